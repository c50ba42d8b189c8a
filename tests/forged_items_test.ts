/**
 * What a step's key cannot do with the events it may publish, against a real nats-server and
 * the real stages: start an item that never entered (or one a caller submits later), hand a
 * step another item's input, run a step for an item that has ended, or show another item's
 * event on an item's SSE stream. A step's key may publish its own event type by design
 * (docs/SECURITY.md): these are about what the other parts trust.
 */
import assert from "node:assert/strict";
import { jetstream, type JetStreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import type { DeadLetter } from "../src/events.gen.ts";
import type { FeedbackState } from "../pipelines/feedback/events.gen.ts";
import { listDeadLetters, redrive } from "../src/redrive.ts";
import { PermanentError } from "../src/errors.ts";
import { messagesOn, runStage } from "../src/runner.ts";
import { readState, runStateWriter } from "../src/state_writer.ts";
import { FEEDBACK_STREAM, STATE_BUCKET } from "../pipelines/feedback/subjects.ts";
import { startTestNats, type TestNats } from "./helpers/nats.ts";
import { feedbackApp, startPipeline } from "./helpers/pipeline.ts";
import { readSse } from "./helpers/sse.ts";
import { createIntake } from "../pipelines/feedback/intake.ts";
import { deadline, waitFor } from "./helpers/wait.ts";
import { feedbackAnalyzers } from "../pipelines/feedback/analyzers.ts";
import {
  dispatchStage,
  feedbackItemReader,
  sentimentStage,
  topicsStage,
} from "../pipelines/feedback/stages.ts";
import type { SentimentAnalyzer } from "../src/ai/analysis.ts";
import { definePipeline } from "../src/pipeline/definition.ts";
import { compileFlow } from "../src/pipeline/flow.ts";
import { durableOf, pipelineSubjects } from "../src/pipeline/derive.ts";
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
import { ensureTopology } from "../src/topology.ts";
import {
  HANDOVER_HEADER,
  REDRIVE_ITEM_HEADER,
  REDRIVE_OF_HEADER,
  SCHEDULE_BUCKET,
} from "../src/subjects.ts";
import { headers } from "@nats-io/nats-core";
import { definitionsApp } from "./helpers/pipeline.ts";
import type { ItemState } from "../src/pipeline/fold.ts";
import { rebuildStates } from "../src/rebuild.ts";
import { deterministicId } from "../src/events.ts";
import { FEEDBACK_STATE_SPEC } from "../pipelines/feedback/state.ts";

const TRACE = "0af7651916cd43dd8448eb211c80319c";
const FEEDBACK_CONSUMERS = ["ingest", "sentiment", "topics", "dispatch", "state"];

type Event = Record<string, unknown> & { data: Record<string, unknown> };

async function lastOn(jsm: JetStreamManager, stream: string, subject: string): Promise<Event> {
  const m = await jsm.streams.getMessage(stream, { last_by_subj: subject });
  return m!.json<Event>();
}

async function subjectsOf(jsm: JetStreamManager, stream: string, filter: string) {
  const info = await jsm.streams.info(stream, { subjects_filter: filter });
  return Object.keys(info.state.subjects ?? {}).sort();
}

async function settled(jsm: JetStreamManager, stream: string, names: readonly string[]) {
  for (const name of names) {
    await waitFor(
      async () => {
        const info = await jsm.consumers.info(stream, name);
        return info.num_pending === 0 && info.num_ack_pending === 0;
      },
      20_000,
      `consumer ${name} to settle`,
    );
  }
}

/** The dead letters of the message stored at `seq`, by stage, once `stages` all have one. */
async function lettersOf(
  t: TestNats,
  seq: number,
  stages: readonly string[],
): Promise<Map<string, DeadLetter>> {
  return await waitFor(
    async () => {
      const by = new Map<string, DeadLetter>();
      for (const { letter } of await listDeadLetters(jetstream(t.nc), {})) {
        if (letter.stream_seq === seq) by.set(letter.stage, letter);
      }
      return stages.every((s) => by.has(s)) && by;
    },
    20_000,
    `dead letters of stream sequence ${seq} from ${stages.join(", ")}`,
  );
}

async function feedbackProcessed(t: TestNats, id: string): Promise<FeedbackState> {
  const kv = await new Kvm(t.nc).open(STATE_BUCKET);
  return await waitFor(
    async () => {
      const s = (await readState<FeedbackState>(kv, id))?.state;
      return s?.status === "processed" && s;
    },
    20_000,
    `${id} processed`,
  );
}

Deno.test("a forged `processed` event for an id a caller submits later is dead-lettered, and the real item processes from its own events", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const { body } = await p.intake.submit({ text: "Why was I charged twice this month?" });
  await feedbackProcessed(t, body.id);
  // The dispatch step's key publishes a valid `processed` event for an id nobody used yet.
  const real = await lastOn(t.jsm, FEEDBACK_STREAM, `feedback.processed.${body.id}`);
  const forged = {
    ...real,
    id: "forged-processed-pre2",
    item_id: "PRE2",
    time: "2099-01-01T00:00:00.000Z",
    data: {
      ...real.data,
      text: "FORGED TEXT 2",
      routing: { ...(real.data.routing as object), team: "Nobody" },
    },
  };
  const ack = await jetstream(t.nc).publish("feedback.processed.PRE2", JSON.stringify(forged));

  const res = await p.app.request("/feedback", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ id: "PRE2", text: "The app crashes on login, terrible" }),
  });
  assert.equal(res.status, 202, await res.text());
  const state = await feedbackProcessed(t, "PRE2");
  assert.equal(state.text, "The app crashes on login, terrible");
  assert.notEqual(state.routing?.team, "Nobody");
  assert.notEqual(state.created_at, forged.time);
  assert.ok(state.stages.ingested, JSON.stringify(state.stages));
  assert.ok(state.stages.processed!.seq > ack.seq, "its own processed event, not the forged one");

  const letters = await lettersOf(t, ack.seq, ["state"]);
  assert.equal(letters.get("state")!.code, "not_found");
  assert.match(letters.get("state")!.reason, /no item "PRE2".*feedback\.ingested\.PRE2/);
  await settled(t.jsm, FEEDBACK_STREAM, FEEDBACK_CONSUMERS);
  assert.deepEqual(await subjectsOf(t.jsm, FEEDBACK_STREAM, "feedback.failed.*"), []);
  // The gateway answers the item as it is, and a rebuild from the stream agrees.
  const got = await (await p.app.request("/feedback/PRE2")).json();
  assert.equal(got.text, "The app crashes on login, terrible");
  const rebuilt = await rebuildStates(jetstream(t.nc), FEEDBACK_STATE_SPEC);
  assert.equal(rebuilt.states.get("PRE2")?.text, "The app crashes on login, terrible");
});

Deno.test("a forged `sentiment_analyzed` for an id a caller submits later does not stand in for the item's own: the item processes with its own text", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const { body } = await p.intake.submit({ text: "Why was I charged twice this month?" });
  await feedbackProcessed(t, body.id);
  // The sentiment step's key publishes a valid event of its own type for an id nobody used yet,
  // without the "expected last subject sequence" header (as `nats pub` does).
  const real = await lastOn(t.jsm, FEEDBACK_STREAM, `feedback.sentiment_analyzed.${body.id}`);
  const forged = {
    ...real,
    id: "forged-sentiment-pre3",
    item_id: "PRE3",
    data: { ...real.data, text: "FORGED TEXT 3" },
  };
  const ack = await jetstream(t.nc).publish(
    "feedback.sentiment_analyzed.PRE3",
    JSON.stringify(forged),
  );
  // Everything it leads to is stored before the id is submitted.
  await settled(t.jsm, FEEDBACK_STREAM, FEEDBACK_CONSUMERS);
  const res = await p.app.request("/feedback", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ id: "PRE3", text: "The app crashes on login, terrible" }),
  });
  assert.equal(res.status, 202, await res.text());
  const state = await feedbackProcessed(t, "PRE3");
  assert.equal(state.text, "The app crashes on login, terrible");
  assert.ok(
    state.stages.sentiment_analyzed!.seq > ack.seq,
    "its own sentiment_analyzed event, stored after the forged one",
  );
  const own = await lastOn(t.jsm, FEEDBACK_STREAM, "feedback.sentiment_analyzed.PRE3");
  assert.equal(own.data.text, "The app crashes on login, terrible");
  await settled(t.jsm, FEEDBACK_STREAM, FEEDBACK_CONSUMERS);
  assert.deepEqual(await subjectsOf(t.jsm, FEEDBACK_STREAM, "feedback.failed.*"), []);
});

