/**
 * Decisions for a definition's waits (awaited events), over HTTP and from the bus, on a real
 * nats-server with the gateway app, the control step and the state writer in-process: a
 * decision no step would take is refused, not accepted and lost.
 */
import assert from "node:assert/strict";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { createApp } from "../src/gateway/app.ts";
import { createIntake } from "../pipelines/feedback/intake.ts";
import { pipelineSubjects } from "../src/pipeline/derive.ts";
import { advance, entryData, entryEvent, flowEvent } from "../src/pipeline/flow.ts";
import { servePipelineRequests } from "../src/gateway/pipelines.ts";
import {
  controlBucketOf,
  controlStage,
  pipelineStateSpec,
  pipelineTopology,
  submitItem,
  workStage,
} from "../src/pipeline/runtime.ts";
import { listDeadLetters, redrive } from "../src/redrive.ts";
import { HANDOVER_HEADER } from "../src/subjects.ts";
import { headers } from "@nats-io/nats-core";
import { depthWithin, MAX_DEPTH, runStage } from "../src/runner.ts";
import { readState, runStateWriter } from "../src/state_writer.ts";
import type { ItemState } from "../src/pipeline/fold.ts";
import { ensureTopology } from "../src/topology.ts";
import { PATIENT, startTestNats } from "./helpers/nats.ts";
import { waitFor } from "./helpers/wait.ts";
import { approvalsPipeline, failItem } from "./helpers/pipeline.ts";

const approvals = approvalsPipeline();
const def = approvals.def;
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
    // approvals-1 ends: its check's event, its wait's (as the control step publishes it after
    // a decision) and its `done` event.
    const checked = advance(entryData({}), "check", {}, {});
    const decided = advance(checked, "approval", {}, {});
    for (const [type, data] of [["check", checked], ["approval", decided], ["done", decided]]) {
      const e = flowEvent(
        approvals.flow,
        type as string,
        { id: `approvals-1-${type}`, item_id: "approvals-1", trace_id: TRACE },
        data as typeof decided,
        { source: "test", now: new Date() },
      );
      await t.nc.request(`approvals.${type}.approvals-1`, JSON.stringify(e));
    }
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

Deno.test("a decision from the bus that is not JSON is one dead letter, the control step's: the state writer skips it", async () => {
  // Found by a new user: `nats pub approvals.approved.<id> 'not json'` left two letters for
  // the one message (<name>-control and <name>-state, both invalid_event), so a "redrive
  // all" sent it twice.
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const spec = pipelineStateSpec(approvals);
  const runners = [
    await runStage({ ...deps, stage: controlStage(approvals, t.nc) }),
    await runStateWriter({ ...deps, spec }),
  ];
  try {
    await submitItem(t.nc, approvals, "approvals-3", {}, { source: "test", traceId: TRACE });
    const js = jetstream(t.nc);
    const ack = await js.publish("approvals.approved.approvals-3", "not json");
    // The state writer has handled everything up to it (skipped, or dead-lettered as before).
    await waitFor(
      async () => {
        const c = await t.jsm.consumers.info(spec.stream, spec.durable);
        return c.num_pending === 0 && c.num_ack_pending === 0 && c.ack_floor.stream_seq >= ack.seq;
      },
      10_000,
      "the state writer past the message",
    );
    const letters = await waitFor(
      async () => {
        const all = (await listDeadLetters(js, { item_id: "approvals-3" }))
          .filter((l) => l.letter.stream_seq === ack.seq);
        return all.some((l) => l.letter.stage === "approvals-control") ? all : undefined;
      },
      10_000,
      "the control step's letter",
    );
    assert.deepEqual(
      letters.map((l) => [l.letter.stage, l.letter.code]),
      [["approvals-control", "invalid_event"]],
      "one letter for the message",
    );
    assert.match(letters[0]!.letter.reason, /JSON/i);
    assert.ok(
      t.lines.some((l) => /"level":"debug"/.test(l) && /another consumer dead-letters/.test(l)),
      "the state writer says it skipped it (debug)",
    );
    // A bad decision fails no item.
    const kv = await new Kvm(t.nc).open(spec.bucket);
    assert.equal((await readState<ItemState>(kv, "approvals-3"))?.state.status, "running");
  } finally {
    for (const r of runners) await r.stop();
  }
});

