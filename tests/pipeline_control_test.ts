/**
 * A definition's control step (joins, waits) on a real nats-server, message by message: a
 * message handled again, as after a kill between its work and its ack, arms each deadline
 * exactly once and fails nothing.
 */
import assert from "node:assert/strict";
import { Kvm } from "@nats-io/kv";
import { jetstream } from "@nats-io/jetstream";
import { definePipeline, type PipelineDefinition } from "../src/pipeline/definition.ts";
import { advance, compileFlow, entryData, type FlowData, flowEvent } from "../src/pipeline/flow.ts";
import {
  controlBucketOf,
  controlStage,
  type LoadedPipeline,
  pipelineStateSpec,
  pipelineTopology,
  readItem,
  stateBucketOf,
  submitItem,
  workStage,
} from "../src/pipeline/runtime.ts";
import { runStage } from "../src/runner.ts";
import { listDeadLetters } from "../src/redrive.ts";
import { runStateWriter } from "../src/state_writer.ts";
import { waitFor } from "./helpers/wait.ts";
import { createScheduleStore } from "../src/scheduler/store.ts";
import { runScheduler } from "../src/scheduler/scheduler.ts";
import { SCHEDULE_BUCKET } from "../src/subjects.ts";
import { ensureTopology } from "../src/topology.ts";
import type { StageContext } from "../src/stage.ts";
import { startTestNats, type TestNats } from "./helpers/nats.ts";
import { failItem } from "./helpers/pipeline.ts";

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

const later = loaded(definePipeline({
  name: "later",
  input: { schema: obj },
  start: "check",
  steps: {
    check: task("pause"),
    pause: { kind: "delay", ms: 60_000, next: "done" },
    done: { kind: "end", outcome: "done" },
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
    ["approvals.approval-it1-0", "2026-01-01T00:01:00.000Z"],
  ]);
});

/**
 * Arms `p`'s timer for `item` (its `check` step completing at 00:00), checks that a copy of
 * it claiming `forgedDue` and handled at `handledAt`, before the armed time, is refused with
 * `refusal`, then fires the real one at its time and returns what that published.
 */
async function earlyTimerRefused(
  p: LoadedPipeline,
  item: string,
  forgedDue: string,
  handledAt: string,
  refusal: RegExp,
) {
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const event = completed(p, "check", item, "2026-01-01T00:00:00.000Z");
  assert.deepEqual(await deliver(t, p, event, 7, "2026-01-01T00:00:00.010Z"), []);
  const [armed] = await timers(t);
  assert.equal(armed!.at, "2026-01-01T00:01:00.000Z");
  const forged = structuredClone(armed!.payload) as { data: { due: string } };
  forged.data.due = forgedDue;
  await assert.rejects(
    deliver(t, p, forged as never, 8, handledAt),
    (err: Error & { code?: string }) =>
      err.code === "invalid_awaited_event" && refusal.test(err.message),
  );
  return await deliver(t, p, armed!.payload as never, 9, armed!.at!);
}

Deno.test("a timer that comes before its wait's deadline (forged, or published early) decides nothing and fails nothing", async () => {
  // A copy of the armed timer claiming a deadline already past, handled 10 s after arming,
  // 50 s before the wait's real deadline: refused, not a timeout. The real one, at its time,
  // times the wait out.
  const fired = await earlyTimerRefused(
    approvals,
    "it9",
    "2026-01-01T00:00:05.000Z",
    "2026-01-01T00:00:10.000Z",
    /before its deadline 2026-01-01T00:01:00/,
  );
  assert.deepEqual(fired.map((e) => e.type), ["approvals.approval_timed_out", "approvals.expired"]);
});

Deno.test("a delay's timer that comes before its time decides nothing; at its time it goes on", async () => {
  const fired = await earlyTimerRefused(
    later,
    "it8",
    "2026-01-01T00:00:01.000Z",
    "2026-01-01T00:00:02.000Z",
    /before its time 2026-01-01T00:01:00/,
  );
  assert.deepEqual(fired.map((e) => e.type), ["later.pause", "later.done"]);
});

Deno.test("a delay's timer resumes the item only as the control step held it: never one it did not arm, nor other data", async () => {
  // Found adversarially: a timer published for an item with no delay armed (or carrying
  // another input) ran the steps after the delay on whatever it carried.
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([later], t.config.retentionMs));
  const event = completed(later, "check", "it6", "2026-01-01T00:00:00.000Z");
  assert.deepEqual(await deliver(t, later, event, 7, "2026-01-01T00:00:00.010Z"), []);
  const [armed] = await timers(t);
  const real = armed!.payload as { item_id: string; data: { carry: { input: unknown } } };
  const refused = (err: Error & { code?: string }, why: RegExp) =>
    err.code === "invalid_awaited_event" && why.test(err.message);
  // Another item's timer, never armed.
  const stray = structuredClone(real);
  stray.item_id = "it5";
  await assert.rejects(
    deliver(t, later, stray as never, 8, armed!.at!),
    (err: Error & { code?: string }) => refused(err, /never armed/),
  );
  // This item's timer at its time, carrying another input.
  const forged = structuredClone(real);
  forged.data.carry.input = { text: "FORGED" };
  await assert.rejects(
    deliver(t, later, forged as never, 9, armed!.at!),
    (err: Error & { code?: string }) => refused(err, /other data/),
  );
  const fired = await deliver(t, later, real as never, 10, armed!.at!);
  assert.deepEqual(fired.map((e) => e.type), ["later.pause", "later.done"]);
});

