/**
 * The runner against a real nats-server: what every stage gets for free.
 */
import assert from "node:assert/strict";
import { serverVersion, versionAtLeast } from "../src/nats_server.ts";
import { headers, nanos, type NatsConnection } from "@nats-io/nats-core";
import { AckPolicy, jetstream } from "@nats-io/jetstream";
import { publishEvent, runStage } from "../src/runner.ts";
import { Kvm } from "@nats-io/kv";
import { definePipeline } from "../src/pipeline/definition.ts";
import { compileFlow } from "../src/pipeline/flow.ts";
import { durableOf, pipelineSubjects } from "../src/pipeline/derive.ts";
import {
  type LoadedPipeline,
  pipelineStateSpec,
  pipelineTopology,
  readItem,
  stateBucketOf,
  submitItem,
  workStage,
} from "../src/pipeline/runtime.ts";
import { ensureTopology } from "../src/topology.ts";
import { runStateWriter } from "../src/state_writer.ts";
import { createEvent } from "../src/events.ts";
import { PermanentError } from "../src/errors.ts";
import { isStreamFull } from "../src/capacity.ts";
import { nextEvent, type Stage } from "../src/stage.ts";
import { feedbackAnalyzers } from "../pipelines/feedback/analyzers.ts";
import { sentimentStage } from "../pipelines/feedback/stages.ts";
import type { DeadLetter } from "../src/events.gen.ts";
import type { FeedbackFailed } from "../pipelines/feedback/events.gen.ts";
import type { Config } from "../src/config.ts";
import { startTestNats, testConfig } from "./helpers/nats.ts";
import { WeftMetrics } from "../src/observability/metrics.ts";
import { deadline, waitFor } from "./helpers/wait.ts";

/** nats-server 2.10+ (consumer metadata, several filters per consumer). */
const SERVER_2_10 = versionAtLeast((await serverVersion()) ?? "0.0.0", "2.10.0");

const rules = await feedbackAnalyzers({ ...testConfig(""), analyzers: "rules" });
const TRACE = "0af7651916cd43dd8448eb211c80319c";
const enc = new TextEncoder();

function ingested(itemId: string, text = "I love it") {
  return createEvent({
    type: "feedback.ingested",
    itemId,
    traceId: TRACE,
    source: "test",
    data: { text },
  });
}

/** Resolves with the first `n` messages on `subject` (a core subscription). */
function nextMessages(nc: NatsConnection, subject: string, n = 1) {
  const sub = nc.subscribe(subject, { max: n });
  return deadline(
    (async () => {
      const out = [];
      for await (const m of sub) out.push(m);
      return out;
    })(),
    10_000,
    `${n} message(s) on ${subject}`,
  ).finally(() => sub.unsubscribe());
}

/** A stage whose handler behaviour the test chooses. */
function probeStage(
  handle: (text: string, attempt: number) => void | Promise<void>,
): Stage<{ kind: "event"; types: readonly ["feedback.ingested"] }> {
  return {
    name: "probe",
    filterSubject: "feedback.ingested.*",
    stream: "FEEDBACK",
    failedType: "feedback.failed",
    input: { kind: "event", types: ["feedback.ingested"] },
    async handle(event, ctx) {
      await handle(event.data.text, ctx.message.deliveryCount);
      return [nextEvent(event, "feedback.sentiment_analyzed", {
        ...event.data,
        sentiment: { label: "neutral", score: 0, analyzer: "probe" },
      }, ctx)];
    },
  };
}

async function consumerSettled(
  t: { jsm: import("@nats-io/jetstream").JetStreamManager },
  name: string,
) {
  return await waitFor(
    async () => {
      const info = await t.jsm.consumers.info("FEEDBACK", name);
      return info.num_pending === 0 && info.num_ack_pending === 0 && info.num_redelivered >= 0 &&
        info;
    },
    10_000,
    `consumer ${name} to settle`,
  );
}

async function countOn(
  t: { jsm: import("@nats-io/jetstream").JetStreamManager },
  stream: string,
  subject: string,
) {
  const info = await t.jsm.streams.info(stream, { subjects_filter: subject });
  return Object.values(info.state.subjects ?? {}).reduce((a, b) => a + b, 0);
}

