/**
 * A definition's control step (joins, waits) on a real nats-server, message by message: a
 * message handled again, as after a kill between its work and its ack, arms each deadline
 * exactly once and fails nothing.
 */
import assert from "node:assert/strict";
import { Kvm } from "@nats-io/kv";
import { definePipeline, type PipelineDefinition } from "../src/pipeline/definition.ts";
import { advance, compileFlow, entryData, flowEvent } from "../src/pipeline/flow.ts";
import { controlStage, type LoadedPipeline, pipelineTopology } from "../src/pipeline/runtime.ts";
import { createScheduleStore } from "../src/scheduler/store.ts";
import { SCHEDULE_BUCKET } from "../src/subjects.ts";
import { ensureTopology } from "../src/topology.ts";
import type { StageContext } from "../src/stage.ts";
import { startTestNats, type TestNats } from "./helpers/nats.ts";

const obj = { type: "object" } as const;
const task = (next: string | string[]) => ({
  kind: "task" as const,
  output: obj,
  handle: () => ({}),
  next,
});

function loaded(def: PipelineDefinition): LoadedPipeline {
  return { file: "inline", def, flow: compileFlow(def) };
}

const approvals = loaded(definePipeline({
  name: "approvals",
  input: { schema: obj },
  start: "check",
  steps: {
    check: task("approval"),
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
}));

const checks = loaded(definePipeline({
  name: "checks",
  input: { schema: obj },
  start: "split",
  steps: {
    split: task(["fraud", "stock"]),
    fraud: task("both"),
    stock: task("both"),
    both: {
      kind: "join",
      after: ["fraud", "stock"],
      deadlineMs: 60_000,
      onDeadline: "late",
      next: "done",
    },
    done: { kind: "end", outcome: "done" },
    late: { kind: "end", outcome: "late" },
  },
}));

const TRACE = "0af7651916cd43dd8448eb211c80319c";

/** The event of `step` completing for `item`, as its service would publish it. */
function completed(p: LoadedPipeline, step: string, item: string, time: string) {
  const data = advance(entryData({}), step, {}, {});
  return JSON.parse(JSON.stringify(flowEvent(
    p.flow,
    step,
    { id: `${item}-${step}`, item_id: item, trace_id: TRACE },
    data,
    { source: "test", now: new Date(time) },
  )));
}

/** Runs one delivery of `event` (stored at `seq`) through the control step at `now`. */
async function deliver(
  t: TestNats,
  p: LoadedPipeline,
  event: { type: string; item_id: string },
  seq: number,
  now: string,
  deliveryCount = 1,
) {
  const stage = controlStage(p, t.nc);
  const message = {
    subject: `${event.type}.${event.item_id}`,
    seq,
    storedAt: Date.parse(now),
    deliveryCount,
  };
  const input = stage.decode!(event, message) as never;
  const ctx: StageContext = {
    source: "weft-test-flow",
    message,
    now: () => new Date(now),
    signal: new AbortController().signal,
  };
  return await stage.handle(input, ctx);
}

async function timers(t: TestNats) {
  return (await createScheduleStore(await new Kvm(t.nc).open(SCHEDULE_BUCKET)).list());
}

Deno.test("a wait's arming handled again later (a kill before its ack) keeps its one deadline", async () => {
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const event = completed(approvals, "check", "it1", "2026-01-01T00:00:00.000Z");
  assert.deepEqual(await deliver(t, approvals, event, 7, "2026-01-01T00:00:00.010Z"), []);
  // The redelivery comes later, on another clock reading: the same timer, no conflict.
  assert.deepEqual(await deliver(t, approvals, event, 7, "2026-01-01T00:00:31.000Z", 2), []);
  const armed = await timers(t);
  assert.deepEqual(armed.map((s) => [s.id, s.at]), [
    ["approvals-approval-it1-0", "2026-01-01T00:01:00.000Z"],
  ]);
});

Deno.test("a join's deadline is armed even when the kill came between recording its first input and arming", async () => {
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([checks], t.config.retentionMs));
  const fraud = completed(checks, "fraud", "it2", "2026-01-01T00:00:00.000Z");
  assert.deepEqual(await deliver(t, checks, fraud, 4, "2026-01-01T00:00:00.010Z"), []);
  const store = createScheduleStore(await new Kvm(t.nc).open(SCHEDULE_BUCKET));
  // What a kill between the two writes leaves: the input recorded, no timer.
  assert.equal(await store.cancel("checks-both-it2-0"), true);
  assert.deepEqual(await timers(t), []);
  assert.deepEqual(await deliver(t, checks, fraud, 4, "2026-01-01T00:00:20.000Z", 2), []);
  assert.deepEqual((await timers(t)).map((s) => [s.id, s.at]), [
    ["checks-both-it2-0", "2026-01-01T00:01:00.000Z"],
  ]);
  // The join completes with its other input.
  const stock = completed(checks, "stock", "it2", "2026-01-01T00:00:05.000Z");
  const out = await deliver(t, checks, stock, 5, "2026-01-01T00:00:21.000Z");
  assert.deepEqual(out.map((e) => e.type), ["checks.both", "checks.done"]);
  assert.deepEqual(await timers(t), [], "a completed join's deadline is cancelled");
});