Deno.test("a join's deadline is armed even when the kill came between recording its first input and arming", async () => {
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([checks], t.config.retentionMs));
  const fraud = completed(checks, "fraud", "it2", "2026-01-01T00:00:00.000Z");
  assert.deepEqual(await deliver(t, checks, fraud, 4, "2026-01-01T00:00:00.010Z"), []);
  const store = createScheduleStore(await new Kvm(t.nc).open(SCHEDULE_BUCKET));
  // What a kill between the two writes leaves: the input recorded, no timer.
  assert.equal(await store.cancel("checks.both-it2-0"), true);
  assert.deepEqual(await timers(t), []);
  assert.deepEqual(await deliver(t, checks, fraud, 4, "2026-01-01T00:00:20.000Z", 2), []);
  assert.deepEqual((await timers(t)).map((s) => [s.id, s.at]), [
    ["checks.both-it2-0", "2026-01-01T00:01:00.000Z"],
  ]);
  // The join completes with its other input.
  const stock = completed(checks, "stock", "it2", "2026-01-01T00:00:05.000Z");
  const out = await deliver(t, checks, stock, 5, "2026-01-01T00:00:21.000Z");
  assert.deepEqual(out.map((e) => e.type), ["checks.both", "checks.done"]);
  assert.deepEqual(await timers(t), [], "a completed join's deadline is cancelled");
});

Deno.test("a failed item's join decides nothing when its deadline passes, until a redrive resumes the item", async () => {
  // Found adversarially: one branch of a fan-out failed (the item `failed`), then the join's
  // deadline took the other branch to the `late` outcome, a second end event for the item.
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([checks], t.config.retentionMs));
  const js = jetstream(t.nc);
  const split = completed(checks, "split", "it3", "2026-01-01T00:00:00.000Z");
  await js.publish("checks.split.it3", JSON.stringify(split));
  const fraud = completed(checks, "fraud", "it3", "2026-01-01T00:00:01.000Z");
  assert.deepEqual(await deliver(t, checks, fraud, 4, "2026-01-01T00:00:01.010Z"), []);
  // The stock branch gave up on the split event: the item failed.
  await failItem(t, checks, "it3", "checks.split.it3", split.id);
  const [deadline] = await timers(t);
  const fired = await deliver(
    t,
    checks,
    deadline!.payload as never,
    10,
    "2026-01-01T00:01:01.000Z",
  );
  assert.deepEqual(fired.map((e) => e.type), [], "no `late` end after the failure");
  // (Fired here by hand, so the scheduler has not marked the first one done.)
  const postponed = (await timers(t)).filter((s) => s.id !== deadline!.id);
  assert.equal(postponed.length, 1, JSON.stringify(await timers(t)));
  assert.equal(postponed[0]!.at, "2026-01-01T00:02:01.000Z", "checked again a deadline later");

  // Still failed at the next firing: postponed again, nothing decided.
  const again = await deliver(t, checks, postponed[0]!.payload as never, 11, postponed[0]!.at!);
  assert.deepEqual(again, []);

  // A redrive stores the split event again: the item resumes, and the join decides.
  await js.publish("checks.split.it3", JSON.stringify(split));
  const seen = new Set([deadline!.id, postponed[0]!.id]);
  const next = (await timers(t)).filter((s) => !seen.has(s.id));
  assert.equal(next.length, 1);
  assert.equal(next[0]!.at, "2026-01-01T00:04:01.000Z", "each time twice as long");
  const decided = await deliver(t, checks, next[0]!.payload as never, 12, next[0]!.at!);
  assert.deepEqual(decided.map((e) => e.type), ["checks.both_timed_out", "checks.late"]);
});

Deno.test("a decision for a failed item is refused (dead-lettered, redrivable), not taken to an outcome", async () => {
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const check = completed(approvals, "check", "it4", "2026-01-01T00:00:00.000Z");
  await deliver(t, approvals, check, 3, "2026-01-01T00:00:00.010Z");
  await failItem(t, approvals, "it4", "approvals.other.it4");
  const decision = { type: "approvals.approved", item_id: "it4", approve: true };
  await assert.rejects(
    deliver(t, approvals, decision, 9, "2026-01-01T00:00:40.000Z"),
    (err: Error & { code?: string; permanent?: boolean }) =>
      err.code === "conflict" && /has failed/.test(err.message),
  );
});

Deno.test("a failed item's join holds its last input, and completes (not times out) once the item is resumed", async () => {
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([checks], t.config.retentionMs));
  const split = completed(checks, "split", "it5", "2026-01-01T00:00:00.000Z");
  await jetstream(t.nc).publish("checks.split.it5", JSON.stringify(split));
  const fraud = completed(checks, "fraud", "it5", "2026-01-01T00:00:01.000Z");
  assert.deepEqual(await deliver(t, checks, fraud, 4, "2026-01-01T00:00:01.010Z"), []);
  await failItem(t, checks, "it5", "checks.split.it5");
  const stock = completed(checks, "stock", "it5", "2026-01-01T00:00:02.000Z");
  assert.deepEqual(
    await deliver(t, checks, stock, 6, "2026-01-01T00:00:31.000Z"),
    [],
    "held: the item has failed",
  );
  await jetstream(t.nc).publish("checks.split.it5", JSON.stringify(split)); // the redrive
  const [deadline] = await timers(t);
  const out = await deliver(t, checks, deadline!.payload as never, 12, "2026-01-01T00:01:01.000Z");
  assert.deepEqual(out.map((e) => e.type), ["checks.both", "checks.done"]);
});