function runnerConfig(config: Config, over: Partial<Config> = {}) {
  return { ...config, ...over };
}

Deno.test("a stage consumes its input and publishes the next event with its id as message id and the trace continued", async () => {
  await using t = await startTestNats();
  const runner = await runStage({
    nc: t.nc,
    stage: sentimentStage(rules.sentiment),
    config: t.config,
    log: t.log,
  });
  const got = nextMessages(t.nc, "feedback.sentiment_analyzed.fb1");
  const h = headers();
  h.set("traceparent", `00-${TRACE}-b7ad6b7169203331-01`);
  await jetstream(t.nc).publish("feedback.ingested.fb1", JSON.stringify(ingested("fb1")), {
    headers: h,
  });
  const [m] = await got;
  const event = m!.json<{ id: string; trace_id: string; data: { sentiment: { label: string } } }>();
  assert.equal(event.data.sentiment.label, "positive");
  assert.equal(m!.headers?.get("Nats-Msg-Id"), event.id);
  assert.match(m!.headers?.get("traceparent") ?? "", new RegExp(`^00-${TRACE}-[0-9a-f]{16}-01$`));
  assert.notEqual(
    m!.headers?.get("traceparent"),
    `00-${TRACE}-b7ad6b7169203331-01`,
    "a new span id",
  );
  await runner.stop();
});

Deno.test("an input delivered twice yields one downstream event: the duplicate window drops the second", async () => {
  await using t = await startTestNats();
  const js = jetstream(t.nc);
  const runner = await runStage({
    nc: t.nc,
    stage: sentimentStage(rules.sentiment),
    config: t.config,
    log: t.log,
  });
  const e = ingested("fb2");
  // Two copies in the stream (distinct message ids), as after a crash before the ack.
  await js.publish("feedback.ingested.fb2", JSON.stringify(e), { msgID: "copy-1" });
  await js.publish("feedback.ingested.fb2", JSON.stringify(e), { msgID: "copy-2" });
  await consumerSettled(t, "sentiment");
  assert.equal(runner.stats.processed, 2);
  assert.equal(await countOn(t, "FEEDBACK", "feedback.sentiment_analyzed.fb2"), 1);
  await runner.stop();
});

Deno.test("a message that is not JSON is dead-lettered with its reason, tied to its item, and never redelivered", async () => {
  await using t = await startTestNats();
  const runner = await runStage({
    nc: t.nc,
    stage: sentimentStage(rules.sentiment),
    config: t.config,
    log: t.log,
  });
  const letters = nextMessages(t.nc, "deadletter.sentiment.fb3");
  const failed = nextMessages(t.nc, "feedback.failed.fb3");
  await jetstream(t.nc).publish("feedback.ingested.fb3", enc.encode("{not json"));
  const letter = (await letters)[0]!.json<DeadLetter>();
  assert.equal(letter.code, "invalid_event");
  assert.match(letter.reason, /not JSON/);
  assert.equal(letter.payload, "{not json");
  assert.equal(letter.attempts, 1);
  const f = (await failed)[0]!.json<FeedbackFailed>();
  assert.equal(f.data.stage, "sentiment");
  assert.equal(f.data.code, "invalid_event");
  const info = await consumerSettled(t, "sentiment");
  assert.equal(info.num_redelivered, 0);
  assert.equal(await countOn(t, "DEADLETTER", "deadletter.>"), 1);
  await runner.stop();
});

Deno.test("an event of the wrong shape is dead-lettered naming the field; invalid UTF-8 is kept as base64", async () => {
  await using t = await startTestNats();
  const runner = await runStage({
    nc: t.nc,
    stage: sentimentStage(rules.sentiment),
    config: t.config,
    log: t.log,
  });
  const letters = nextMessages(t.nc, "deadletter.sentiment.>", 3);
  const js = jetstream(t.nc);
  const e = ingested("fb4");
  await js.publish("feedback.ingested.fb4", JSON.stringify({ ...e, data: {} }));
  await js.publish("feedback.ingested.fb5", JSON.stringify({ ...ingested("fb5"), version: 9 }));
  await js.publish("feedback.ingested.fb6", new Uint8Array([0xff, 0xfe, 0x7b]));
  const byItem = Object.fromEntries((await letters).map((m) => {
    const l = m.json<DeadLetter>();
    return [l.item_id, l];
  }));
  assert.match(byItem.fb4!.reason, /\/data\/text is required/);
  assert.equal(byItem.fb5!.code, "unknown_version");
  assert.equal(byItem.fb6!.payload_encoding, "base64");
  assert.equal(byItem.fb6!.payload, "//57");
  await runner.stop();
});