Deno.test("a step's event for a feedback id that never entered makes no item and no outcome: the state writer dead-letters it and what follows not_found, and dispatch stores nothing", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const { body } = await p.intake.submit({ text: "Why was I charged twice this month?" });
  await feedbackProcessed(t, body.id);
  // The sentiment step's key publishes a valid event of its own type for an id never submitted.
  const real = await lastOn(t.jsm, FEEDBACK_STREAM, `feedback.sentiment_analyzed.${body.id}`);
  const forged = { ...real, id: "forged-sentiment-never1", item_id: "NEVER1" };
  const ack = await jetstream(t.nc).publish(
    "feedback.sentiment_analyzed.NEVER1",
    JSON.stringify(forged),
  );
  const letter = (await lettersOf(t, ack.seq, ["state"])).get("state")!;
  assert.equal(letter.code, "not_found");
  assert.match(letter.reason, /no item "NEVER1".*feedback\.ingested\.NEVER1/);
  await settled(t.jsm, FEEDBACK_STREAM, FEEDBACK_CONSUMERS);
  // Topics does not read the entry per message (checksEntry: false, the bench's hot path): it
  // runs for it, and the state writer refuses its event too. Dispatch, which stores the
  // outcome, refuses it: no dispatched or processed is stored.
  const refused = (await dispatchLetters(t, "NEVER1", ["not_found"])).get("not_found")!;
  assert.match(refused.reason, /no item "NEVER1".*feedback\.ingested\.NEVER1/);
  const stored = await subjectsOf(t.jsm, FEEDBACK_STREAM, "feedback.*.NEVER1");
  assert.deepEqual(stored, [
    "feedback.sentiment_analyzed.NEVER1",
    "feedback.topics_extracted.NEVER1",
  ]);
  for (const subject of stored) {
    const m = await t.jsm.streams.getMessage(FEEDBACK_STREAM, { last_by_subj: subject });
    const l = (await lettersOf(t, m!.seq, ["state"])).get("state")!;
    assert.equal(l.code, "not_found", subject);
  }
  assert.equal(await readState(await new Kvm(t.nc).open(STATE_BUCKET), "NEVER1"), null);
  assert.equal((await p.app.request("/feedback/NEVER1")).status, 404);
  assert.deepEqual(await subjectsOf(t.jsm, FEEDBACK_STREAM, "feedback.failed.*"), []);
  assert.equal(
    (await rebuildStates(jetstream(t.nc), FEEDBACK_STATE_SPEC)).states.has("NEVER1"),
    false,
  );
});

/** The dead letters dispatch keeps for `item`, by code, once it holds `codes`. */
async function dispatchLetters(t: TestNats, item: string, codes: readonly string[]) {
  return await waitFor(
    async () => {
      const by = new Map<string, DeadLetter>();
      for (const { letter } of await listDeadLetters(jetstream(t.nc), {})) {
        if (letter.stage === "dispatch" && letter.item_id === item) by.set(letter.code, letter);
      }
      return codes.every((c) => by.has(c)) && by;
    },
    20_000,
    `dispatch's ${codes.join(", ")} dead letters of ${item}`,
  );
}