Deno.test("an item that failed on a timer stays failed when another of its timers fires, until that timer is redriven", async () => {
  // Seen in review: "resumed" was any message stored on the subject the item failed on after
  // the failure. Every timer of an item shares one subject (`<name>._timer.<item>`), so the
  // next timer of an item that failed on one (its wait's, or a postponement) took the item
  // for resumed and decided: an outcome after the failure.
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const js = jetstream(t.nc);
  const check = completed(approvals, "check", "it7", "2026-01-01T00:00:00.000Z");
  assert.deepEqual(await deliver(t, approvals, check, 3, "2026-01-01T00:00:00.010Z"), []);
  const [deadline] = await timers(t);
  // A timer of the item that the control step gave up on (here one it never armed).
  const bad = structuredClone(deadline!.payload) as { id: string; data: { step: string } };
  bad.id = "bad-timer";
  await js.publish("approvals._timer.it7", JSON.stringify(bad));
  await failItem(t, approvals, "it7", "approvals._timer.it7", "bad-timer");
  // The wait's own timer fires: the scheduler stores it on the same subject.
  const fired = await js.publish("approvals._timer.it7", JSON.stringify(deadline!.payload));
  assert.deepEqual(
    await deliver(t, approvals, deadline!.payload as never, fired.seq, deadline!.at!),
    [],
    "no `expired` end after the failure",
  );
  const postponed = (await timers(t)).filter((s) => s.id !== deadline!.id);
  assert.equal(postponed.length, 1, "checked again later");

  // The failed timer redriven (the same event stored again): the item is resumed, and the
  // wait's next firing decides.
  await js.publish("approvals._timer.it7", JSON.stringify(bad));
  const next = postponed[0]!;
  const stored = await js.publish("approvals._timer.it7", JSON.stringify(next.payload));
  const decided = await deliver(t, approvals, next.payload as never, stored.seq, next.at!);
  assert.deepEqual(decided.map((e) => e.type), [
    "approvals.approval_timed_out",
    "approvals.expired",
  ]);
});

Deno.test("a decision that came before its wait is not taken when the item has failed meanwhile; the wait's firing after a redrive takes it", async () => {
  // Found in review: a decision may come before the item reaches its wait (it counts when the
  // item gets there). When another branch failed the item in between, the arrival at the wait
  // took that decision at once and ran the item on to `done`: an outcome after its failure.
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const js = jetstream(t.nc);
  // Submitted first (stream sequence 1): a decision counts only for an item submitted before it.
  await submitItem(t.nc, approvals, "it8", {}, {
    source: "test",
    traceId: "0af7651916cd43dd8448eb211c80319c",
  });
  const decision = { type: "approvals.approved", item_id: "it8", approve: true };
  assert.deepEqual(await deliver(t, approvals, decision, 2, "2026-01-01T00:00:00.000Z"), []);
  await failItem(t, approvals, "it8", "approvals.other.it8", "other-it8");
  const check = completed(approvals, "check", "it8", "2026-01-01T00:00:01.000Z");
  assert.deepEqual(
    await deliver(t, approvals, check, 5, "2026-01-01T00:00:31.000Z"),
    [],
    "held: the item has failed",
  );
  const [deadline] = await timers(t);
  assert.ok(deadline, "the wait is armed");
  const fired = await js.publish("approvals._timer.it8", JSON.stringify(deadline!.payload));
  assert.deepEqual(
    await deliver(t, approvals, deadline!.payload as never, fired.seq, deadline!.at!),
    [],
    "no outcome while failed",
  );
  const [postponed] = (await timers(t)).filter((s) => s.id !== deadline!.id);
  assert.ok(postponed, "checked again later");
  // The redrive stores the event the item failed on again: the item is resumed, and the
  // wait's next firing takes the decision that came first (not its timeout).
  await js.publish("approvals.other.it8", JSON.stringify({ id: "other-it8" }));
  const stored = await js.publish("approvals._timer.it8", JSON.stringify(postponed!.payload));
  const decided = await deliver(
    t,
    approvals,
    postponed!.payload as never,
    stored.seq,
    postponed!.at!,
  );
  assert.deepEqual(decided.map((e) => e.type), ["approvals.approval", "approvals.done"]);
});

Deno.test("a branch a redrive runs after its join's deadline passed while the item was failed completes the join (not its deadline's outcome)", async () => {
  // Found by a new user's probe: a fan-out's llm branch failed the item (its join's other
  // input in), the join's deadline passed while the item was failed (its timer put off), and
  // the branch's letter was redriven: the branch ran and stored its completion, after the
  // deadline, so the join took it for a late input and the next firing ended the item at
  // `late` with both branches' results in its state (unless a hand-over's copy, a race,
  // got there first: then `done`).
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([checks], t.config.retentionMs));
  const js = jetstream(t.nc);
  const split = completed(checks, "split", "it20", "2026-01-01T00:00:00.000Z");
  await js.publish("checks.split.it20", JSON.stringify(split));
  const fraud = completed(checks, "fraud", "it20", "2026-01-01T00:00:01.000Z");
  assert.deepEqual(await deliver(t, checks, fraud, 2, "2026-01-01T00:00:01.010Z"), []);
  await failItem(t, checks, "it20", "checks.split.it20", split.id); // stock gave up on split
  const [deadline] = await timers(t);
  const fired = await js.publish("checks._timer.it20", JSON.stringify(deadline!.payload));
  assert.deepEqual(
    await deliver(t, checks, deadline!.payload as never, fired.seq, "2026-01-01T00:01:01.000Z"),
    [],
    "put off: the item has failed",
  );
  // The redrive stores split again: the item resumes, and stock runs and completes after
  // the deadline.
  await js.publish("checks.split.it20", JSON.stringify(split));
  const stock = completed(checks, "stock", "it20", "2026-01-01T00:01:30.000Z");
  const stored = await js.publish("checks.stock.it20", JSON.stringify(stock));
  const out = await deliver(t, checks, stock, stored.seq, "2026-01-01T00:01:30.010Z");
  assert.deepEqual(out.map((e) => e.type), ["checks.both", "checks.done"]);
});