Deno.test("a failing handler is retried with a growing delay and its next attempt succeeds", async () => {
  await using t = await startTestNats();
  const attempts: { attempt: number; at: number }[] = [];
  const stage = probeStage((_text, attempt) => {
    attempts.push({ attempt, at: performance.now() });
    if (attempt < 3) throw new Error("flaky dependency");
  });
  const config = runnerConfig(t.config, { retryBaseMs: 100, retryMaxMs: 1000 });
  const runner = await runStage({ nc: t.nc, stage, config, log: t.log });
  const out = nextMessages(t.nc, "feedback.sentiment_analyzed.fb7");
  await jetstream(t.nc).publish("feedback.ingested.fb7", JSON.stringify(ingested("fb7")));
  await out;
  assert.deepEqual(attempts.map((a) => a.attempt), [1, 2, 3]);
  // retryDelay(1) is 50-100 ms, retryDelay(2) is 100-200 ms.
  assert.ok(attempts[1]!.at - attempts[0]!.at >= 45, "first retry waited");
  assert.ok(attempts[2]!.at - attempts[1]!.at >= 95, "second retry waited longer");
  assert.equal(runner.stats.retried, 2);
  await runner.stop();
});

Deno.test("a handler that never answers times out, is retried, and is dead-lettered naming the timeout", async () => {
  await using t = await startTestNats();
  const signals: AbortSignal[] = [];
  const stage = probeStage(() => new Promise<void>(() => {}));
  const handle = stage.handle.bind(stage);
  stage.handle = (event, ctx) => {
    signals.push(ctx.signal);
    return handle(event, ctx);
  };
  const config = runnerConfig(t.config, {
    handlerTimeoutMs: 300,
    maxAttempts: 2,
    retryBaseMs: 10,
    retryMaxMs: 20,
  });
  const runner = await runStage({ nc: t.nc, stage, config, log: t.log });
  const letters = nextMessages(t.nc, "deadletter.probe.fb9");
  await jetstream(t.nc).publish("feedback.ingested.fb9", JSON.stringify(ingested("fb9")));
  // Before: held for ever (its lease kept alive), never retried nor dead-lettered.
  const letter = (await letters)[0]!.json<DeadLetter>();
  assert.equal(letter.code, "handler_failed");
  assert.match(letter.reason, /did not answer within 300 ms/);
  assert.equal(letter.attempts, 2);
  assert.ok(signals.length >= 2 && signals.every((s) => s.aborted), "each call was aborted");
  await runner.stop();
});

Deno.test({
  name:
    "a stage with several inputs filters on each (its consumer made before with their wildcard is updated)",
  // Consumer metadata and several filters per consumer: nats-server 2.10+.
  ignore: !SERVER_2_10,
  fn: async () => {
    await using t = await startTestNats();
    // As an earlier Weft made it: one wildcard filter.
    await t.jsm.consumers.add("FEEDBACK", {
      durable_name: "probe",
      filter_subject: "feedback.*.*",
      ack_policy: AckPolicy.Explicit,
    });
    const stage = {
      ...probeStage(() => {}),
      filterSubjects: ["feedback.ingested.*", "feedback.dispatched.*"],
    };
    const runner = await runStage({ nc: t.nc, stage, config: t.config, log: t.log });
    const ci = await t.jsm.consumers.info("FEEDBACK", "probe");
    assert.deepEqual(ci.config.filter_subjects, ["feedback.ingested.*", "feedback.dispatched.*"]);
    assert.equal(ci.config.filter_subject, undefined);
    await runner.stop();
  },
});

