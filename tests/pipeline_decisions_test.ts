/**
 * Decisions for a definition's waits (awaited events), over HTTP and from the bus, on a real
 * nats-server with the gateway app, the control step and the state writer in-process: a
 * decision no step would take is refused, not accepted and lost.
 */
import assert from "node:assert/strict";
import { createApp } from "../src/gateway/app.ts";
import { createIntake } from "../pipelines/feedback/intake.ts";
import { definePipeline } from "../src/pipeline/definition.ts";
import { pipelineSubjects } from "../src/pipeline/derive.ts";
import { advance, compileFlow, entryData, flowEvent } from "../src/pipeline/flow.ts";
import {
  type LoadedPipeline,
  pipelineStateSpec,
  pipelineTopology,
  submitItem,
} from "../src/pipeline/runtime.ts";
import { runStateWriter } from "../src/state_writer.ts";
import { ensureTopology } from "../src/topology.ts";
import { startTestNats } from "./helpers/nats.ts";
import { waitFor } from "./helpers/wait.ts";

const obj = { type: "object" } as const;
const def = definePipeline({
  name: "approvals",
  input: { schema: obj },
  start: "check",
  steps: {
    check: { kind: "task", output: obj, handle: () => ({}), next: "approval" },
    approval: {
      kind: "wait",
      event: "approved",
      timeoutMs: 60_000,
      onTimeout: "expired",
      next: "done",
    },
    done: { kind: "end", outcome: "done" },
    expired: { kind: "end", outcome: "expired" },
  },
});
const approvals: LoadedPipeline = { file: "inline", def, flow: compileFlow(def) };
const TRACE = "0af7651916cd43dd8448eb211c80319c";

Deno.test("a decision for an item that has ended is refused with 409 saying so; one for a running item not yet at its wait is accepted", async () => {
  // Found by a new user: a decision for a done item answered 202 {"duplicate":false}, and
  // the event was stored for nothing.
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const app = createApp({ ...deps, jetStream: await createIntake(t.nc), pipelines: [approvals] });
  const state = await runStateWriter({ ...deps, spec: pipelineStateSpec(approvals) });
  try {
    const opts = { source: "test", traceId: TRACE };
    await submitItem(t.nc, approvals, "approvals-1", {}, opts);
    await submitItem(t.nc, approvals, "approvals-2", {}, opts);
    // approvals-1 ends (its `done` event, as the control step publishes it after a decision).
    const end = flowEvent(
      approvals.flow,
      "done",
      { id: "approvals-1-done", item_id: "approvals-1", trace_id: TRACE },
      advance(entryData({}), "approval", {}, {}),
      { source: "test", now: new Date() },
    );
    await t.nc.request("approvals.done.approvals-1", JSON.stringify(end));
    const get = async (id: string) =>
      await (await app.request(`/pipelines/approvals/items/${id}`)).json();
    await waitFor(async () => (await get("approvals-1")).status === "done", 10_000, "ended");
    await waitFor(async () => (await get("approvals-2")).status === "running", 10_000, "running");

    const decide = (id: string) =>
      app.request(`/pipelines/approvals/items/${id}/approved`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ by: "carol" }),
      });
    const late = await decide("approvals-1");
    const problem = await late.json();
    assert.equal(late.status, 409, JSON.stringify(problem));
    assert.equal(problem.code, "conflict");
    assert.match(problem.detail, /approvals item approvals-1 has ended \(outcome done\)/);
    // Nothing was stored for it.
    const info = await t.jsm.streams.info(pipelineSubjects(def).stream, {
      subjects_filter: "approvals.approved.>",
    });
    assert.equal(info.state.subjects?.["approvals.approved.approvals-1"], undefined);

    // A running item may be decided early: the decision counts once it reaches the wait.
    const early = await decide("approvals-2");
    assert.equal(early.status, 202, await early.clone().text());
    assert.equal((await early.json()).duplicate, false);
  } finally {
    await state.stop();
  }
});