Deno.test("a decision sent again after a redrive resumed an item whose wait's deadline passed while it was failed is taken (not its timeout)", async () => {
  // docs/PIPELINES.md: a decision refused while the item has failed "can be sent or redriven
  // again" once a redrive resumed it. Sent after the deadline (which passed while the item was
  // failed, its timer put off), it was taken for one stored after the deadline's timer and
  // changed nothing: the next firing timed the item out.
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const js = jetstream(t.nc);
  await submitItem(t.nc, approvals, "it21", {}, { source: "test", traceId: TRACE });
  const check = completed(approvals, "check", "it21", "2026-01-01T00:00:01.000Z");
  assert.deepEqual(await deliver(t, approvals, check, 2, "2026-01-01T00:00:01.010Z"), []);
  await failItem(t, approvals, "it21", "approvals.other.it21", "other-it21");
  const [deadline] = await timers(t);
  const fired = await js.publish("approvals._timer.it21", JSON.stringify(deadline!.payload));
  assert.deepEqual(
    await deliver(t, approvals, deadline!.payload as never, fired.seq, "2026-01-01T00:01:01.000Z"),
    [],
    "put off: the item has failed",
  );
  const [postponed] = (await timers(t)).filter((s) => s.id !== deadline!.id);
  await js.publish("approvals.other.it21", JSON.stringify({ id: "other-it21" })); // the redrive
  // The decision, sent again now that the item runs: stored after the deadline and its timer.
  const payload = { approve: true };
  const sent = await js.publish("approvals.approved.it21", JSON.stringify(payload));
  const decision = { type: "approvals.approved", item_id: "it21", ...payload };
  const taken = await deliver(t, approvals, decision, sent.seq, "2026-01-01T00:01:40.000Z");
  assert.deepEqual(taken.map((e) => e.type), ["approvals.approval", "approvals.done"]);
  // Its put-off timer, firing later, changes nothing.
  const later = await js.publish("approvals._timer.it21", JSON.stringify(postponed!.payload));
  assert.deepEqual(
    await deliver(t, approvals, postponed!.payload as never, later.seq, postponed!.at!),
    [],
  );
});

Deno.test("a branch reaching an end while another branch's failure holds the item is kept as a dead letter, not stored as an outcome after the failure", async () => {
  // Seen in review: in a fan-out with no join, one branch failed (the item `failed`) and the
  // other then reached its end: a failure and an outcome stored for one item, and the live
  // state and a rebuild could disagree on which came first.
  const forks = loaded(definePipeline({
    name: "forks",
    input: { schema: obj },
    start: "split",
    steps: {
      split: task(["a", "b"]),
      a: task("x"),
      b: task("y"),
      x: { kind: "end", outcome: "x" },
      y: { kind: "end", outcome: "y" },
    },
  }));
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([forks], t.config.retentionMs));
  const split = completed(forks, "split", "f1", "2026-01-01T00:00:00.000Z");
  await jetstream(t.nc).publish("forks.split.f1", JSON.stringify(split));
  await failItem(t, forks, "f1", "forks.split.f1", split.id);
  const stage = workStage(forks, "b", { nc: t.nc });
  const message = { subject: "forks.split.f1", seq: 1, storedAt: 0, deliveryCount: 1 };
  const ctx: StageContext = {
    source: "weft-test-b",
    message,
    now: () => new Date("2026-01-01T00:00:01.000Z"),
    signal: new AbortController().signal,
  };
  await assert.rejects(
    async () => await stage.handle(stage.decode!(split, message) as never, ctx),
    (err: Error & { code?: string; permanent?: boolean }) =>
      err.code === "conflict" && err.permanent === true && /has failed/.test(err.message),
  );
  // Once a redrive has resumed the item (its failed message stored again), the branch ends.
  await jetstream(t.nc).publish("forks.split.f1", JSON.stringify(split));
  const out = await stage.handle(stage.decode!(split, message) as never, ctx);
  assert.deepEqual(out.map((e) => e.type), ["forks.b", "forks.y"]);
});