Deno.test("a permanent failure is dead-lettered at once, without retries", async () => {
  await using t = await startTestNats();
  let calls = 0;
  const stage = probeStage(() => {
    calls++;
    throw new PermanentError("policy forbids this text");
  });
  const runner = await runStage({ nc: t.nc, stage, config: t.config, log: t.log });
  const letters = nextMessages(t.nc, "deadletter.probe.fb8");
  await jetstream(t.nc).publish("feedback.ingested.fb8", JSON.stringify(ingested("fb8")));
  const letter = (await letters)[0]!.json<DeadLetter>();
  assert.equal(letter.code, "rejected");
  assert.equal(letter.attempts, 1);
  assert.equal(calls, 1);
  await runner.stop();
});

Deno.test("an item whose stream is full even for its failure event is dead-lettered saying it is not failed, loudly, and not redelivered", async () => {
  await using t = await startTestNats({ streamMaxBytes: 32 * 1024 });
  const js = jetstream(t.nc);
  await js.publish("feedback.ingested.full1", JSON.stringify(ingested("full1")));
  // Fill the rest of the stream until it refuses (discard-new).
  let full = false;
  while (!full) {
    await js.publish("feedback.submit", JSON.stringify({ text: "x".repeat(500) }))
      .catch((err) => (full = isStreamFull(err)) || Promise.reject(err));
  }
  const stage = probeStage(() => {
    throw new PermanentError("policy forbids this text");
  });
  const letters = nextMessages(t.nc, "deadletter.probe.full1");
  const runner = await runStage({ nc: t.nc, stage, config: t.config, log: t.log });
  try {
    const letter = (await letters)[0]!.json<DeadLetter>();
    assert.equal(letter.code, "rejected");
    assert.match(
      letter.item_not_failed ?? "",
      /stream FEEDBACK is full: its feedback\.failed event/,
    );
    assert.match(letter.reason, /could not be marked failed/);
    assert.ok(
      t.lines.some((l) => l.includes('"level":"error"') && l.includes("item not marked failed")),
      "an error is logged",
    );
    const info = await consumerSettled(t, "probe");
    assert.equal(info.num_redelivered, 0, "terminated, not retried until max_deliver");
    assert.equal(await countOn(t, "FEEDBACK", "feedback.failed.full1"), 0);
  } finally {
    await runner.stop();
  }
});

Deno.test("a message whose dead letter a full DEADLETTER refuses is held, not dropped by max_deliver, and dead-lettered once it has room", async () => {
  await using t = await startTestNats();
  const js = jetstream(t.nc);
  // A tiny DEADLETTER (discard-new), filled to the brim by letters of another stage.
  const dl = await t.jsm.streams.info("DEADLETTER");
  await t.jsm.streams.update("DEADLETTER", { ...dl.config, max_bytes: 8 * 1024 });
  let n = 0;
  for (const size of [1000, 100, 0]) { // to the last byte: even a small letter is refused
    let full = false;
    while (!full) {
      await js.publish(`deadletter.filler.f${n++}`, JSON.stringify({ pad: "x".repeat(size) }))
        .catch((err) => (full = isStreamFull(err)) || Promise.reject(err));
    }
  }
  // Every attempt to store a letter is a publish on its subject, which a plain subscriber
  // sees whether or not the stream takes it.
  const attempts = new Map<string, number>();
  const sub = t.nc.subscribe("deadletter.sentiment.>", {
    callback: (_e, m) => void attempts.set(m.subject, (attempts.get(m.subject) ?? 0) + 1),
  });
  const metrics = new WeftMetrics();
  // max_deliver is maxAttempts + 2 = 4.
  const config = runnerConfig(t.config, { maxAttempts: 2, retryBaseMs: 10, retryMaxMs: 40 });
  const runner = await runStage({
    nc: t.nc,
    stage: sentimentStage(rules.sentiment),
    config,
    log: t.log,
    metrics,
  });
  try {
    const items = ["held1", "held2", "held3"];
    for (const id of items) await js.publish(`feedback.ingested.${id}`, enc.encode("{not json"));
    // Before: each delivery tried its letter once, then was nak'ed; after max_deliver (4)
    // deliveries the server dropped the message, with no letter.
    await waitFor(
      () => items.every((id) => (attempts.get(`deadletter.sentiment.${id}`) ?? 0) >= 6),
      30_000,
      "each letter tried more often than max_deliver allows deliveries",
    );
    const held = await t.jsm.consumers.info("FEEDBACK", "sentiment");
    assert.equal(held.num_ack_pending, 3, "the three messages are held, not dropped");
    assert.equal(held.num_redelivered, 0, "held in progress, never redelivered");
    assert.match(await metrics.text(), /weft_stage_letters_held\{stage="sentiment"\} 3/);
    assert.ok(
      t.lines.some((l) =>
        l.includes('"level":"error"') &&
        l.includes("dead letter not stored: stream DEADLETTER is full")
      ),
      "an error is logged",
    );
    // Other items flow on meanwhile.
    const ok = nextMessages(t.nc, "feedback.sentiment_analyzed.ok1");
    await js.publish("feedback.ingested.ok1", JSON.stringify(ingested("ok1")));
    await ok;
    // Room again: every held letter is stored by itself, and its message terminated.
    await t.jsm.streams.purge("DEADLETTER", { filter: "deadletter.filler.>" });
    await waitFor(
      async () => (await countOn(t, "DEADLETTER", "deadletter.sentiment.>")) === 3,
      30_000,
      "the three held letters stored",
    );
    const info = await consumerSettled(t, "sentiment");
    assert.equal(info.num_redelivered, 0);
    for (const id of items) {
      const m = await t.jsm.streams.getMessage("DEADLETTER", {
        last_by_subj: `deadletter.sentiment.${id}`,
      });
      const letter = m!.json<DeadLetter>();
      assert.equal(letter.code, "invalid_event");
      assert.match(letter.reason, /not JSON/);
      assert.equal(letter.attempts, 1);
      assert.equal(await countOn(t, "FEEDBACK", `feedback.failed.${id}`), 1, "failed once");
    }
    assert.match(await metrics.text(), /weft_stage_letters_held\{stage="sentiment"\} 0/);
    assert.equal(runner.stats.deadLettered, 3);
  } finally {
    sub.unsubscribe();
    await runner.stop();
  }
});