Deno.test("a forged `sentiment_analyzed` for a failed feedback item stores no processed: dispatch dead-letters what follows (conflict; subject_mismatch with another text) and the item stays failed", async () => {
  // Every item whose text has "crash" fails in the sentiment step (after its retries).
  await using t = await startTestNats({ failOn: "crash", failStage: "sentiment" });
  await using p = await startPipeline(t);
  const { body } = await p.intake.submit({ text: "Why was I charged twice this month?" });
  await feedbackProcessed(t, body.id);
  const TEXT = "The app crashes on login, terrible";
  await p.intake.submit({ id: "FAIL1", text: TEXT });
  const kv = await new Kvm(t.nc).open(STATE_BUCKET);
  await waitFor(
    async () => (await readState<FeedbackState>(kv, "FAIL1"))?.state.status === "failed",
    20_000,
    "FAIL1 failed",
  );
  // The sentiment step's key publishes valid events of its own type for the failed item: one
  // with its own text, one with another (as `nats pub` does, without the once-per-item header).
  const real = await lastOn(t.jsm, FEEDBACK_STREAM, `feedback.sentiment_analyzed.${body.id}`);
  const js = jetstream(t.nc);
  for (const [id, text] of [["forged-fail1-own", TEXT], ["forged-fail1-other", "FORGED TEXT"]]) {
    await js.publish(
      "feedback.sentiment_analyzed.FAIL1",
      JSON.stringify({ ...real, id, item_id: "FAIL1", data: { ...real.data, text } }),
    );
  }
  const letters = await dispatchLetters(t, "FAIL1", ["conflict", "subject_mismatch"]);
  assert.match(letters.get("conflict")!.reason, /FAIL1 has failed/);
  assert.match(letters.get("subject_mismatch")!.reason, /other than its ingested event's/);
  await settled(t.jsm, FEEDBACK_STREAM, FEEDBACK_CONSUMERS);
  assert.deepEqual(
    (await subjectsOf(t.jsm, FEEDBACK_STREAM, "feedback.*.FAIL1")).filter((s) =>
      /dispatched|processed/.test(s)
    ),
    [],
    "no dispatched or processed stored",
  );
  const state = (await readState<FeedbackState>(kv, "FAIL1"))!.state;
  assert.equal(state.status, "failed");
  assert.equal(state.text, TEXT);
  assert.equal(state.error?.stage, "sentiment");
  const rebuilt = (await rebuildStates(jetstream(t.nc), FEEDBACK_STATE_SPEC)).states.get("FAIL1");
  assert.equal(rebuilt?.status, "failed");
  assert.equal(rebuilt?.text, TEXT);
});

Deno.test("a feedback item failed on junk on a step's subject stays failed: a valid `sentiment_analyzed` published after it stores no processed", async () => {
  await using t = await startTestNats({ failOn: "crash", failStage: "sentiment" });
  await using p = await startPipeline(t);
  const { body } = await p.intake.submit({ text: "Why was I charged twice this month?" });
  await feedbackProcessed(t, body.id);
  const TEXT = "The app crashes on login, terrible";
  await p.intake.submit({ id: "JUNK1", text: TEXT });
  const kv = await new Kvm(t.nc).open(STATE_BUCKET);
  await waitFor(
    async () => (await readState<FeedbackState>(kv, "JUNK1"))?.state.status === "failed",
    20_000,
    "JUNK1 failed",
  );
  // The sentiment key publishes junk on the item's subject (topics fails the item on it), then
  // a valid event with the item's own text: as a redrive would store the message again.
  const js = jetstream(t.nc);
  await js.publish("feedback.sentiment_analyzed.JUNK1", "not an event");
  await waitFor(
    async () => (await readState<FeedbackState>(kv, "JUNK1"))?.state.error?.stage === "topics",
    20_000,
    "JUNK1 failed by topics on the junk",
  );
  const real = await lastOn(t.jsm, FEEDBACK_STREAM, `feedback.sentiment_analyzed.${body.id}`);
  await js.publish(
    "feedback.sentiment_analyzed.JUNK1",
    JSON.stringify({
      ...real,
      id: "forged-junk1",
      item_id: "JUNK1",
      data: { ...real.data, text: TEXT },
    }),
  );
  const letter = (await dispatchLetters(t, "JUNK1", ["conflict"])).get("conflict")!;
  assert.match(letter.reason, /JUNK1 has failed/);
  await settled(t.jsm, FEEDBACK_STREAM, FEEDBACK_CONSUMERS);
  assert.deepEqual(
    (await subjectsOf(t.jsm, FEEDBACK_STREAM, "feedback.*.JUNK1")).filter((s) =>
      /dispatched|processed/.test(s)
    ),
    [],
    "no dispatched or processed stored",
  );
  const state = (await readState<FeedbackState>(kv, "JUNK1"))!.state;
  assert.equal(state.status, "failed");
  assert.equal(state.error?.subject, "feedback.sentiment_analyzed.JUNK1");
  const rebuilt = (await rebuildStates(jetstream(t.nc), FEEDBACK_STATE_SPEC)).states.get("JUNK1");
  assert.equal(rebuilt?.status, "failed");
});

Deno.test("a forged `sentiment_analyzed` with another text, stored before an in-flight item's own, changes nothing: the item processes with its own text", async () => {
  await using t = await startTestNats();
  const rules = await feedbackAnalyzers(t.config);
  // The sentiment step holds HELD1 until the forged event is stored and refused.
  const gate = Promise.withResolvers<void>();
  const reached = Promise.withResolvers<void>();
  const held: SentimentAnalyzer = {
    ...rules.sentiment,
    async analyze(text, opts) {
      if (text.startsWith("HELD1")) {
        reached.resolve();
        await gate.promise;
      }
      return await rules.sentiment.analyze(text, opts);
    },
  };
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const runners = [
    await runStateWriter({ ...deps, spec: FEEDBACK_STATE_SPEC }),
    await runStage({ ...deps, stage: sentimentStage(held) }),
    await runStage({ ...deps, stage: topicsStage(rules.topics, rules.toxicity) }),
    await runStage({ ...deps, stage: dispatchStage(rules.route, feedbackItemReader(t.jsm, t.nc)) }),
  ];
  try {
    const intake = await createIntake(t.nc);
    const { body } = await intake.submit({ text: "Why was I charged twice this month?" });
    await feedbackProcessed(t, body.id);
    const real = await lastOn(t.jsm, FEEDBACK_STREAM, `feedback.sentiment_analyzed.${body.id}`);
    const TEXT = "HELD1 the invoice is wrong again";
    await intake.submit({ id: "HELD1", text: TEXT });
    await deadline(reached.promise, 20_000, "HELD1 in the sentiment step");
    // The sentiment step's key publishes the item's completion first, with another text.
    const ack = await jetstream(t.nc).publish(
      "feedback.sentiment_analyzed.HELD1",
      JSON.stringify({
        ...real,
        id: "forged-held1",
        item_id: "HELD1",
        data: { ...real.data, text: "FORGED: route me to Nobody" },
      }),
    );
    const letter = (await dispatchLetters(t, "HELD1", ["subject_mismatch"])).get(
      "subject_mismatch",
    )!;
    assert.match(letter.reason, /other than its ingested event's/);
    gate.resolve();
    const state = await feedbackProcessed(t, "HELD1");
    assert.equal(state.text, TEXT);
    assert.ok(state.stages.sentiment_analyzed!.seq > ack.seq, "its own sentiment event");
    const processed = await lastOn(t.jsm, FEEDBACK_STREAM, "feedback.processed.HELD1");
    assert.equal(processed.data.text, TEXT);
    assert.deepEqual(
      state.routing,
      rules.route(state.sentiment!.label, state.topics!.topics),
      "routed on its own text",
    );
    await settled(t.jsm, FEEDBACK_STREAM, ["sentiment", "topics", "dispatch", "state"]);
    const info = await t.jsm.streams.info(FEEDBACK_STREAM, {
      subjects_filter: "feedback.processed.HELD1",
    });
    assert.equal(info.state.subjects?.["feedback.processed.HELD1"], 1, "one processed stored");
    assert.deepEqual(await subjectsOf(t.jsm, FEEDBACK_STREAM, "feedback.failed.*"), []);
    const rebuilt = (await rebuildStates(jetstream(t.nc), FEEDBACK_STATE_SPEC)).states;
    assert.equal(rebuilt.get("HELD1")?.text, TEXT);
    assert.equal(rebuilt.get("HELD1")?.status, "processed");
  } finally {
    gate.resolve();
    for (const r of runners) await r.stop();
  }
});

/**
 * A definition of two tasks and an end, run in-process: intake by submitItem. The answer step
 * waits for `hold` on item `holdItem`, keeping that item running there meanwhile.
 */
async function startTwoSteps(
  t: TestNats,
  opts: {
    holdItem?: string;
    hold?: Promise<void>;
    /** The step that waits for `hold` (the answer step when unset). */
    holdStep?: "route" | "answer";
    stateless?: boolean;
    /** The answer step fails (for good) for an item while this says so. */
    failAnswer?: (item: string) => boolean;
  } = {},
) {
  const obj = { type: "object" } as const;
  const ran: { step: string; item: string; input: unknown; value?: unknown }[] = [];
  const def = definePipeline({
    name: "orders",
    input: { schema: obj },
    start: "route",
    steps: {
      route: {
        kind: "task",
        output: obj,
        handle: async (_v, ctx) => {
          ran.push({ step: "route", item: ctx.item, input: ctx.input });
          if (ctx.item === opts.holdItem && opts.holdStep === "route") await opts.hold;
          return { routed: true };
        },
        next: "answer",
      },
      answer: {
        kind: "task",
        output: obj,
        handle: async (_v, ctx) => {
          ran.push({ step: "answer", item: ctx.item, input: ctx.input, value: _v });
          if (ctx.item === opts.holdItem && (opts.holdStep ?? "answer") === "answer") {
            await opts.hold;
          }
          if (opts.failAnswer?.(ctx.item)) throw new PermanentError("the answer is down");
          return { answered: true };
        },
        next: "done",
      },
      done: { kind: "end", outcome: "answered" },
    },
  });
  const p: LoadedPipeline = { file: "inline", def, flow: compileFlow(def) };
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const runners = [
    ...opts.stateless ? [] : [await runStateWriter({ ...deps, spec: pipelineStateSpec(p) })],
    await runStage({ ...deps, stage: workStage(p, "route", { nc: t.nc }) }),
    await runStage({ ...deps, stage: workStage(p, "answer", { nc: t.nc }) }),
  ];
  const kv = await new Kvm(t.nc).open(stateBucketOf("orders"));
  const stream = pipelineSubjects(def).stream;
  const done = async (id: string) =>
    await waitFor(
      async () => {
        const s = await readItem(kv, id);
        return s?.status === "done" && s;
      },
      20_000,
      `${id} done`,
    );
  const consumers = [durableOf(def, "route"), durableOf(def, "answer"), durableOf(def, "state")];
  return {
    p,
    ran,
    kv,
    stream,
    done,
    consumers,
    async [Symbol.asyncDispose]() {
      for (const r of runners) await r.stop();
    },
  };
}

Deno.test("a step's event for a definition's id that never entered makes no item and runs no step: dead-lettered not_found", async () => {
  await using t = await startTestNats();
  await using o = await startTwoSteps(t);
  await submitItem(t.nc, o.p, "S1", { customer: "bob" }, { source: "test", traceId: TRACE });
  await o.done("S1");
  // The route step's key publishes its own completion, dated 2099, for an id never submitted.
  const real = await lastOn(t.jsm, o.stream, "orders.route.S1");
  const forged = {
    ...real,
    id: "forged-route",
    item_id: "PHANTOM3",
    time: "2099-01-01T00:00:00.000Z",
  };
  const ack = await jetstream(t.nc).publish("orders.route.PHANTOM3", JSON.stringify(forged));
  const letters = await lettersOf(t, ack.seq, ["orders-state", "orders-answer"]);
  for (const [stage, letter] of letters) {
    assert.equal(letter.code, "not_found", stage);
    assert.match(letter.reason, /no item "PHANTOM3".*orders\.submitted\.PHANTOM3/, stage);
  }
  await settled(t.jsm, o.stream, o.consumers);
  assert.deepEqual(o.ran.filter((r) => r.item === "PHANTOM3"), [], "no step ran for it");
  assert.deepEqual(await subjectsOf(t.jsm, o.stream, "orders.*.PHANTOM3"), [
    "orders.route.PHANTOM3",
  ]);
  assert.equal(await readItem(o.kv, "PHANTOM3"), null);
  assert.deepEqual(await subjectsOf(t.jsm, o.stream, "orders.failed.*"), []);
});

Deno.test("per-item SSE skips an event stored on the item's subject whose body names another item, in its replay and live", async () => {
  await using t = await startTestNats();
  // Intake and gateway only: the item stays as submitted while the test publishes its events.
  const intake = await createIntake(t.nc);
  const app = feedbackApp(t, intake);
  const { body } = await intake.submit({ id: "SSE1", text: "The app crashes on login" });
  const js = jetstream(t.nc);
  const ingested = await lastOn(t.jsm, FEEDBACK_STREAM, `feedback.ingested.${body.id}`);
  // Before the client comes: for the replay.
  const early = await js.publish(
    "feedback.sentiment_analyzed.SSE1",
    JSON.stringify({
      ...ingested,
      id: "other-1",
      type: "feedback.sentiment_analyzed",
      item_id: "OTHER",
    }),
  );
  const res = await app.request("/feedback/SSE1/events");
  assert.equal(res.status, 200);
  let late: number | undefined;
  // Once the client replayed its history and waits on the live feed (the gateway's feed reads
  // the whole stream; no replay of the item's subjects is left): another item's event, then
  // the item's own end, both live.
  const live = (async () => {
    await waitFor(
      async () => {
        const filters: string[] = [];
        for await (const c of await t.jsm.consumers.list(FEEDBACK_STREAM)) {
          filters.push(c.config.filter_subject ?? c.config.filter_subjects?.join(",") ?? "");
        }
        return filters.length > 0 && filters.every((f) => !f.endsWith(".SSE1"));
      },
      10_000,
      "the client on the live feed",
    );
    late = (await js.publish(
      "feedback.topics_extracted.SSE1",
      JSON.stringify({
        ...ingested,
        id: "other-2",
        type: "feedback.topics_extracted",
        item_id: "OTHER",
      }),
    )).seq;
    await js.publish(
      "feedback.processed.SSE1",
      JSON.stringify({ ...ingested, id: "own-end", type: "feedback.processed" }),
    );
  })();
  const frames = await readSse(res, {
    timeoutMs: 15_000,
    stopAfter: (e) => e.event === "feedback.processed",
  });
  await live;
  const seqs = frames.map((f) => Number(f.id));
  assert.deepEqual(frames.map((f) => f.event), ["feedback.ingested", "feedback.processed"]);
  assert.ok(!seqs.includes(early.seq) && late !== undefined && !seqs.includes(late), `${seqs}`);
});

const ANN = { customer: "ann", order_id: "A100", address: "1 Ann Street" };
const BOB = { customer: "bob", order_id: "B200" };

Deno.test("a work step runs on the item's input as its entry stored it: an event carrying another input is dead-lettered subject_mismatch and runs nothing", async () => {
  await using t = await startTestNats();
  const gate = Promise.withResolvers<void>();
  await using o = await startTwoSteps(t, { holdItem: "S2", hold: gate.promise });
  try {
    await submitItem(t.nc, o.p, "S1", ANN, { source: "test", traceId: TRACE });
    await o.done("S1");
    await submitItem(t.nc, o.p, "S2", BOB, { source: "test", traceId: TRACE });
    // S2 is at its answer step (held there), and its state is written.
    await waitFor(
      async () =>
        o.ran.some((r) => r.step === "answer" && r.item === "S2") &&
        (await readItem(o.kv, "S2"))?.input !== undefined,
      20_000,
      "S2 held at its answer step, its state written",
    );
    // The route step's key republishes S2's route event carrying ann's order as the input.
    const real = await lastOn(t.jsm, o.stream, "orders.route.S2");
    const forged = { ...real, id: "forged-route-s2", data: { ...real.data, input: ANN } };
    const ack = await jetstream(t.nc).publish("orders.route.S2", JSON.stringify(forged));
    const letter = (await lettersOf(t, ack.seq, ["orders-answer"])).get("orders-answer")!;
    assert.equal(letter.code, "subject_mismatch");
    assert.match(letter.reason, /carries a data\.input other than the item's/);
    gate.resolve();
    const s2 = await o.done("S2");
    assert.deepEqual(s2.input, BOB);
    assert.deepEqual(
      o.ran.filter((r) => r.item === "S2").map((r) => [r.step, r.input]),
      [["route", BOB], ["answer", BOB]],
      "no step ran with ann's order for bob's item",
    );
    await settled(t.jsm, o.stream, o.consumers);
    assert.deepEqual(await subjectsOf(t.jsm, o.stream, "orders.failed.*"), []);
  } finally {
    gate.resolve();
  }
});

Deno.test("a work step's event carrying another input than the item's entry event, before its state is written, is dead-lettered subject_mismatch", async () => {
  await using t = await startTestNats();
  const gate = Promise.withResolvers<void>();
  // No state writer: the step checks the carried input against the item's entry event.
  await using o = await startTwoSteps(t, { holdItem: "S3", hold: gate.promise, stateless: true });
  try {
    await submitItem(t.nc, o.p, "S3", BOB, { source: "test", traceId: TRACE });
    await waitFor(
      () => o.ran.some((r) => r.step === "answer" && r.item === "S3"),
      20_000,
      "S3 held at its answer step",
    );
    const real = await lastOn(t.jsm, o.stream, "orders.route.S3");
    const forged = { ...real, id: "forged-route-s3", data: { ...real.data, input: ANN } };
    const ack = await jetstream(t.nc).publish("orders.route.S3", JSON.stringify(forged));
    const letter = (await lettersOf(t, ack.seq, ["orders-answer"])).get("orders-answer")!;
    assert.equal(letter.code, "subject_mismatch");
    assert.match(letter.reason, /its entry event \(stream sequence \d+\)/);
    assert.deepEqual(
      o.ran.filter((r) => (r.input as { customer?: unknown }).customer === "ann"),
      [],
      "nothing ran on ann's order",
    );
  } finally {
    gate.resolve();
  }
});

Deno.test("a work step does not run for an item that has ended: a step event for a done item is dead-lettered conflict", async () => {
  await using t = await startTestNats();
  await using o = await startTwoSteps(t);
  await submitItem(t.nc, o.p, "S1", BOB, { source: "test", traceId: TRACE });
  const before = await o.done("S1");
  // The route step's key publishes its event again (another id, the item's own input).
  const real = await lastOn(t.jsm, o.stream, "orders.route.S1");
  const ack = await jetstream(t.nc).publish(
    "orders.route.S1",
    JSON.stringify({ ...real, id: "forged-route-again" }),
  );
  const letter = (await lettersOf(t, ack.seq, ["orders-answer"])).get("orders-answer")!;
  assert.equal(letter.code, "conflict");
  assert.match(letter.reason, /has ended \(done, outcome answered\)/);
  await settled(t.jsm, o.stream, o.consumers);
  assert.equal(o.ran.filter((r) => r.step === "answer").length, 1, "the answer step ran once");
  const after = await readItem(o.kv, "S1");
  assert.equal(after?.status, "done");
  assert.deepEqual(after?.results, before.results);
  assert.deepEqual(await subjectsOf(t.jsm, o.stream, "orders.failed.*"), []);
});

/**
 * The route step's key stores a copy of the route event of item `item`, held at its route step,
 * with a `Weft-Handover-To` header naming no step (every consumer skips it), before the step
 * publishes its own; `underItsId`: under the id the step's own event will carry.
 */
async function handoverFirst(underItsId: boolean) {
  await using t = await startTestNats();
  const gate = Promise.withResolvers<void>();
  await using o = await startTwoSteps(t, { holdItem: "H1", hold: gate.promise, holdStep: "route" });
  try {
    await submitItem(t.nc, o.p, "H1", BOB, { source: "test", traceId: TRACE });
    await waitFor(
      () => o.ran.some((r) => r.step === "route" && r.item === "H1"),
      20_000,
      "H1 held at its route step",
    );
    const entry = await lastOn(t.jsm, o.stream, "orders.submitted.H1");
    const own = deterministicId(entry.id as string, "orders.route");
    const forged = {
      ...entry,
      id: underItsId ? own : "forged-handover-h1",
      type: "orders.route",
      source: "weft-orders-route",
      data: {
        input: BOB,
        value: { routed: "forged" },
        results: { route: { routed: "forged" } },
        runs: { route: 1 },
      },
    };
    const h = headers();
    h.set(HANDOVER_HEADER, "nowhere");
    if (underItsId) h.set("Nats-Msg-Id", own);
    const ack = await jetstream(t.nc).publish("orders.route.H1", JSON.stringify(forged), {
      headers: h,
    });
    gate.resolve();
    const done = await o.done("H1");
    assert.deepEqual(done.results.route, { routed: true }, "the step's own result");
    assert.deepEqual(
      o.ran.filter((r) => r.item === "H1" && r.step === "answer").map((r) => r.value),
      [{ routed: true }],
      "the answer step ran once, on the route step's own event",
    );
    const mine = await lastOn(t.jsm, o.stream, "orders.route.H1");
    assert.deepEqual(mine.data.value, { routed: true });
    const info = await t.jsm.streams.info(o.stream, { subjects_filter: "orders.route.H1" });
    assert.equal(info.state.subjects?.["orders.route.H1"], 2, "the copy, then the step's own");
    const stored = await t.jsm.streams.getMessage(o.stream, { last_by_subj: "orders.route.H1" });
    assert.ok(stored!.seq > ack.seq);
    assert.equal(stored!.header?.get(HANDOVER_HEADER) ?? "", "");
    await settled(t.jsm, o.stream, o.consumers);
    assert.deepEqual(await subjectsOf(t.jsm, o.stream, "orders.failed.*"), []);
  } finally {
    gate.resolve();
  }
}

Deno.test("a hand-over copy a step's key stores first, naming no step, does not stand in for the step's own event: the item goes on", async () => {
  await handoverFirst(false);
});

Deno.test("a hand-over copy stored first under the id of the step's own event does not stand in for it either", async () => {
  await handoverFirst(true);
});

Deno.test("a router's event published again for an item that has ended, with the label of a wait, arms no wait: the control step dead-letters it conflict", async () => {
  await using t = await startTestNats();
  const obj = { type: "object" } as const;
  const def = definePipeline({
    name: "orders",
    input: { schema: obj },
    start: "route",
    steps: {
      route: {
        kind: "router",
        route: (_v, ctx) => ((ctx.input as { urgent?: boolean }).urgent ? "urgent" : "normal"),
        routes: { urgent: "approval", normal: "reply" },
      },
      approval: {
        kind: "wait",
        event: "approved",
        timeoutMs: 3_600_000,
        onTimeout: "reply",
        next: "reply",
      },
      reply: { kind: "task", output: obj, handle: () => ({ replied: true }), next: "sent" },
      sent: { kind: "end", outcome: "sent" },
    },
  });
  const p: LoadedPipeline = { file: "inline", def, flow: compileFlow(def) };
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const runners = [
    await runStateWriter({ ...deps, spec: pipelineStateSpec(p) }),
    await runStage({ ...deps, stage: workStage(p, "route", { nc: t.nc }) }),
    await runStage({ ...deps, stage: workStage(p, "reply", { nc: t.nc }) }),
    await runStage({ ...deps, stage: controlStage(p, t.nc) }),
  ];
  try {
    const { stream } = pipelineSubjects(def);
    const kv = await new Kvm(t.nc).open(stateBucketOf("orders"));
    await submitItem(t.nc, p, "N1", { urgent: false }, { source: "test", traceId: TRACE });
    const before = await waitFor(
      async () => {
        const s = await readItem(kv, "N1");
        return s?.status === "done" && s;
      },
      20_000,
      "N1 done",
    );
    // The route step's key publishes its event again, another id, the label of the wait.
    const real = await lastOn(t.jsm, stream, "orders.route.N1");
    const results = { ...real.data.results as Record<string, unknown> };
    results.route = { label: "urgent", by: "rules" };
    const ack = await jetstream(t.nc).publish(
      "orders.route.N1",
      JSON.stringify({ ...real, id: "forged-route-n1", data: { ...real.data, results } }),
    );
    const letter = (await lettersOf(t, ack.seq, ["orders-control"])).get("orders-control")!;
    assert.equal(letter.code, "conflict");
    assert.match(letter.reason, /has ended \(done, outcome sent\).*nothing was armed/);
    await settled(t.jsm, stream, [durableOf(def, "control"), durableOf(def, "reply")]);
    const control = await new Kvm(t.nc).open(controlBucketOf("orders"));
    assert.equal(await control.get("approval.N1"), null, "no wait recorded");
    const schedules = await new Kvm(t.nc).open(SCHEDULE_BUCKET);
    for await (const k of await schedules.keys()) assert.ok(!k.includes("N1"), `timer ${k}`);
    // A decision on the bus for it now stores nothing after the item's end.
    const decided = await jetstream(t.nc).publish("orders.approved.N1", JSON.stringify({}));
    await settled(t.jsm, stream, [durableOf(def, "control")]);
    const info = await t.jsm.streams.info(stream, { subjects_filter: "orders.*.N1" });
    const stored = Object.keys(info.state.subjects ?? {}).sort();
    assert.deepEqual(stored, [
      "orders.approved.N1",
      "orders.reply.N1",
      "orders.route.N1",
      "orders.sent.N1",
      "orders.submitted.N1",
    ]);
    assert.ok(info.state.last_seq >= decided.seq);
    const after = await readItem(kv, "N1");
    assert.equal(after?.status, "done");
    assert.deepEqual(after?.results, before.results);
    assert.deepEqual(await subjectsOf(t.jsm, stream, "orders.failed.*"), []);
  } finally {
    for (const r of runners) await r.stop();
  }
});

Deno.test("a step's key cannot end an item waiting for a decision: its forged run and end are dead-lettered conflict, and the decision still decides", async () => {
  // Found by probing: the reply step's key published its event and its end for an item waiting
  // at its approval; the item read as done, outcome sent, and the decision was refused (409).
  await using t = await startTestNats();
  const obj = { type: "object" } as const;
  const def = definePipeline({
    name: "orders",
    input: { schema: obj },
    start: "route",
    steps: {
      route: { kind: "router", route: () => "urgent" as const, routes: { urgent: "approval" } },
      approval: {
        kind: "wait",
        event: "approved",
        timeoutMs: 3_600_000,
        onTimeout: "reply",
        next: "reply",
      },
      reply: { kind: "task", output: obj, handle: () => ({ replied: true }), next: "sent" },
      sent: { kind: "end", outcome: "sent" },
    },
  });
  const p: LoadedPipeline = { file: "inline", def, flow: compileFlow(def) };
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const runners = [
    await runStateWriter({ ...deps, spec: pipelineStateSpec(p) }),
    await runStage({ ...deps, stage: workStage(p, "route", { nc: t.nc }) }),
    await runStage({ ...deps, stage: workStage(p, "reply", { nc: t.nc }) }),
    await runStage({ ...deps, stage: controlStage(p, t.nc) }),
  ];
  try {
    const kv = await new Kvm(t.nc).open(stateBucketOf("orders"));
    await submitItem(t.nc, p, "W1", {}, { source: "test", traceId: TRACE });
    const waiting = await waitFor(
      async () => {
        const s = await readItem(kv, "W1");
        return s?.status === "waiting" && s;
      },
      20_000,
      "W1 waiting",
    );
    // A client following the item's events from now on.
    const app = await definitionsApp(t, [p]);
    const live = readSse(await app.request("/pipelines/orders/items/W1/events"), {
      timeoutMs: 30_000,
    });
    // The reply step's key: its event, then its end, as its runner would publish them.
    const route = await lastOn(t.jsm, pipelineSubjects(def).stream, "orders.route.W1");
    const data = {
      ...route.data,
      results: { ...route.data.results as object, approval: {}, reply: { replied: "forged" } },
      runs: { ...route.data.runs as object, approval: 1, reply: 1 },
    };
    const js = jetstream(t.nc);
    const forged = [];
    for (const type of ["reply", "sent"]) {
      forged.push(
        await js.publish(
          `orders.${type}.W1`,
          JSON.stringify({ ...route, id: `forged-${type}`, type: `orders.${type}`, data }),
        ),
      );
    }
    const state = durableOf(def, "state");
    for (const ack of forged) {
      const letter = (await lettersOf(t, ack.seq, [state])).get(state)!;
      assert.equal(letter.code, "conflict");
      assert.match(letter.reason, /has not reached step "reply"|no completion that leads/);
    }
    const still = await readItem(kv, "W1");
    assert.equal(still?.status, "waiting");
    assert.deepEqual(still?.current, ["approval"]);
    assert.equal(still?.updated_at, waiting.updated_at);
    // The decision still decides: the item goes on through reply to its own end.
    await js.publish("orders.approved.W1", JSON.stringify({ by: "alice" }));
    const done = await waitFor(
      async () => {
        const s = await readItem(kv, "W1");
        return s?.status === "done" && s;
      },
      20_000,
      "W1 done",
    );
    assert.equal(done.outcome, "sent");
    assert.deepEqual(done.results.reply, { replied: true });
    // Its event stream showed no forged end, and closed at the item's own.
    const frames = await live;
    const sent = frames.filter((f) => f.event === "orders.sent");
    assert.equal(sent.length, 1, frames.map((f) => f.event).join(", "));
    assert.notEqual(JSON.parse(sent[0]!.data).id, "forged-sent");
    assert.equal(frames.at(-1)!.event, "orders.sent");
    // A replay shows the same.
    const replayed = await readSse(await app.request("/pipelines/orders/items/W1/events"), {
      timeoutMs: 30_000,
    });
    assert.deepEqual(
      replayed.filter((f) => f.event === "orders.sent").map((f) => JSON.parse(f.data).id),
      [JSON.parse(sent[0]!.data).id],
    );
    assert.deepEqual(done.results.approval, { by: "alice" });
    // The state a rebuild folds from the stream is the live one.
    const { states } = await rebuildStates(jetstream(t.nc), pipelineStateSpec(p));
    const rebuilt = states.get("W1")!;
    assert.equal(rebuilt.status, "done");
    assert.deepEqual(rebuilt.results, done.results);
  } finally {
    for (const r of runners) await r.stop();
  }
});

/** route -> (urgent) approval -> draft, or (normal) draft; draft -> reply -> sent. */
function gatedOrders(gate: Promise<void>, calls: { draft: number; reply: number }) {
  const obj = { type: "object" } as const;
  const def = definePipeline({
    name: "orders",
    input: { schema: obj },
    start: "route",
    steps: {
      route: {
        kind: "router",
        route: (_v, ctx) => ((ctx.input as { urgent?: boolean }).urgent ? "urgent" : "normal"),
        routes: { urgent: "approval", normal: "draft" },
      },
      approval: {
        kind: "wait",
        event: "approved",
        timeoutMs: 3_600_000,
        onTimeout: "draft",
        next: "draft",
      },
      draft: {
        kind: "task",
        output: obj,
        handle: async () => (await gate, calls.draft++, { drafted: true }),
        next: "reply",
      },
      reply: { kind: "task", output: obj, handle: () => (calls.reply++, {}), next: "sent" },
      sent: { kind: "end", outcome: "sent" },
    },
  });
  return { def, flow: compileFlow(def), file: "inline" } as LoadedPipeline;
}

Deno.test("a step's event for an item not at the step runs nothing after it: the next step and the control step dead-letter it conflict", async () => {
  // Found in review: a step's key publishing its event for an item waiting elsewhere ran the
  // steps after it (and a router's event again with another label armed a wait), though the
  // item's state took none of it.
  await using t = await startTestNats();
  let open!: () => void;
  const calls = { draft: 0, reply: 0 };
  const p = gatedOrders(new Promise<void>((r) => open = r), calls);
  const def = p.def;
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const runners = [
    await runStateWriter({ ...deps, spec: pipelineStateSpec(p) }),
    ...await Promise.all(
      ["route", "draft", "reply"].map((s) =>
        runStage({ ...deps, stage: workStage(p, s, { nc: t.nc }) })
      ),
    ),
    await runStage({ ...deps, stage: controlStage(p, t.nc) }),
  ];
  try {
    const { stream } = pipelineSubjects(def);
    const kv = await new Kvm(t.nc).open(stateBucketOf("orders"));
    const js = jetstream(t.nc);
    const opts = { source: "test", traceId: TRACE };
    await submitItem(t.nc, p, "U1", { urgent: true }, opts);
    await submitItem(t.nc, p, "N1", { urgent: false }, opts);
    const state = (id: string, status: string) =>
      waitFor(
        async () => {
          const s = await readItem(kv, id);
          return s?.status === status && s;
        },
        20_000,
        `${id} ${status}`,
      );
    await state("U1", "waiting");
    // N1 is at draft (held there by the gate).
    await waitFor(async () => (await readItem(kv, "N1"))?.current.includes("draft"), 20_000, "N1");
    // U1, waiting for approval: the draft step's key publishes its event for it.
    const route = await lastOn(t.jsm, stream, "orders.route.U1");
    const drafted = {
      ...route,
      id: "forged-draft",
      type: "orders.draft",
      data: {
        ...route.data,
        results: { ...route.data.results as object, draft: { drafted: "forged" } },
        runs: { ...route.data.runs as object, draft: 1 },
      },
    };
    const a = await js.publish("orders.draft.U1", JSON.stringify(drafted));
    const aLetters = await lettersOf(t, a.seq, ["orders-reply", "orders-state"]);
    assert.equal(aLetters.get("orders-state")!.code, "conflict");
    const byReply = aLetters.get("orders-reply")!;
    assert.equal(byReply.code, "conflict");
    assert.match(byReply.reason, /has not reached.*step reply did not run/);
    // U1 again: the route step's key publishes its event again with the other label.
    const relabelled = {
      ...route,
      id: "forged-route",
      data: {
        ...route.data,
        results: { ...route.data.results as object, route: { label: "normal", by: "rules" } },
      },
    };
    const b = await js.publish("orders.route.U1", JSON.stringify(relabelled));
    const byDraft = (await lettersOf(t, b.seq, ["orders-draft"])).get("orders-draft")!;
    assert.equal(byDraft.code, "conflict");
    // N1, at draft: its route's event again, labelled for the approval, arms no wait.
    const nRoute = await lastOn(t.jsm, stream, "orders.route.N1");
    const toWait = {
      ...nRoute,
      id: "forged-route-n",
      data: {
        ...nRoute.data,
        results: { ...nRoute.data.results as object, route: { label: "urgent", by: "rules" } },
      },
    };
    const c = await js.publish("orders.route.N1", JSON.stringify(toWait));
    const byControl = (await lettersOf(t, c.seq, ["orders-control"])).get("orders-control")!;
    assert.equal(byControl.code, "conflict");
    assert.match(byControl.reason, /nothing was armed/);
    const control = await new Kvm(t.nc).open(controlBucketOf("orders"));
    assert.equal(await control.get("approval.N1"), null, "no wait recorded");
    assert.equal(calls.reply, 0);
    // Both items go on as their own events say.
    open();
    await js.publish("orders.approved.U1", JSON.stringify({ by: "alice" }));
    for (const id of ["U1", "N1"]) {
      const done = await state(id, "done");
      assert.deepEqual(done.results.draft, { drafted: true });
    }
    assert.deepEqual(calls, { draft: 2, reply: 2 });
  } finally {
    open();
    for (const r of runners) await r.stop();
  }
});

Deno.test("a step's event for an id that never entered arms no wait: the control step dead-letters it not_found", async () => {
  await using t = await startTestNats();
  const obj = { type: "object" } as const;
  const def = definePipeline({
    name: "approvals",
    input: { schema: obj },
    start: "check",
    steps: {
      check: { kind: "task", output: obj, handle: () => ({ checked: true }), next: "approval" },
      approval: {
        kind: "wait",
        event: "approved",
        schema: obj,
        timeoutMs: 3_600_000,
        next: "done",
        onTimeout: "done",
      },
      done: { kind: "end", outcome: "done" },
    },
  });
  const p: LoadedPipeline = { file: "inline", def, flow: compileFlow(def) };
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const runners = [
    await runStage({ ...deps, stage: workStage(p, "check", { nc: t.nc }) }),
    await runStage({ ...deps, stage: controlStage(p, t.nc) }),
  ];
  try {
    const { stream } = pipelineSubjects(def);
    await submitItem(t.nc, p, "A1", {}, { source: "test", traceId: TRACE });
    const schedules = await new Kvm(t.nc).open(SCHEDULE_BUCKET);
    const keys = async () => {
      const all: string[] = [];
      for await (const k of await schedules.keys()) all.push(k);
      return all;
    };
    // The real item waits: its timeout is scheduled.
    await waitFor(async () => (await keys()).some((k) => k.includes("A1")), 20_000, "A1's timer");
    const real = await lastOn(t.jsm, stream, "approvals.check.A1");
    const ack = await jetstream(t.nc).publish(
      "approvals.check.PHANTOM4",
      JSON.stringify({ ...real, id: "forged-check", item_id: "PHANTOM4" }),
    );
    const letter = (await lettersOf(t, ack.seq, ["approvals-control"])).get("approvals-control")!;
    assert.equal(letter.code, "not_found");
    assert.match(letter.reason, /no item "PHANTOM4".*approvals\.submitted\.PHANTOM4/);
    await settled(t.jsm, stream, [durableOf(def, "control")]);
    assert.deepEqual((await keys()).filter((k) => k.includes("PHANTOM4")), [], "no timer armed");
    assert.deepEqual(await subjectsOf(t.jsm, stream, "approvals.*.PHANTOM4"), [
      "approvals.check.PHANTOM4",
    ]);
  } finally {
    for (const r of runners) await r.stop();
  }
});

Deno.test("a copy of the event a failed item failed on, with its id and another body, resumes nothing: dead-lettered conflict; the redrive of its letter resumes the item with the original", async () => {
  await using t = await startTestNats();
  let down = true;
  await using o = await startTwoSteps(t, { failAnswer: () => down });
  await submitItem(t.nc, o.p, "F1", BOB, { source: "test", traceId: TRACE });
  const kv = o.kv;
  const failed = await waitFor(
    async () => {
      const s = await readItem(kv, "F1");
      return s?.status === "failed" && s;
    },
    20_000,
    "F1 failed at its answer step",
  );
  const real = await lastOn(t.jsm, o.stream, "orders.route.F1");
  assert.equal(failed.error?.event, real.id, "the failure names the route event");
  // The route step's key stores its event again with the failed event's id, another result.
  down = false;
  const forged = {
    ...real,
    time: "2099-01-01T00:00:00.000Z",
    data: { ...real.data, value: { routed: "FORGED" }, results: { route: { routed: "FORGED" } } },
  };
  const ack = await jetstream(t.nc).publish("orders.route.F1", JSON.stringify(forged));
  const letter = (await lettersOf(t, ack.seq, ["orders-answer"])).get("orders-answer")!;
  assert.equal(letter.code, "conflict");
  assert.match(letter.reason, /carries its id with another body/);
  await settled(t.jsm, o.stream, o.consumers);
  assert.deepEqual(
    o.ran.filter((r) => r.step === "answer").map((r) => r.value),
    [{ routed: true }],
    "the answer step never ran on the forged value",
  );
  const still = await readItem(kv, "F1");
  assert.equal(still?.status, "failed", "the forged copy resumed nothing");
  assert.deepEqual(still?.results.route, { routed: true });
  assert.equal(still?.redriven, undefined);
  assert.deepEqual(await subjectsOf(t.jsm, o.stream, "orders.failed.*"), ["orders.failed.F1"]);
  const failures = await t.jsm.streams.info(o.stream, { subjects_filter: "orders.failed.F1" });
  assert.equal(failures.state.subjects?.["orders.failed.F1"], 1, "the conflict failed nothing");

  // The redrive of the item's own letter stores the original again: the item resumes from it.
  const own = (await listDeadLetters(jetstream(t.nc), { item_id: "F1", code: "rejected" }))
    .filter((l) => l.letter.stream_seq !== ack.seq);
  assert.equal(own.length, 1);
  const { redriven } = await redrive(jetstream(t.nc), { ids: [own[0]!.seq] });
  assert.equal(redriven.length, 1);
  const done = await o.done("F1");
  assert.deepEqual(done.results.route, { routed: true });
  assert.deepEqual(done.results.answer, { answered: true });
  assert.equal(done.redriven?.length, 1);
  assert.deepEqual(
    o.ran.filter((r) => r.step === "answer").map((r) => r.value),
    [{ routed: true }, { routed: true }],
    "the answer step ran again on the original only",
  );
});

Deno.test("junk a step's key stores under the id of the step's completion does not make a redrive skip the step as run: the redriven item goes on and ends", async () => {
  // docs/SECURITY.md had this as not defended: a redrive asks whether the step ran for the
  // redriven event (its completion's id follows from the event's), and took any message under
  // that id for its completion; the item stayed where it was, its letter gone.
  await using t = await startTestNats();
  let down = true;
  await using o = await startTwoSteps(t, { failAnswer: () => down });
  await submitItem(t.nc, o.p, "J1", BOB, { source: "test", traceId: TRACE });
  await waitFor(
    async () => (await readItem(o.kv, "J1"))?.status === "failed" || undefined,
    20_000,
    "J1 failed at its answer step",
  );
  const route = await lastOn(t.jsm, o.stream, "orders.route.J1");
  // The answer step's key stores junk where the answer step's completion of it would be.
  const junk = { id: deterministicId(route.id as string, "orders.answer") };
  await jetstream(t.nc).publish("orders.answer.J1", JSON.stringify(junk));
  down = false;
  const [letter] = await listDeadLetters(jetstream(t.nc), { item_id: "J1", code: "rejected" });
  const { redriven } = await redrive(jetstream(t.nc), { ids: [letter!.seq] });
  assert.equal(redriven.length, 1);
  const done = await o.done("J1");
  assert.deepEqual(done.results.answer, { answered: true });
  assert.equal(
    o.ran.filter((r) => r.step === "answer" && r.item === "J1").length,
    2,
    "the answer step ran again for the redriven event",
  );
});

/**
 * A definition of three tasks and an end, run in-process with its state writer and the
 * gateway app: `check` holds every item until `release`. `copies` stores three copies of an
 * item's `route` completion with another result: a new id dated 2000, and the real id as a
 * hand-over's and as a redrive's (their headers); it answers the last one's stream sequence.
 */
async function startThreeSteps(
  t: TestNats,
  holdAt: "answer" | "check" = "check",
  withControl = false,
  /** Whether the check step fails its first attempt (the runner retries it). */
  checkFailsOnce = false,
) {
  const obj = { type: "object" } as const;
  const ran: { step: string; value: unknown }[] = [];
  const gate = Promise.withResolvers<void>();
  let failed = false;
  const task = (step: string, next: string, hold = step === holdAt) => ({
    kind: "task" as const,
    output: obj,
    handle: async (value: unknown) => {
      ran.push({ step, value });
      if (hold) await gate.promise;
      if (step === "check" && checkFailsOnce && !failed) {
        failed = true;
        throw new Error("down for a moment");
      }
      return { [step]: true };
    },
    next,
  });
  const def = definePipeline({
    name: "orders",
    input: { schema: obj },
    start: "route",
    steps: {
      route: task("route", "answer"),
      answer: task("answer", "check"),
      check: task("check", "done"),
      done: { kind: "end", outcome: "checked" },
    },
  });
  const p: LoadedPipeline = { file: "inline", def, flow: compileFlow(def) };
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const runners = [
    await runStateWriter({ ...deps, spec: pipelineStateSpec(p) }),
    ...await Promise.all(
      ["route", "answer", "check"].map((s) =>
        runStage({ ...deps, stage: workStage(p, s, { nc: t.nc }) })
      ),
    ),
    ...(withControl ? [await runStage({ ...deps, stage: controlStage(p, t.nc) })] : []),
  ];
  const app = await definitionsApp(t, [p]);
  const { stream } = pipelineSubjects(def);
  const item = async (id: string) => {
    const res = await app.request(`/pipelines/orders/items/${id}`);
    return res.status === 200 ? (await res.json()) as ItemState : undefined;
  };
  const copies = async (id: string) => {
    const real = await lastOn(t.jsm, stream, `orders.route.${id}`);
    const js = jetstream(t.nc);
    const forged = {
      ...real.data,
      value: { route: "FORGED" },
      results: { route: { route: "FORGED" } },
    };
    const subject = `orders.route.${id}`;
    await js.publish(
      subject,
      JSON.stringify({
        ...real,
        id: "route-again",
        time: "2000-01-01T00:00:00.000Z",
        data: forged,
      }),
    );
    const handover = headers();
    handover.set(HANDOVER_HEADER, "answer");
    await js.publish(subject, JSON.stringify({ ...real, data: forged }), { headers: handover });
    const redriven = headers();
    redriven.set(REDRIVE_OF_HEADER, "1");
    return (await js.publish(
      subject,
      JSON.stringify({ ...real, time: "2000-01-01T00:00:00.000Z", data: forged }),
      { headers: redriven },
    )).seq;
  };
  return {
    p,
    app,
    ran,
    stream,
    item,
    copies,
    release: () => gate.resolve(),
    consumers: ["route", "answer", "check", "state", ...(withControl ? ["control"] : [])].map((
      s,
    ) => durableOf(def, s)),
    async [Symbol.asyncDispose]() {
      gate.resolve();
      for (const r of runners) await r.stop();
    },
  };
}

Deno.test("a repeated or forged completion of a step an item went past changes nothing in its state: not its result, not where it is, not when it was updated", async () => {
  await using t = await startTestNats();
  await using o = await startThreeSteps(t);
  await submitItem(t.nc, o.p, "G1", BOB, { source: "test", traceId: TRACE });
  // The item is at its check step (held there), past route and answer, its state written.
  const before = await waitFor(
    async () => {
      const s = await o.item("G1");
      return o.ran.some((r) => r.step === "check") && s?.current.includes("check") && s;
    },
    20_000,
    "G1 at its check step",
  );
  assert.deepEqual(before.current, ["check"]);
  const last = await o.copies("G1");
  const after = await waitFor(
    async () => {
      const s = await o.item("G1");
      return s !== undefined && s.last_seq >= last && s;
    },
    20_000,
    "the state writer past the copies",
  );
  assert.deepEqual(after.results.route, { route: true }, "route's result is its own");
  assert.deepEqual(after.current, ["check"], "the item is where it was");
  assert.deepEqual(after.runs, before.runs);
  assert.equal(after.updated_at, before.updated_at);
  assert.ok(Date.parse(after.updated_at) >= Date.parse(after.created_at));
  o.release();
  const done = await waitFor(
    async () => {
      const s = await o.item("G1");
      return s?.status === "done" && s.last_seq > last && s;
    },
    20_000,
    "G1 done",
  );
  assert.deepEqual(done.results, {
    route: { route: true },
    answer: { answer: true },
    check: { check: true },
  });
  assert.deepEqual(done.current, []);
  assert.ok(Date.parse(done.updated_at) >= Date.parse(after.updated_at));
});

Deno.test("a work step does not run again for a copy of a completion it ran past: a step's key republishing its event with another id and result is dead-lettered conflict", async () => {
  await using t = await startTestNats();
  await using o = await startThreeSteps(t);
  await submitItem(t.nc, o.p, "G2", BOB, { source: "test", traceId: TRACE });
  await waitFor(
    async () => (await o.item("G2"))?.current.includes("check") === true,
    20_000,
    "G2 at its check step, its state written",
  );
  await o.copies("G2");
  const seqs: number[] = [];
  for await (const m of messagesOn(t.jsm, o.stream, "orders.route.G2", { max: 10 })) {
    if (m.json<{ id?: string }>().id === "route-again") seqs.push(m.seq);
  }
  assert.equal(seqs.length, 1);
  const letter = (await lettersOf(t, seqs[0]!, ["orders-answer"])).get("orders-answer")!;
  assert.equal(letter.code, "conflict");
  assert.match(letter.reason, /a copy of an earlier completion; step answer did not run/);
  o.release();
  await waitFor(async () => (await o.item("G2"))?.status === "done", 20_000, "G2 done");
  await settled(t.jsm, o.stream, o.consumers);
  assert.deepEqual(
    o.ran.map((r) => [r.step, r.value]),
    [["route", BOB], ["answer", { route: true }], ["check", { answer: true }]],
    "each step ran once, on its own input",
  );
  assert.deepEqual(await subjectsOf(t.jsm, o.stream, "orders.failed.*"), []);
});

Deno.test("a new run of a step an item went past, led to by the completion before it, runs nothing after it: the next step and the state writer dead-letter it conflict", async () => {
  // Found by re-probing: with a step before it (tickets: triage, then route), the forged run
  // was taken as one the held completion of the step before leads to.
  await using t = await startTestNats();
  await using o = await startThreeSteps(t);
  await submitItem(t.nc, o.p, "G4", BOB, { source: "test", traceId: TRACE });
  await waitFor(
    async () => (await o.item("G4"))?.current.includes("check") === true,
    20_000,
    "G4 at its check step, its state written",
  );
  const real = await lastOn(t.jsm, o.stream, "orders.answer.G4");
  const ack = await jetstream(t.nc).publish(
    "orders.answer.G4",
    JSON.stringify({
      ...real,
      id: "answer-run-2",
      data: {
        ...real.data,
        value: { answer: "FORGED" },
        results: { ...real.data.results as object, answer: { answer: "FORGED" } },
        runs: { ...real.data.runs as object, answer: 2 },
      },
    }),
  );
  const letters = await lettersOf(t, ack.seq, ["orders-check", "orders-state"]);
  assert.equal(letters.get("orders-state")!.code, "conflict");
  assert.match(letters.get("orders-state")!.reason, /has not reached step "answer"/);
  assert.equal(letters.get("orders-check")!.code, "conflict");
  assert.match(letters.get("orders-check")!.reason, /step check did not run/);
  o.release();
  const done = await waitFor(
    async () => {
      const s = await o.item("G4");
      return s?.status === "done" && s;
    },
    20_000,
    "G4 done",
  );
  await settled(t.jsm, o.stream, o.consumers);
  assert.deepEqual(done.results.answer, { answer: true });
  assert.deepEqual(
    o.ran.map((r) => [r.step, r.value]),
    [["route", BOB], ["answer", { route: true }], ["check", { answer: true }]],
    "each step ran once, on its own input",
  );
});

Deno.test("a new run of a step an item went past, with another result, runs nothing after it: the next step and the state writer dead-letter it conflict", async () => {
  // Found by probing: the router key of a ticket waiting for its approval published its event
  // again with `runs.route: 2` and the other label; the reply step took it and ran (as the
  // history the state writer had not yet written allowed a run above the state's), though the
  // state took nothing from it and no letter said so.
  await using t = await startTestNats();
  await using o = await startThreeSteps(t);
  await submitItem(t.nc, o.p, "G3", BOB, { source: "test", traceId: TRACE });
  const before = await waitFor(
    async () => {
      const s = await o.item("G3");
      return o.ran.some((r) => r.step === "check") && s?.current.includes("check") && s;
    },
    20_000,
    "G3 at its check step, its state written",
  );
  const real = await lastOn(t.jsm, o.stream, "orders.route.G3");
  const ack = await jetstream(t.nc).publish(
    "orders.route.G3",
    JSON.stringify({
      ...real,
      id: "route-run-2",
      data: {
        ...real.data,
        value: { route: "FORGED" },
        results: { route: { route: "FORGED" } },
        runs: { route: 2 },
      },
    }),
  );
  const letters = await lettersOf(t, ack.seq, ["orders-answer", "orders-state"]);
  assert.equal(letters.get("orders-state")!.code, "conflict");
  assert.match(letters.get("orders-state")!.reason, /has not reached step "route"/);
  assert.equal(letters.get("orders-answer")!.code, "conflict");
  assert.match(letters.get("orders-answer")!.reason, /step answer did not run/);
  o.release();
  const done = await waitFor(
    async () => {
      const s = await o.item("G3");
      return s?.status === "done" && s;
    },
    20_000,
    "G3 done",
  );
  await settled(t.jsm, o.stream, o.consumers);
  assert.deepEqual(done.results.route, { route: true });
  assert.deepEqual(done.runs, { ...before.runs, check: 1 });
  assert.deepEqual(
    o.ran.map((r) => [r.step, r.value]),
    [["route", BOB], ["answer", { route: true }], ["check", { answer: true }]],
    "each step ran once, on its own input",
  );
  assert.deepEqual(await subjectsOf(t.jsm, o.stream, "orders.failed.*"), []);
});

/**
 * The check step's key stores `type` (its event, or the end it leads to) for an item held at
 * its answer step, under the id the item's own will carry; then the item goes on.
 */
async function preempted(type: "orders.check" | "orders.checked", checkFailsOnce = false) {
  await using t = await startTestNats();
  await using o = await startThreeSteps(t, "answer", false, checkFailsOnce);
  await submitItem(t.nc, o.p, "P1", BOB, { source: "test", traceId: TRACE });
  await waitFor(() => o.ran.some((r) => r.step === "answer"), 20_000, "P1 held at answer");
  const entry = await lastOn(t.jsm, o.stream, "orders.submitted.P1");
  const route = deterministicId(entry.id as string, "orders.route");
  const answer = deterministicId(route, "orders.answer");
  const check = deterministicId(answer, "orders.check");
  const id = type === "orders.check" ? check : deterministicId(check, "orders.checked");
  const h = headers();
  h.set("Nats-Msg-Id", id);
  const forged = await jetstream(t.nc).publish(
    `${type}.P1`,
    JSON.stringify({
      ...entry,
      id,
      type,
      source: "weft-orders-check",
      data: {
        input: BOB,
        value: { check: "FORGED" },
        results: { route: { route: true }, answer: { answer: true }, check: { check: "FORGED" } },
        runs: { route: 1, answer: 1, check: 1 },
      },
    }),
    { headers: h },
  );
  const letter = (await lettersOf(t, forged.seq, ["orders-state"])).get("orders-state")!;
  assert.equal(letter.code, "conflict");
  o.release();
  const done = await waitFor(
    async () => {
      const s = await o.item("P1");
      return s?.status === "done" && s;
    },
    20_000,
    "P1 done on its own events",
  );
  assert.equal(done.outcome, "checked");
  assert.deepEqual(done.results.check, { check: true });
  await settled(t.jsm, o.stream, o.consumers);
  const own = await lastOn(t.jsm, o.stream, `${type}.P1`);
  assert.deepEqual(
    (own.data.results as Record<string, unknown>).check,
    { check: true },
    "the item's own, stored after the forged one",
  );
  assert.deepEqual(await subjectsOf(t.jsm, o.stream, "orders.failed.*"), []);
}

Deno.test("a step's event stored first under the id of the item's own, before the item reached the step, does not stand in for it: the item goes on and ends", async () => {
  // Found by probing: the documents classify key stored documents.classify for an item at its
  // extract step, under the id the classify step's own would carry. The state writer
  // dead-lettered it, the step's own was answered "duplicate" and dropped, and the item stayed
  // at classify for good, its end dead-lettered, with no letter for what was lost.
  await preempted("orders.check");
});

Deno.test("an end stored first under the id of the item's own, before the item reached its step, does not stand in for it: the item ends", async () => {
  // Found by probing: documents.filed under the id of the item's own end, stored while the item
  // was at extract; the item's own end was skipped as stored already, and the item stayed
  // running, at no step, for good.
  await preempted("orders.checked");
});

Deno.test("a step's event stored first under the id of the item's own does not stand in for it when the step runs again: a retried step stores its own", async () => {
  // Found by re-probing the fix above: a redelivered message skips the events stored under
  // their ids already (so plain subscribers see them once), and that check took the forged
  // event under the step's id for the step's own, when the step failed its first attempt.
  await preempted("orders.check", true);
});

Deno.test("an end stored first under the id of the item's own does not stand in for it when its step runs again: the item ends", async () => {
  await preempted("orders.checked", true);
});

Deno.test("per-item SSE shows no step event the item's history does not lead to: a step's event for an item not at the step is neither replayed nor sent live", async () => {
  // Found by probing: documents.classify published with the classify key for an item at its
  // extract step was dead-lettered by the state writer, yet the item's event stream showed
  // it, before the item's extract, to a client replaying it and to one live.
  await using t = await startTestNats();
  await using o = await startThreeSteps(t, "answer");
  await submitItem(t.nc, o.p, "S1", BOB, { source: "test", traceId: TRACE });
  await waitFor(() => o.ran.some((r) => r.step === "answer"), 20_000, "S1 held at answer");
  const until = (e: { event?: string }) => e.event === "orders.checked";
  const live = readSse(await o.app.request("/pipelines/orders/items/S1/events"), {
    timeoutMs: 20_000,
    stopAfter: until,
  });
  const entry = await lastOn(t.jsm, o.stream, "orders.submitted.S1");
  const forged = await jetstream(t.nc).publish(
    "orders.check.S1",
    JSON.stringify({
      ...entry,
      id: "forged-check-s1",
      type: "orders.check",
      source: "weft-orders-check",
      data: {
        input: BOB,
        value: { check: "FORGED" },
        results: { check: { check: "FORGED" } },
        runs: { check: 1 },
      },
    }),
  );
  const letter = (await lettersOf(t, forged.seq, ["orders-state"])).get("orders-state")!;
  assert.equal(letter.code, "conflict");
  o.release();
  await waitFor(async () => (await o.item("S1"))?.status === "done", 20_000, "S1 done");
  const replayed = await readSse(await o.app.request("/pipelines/orders/items/S1/events"), {
    timeoutMs: 20_000,
    stopAfter: until,
  });
  for (const frames of [await live, replayed]) {
    assert.ok(!frames.some((f) => Number(f.id) === forged.seq), JSON.stringify(frames));
    assert.deepEqual(frames.map((f) => f.event), [
      "orders.submitted",
      "orders.route",
      "orders.answer",
      "orders.check",
      "orders.checked",
    ]);
  }
});

Deno.test("a step's event with a redrive's header, for an item not at the step, ends nothing: the control step dead-letters it conflict and publishes no end", async () => {
  // Found by probing: the documents classify key published documents.classify with
  // `Weft-Redrive-Of` for an item at its extract step; the control step took it for a redriven
  // completion and published documents.filed for the item (the state writer refused both).
  await using t = await startTestNats();
  await using o = await startThreeSteps(t, "answer", true);
  await submitItem(t.nc, o.p, "R1", BOB, { source: "test", traceId: TRACE });
  await waitFor(() => o.ran.some((r) => r.step === "answer"), 20_000, "R1 held at answer");
  const entry = await lastOn(t.jsm, o.stream, "orders.submitted.R1");
  const h = headers();
  h.set(REDRIVE_OF_HEADER, "1");
  h.set(REDRIVE_ITEM_HEADER, "R1");
  const forged = await jetstream(t.nc).publish(
    "orders.check.R1",
    JSON.stringify({
      ...entry,
      id: "forged-redriven-check",
      type: "orders.check",
      source: "weft-orders-check",
      data: {
        input: BOB,
        value: { check: "FORGED" },
        results: { check: { check: "FORGED" } },
        runs: { check: 1 },
      },
    }),
    { headers: h },
  );
  const letters = await lettersOf(t, forged.seq, ["orders-control", "orders-state"]);
  const byControl = letters.get("orders-control")!;
  assert.equal(byControl.code, "conflict");
  assert.match(byControl.reason, /has not reached.*nothing was published/);
  assert.deepEqual(await subjectsOf(t.jsm, o.stream, "orders.checked.*"), [], "no end stored");
  o.release();
  const done = await waitFor(
    async () => {
      const s = await o.item("R1");
      return s?.status === "done" && s;
    },
    20_000,
    "R1 done on its own events",
  );
  assert.deepEqual(done.results.check, { check: true });
  await settled(t.jsm, o.stream, o.consumers);
  const info = await t.jsm.streams.info(o.stream, { subjects_filter: "orders.checked.R1" });
  assert.equal(info.state.subjects?.["orders.checked.R1"], 1, "the item's own end alone");
  assert.deepEqual(await subjectsOf(t.jsm, o.stream, "orders.failed.*"), []);
});

Deno.test("an id whose bus submission failed at intake, submitted again valid, is processed: its entry after the failure resumes it, and a step's event before that changes nothing", async () => {
  // Found by re-probing this stop's dispatch check: the resubmission was answered 202, then
  // dispatch dead-lettered it `conflict` ("has failed") for good, and a forged step event for
  // the failed id wrote its text into the item's state.
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const { body } = await p.intake.submit({ text: "Why was I charged twice this month?" });
  await feedbackProcessed(t, body.id);
  const js = jetstream(t.nc);
  const kv = await new Kvm(t.nc).open(STATE_BUCKET);
  await js.publish("feedback.submit", JSON.stringify({ id: "FI1", text: 123 }));
  await waitFor(
    async () => (await readState<FeedbackState>(kv, "FI1"))?.state.status === "failed",
    20_000,
    "FI1 failed at intake",
  );
  // The sentiment key's event for the failed id, with text of its own.
  const real = await lastOn(t.jsm, FEEDBACK_STREAM, `feedback.sentiment_analyzed.${body.id}`);
  const forged = await js.publish(
    "feedback.sentiment_analyzed.FI1",
    JSON.stringify({
      ...real,
      id: "forged-fi1",
      item_id: "FI1",
      data: { ...real.data, text: "FORGED" },
    }),
  );
  await waitFor(
    async () => {
      const ci = await t.jsm.consumers.info(FEEDBACK_STREAM, "state");
      return ci.ack_floor.stream_seq >= forged.seq;
    },
    20_000,
    "the state writer past the forged event",
  );
  const failed = (await readState<FeedbackState>(kv, "FI1"))!.state;
  assert.equal(failed.status, "failed");
  assert.equal(failed.text, undefined, "the forged text is not the item's");
  // The caller sends it again, valid: the item is made and processed with its own text.
  const res = await p.app.request("/feedback", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ id: "FI1", text: "real text after intake failure" }),
  });
  assert.equal(res.status, 202, await res.text());
  const state = await feedbackProcessed(t, "FI1");
  assert.equal(state.text, "real text after intake failure");
});