Deno.test("a join inside a loop hands on each branch's result of this round, not another branch's copy from an earlier round", async () => {
  // Found by a re-probe: with a fan-out to b and c joined by j inside a loop, after three
  // rounds results.j held b:3 and c:3 but results.c was {c:1}: each input of the join carries
  // the other branch's result from the round before, and the last to arrive overwrote it.
  await using t = await startTestNats();
  const seen: { runs: Record<string, number>; results: Record<string, unknown> }[] = [];
  const round = (id: string) => ({
    kind: "task" as const,
    output: obj,
    handle: (_v: unknown, ctx: { runs: Readonly<Record<string, number>> }) => ({
      [id]: (ctx.runs[id] ?? 0) + 1,
    }),
    next: "j",
  });
  const p = loaded(definePipeline({
    name: "rounds",
    input: { schema: obj },
    start: "work",
    steps: {
      work: task(["b", "c"]),
      b: round("b"),
      c: round("c"),
      j: {
        kind: "join",
        after: ["b", "c"],
        deadlineMs: 600_000,
        onDeadline: "done",
        next: "check",
      },
      check: {
        kind: "router",
        route: (_v: unknown, ctx) => {
          seen.push({ runs: { ...ctx.runs }, results: { ...ctx.results } });
          return (ctx.runs.work ?? 0) < 3 ? "again" : "done";
        },
        routes: { again: "work", done: "done" },
      },
      done: { kind: "end", outcome: "done" },
    },
    loops: [{ from: "check", to: "work", maxIterations: 3 }],
  }));
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const runners = [
    await runStateWriter({ ...deps, spec: pipelineStateSpec(p) }),
    await runStage({ ...deps, stage: controlStage(p, t.nc) }),
    ...await Promise.all(
      ["work", "b", "c", "check"].map((id) =>
        runStage({ ...deps, stage: workStage(p, id, { nc: t.nc }) })
      ),
    ),
  ];
  try {
    const kv = await new Kvm(t.nc).open(stateBucketOf("rounds"));
    await submitItem(t.nc, p, "L1", {}, { source: "test", traceId: TRACE });
    const state = await waitFor(
      async () => {
        const s = await readItem(kv, "L1");
        return s?.status === "done" && s;
      },
      20_000,
      "L1 done",
    );
    assert.deepEqual(state.runs, { work: 3, b: 3, c: 3, j: 3, check: 3 });
    assert.deepEqual(state.results.b, { b: 3 });
    assert.deepEqual(state.results.c, { c: 3 });
    assert.deepEqual(state.results.j, { b: { b: 3 }, c: { c: 3 } });
    // Each round's router saw that round's result of both branches.
    assert.equal(seen.length, 3);
    seen.forEach((s, i) => {
      assert.equal(s.runs.b, i + 1);
      assert.equal(s.runs.c, i + 1);
      assert.deepEqual(s.results.b, { b: i + 1 }, `round ${i + 1}: ${JSON.stringify(s)}`);
      assert.deepEqual(s.results.c, { c: i + 1 }, `round ${i + 1}: ${JSON.stringify(s)}`);
    });
    // And so did each round's event of the join.
    const joins: { runs: Record<string, number>; results: Record<string, unknown> }[] = [];
    const { state: info } = await t.jsm.streams.info("ROUNDS");
    for (let seq = info.first_seq; seq <= info.last_seq; seq++) {
      const m = await t.jsm.streams.getMessage("ROUNDS", { seq }).catch(() => null);
      if (m?.subject === "rounds.j.L1") joins.push(m.json<{ data: never }>().data);
    }
    assert.equal(joins.length, 3);
    joins.forEach((d, i) => {
      assert.deepEqual(d.results.b, { b: i + 1 }, `round ${i + 1}: ${JSON.stringify(d)}`);
      assert.deepEqual(d.results.c, { c: i + 1 }, `round ${i + 1}: ${JSON.stringify(d)}`);
    });
  } finally {
    await Promise.all(runners.map((r) => r.stop()));
  }
});