Deno.test("a stage stopped while it holds a message for a full DEADLETTER hands it back, and its next run dead-letters it once there is room", async () => {
  await using t = await startTestNats();
  const js = jetstream(t.nc);
  const dl = await t.jsm.streams.info("DEADLETTER");
  await t.jsm.streams.update("DEADLETTER", { ...dl.config, max_bytes: 8 * 1024 });
  let n = 0;
  for (const size of [1000, 100, 0]) {
    let full = false;
    while (!full) {
      await js.publish(`deadletter.filler.f${n++}`, JSON.stringify({ pad: "x".repeat(size) }))
        .catch((err) => (full = isStreamFull(err)) || Promise.reject(err));
    }
  }
  const config = runnerConfig(t.config, { retryBaseMs: 10, retryMaxMs: 40 });
  const start = () =>
    runStage({ nc: t.nc, stage: sentimentStage(rules.sentiment), config, log: t.log });
  const first = await start();
  await js.publish("feedback.ingested.stop1", enc.encode("{not json"));
  await waitFor(
    () => t.lines.some((l) => l.includes("dead letter not stored")),
    10_000,
    "the message held",
  );
  await deadline(first.stop(), 10_000, "stop with a held message");
  assert.ok(t.lines.some((l) => l.includes("held message handed back on stop")));
  await t.jsm.streams.purge("DEADLETTER", { filter: "deadletter.filler.>" });
  const letters = nextMessages(t.nc, "deadletter.sentiment.stop1");
  const second = await start();
  try {
    const letter = (await letters)[0]!.json<DeadLetter>();
    assert.equal(letter.code, "invalid_event");
    assert.match(letter.reason, /not JSON/);
    await consumerSettled(t, "sentiment");
    assert.equal(second.stats.deadLettered, 1, "the next run took it");
    assert.equal(await countOn(t, "DEADLETTER", "deadletter.sentiment.stop1"), 1);
  } finally {
    await second.stop();
  }
});