Deno.test("a `feedback.failed` published for an id before it was submitted does not hold the item: it is processed", async () => {
  // Found by re-probing: a step's key publishing a failure for an id nobody used yet made the
  // later item's dispatch dead-letter it `conflict`, and the item stopped at topics for good.
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const js = jetstream(t.nc);
  await js.publish(
    "feedback.failed.PREF1",
    JSON.stringify({
      id: "forged-failed-pref1",
      type: "feedback.failed",
      version: 1,
      item_id: "PREF1",
      trace_id: TRACE,
      time: new Date().toISOString(),
      source: "weft-topics",
      data: { stage: "topics", code: "handler_failed", reason: "forged", attempts: 5 },
    }),
  );
  const res = await p.app.request("/feedback", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ id: "PREF1", text: "My invoice is wrong, charged twice" }),
  });
  assert.equal(res.status, 202, await res.text());
  const state = await feedbackProcessed(t, "PREF1");
  assert.equal(state.text, "My invoice is wrong, charged twice");
});

Deno.test("a copy of the event a failed item failed on, with another body and a time of its own, leaves the failed item's updated_at as it was", async () => {
  // Found by re-probing: the copy (route's key, another result, dated 2099) was dead-lettered
  // conflict and resumed nothing, but the failed item's updated_at became 2099, though a copy
  // of a run the state holds changes nothing, updated_at included (docs/PIPELINES.md).
  await using t = await startTestNats();
  let down = true;
  await using o = await startTwoSteps(t, { failAnswer: () => down });
  await submitItem(t.nc, o.p, "F2", BOB, { source: "test", traceId: TRACE });
  const failed = await waitFor(
    async () => {
      const s = await readItem(o.kv, "F2");
      return s?.status === "failed" && s;
    },
    20_000,
    "F2 failed at its answer step",
  );
  const real = await lastOn(t.jsm, o.stream, "orders.route.F2");
  down = false;
  const forged = {
    ...real,
    time: "2099-01-01T00:00:00.000Z",
    data: { ...real.data, value: { routed: "FORGED" }, results: { route: { routed: "FORGED" } } },
  };
  const ack = await jetstream(t.nc).publish("orders.route.F2", JSON.stringify(forged));
  const letter = (await lettersOf(t, ack.seq, ["orders-answer"])).get("orders-answer")!;
  assert.equal(letter.code, "conflict");
  await settled(t.jsm, o.stream, o.consumers);
  await waitFor(
    async () => ((await readItem(o.kv, "F2"))?.last_seq ?? 0) >= ack.seq,
    10_000,
    "the state writer took the copy",
  );
  const still = await readItem(o.kv, "F2");
  assert.equal(still?.status, "failed");
  assert.equal(still?.updated_at, failed.updated_at, "updated_at as it was");
  assert.deepEqual(still?.results.route, { routed: true });
  assert.deepEqual(
    o.ran.filter((r) => r.step === "answer").map((r) => r.value),
    [{ routed: true }],
  );
});