Deno.test("a branch a timed-out join went on without runs in its loop's next round, and that round's join waits for its result", async () => {
  // Found by probing (57 of 150 items of a loop with a 5 s join deadline and a 7 s branch):
  // the branch's next-round run was dead-lettered as a copy of its late earlier-round
  // completion (both had run 1), or, when it ran, the item's state kept the late result.
  await using t = await startTestNats();
  let release!: () => void;
  const gate = new Promise<void>((r) => release = r);
  // Round 2's b completes once round 1's late b is stored and folded into the item's state.
  let folded!: () => void;
  const lateFolded = new Promise<void>((r) => folded = r);
  const calls: number[] = [];
  const p = loaded(definePipeline({
    name: "redraft",
    input: { schema: obj },
    start: "draft",
    steps: {
      draft: task(["a", "b"]),
      a: task("j"),
      b: {
        kind: "task",
        output: obj,
        // Round 1 is slower than the join's deadline; round 2 is quick.
        handle: async (_v: unknown, ctx: { runs: Readonly<Record<string, number>> }) => {
          const round = ctx.runs.draft ?? 0;
          calls.push(round);
          await (round === 1 ? gate : lateFolded);
          // Round 2's first attempt fails (a flaky API): its retry is admitted again, after
          // round 1's late b is in the item's state.
          if (round === 2 && calls.filter((r) => r === 2).length === 1) throw new Error("flaky");
          return { round };
        },
        next: "j",
      },
      j: {
        kind: "join",
        after: ["a", "b"],
        deadlineMs: 4_000,
        onDeadline: "decide",
        next: "decide",
      },
      decide: {
        kind: "router",
        route: (_v: unknown, ctx) => (ctx.runs.draft ?? 0) < 2 ? "again" : "done",
        routes: { again: "draft", done: "done" },
      },
      done: { kind: "end", outcome: "done" },
    },
    loops: [{ from: "decide", to: "draft", maxIterations: 3 }],
  }));
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const scheduler = await runScheduler({ nc: t.nc, log: t.log, replica: "redraft" });
  const runners = [
    await runStateWriter({ ...deps, spec: pipelineStateSpec(p) }),
    await runStage({ ...deps, stage: controlStage(p, t.nc) }),
    ...await Promise.all(
      ["draft", "a", "b", "decide"].map((id) =>
        runStage({ ...deps, stage: workStage(p, id, { nc: t.nc }) })
      ),
    ),
  ];
  try {
    const kv = await new Kvm(t.nc).open(stateBucketOf("redraft"));
    await submitItem(t.nc, p, "D1", {}, { source: "test", traceId: TRACE });
    // Round 1's join times out without b, and the loop goes round: then b's round 1 ends.
    await waitFor(
      async () => ((await readItem(kv, "D1"))?.runs.draft ?? 0) >= 2,
      30_000,
      "round 2",
    );
    release();
    const late = await waitFor(
      async () =>
        (await t.jsm.streams.getMessage("REDRAFT", { last_by_subj: "redraft.b.D1" }).catch(() =>
          null
        )) ?? undefined,
      30_000,
      "round 1's late b stored",
    );
    assert.equal(late.json<{ data: FlowData }>().data.runs.draft, 1);
    await waitFor(
      async () => ((await readItem(kv, "D1"))?.last_seq ?? 0) >= late.seq,
      30_000,
      "folded",
    );
    folded();
    const state = await waitFor(
      async () => {
        const s = await readItem(kv, "D1");
        return (s?.status === "done" || s?.status === "failed") && s;
      },
      30_000,
      "D1 ended",
    );
    assert.equal(state.status, "done", JSON.stringify(state));
    assert.deepEqual(calls.sort(), [1, 2, 2], "b ran in both rounds (round 2 retried once)");
    assert.deepEqual(state.results.b, { round: 2 }, JSON.stringify(state));
    // Round 1's b counts as run on the timeout (no result), and round 2's as its second run.
    assert.deepEqual(state.runs, { draft: 2, a: 2, b: 2, j: 2, decide: 2 });
    // Round 2's join completed with round 2's b (round 1's timed out without it).
    const joins: { type: string; value: unknown }[] = [];
    const { state: info } = await t.jsm.streams.info("REDRAFT");
    for (let seq = info.first_seq; seq <= info.last_seq; seq++) {
      const m = await t.jsm.streams.getMessage("REDRAFT", { seq }).catch(() => null);
      if (m?.subject.startsWith("redraft.j")) {
        const e = m.json<{ type: string; data: FlowData }>();
        joins.push({ type: e.type, value: e.data.value });
      }
    }
    assert.deepEqual(joins, [
      { type: "redraft.j_timed_out", value: { a: {} } },
      { type: "redraft.j", value: { a: {}, b: { round: 2 } } },
    ]);
    assert.deepEqual(state.results.j, { a: {}, b: { round: 2 } });
    assert.deepEqual(await listDeadLetters(jetstream(t.nc), {}), [], "no dead letter");
  } finally {
    release();
    folded();
    await Promise.all(runners.map((r) => r.stop()));
    await scheduler.stop();
  }
});

Deno.test("a join's input from an earlier round of its loop changes nothing: this round's join completes", async () => {
  // Found by probing under deno task start: a branch slower than its join's deadline
  // arrived once the loop had gone round. Its input replaced the new round's record (the
  // other branch's input lost, the round's deadline armed already and then judged stale),
  // and the item waited at the join for ever, with no letter.
  await using t = await startTestNats();
  const p = loaded(definePipeline({
    name: "drafts",
    input: { schema: obj },
    start: "draft",
    steps: {
      draft: task(["a", "b"]),
      a: task("j"),
      b: task("j"),
      j: {
        kind: "join",
        after: ["a", "b"],
        deadlineMs: 60_000,
        onDeadline: "decide",
        next: "decide",
      },
      decide: {
        kind: "router",
        route: () => "again" as const,
        routes: { again: "draft", done: "done" },
      },
      done: { kind: "end", outcome: "done" },
    },
    loops: [{ from: "decide", to: "draft", maxIterations: 3 }],
  }));
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const event = (step: string, data: FlowData, time: string) =>
    JSON.parse(JSON.stringify(flowEvent(
      p.flow,
      step,
      { id: `${step}-${data.runs[step]}`, item_id: "R1", trace_id: TRACE },
      data,
      { source: "test", now: new Date(time) },
    )));
  const round0 = advance(entryData({}), "draft", {}, {});
  const a0 = event("a", advance(round0, "a", { a: 1 }, { a: 1 }), "2026-01-01T00:00:00.000Z");
  const b0 = event("b", advance(round0, "b", { b: 1 }, { b: 1 }), "2026-01-01T00:00:30.000Z");
  assert.deepEqual(await deliver(t, p, a0, 10, "2026-01-01T00:00:00.010Z"), []);
  // Round 0's deadline passes without b: the item goes round.
  const [deadline] = await timers(t);
  const late = await deliver(t, p, deadline!.payload as never, 11, "2026-01-01T00:01:00.100Z");
  assert.deepEqual(late.map((e) => e.type), ["drafts.j_timed_out"]);
  // (Fired here by hand: the scheduler would have marked it done.)
  await createScheduleStore(await new Kvm(t.nc).open(SCHEDULE_BUCKET)).cancel(deadline!.id);
  const went = late[0]!.data as FlowData;
  const round1 = advance(advance(went, "decide", { label: "again" }, went.value), "draft", {}, {});
  const a1 = event("a", advance(round1, "a", { a: 2 }, { a: 2 }), "2026-01-01T00:01:10.000Z");
  const b1 = event("b", advance(round1, "b", { b: 2 }, { b: 2 }), "2026-01-01T00:01:20.000Z");
  assert.deepEqual(await deliver(t, p, a1, 20, "2026-01-01T00:01:10.010Z"), []);
  const kv = await new Kvm(t.nc).open(controlBucketOf("drafts"));
  const before = (await kv.get("j.R1"))!.string();
  // Round 0's b, slower than its deadline, arrives now.
  assert.deepEqual(await deliver(t, p, b0, 21, "2026-01-01T00:01:15.000Z"), []);
  assert.equal((await kv.get("j.R1"))!.string(), before, "round 1's record is left as it was");
  assert.deepEqual((await timers(t)).map((s) => [s.id, s.at]), [
    ["drafts.j-R1-1", "2026-01-01T00:02:10.000Z"],
  ], "no deadline armed again for round 0");
  // An input for a round after the open one (no round closed before it) is refused.
  const ahead = event(
    "b",
    { ...b1.data, runs: { ...b1.data.runs, j: 4 } },
    "2026-01-01T00:01:16.000Z",
  );
  await assert.rejects(
    deliver(t, p, ahead, 22, "2026-01-01T00:01:16.010Z"),
    (err: Error & { code?: string }) => err.code === "conflict" && /round 5/.test(err.message),
  );
  assert.equal((await kv.get("j.R1"))!.string(), before, "nor does a round ahead change it");
  // Round 1's b completes round 1's join with both of its inputs.
  const out = await deliver(t, p, b1, 23, "2026-01-01T00:01:20.010Z");
  assert.deepEqual(out.map((e) => e.type), ["drafts.j"]);
  assert.deepEqual((out[0]!.data as FlowData).value, { a: { a: 2 }, b: { b: 2 } });
  assert.deepEqual(await timers(t), [], "round 1's deadline is cancelled");
});