Deno.test("a decision from the bus with a hand-over header is one dead letter, the item waiting still; its redrive is taken", async () => {
  // Found by probing: `nats pub approvals.approved.<id> '{}' -H 'Weft-Handover-To:approval'`
  // was acked unread by the control step (a hand-over's copy that named no step of it) and
  // lost, with no letter; the item waited on.
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const spec = pipelineStateSpec(approvals);
  const runners = [
    await runStage({ ...deps, stage: workStage(approvals, "check", { nc: t.nc }) }),
    await runStage({ ...deps, stage: controlStage(approvals, t.nc) }),
    await runStateWriter({ ...deps, spec }),
  ];
  try {
    const kv = await new Kvm(t.nc).open(spec.bucket);
    const status = async () => (await readState<ItemState>(kv, "approvals-4"))?.state.status;
    await submitItem(t.nc, approvals, "approvals-4", {}, { source: "test", traceId: TRACE });
    await waitFor(async () => (await status()) === "waiting", 10_000, "approvals-4 waiting");
    const js = jetstream(t.nc);
    const h = headers();
    h.set(HANDOVER_HEADER, "approval");
    const ack = await js.publish("approvals.approved.approvals-4", '{"by":"carol"}', {
      headers: h,
    });
    const letters = await waitFor(
      async () => {
        const all = (await listDeadLetters(js, { item_id: "approvals-4" }))
          .filter((l) => l.letter.stream_seq === ack.seq);
        return all.length > 0 && all;
      },
      10_000,
      "a letter for the decision",
    );
    assert.deepEqual(
      letters.map((l) => [l.letter.stage, l.letter.code]),
      [["approvals-control", "invalid_awaited_event"]],
    );
    assert.match(letters[0]!.letter.reason, /Weft-Handover-To/);
    assert.equal(await status(), "waiting", "a bad decision fails no item");
    const { redriven } = await redrive(js, { ids: [letters[0]!.seq] });
    assert.equal(redriven.length, 1);
    await waitFor(async () => (await status()) === "done", 10_000, "approvals-4 done");
    const state = (await readState<ItemState>(kv, "approvals-4"))!.state;
    assert.equal(state.outcome, "done");
    assert.deepEqual(state.results.approval, { by: "carol" });
  } finally {
    for (const r of runners) await r.stop();
  }
});