Deno.test("after the last attempt an item is dead-lettered and failed, while other items flow on", async () => {
  await using t = await startTestNats();
  const stage = probeStage((text) => {
    if (/crash/i.test(text)) throw new Error("handler crashed");
  });
  const config = runnerConfig(t.config, { maxAttempts: 3 });
  const runner = await runStage({ nc: t.nc, stage, config, log: t.log });
  const failed = nextMessages(t.nc, "feedback.failed.bad1");
  const ok = nextMessages(t.nc, "feedback.sentiment_analyzed.good1");
  const js = jetstream(t.nc);
  await js.publish("feedback.ingested.bad1", JSON.stringify(ingested("bad1", "it will CRASH")));
  await js.publish("feedback.ingested.good1", JSON.stringify(ingested("good1", "fine")));
  await ok;
  const f = (await failed)[0]!.json<FeedbackFailed>();
  assert.deepEqual(
    { stage: f.data.stage, code: f.data.code, attempts: f.data.attempts },
    { stage: "probe", code: "handler_failed", attempts: 3 },
  );
  assert.equal(f.trace_id, TRACE, "the failure stays in the item's trace");
  assert.equal(await countOn(t, "FEEDBACK", "feedback.sentiment_analyzed.bad1"), 0);
  const info = await consumerSettled(t, "probe");
  assert.equal(info.num_pending, 0);
  await runner.stop();
});

Deno.test("a handler slower than the ack wait keeps its lease and runs once", async () => {
  await using t = await startTestNats();
  let calls = 0;
  let release!: () => void;
  const released = new Promise<void>((r) => (release = r));
  const stage = probeStage(async () => {
    calls++;
    await released;
  });
  const config = runnerConfig(t.config, { ackWaitMs: 1000 });
  const runner = await runStage({ nc: t.nc, stage, config, log: t.log });
  const out = nextMessages(t.nc, "feedback.sentiment_analyzed.slow1");
  await jetstream(t.nc).publish("feedback.ingested.slow1", JSON.stringify(ingested("slow1")));
  // Hold the handler for 2.5 ack waits, then let it finish.
  await waitFor(() => calls === 1, 5_000, "the handler to start");
  const timer = setTimeout(release, 2_500);
  await out;
  clearTimeout(timer);
  assert.equal(calls, 1);
  const info = await consumerSettled(t, "probe");
  assert.equal(info.num_redelivered, 0);
  await runner.stop();
});

/**
 * A probe stage whose consumer's lease runs out while its handler runs: the consumer's ack
 * wait is shortened under the runner, below its keep-alive period (30 s / 3), as when its
 * in-progress acks do not land (the consumer's leader moving, a CPU-starved process). Resolves
 * once the runner has taken `deliveries` deliveries of the message (it is then redelivered
 * while its first handler still runs).
 */
async function leaseLost(
  t: Awaited<ReturnType<typeof startTestNats>>,
  item: string,
  handle: (calls: number) => Promise<void>,
  deliveries: number,
) {
  let calls = 0;
  const stage = probeStage(() => handle(++calls));
  const config = runnerConfig(t.config, { maxAttempts: 2, concurrency: 4 });
  const runner = await runStage({ nc: t.nc, stage, config, log: t.log });
  await t.jsm.consumers.update("FEEDBACK", "probe", { ack_wait: nanos(300) });
  await jetstream(t.nc).publish(`feedback.ingested.${item}`, JSON.stringify(ingested(item)));
  await waitFor(
    () => runner.stats.received >= deliveries,
    30_000,
    `${deliveries} deliveries of the message while its handler runs`,
  );
  return { runner, calls: () => calls };
}

Deno.test("a message redelivered while its handler still runs (its lease lost) is no attempt: it runs once and its item is not failed", async () => {
  await using t = await startTestNats();
  let release!: () => void;
  const released = new Promise<void>((r) => (release = r));
  // Every delivery after the first comes while the handler runs; the 3rd is past the last
  // attempt (maxAttempts 2), where a delivery is taken for one its process died on.
  const { runner, calls } = await leaseLost(t, "lease1", () => released, 3);
  const out = nextMessages(t.nc, "feedback.sentiment_analyzed.lease1");
  release();
  await out;
  const info = await consumerSettled(t, "probe");
  assert.equal(await countOn(t, "FEEDBACK", "feedback.failed.lease1"), 0, "the item not failed");
  assert.equal(await countOn(t, "DEADLETTER", "deadletter.>"), 0, "no dead letter");
  assert.equal(calls(), 1, "the handler ran once");
  assert.equal(await countOn(t, "FEEDBACK", "feedback.sentiment_analyzed.lease1"), 1);
  assert.equal(info.num_ack_pending, 0);
  await runner.stop();
});