Deno.test("a join's input stored after its deadline changes nothing, though the control step takes it before the deadline's timer", async () => {
  // Found by probing: after a kill -9 of the control step, a branch stored seconds after the
  // join's deadline and the deadline's timer (stored before it) waited together, and the
  // branch, taken first, completed the join: the item ended `done`, not `late`.
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([checks], t.config.retentionMs));
  const fraud = completed(checks, "fraud", "it9", "2026-01-01T00:00:00.000Z");
  assert.deepEqual(await deliver(t, checks, fraud, 4, "2026-01-01T00:00:00.010Z"), []);
  const kv = await new Kvm(t.nc).open(controlBucketOf("checks"));
  const before = (await kv.get("both.it9"))!.string();
  // Stored 10 s after the deadline (00:01:00), taken before the deadline's timer.
  const stock = completed(checks, "stock", "it9", "2026-01-01T00:01:10.000Z");
  assert.deepEqual(await deliver(t, checks, stock, 9, "2026-01-01T00:01:10.000Z"), []);
  assert.equal((await kv.get("both.it9"))!.string(), before, "the late input is not recorded");
  const [deadline] = await timers(t);
  assert.equal(deadline?.id, "checks.both-it9-0", "the deadline stays armed");
  const out = await deliver(t, checks, deadline!.payload as never, 8, "2026-01-01T00:01:11.000Z");
  assert.deepEqual(out.map((e) => e.type), ["checks.both_timed_out", "checks.late"]);
  assert.deepEqual((out[0]!.data as FlowData).value, { fraud: {} }, "with what arrived in time");
});

Deno.test("a decision stored before its wait's deadline wins, though the control step takes the deadline's timer first", async () => {
  // Found by probing: after a kill -9 of the control step, a decision stored two seconds
  // before the wait's deadline (answered 202) and the deadline's timer waited together;
  // the timer, taken first, timed the item out and the decision changed nothing.
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const start = new Date();
  const check = completed(approvals, "check", "it10", start.toISOString());
  assert.deepEqual(await deliver(t, approvals, check, 3, start.toISOString()), []);
  const js = jetstream(t.nc);
  await js.publish("approvals.submitted.it10", JSON.stringify({})); // the item entered
  // Not JSON: it does not count.
  await js.publish("approvals.approved.it10", "not json");
  const first = await js.publish("approvals.approved.it10", JSON.stringify({ by: "carol" }));
  const [deadline] = await timers(t);
  const due = deadline!.at!;
  assert.ok(Date.now() < Date.parse(due), "the decision is stored before the deadline");
  const late = new Date(Date.parse(due) + 1000).toISOString();
  const out = await deliver(t, approvals, deadline!.payload as never, first.seq + 1, late);
  assert.deepEqual(out.map((e) => e.type), ["approvals.approval", "approvals.done"]);
  assert.deepEqual((out[0]!.data as FlowData).value, { by: "carol" });
  // The decision, taken afterwards, changes nothing.
  const decision = { type: "approvals.approved", item_id: "it10", by: "carol" };
  assert.deepEqual(await deliver(t, approvals, decision, first.seq, late), []);
  // A decision stored after the timer is not the timer's to take.
  const check2 = completed(approvals, "check", "it11", start.toISOString());
  assert.deepEqual(await deliver(t, approvals, check2, 4, start.toISOString()), []);
  const deadline2 = (await timers(t)).find((s) => s.id.includes("it11"))!;
  const timed = await deliver(t, approvals, deadline2.payload as never, first.seq + 2, late);
  await js.publish("approvals.approved.it11", JSON.stringify({ by: "dan" }));
  assert.deepEqual(timed.map((e) => e.type), ["approvals.approval_timed_out", "approvals.expired"]);
});