Deno.test("an awaited event for an item never submitted makes no item: GET, weft.<name>.get, its SSE stream and a claim answer 404, and the control step dead-letters it not_found, once", async () => {
  // Found by a probe: `nats pub support.human_replied.PHANTOM2 '{"answer":"hi"}'` (no such
  // item) made a state {"status":"running","current":[],"results":{}} that GET and
  // `nats req weft.support.get` showed, whose SSE stream never closed, and that a claim
  // answered 409 "not waiting (running)"; no dead letter said why.
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const spec = pipelineStateSpec(approvals);
  const app = createApp({ ...deps, jetStream: await createIntake(t.nc), pipelines: [approvals] });
  const requests = servePipelineRequests(t.nc, [approvals], t.log);
  const control = controlStage(approvals, t.nc);
  const runners = [
    await runStage({ ...deps, stage: control }),
    await runStateWriter({ ...deps, spec }),
  ];
  try {
    const js = jetstream(t.nc);
    const ack = await js.publish("approvals.approved.PHANTOM", JSON.stringify({ by: "carol" }));
    // A real item after it: the state writer's state of it shows it has folded past the stray.
    await submitItem(t.nc, approvals, "approvals-4", {}, { source: "test", traceId: TRACE });
    const kv = await new Kvm(t.nc).open(spec.bucket);
    await waitFor(
      async () => (await readState<ItemState>(kv, "approvals-4"))?.state.status === "running",
      10_000,
      "the real item's state",
    );
    const letters = await waitFor(
      async () => {
        const all = (await listDeadLetters(js)).filter((l) => l.letter.stream_seq === ack.seq);
        return all.length > 0 ? all : undefined;
      },
      10_000,
      "the control step's letter",
    );
    assert.deepEqual(
      letters.map((l) => [l.letter.stage, l.letter.code, l.letter.item_id, l.letter.attempts]),
      [["approvals-control", "not_found", "PHANTOM", 1]],
      "one letter, at the first attempt",
    );
    assert.match(letters[0]!.letter.reason, /no approvals item "PHANTOM"/);
    // Terminated, not redelivered.
    await waitFor(
      async () => {
        const c = await t.jsm.consumers.info(spec.stream, control.name);
        return c.num_pending === 0 && c.num_ack_pending === 0 && c.num_redelivered === 0;
      },
      10_000,
      "the control consumer past it",
    );
    // No state, no held record, no failure event.
    assert.equal(await readState<ItemState>(kv, "PHANTOM"), null);
    const held = await new Kvm(t.nc).open(controlBucketOf("approvals"));
    assert.equal(await held.get("approval.PHANTOM"), null);
    const info = await t.jsm.streams.info(spec.stream, { subjects_filter: "approvals.*.PHANTOM" });
    assert.deepEqual(Object.keys(info.state.subjects ?? {}), ["approvals.approved.PHANTOM"]);

    const get = await app.request("/pipelines/approvals/items/PHANTOM");
    assert.equal(get.status, 404, await get.clone().text());
    assert.equal((await get.json()).code, "not_found");
    const sse = await app.request("/pipelines/approvals/items/PHANTOM/events");
    assert.equal(sse.status, 404);
    await sse.body?.cancel();
    const claim = await app.request("/pipelines/approvals/claims/PHANTOM", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ by: "carol" }),
    });
    assert.equal(claim.status, 404, await claim.clone().text());
    const decide = await app.request("/pipelines/approvals/items/PHANTOM/approved", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ by: "carol" }),
    });
    assert.equal(decide.status, 404, await decide.clone().text());
    const reply = await t.nc.request("weft.approvals.get", "PHANTOM", PATIENT);
    assert.equal(reply.json<{ error?: { status: number } }>().error?.status, 404);
  } finally {
    requests.stop();
    for (const r of runners) await r.stop();
  }
});