Deno.test("a handler that fails after its lease was lost until max_deliver is spent is dead-lettered with its own error, not left unsettled", async () => {
  await using t = await startTestNats();
  let fail!: () => void;
  const failing = new Promise<void>((r) => (fail = r));
  // Delivered max_deliver times (maxAttempts + 2 = 4) while the handler runs: the server
  // delivers it no more, so a nak would leave it unsettled with no letter.
  const { runner, calls } = await leaseLost(t, "lease2", async () => {
    await failing;
    throw new Error("handler crashed");
  }, 4);
  const failed = nextMessages(t.nc, "feedback.failed.lease2");
  fail();
  const f = (await failed)[0]!.json<FeedbackFailed>();
  assert.equal(f.data.code, "handler_failed");
  assert.match(f.data.reason, /handler crashed/, "the handler's own error, not a death");
  const info = await consumerSettled(t, "probe");
  assert.equal(info.num_ack_pending, 0, "settled");
  assert.equal(calls(), 1);
  await runner.stop();
});

Deno.test("a redelivery of an event a definition's step ran for, once its item has ended, is acked without a dead letter", async () => {
  await using t = await startTestNats();
  const obj = { type: "object" } as const;
  const def = definePipeline({
    name: "orders",
    input: { schema: obj },
    start: "check",
    steps: {
      check: { kind: "task", output: obj, handle: () => ({ checked: true }), next: "price" },
      price: { kind: "task", output: obj, handle: () => ({ priced: true }), next: "done" },
      done: { kind: "end", outcome: "done" },
    },
  });
  const p: LoadedPipeline = { file: "inline", def, flow: compileFlow(def) };
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const js = jetstream(t.nc);
  const kv = await new Kvm(t.nc).open(stateBucketOf("orders"));
  const step = workStage(p, "price", { nc: t.nc });
  // The step's first delivery (of check's completion) stores its outputs (the item ends),
  // then its process dies before the ack: here, it fails after storing them, and the message
  // is redelivered.
  const firstRun = {
    ...step,
    async handle(e: Parameters<typeof step.handle>[0], ctx: Parameters<typeof step.handle>[1]) {
      const out = await step.handle(e, ctx);
      if (ctx.message.deliveryCount > 1) return out;
      for (const o of out) await publishEvent(js, o, null);
      await waitFor(
        async () => (await readItem(kv, (e as { item_id: string }).item_id))?.status === "done",
        20_000,
        "the item done",
      );
      throw new Error("the step's process died before its ack");
    },
  };
  const deps = { nc: t.nc, config: t.config, log: t.log };
  await using _state = disposing(await runStateWriter({ ...deps, spec: pipelineStateSpec(p) }));
  await using _check = disposing(await runStage({ ...deps, stage: workStage(p, "check") }));
  await using _step = disposing(await runStage({ ...deps, stage: firstRun }));
  await submitItem(t.nc, p, "R1", {}, { source: "test", traceId: TRACE });
  const stream = pipelineSubjects(def).stream;
  await waitFor(
    async () => {
      const c = await t.jsm.consumers.info(stream, durableOf(def, "price"));
      return c.num_pending === 0 && c.num_ack_pending === 0 && c.delivered.consumer_seq >= 2;
    },
    20_000,
    "the step's consumer past its redelivery",
  );
  // Before: the redelivery was refused as an event for an ended item, a `conflict` letter
  // for an item that was done.
  const letters = await t.jsm.streams.info("DEADLETTER", { subjects_filter: "deadletter.*.R1" });
  assert.deepEqual(letters.state.subjects ?? {}, {}, "no dead letter for the item");
  assert.ok(
    t.lines.some((l) => l.includes("skipped: this step ran for the event already; the item")),
    "the redelivery was acked as one the step ran for",
  );
  assert.equal((await readItem(kv, "R1"))?.status, "done");
  assert.equal(await countOn(t, stream, "orders.done.R1"), 1);
});

/** A runner or state writer stopped at the end of its scope. */
function disposing<T extends { stop(): Promise<void> }>(r: T): T & AsyncDisposable {
  return Object.assign(r, { [Symbol.asyncDispose]: () => r.stop() });
}