Deno.test("a decision stored after its wait's deadline and timer changes nothing, though the control step takes it first", async () => {
  // Found by probing: after a kill -9 of the control step, the deadline's timer and a
  // decision stored after it (past the deadline, answered 202) waited together; the decision,
  // taken first, went on as it said, and the timer then changed nothing.
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const start = new Date();
  const check = completed(approvals, "check", "it12", start.toISOString());
  assert.deepEqual(await deliver(t, approvals, check, 3, start.toISOString()), []);
  const js = jetstream(t.nc);
  await js.publish("approvals.submitted.it12", JSON.stringify({})); // the item entered
  const deadline = (await timers(t)).find((s) => s.id.includes("it12"))!;
  const late = new Date(Date.parse(deadline.at!) + 1000).toISOString();
  // The scheduler stores the deadline's timer, then the server stores a late decision.
  const timer = await js.publish("approvals._timer.it12", JSON.stringify(deadline.payload));
  const decided = await js.publish("approvals.approved.it12", JSON.stringify({ by: "erin" }));
  assert.ok(timer.seq < decided.seq);
  const decision = { type: "approvals.approved", item_id: "it12", by: "erin" };
  assert.deepEqual(await deliver(t, approvals, decision, decided.seq, late), []);
  const timed = await deliver(t, approvals, deadline.payload as never, timer.seq, late);
  assert.deepEqual(timed.map((e) => e.type), ["approvals.approval_timed_out", "approvals.expired"]);
  // A decision stored after the deadline, while its timer is not stored yet, still counts.
  const check2 = completed(approvals, "check", "it13", start.toISOString());
  assert.deepEqual(await deliver(t, approvals, check2, 4, start.toISOString()), []);
  await js.publish("approvals.submitted.it13", JSON.stringify({}));
  const deadline2 = (await timers(t)).find((s) => s.id.includes("it13"))!;
  const late2 = new Date(Date.parse(deadline2.at!) + 1000).toISOString();
  const decided2 = await js.publish("approvals.approved.it13", JSON.stringify({ by: "erin" }));
  const out = await deliver(t, approvals, { ...decision, item_id: "it13" }, decided2.seq, late2);
  assert.deepEqual(out.map((e) => e.type), ["approvals.approval", "approvals.done"]);
});

Deno.test("a join takes a branch's completion that its item's state has not folded yet while holding the other branch's, stored after it", async () => {
  await using t = await startTestNats({ ackWaitMs: 5000 });
  const p = loaded(definePipeline({
    name: "orders",
    input: { schema: obj },
    start: "split",
    steps: {
      split: task(["left", "right"]),
      left: task("both"),
      right: task("both"),
      both: {
        kind: "join",
        after: ["left", "right"],
        deadlineMs: 600_000,
        onDeadline: "late",
        next: "done",
      },
      done: { kind: "end", outcome: "done" },
      late: { kind: "end", outcome: "late" },
    },
  }));
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const stream = "ORDERS";
  const spec = pipelineStateSpec(p);
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const kv = await new Kvm(t.nc).open(stateBucketOf("orders"));
  const js = jetstream(t.nc);
  // The item enters and splits, its state written; then the state writer dies.
  let writer = await runStateWriter({ ...deps, spec });
  const split = await runStage({ ...deps, stage: workStage(p, "split", { nc: t.nc }) });
  await submitItem(t.nc, p, "o1", {}, { source: "test", traceId: TRACE });
  await waitFor(
    async () => (await readItem(kv, "o1"))?.current.length === 2 ? true : undefined,
    10_000,
    "o1 split",
  );
  await split.stop();
  await writer.stop();
  // Both branches complete.
  const steps = await Promise.all(
    ["left", "right"].map((id) => runStage({ ...deps, stage: workStage(p, id, { nc: t.nc }) })),
  );
  const last = async (type: string) =>
    (await t.jsm.streams.getMessage(stream, { last_by_subj: `orders.${type}.o1` })
      .catch(() => null))?.seq;
  let seqs: number[] = [];
  try {
    seqs = await waitFor(
      async () => {
        const s = [await last("left"), await last("right")];
        return s.every((x) => x !== undefined) ? s as number[] : undefined;
      },
      20_000,
      "both branches' completions on the stream",
    );
  } finally {
    for (const s of steps) await s.stop();
  }
  // The writer held the first branch's completion when it died (delivered, not acked): the
  // restarted writer folds the second one first, and the first only after the ack wait.
  const consumer = await js.consumers.get(stream, spec.durable);
  const first = Math.min(...seqs);
  for (;;) {
    const m = await consumer.next({ expires: 5000 });
    assert.ok(m, "the writer's next message");
    if (m.seq === first) break;
    m.ack();
  }
  writer = await runStateWriter({ ...deps, spec });
  await waitFor(
    async () => ((await readItem(kv, "o1"))?.last_seq ?? 0) >= Math.max(...seqs),
    10_000,
    "the second branch folded",
  );
  const join = await runStage({ ...deps, stage: controlStage(p, t.nc) });
  try {
    // The join, reading the item's state meanwhile, takes both branches and completes.
    const s = await waitFor(
      async () => {
        const s = await readItem(kv, "o1");
        return s?.status === "done" ? s : undefined;
      },
      20_000,
      "o1 done",
    );
    assert.equal(s.outcome, "done");
    assert.deepEqual(await listDeadLetters(js, {}), []);
  } finally {
    await join.stop();
    await writer.stop();
  }
});