Deno.test("a decision over HTTP nesting deeper than the bus takes is refused with 422 invalid_awaited_event, nothing stored; one at the limit is accepted", async () => {
  // Found by a probe: POST .../items/<id>/<event> with {"answer":"x","zz":[[[...70 levels]]]}
  // answered 202; the control step then dead-lettered it (`body nests deeper than 64
  // levels`) and the item kept waiting. Submissions already got 422 for depth.
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const app = createApp({
    nc: t.nc,
    config: t.config,
    log: t.log,
    jetStream: await createIntake(t.nc),
    pipelines: [approvals],
  });
  await submitItem(t.nc, approvals, "approvals-5", {}, { source: "test", traceId: TRACE });
  // `levels` levels of objects and arrays in all, the body itself the first.
  const nested = (levels: number) => {
    let zz: unknown = [];
    for (let i = 2; i < levels; i++) zz = [zz];
    return { by: "carol", zz };
  };
  assert.ok(depthWithin(nested(MAX_DEPTH), MAX_DEPTH));
  assert.ok(!depthWithin(nested(MAX_DEPTH + 1), MAX_DEPTH));
  const decide = (body: unknown) =>
    app.request("/pipelines/approvals/items/approvals-5/approved", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
  const deep = await decide(nested(70));
  const problem = await deep.json();
  assert.equal(deep.status, 422, JSON.stringify(problem));
  assert.equal(deep.headers.get("content-type"), "application/problem+json");
  assert.equal(problem.code, "invalid_awaited_event");
  assert.equal(problem.field, "/");
  assert.match(problem.detail, /nests deeper than 64 levels/);
  const past = await decide(nested(MAX_DEPTH + 1));
  assert.equal(past.status, 422, await past.clone().text());
  await past.body?.cancel();
  const info = await t.jsm.streams.info(pipelineSubjects(def).stream, {
    subjects_filter: "approvals.approved.>",
  });
  assert.equal(info.state.subjects?.["approvals.approved.approvals-5"], undefined, "none stored");
  const fits = await decide(nested(MAX_DEPTH));
  assert.equal(fits.status, 202, await fits.clone().text());
  await fits.body?.cancel();
});

Deno.test("an event whose subject names a wildcard for its item (`approvals.approved.*`) is dead-lettered at once as an invalid item id by each consumer that reads it, matched against no other item", async () => {
  // Found by a probe: `nats pub 'support.human_replied.*' '{"answer":"x"}'` was dead-lettered by
  // the control step as `conflict` "support item * has failed" (the `*` matched another item's
  // failure in a last-by-subject lookup), and the state writer retried it 5 times ("invalid
  // key: *") before a handler_failed letter; `tickets.approved.*` was retried as handler_failed
  // ("invalid key: approval.*").
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const spec = pipelineStateSpec(approvals);
  const runners = [
    await runStage({ ...deps, stage: controlStage(approvals, t.nc) }),
    await runStage({ ...deps, stage: workStage(approvals, "check", { nc: t.nc }) }),
    await runStateWriter({ ...deps, spec }),
  ];
  try {
    const js = jetstream(t.nc);
    // Another item has failed: a wildcard looked up as an item id would find its failure.
    await submitItem(t.nc, approvals, "approvals-7", {}, { source: "test", traceId: TRACE });
    // As a step giving up on its entry fails it: the failure and its dead letter (a failure
    // counts only with its letter, src/failure_letter.ts).
    const failedAt = await failItem(
      t,
      approvals,
      "approvals-7",
      `approvals.${entryEvent(approvals.def)}.approvals-7`,
    );
    const kv = await new Kvm(t.nc).open(spec.bucket);
    await waitFor(
      async () => (await readState<ItemState>(kv, "approvals-7"))?.state.status === "failed",
      10_000,
      "the other item failed",
    );
    // A decision on a wildcard, and a step's event on one (its body names a real item).
    const decision = await js.publish("approvals.approved.*", JSON.stringify({ by: "carol" }));
    const checked = flowEvent(
      approvals.flow,
      "check",
      { id: "forged-check", item_id: "approvals-7", trace_id: TRACE },
      advance(entryData({}), "check", {}, {}),
      { source: "test", now: new Date() },
    );
    const step = await js.publish("approvals.check.*", JSON.stringify(checked));
    // An entry event on one: the work step `check` reads it too.
    const entry = flowEvent(
      approvals.flow,
      "submitted",
      { id: "forged-entry", item_id: "approvals-7", trace_id: TRACE },
      entryData({}),
      { source: "test", now: new Date() },
    );
    const submitted = await js.publish("approvals.submitted.*", JSON.stringify(entry));
    const lettersOf = async (seq: number, n: number) =>
      await waitFor(
        async () => {
          const all = (await listDeadLetters(js)).filter((l) => l.letter.stream_seq === seq);
          return all.length >= n ? all : undefined;
        },
        10_000,
        `${n} letters of sequence ${seq}`,
      );
    // The state writer skips the decision (the control step letters it), and letters the
    // step's event itself, as it does any event it cannot fold.
    const byDecision = await lettersOf(decision.seq, 1);
    const byStep = await lettersOf(step.seq, 2);
    const byEntry = await lettersOf(submitted.seq, 3);
    // Everything read: nothing is retried.
    for (const durable of [spec.durable, "approvals-control", "approvals-check"]) {
      await waitFor(
        async () => {
          const c = await t.jsm.consumers.info(spec.stream, durable);
          return c.num_pending === 0 && c.num_ack_pending === 0 && c.num_redelivered === 0;
        },
        10_000,
        `${durable} past them, none redelivered`,
      );
    }
    const all = [...byDecision, ...byStep, ...byEntry];
    assert.deepEqual(
      all.map((l) => [l.letter.subject, l.letter.stage]).sort(),
      [
        ["approvals.approved.*", "approvals-control"],
        ["approvals.check.*", "approvals-control"],
        ["approvals.check.*", "approvals-state"],
        ["approvals.submitted.*", "approvals-check"],
        ["approvals.submitted.*", "approvals-control"],
        ["approvals.submitted.*", "approvals-state"],
      ],
    );
    for (const { subject, letter } of all) {
      assert.equal(letter.code, "invalid_event", JSON.stringify(letter));
      assert.match(letter.reason, /invalid item id "\*" in subject approvals\.\w+\.\*/);
      assert.equal(letter.attempts, 1);
      assert.equal(letter.item_id, undefined);
      assert.equal(subject, `deadletter.${letter.stage}.unknown`);
    }
    // No item was changed or failed: no failure event on a wildcard, approvals-7 as it was.
    const info = await t.jsm.streams.info(spec.stream, { subjects_filter: "approvals.failed.>" });
    assert.deepEqual(Object.keys(info.state.subjects ?? {}), ["approvals.failed.approvals-7"]);
    assert.equal((await readState<ItemState>(kv, "approvals-7"))?.state.failed_seq, failedAt);
  } finally {
    for (const r of runners) await r.stop();
  }
});

Deno.test("a decision on `approvals.approved.>` makes no item: a server that delivers it to the `approvals.*.*` consumers has it dead-lettered as an invalid item id, once; one that does not (2.9) leaves it unread", async () => {
  // Found by a probe: `nats pub 'support.human_replied.>' ...` was stored and nothing said
  // what became of it. nats-server 2.15 delivers it to a consumer filtered on `<name>.*.*`,
  // 2.9 does not.
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const spec = pipelineStateSpec(approvals);
  const runners = [
    await runStage({ ...deps, stage: controlStage(approvals, t.nc) }),
    await runStateWriter({ ...deps, spec }),
  ];
  try {
    const js = jetstream(t.nc);
    const ack = await js.publish("approvals.approved.>", JSON.stringify({ by: "carol" }));
    assert.equal(ack.seq, 1, "the stream's only message");
    // Each consumer past it: delivered (and acked or terminated), or never delivered.
    const delivered = new Map<string, number>();
    for (const durable of ["approvals-control", spec.durable]) {
      await waitFor(
        async () => {
          const c = await t.jsm.consumers.info(spec.stream, durable);
          delivered.set(durable, c.delivered.consumer_seq);
          return c.num_pending === 0 && c.num_ack_pending === 0 && c.num_redelivered === 0;
        },
        10_000,
        `${durable} past it`,
      );
    }
    const control = delivered.get("approvals-control")!;
    assert.equal(delivered.get(spec.durable), control, "both consumers alike");
    const letters = control === 0 ? [] : await waitFor(
      async () => {
        const all = await listDeadLetters(js);
        return all.length > 0 ? all : undefined;
      },
      10_000,
      "the control step's letter",
    );
    assert.deepEqual(
      letters.map((l) => [l.subject, l.letter.code, l.letter.attempts]),
      control === 0 ? [] : [["deadletter.approvals-control.unknown", "invalid_event", 1]],
      `server ${t.nc.info?.version}`,
    );
    if (control > 0) assert.match(letters[0]!.letter.reason, /invalid item id ">"/);
    const kv = await new Kvm(t.nc).open(spec.bucket);
    const keys: string[] = [];
    for await (const k of await kv.keys()) keys.push(k);
    assert.deepEqual(keys, [], "no state");
  } finally {
    for (const r of runners) await r.stop();
  }
});
