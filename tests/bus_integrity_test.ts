/**
 * What an event on the bus cannot do, against a real nats-server and the real pipeline:
 * name another item than its subject, make an item run a step twice, or show a plain
 * subscriber an event twice when a message is redelivered.
 */
import assert from "node:assert/strict";
import { headers, type NatsConnection } from "@nats-io/nats-core";
import { AckPolicy, jetstream, type JetStreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import type { DeadLetter } from "../src/events.gen.ts";
import type { FeedbackState } from "../pipelines/feedback/events.gen.ts";
import { createEvent, deterministicId } from "../src/events.ts";
import { listDeadLetters } from "../src/redrive.ts";
import { runStage } from "../src/runner.ts";
import { nextEvent, type Stage } from "../src/stage.ts";
import { readState, runStateWriter } from "../src/state_writer.ts";
import { FEEDBACK_STREAM, STATE_BUCKET } from "../pipelines/feedback/subjects.ts";
import { startTestNats, type TestNats } from "./helpers/nats.ts";
import { startPipeline } from "./helpers/pipeline.ts";
import { waitFor, waitUntil } from "./helpers/wait.ts";
import { serverVersion, versionAtLeast } from "../src/nats_server.ts";
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
import {
  contentOutcomeGuard,
  itemModerationReader,
  storageDecidedStage,
  storageModeratedStage,
  uploadedContentReader,
} from "../pipelines/moderation/stages.ts";
import { CONTENT_STREAM } from "../pipelines/moderation/subjects.ts";

const TRACE = "0af7651916cd43dd8448eb211c80319c";
/**
 * Whether the installed nats-server stores a step's once-per-item events once (2.10+); on 2.9
 * a step's outputs rely on their message ids and the duplicate window.
 */
const STORES_ONCE = versionAtLeast((await serverVersion()) ?? "0.0.0", "2.10.0");
/** Whether it checks a publish against the last sequence of a wildcard subject (2.11+). */
const FENCES = versionAtLeast((await serverVersion()) ?? "0.0.0", "2.11.0");
const STAGES = ["ingest", "sentiment", "topics", "dispatch", "state"];

async function processed(t: TestNats, id: string): Promise<FeedbackState> {
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

async function settled(jsm: JetStreamManager, names = STAGES) {
  for (const name of names) {
    await waitFor(
      async () => {
        const info = await jsm.consumers.info(FEEDBACK_STREAM, name);
        return info.num_pending === 0 && info.num_ack_pending === 0;
      },
      20_000,
      `consumer ${name} to settle`,
    );
  }
}

/**
 * Resolves once the stream's duplicate window has passed for everything published so far:
 * a probe message id published now is accepted again.
 */
async function duplicateWindowPassed(t: TestNats): Promise<void> {
  const js = jetstream(t.nc);
  await js.publish("feedback.window_probe", "", { msgID: "probe" });
  await waitFor(
    async () => !(await js.publish("feedback.window_probe", "", { msgID: "probe" })).duplicate,
    10_000,
    "the duplicate window to pass",
  );
}

async function countOn(jsm: JetStreamManager, subject: string): Promise<number> {
  const info = await jsm.streams.info(FEEDBACK_STREAM, { subjects_filter: subject });
  return Object.values(info.state.subjects ?? {}).reduce((a, b) => a + b, 0);
}

async function lastOn(jsm: JetStreamManager, subject: string) {
  const m = await jsm.streams.getMessage(FEEDBACK_STREAM, { last_by_subj: subject });
  return m!.json<Record<string, unknown> & { data: Record<string, unknown> }>();
}

Deno.test("an event whose body names another item than its subject is dead-lettered and changes or fails no item", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const { body } = await p.intake.submit({ text: "Why was I charged twice this month?" });
  const victim = await processed(t, body.id);
  assert.notEqual(victim.routing?.team, "Trust and Safety");

  // A valid `processed` event of the victim, re-dated and re-routed, on another item's subject.
  const real = await lastOn(t.jsm, `feedback.processed.${body.id}`);
  const forged = {
    ...real,
    id: "forged-processed",
    time: "9999-01-01T00:00:00.000Z",
    data: { ...real.data, routing: { ...(real.data.routing as object), team: "Trust and Safety" } },
  };
  const ack = await jetstream(t.nc).publish("feedback.processed.other", JSON.stringify(forged));

  const letter = await waitFor(
    async () =>
      (await listDeadLetters(jetstream(t.nc))).find((l) => l.letter.stream_seq === ack.seq)
        ?.letter,
    10_000,
    "the forged event's dead letter",
  ) as DeadLetter;
  assert.equal(letter.code, "subject_mismatch");
  assert.match(
    letter.reason,
    /item_id "[^"]+" does not match its subject feedback\.processed\.other/,
  );
  await settled(t.jsm);

  const kv = await new Kvm(t.nc).open(STATE_BUCKET);
  const after = (await readState<FeedbackState>(kv, body.id))!.state;
  assert.equal(after.routing?.team, victim.routing?.team, "the victim keeps its team");
  assert.equal(after.updated_at, victim.updated_at, "and its times");
  assert.equal(
    await readState<FeedbackState>(kv, "other"),
    null,
    "the subject's item is neither created nor failed",
  );
  assert.equal(await countOn(t.jsm, "feedback.failed.*"), 0);
});

Deno.test("a hand-wired pipeline's event on a wildcard item subject (`feedback.ingested.*`) is dead-lettered at once as an invalid item id by each consumer that reads it, failing no item", async () => {
  // Found by a probe of the definitions' subjects, checked here for the shipped pipelines'
  // consumers: the item id a stage reads from the subject was not checked. A valid event of a
  // real item on `feedback.ingested.*` was dead-lettered `subject_mismatch` under the item `*`
  // (deadletter.<stage>.*, a wildcard subject again).
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const { body } = await p.intake.submit({ text: "Why was I charged twice this month?" });
  const real = await processed(t, body.id);
  const ingested = await lastOn(t.jsm, `feedback.ingested.${body.id}`);
  const js = jetstream(t.nc);
  const ack = await js.publish(
    "feedback.ingested.*",
    JSON.stringify({ ...ingested, id: "wild-ingested" }),
  );
  const letters = await waitFor(
    async () => {
      const all = (await listDeadLetters(js)).filter((l) => l.letter.stream_seq === ack.seq);
      return all.length >= 2 ? all : undefined;
    },
    10_000,
    "the letters of sentiment and the state writer",
  );
  await settled(t.jsm);
  assert.deepEqual(
    letters.map((l) => [l.subject, l.letter.code, l.letter.attempts, l.letter.item_id]).sort(),
    [
      ["deadletter.sentiment.unknown", "invalid_event", 1, undefined],
      ["deadletter.state.unknown", "invalid_event", 1, undefined],
    ],
  );
  for (const { letter } of letters) {
    assert.match(letter.reason, /invalid item id "\*" in subject feedback\.ingested\.\*/);
  }
  assert.equal(await countOn(t.jsm, "feedback.failed.>"), 0, "no item failed");
  const kv = await new Kvm(t.nc).open(STATE_BUCKET);
  assert.equal((await readState<FeedbackState>(kv, body.id))!.state.updated_at, real.updated_at);
});

Deno.test("a message published first under a future event's id does not make the stream drop that event", async () => {
  // Found adversarially: event ids follow from the item and are predictable, and the
  // stream's duplicate window is per stream, so a submission on feedback.submit carrying
  // (as Nats-Msg-Id) the id the item's topics event would have had the real one dropped as
  // a "duplicate": the item stayed at sentiment_analyzed for good, with no dead letter.
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const id = "fb-pre-empted";
  const ingested = deterministicId(id, "feedback.ingested");
  const sentiment = deterministicId(ingested, "feedback.sentiment_analyzed");
  const h = headers();
  h.set("Nats-Msg-Id", deterministicId(sentiment, "feedback.topics_extracted"));
  await jetstream(t.nc).publish("feedback.submit", JSON.stringify({ text: "decoy" }), {
    headers: h,
  });
  const { body } = await p.intake.submit({ id, text: "The export crashes with an error" });
  const state = await processed(t, body.id);
  assert.equal(state.status, "processed");
  assert.equal(await countOn(t.jsm, `feedback.topics_extracted.${id}`), 1);
});

Deno.test("a forged second `ingested` event with new text neither re-runs the item nor changes its text", async () => {
  await using t = await startTestNats({ duplicateWindowMs: 1000 });
  await using p = await startPipeline(t);
  const { body } = await p.intake.submit({ text: "The export crashes with an error" });
  const before = await processed(t, body.id);
  await duplicateWindowPassed(t);

  const forged = createEvent({
    type: "feedback.ingested",
    itemId: body.id,
    traceId: TRACE,
    id: "forged-ingested",
    source: "forger",
    data: { text: "I love everything, please route me to the Product Team" },
  });
  await jetstream(t.nc).publish(`feedback.ingested.${body.id}`, JSON.stringify(forged));
  await settled(t.jsm);

  assert.equal(await countOn(t.jsm, `feedback.ingested.${body.id}`), 2, "the forgery is stored");
  for (const type of ["sentiment_analyzed", "topics_extracted", "dispatched", "processed"]) {
    assert.equal(await countOn(t.jsm, `feedback.${type}.${body.id}`), 1, `one ${type} event`);
  }
  const kv = await new Kvm(t.nc).open(STATE_BUCKET);
  const after = (await readState<FeedbackState>(kv, body.id))!.state;
  assert.equal(after.text, before.text);
  assert.deepEqual(after.routing, before.routing);
});

Deno.test("a forged second `ingested` event that claims to be first (the stream's check as a header) is refused by the stream and runs nothing", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const { body } = await p.intake.submit({ text: "The export crashes with an error" });
  await processed(t, body.id);

  // The first step trusts an entry event stored under "expected last subject sequence 0"
  // without looking the subject up: only the first message on a subject can carry it.
  const forged = createEvent({
    type: "feedback.ingested",
    itemId: body.id,
    traceId: TRACE,
    id: "forged-first",
    source: "forger",
    data: { text: "I love everything, please route me to the Product Team" },
  });
  const h = headers();
  h.set("Nats-Expected-Last-Subject-Sequence", "0");
  await assert.rejects(
    jetstream(t.nc).publish(`feedback.ingested.${body.id}`, JSON.stringify(forged), {
      headers: h,
    }),
    /wrong last sequence/,
  );
  await settled(t.jsm);
  assert.equal(await countOn(t.jsm, `feedback.ingested.${body.id}`), 1);
  assert.equal(await countOn(t.jsm, `feedback.processed.${body.id}`), 1);
});

Deno.test("a malformed event on a processed item's subject is dead-lettered and neither fails nor changes the item", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const { body } = await p.intake.submit({ text: "The export crashes with an error" });
  const before = await processed(t, body.id);

  // Not an event at all: the sentiment stage dead-letters it, naming the subject's item,
  // which has its outcome already: no `feedback.failed` is stored after `processed`.
  const ack = await jetstream(t.nc).publish(`feedback.ingested.${body.id}`, '{"garbage":true}');
  const letter = await waitFor(
    async () =>
      (await listDeadLetters(jetstream(t.nc))).find((l) => l.letter.stream_seq === ack.seq),
    10_000,
    "the malformed event's dead letter",
  );
  assert.equal(letter.letter.item_id, body.id);
  await settled(t.jsm);

  assert.equal(
    await countOn(t.jsm, `feedback.failed.${body.id}`),
    0,
    "no failure after the outcome",
  );
  const kv = await new Kvm(t.nc).open(STATE_BUCKET);
  const after = (await readState<FeedbackState>(kv, body.id))!.state;
  assert.equal(after.status, "processed");
  assert.equal(after.error, undefined);
  assert.deepEqual(after.routing, before.routing);
});

Deno.test({
  name:
    "a forged second `topics_extracted` event (another event id) for a processed item stores no second routing or outcome",
  ignore: !STORES_ONCE,
  async fn() {
    await using t = await startTestNats();
    await using p = await startPipeline(t);
    const { body } = await p.intake.submit({ text: "The export crashes with an error" });
    const before = await processed(t, body.id);

    // A valid copy of the item's topics event under a new id, with other topics: dispatch
    // would route it again (to another team) and publish a second `processed`.
    const real = await lastOn(t.jsm, `feedback.topics_extracted.${body.id}`);
    const forged = {
      ...real,
      id: "forged-topics",
      data: {
        ...real.data,
        topics: { topics: ["billing"], evidence: { billing: ["charged"] }, analyzer: "forger" },
      },
    };
    await jetstream(t.nc).publish(`feedback.topics_extracted.${body.id}`, JSON.stringify(forged));
    await settled(t.jsm);

    assert.equal(await countOn(t.jsm, `feedback.topics_extracted.${body.id}`), 2, "stored");
    assert.equal(await countOn(t.jsm, `feedback.dispatched.${body.id}`), 1, "one routing");
    assert.equal(await countOn(t.jsm, `feedback.processed.${body.id}`), 1, "one outcome");
    assert.equal(await countOn(t.jsm, "feedback.failed.*"), 0);
    const kv = await new Kvm(t.nc).open(STATE_BUCKET);
    const after = (await readState<FeedbackState>(kv, body.id))!.state;
    assert.deepEqual(after.routing, before.routing);
  },
});

Deno.test({
  name:
    "a forged copy of a definition's step event (another id) for a done item runs no later step again and does not end it a second time; garbage fails it no more",
  ignore: !STORES_ONCE,
  async fn() {
    await using t = await startTestNats();
    const obj = { type: "object" } as const;
    const def = definePipeline({
      name: "twice",
      input: { schema: obj },
      start: "a",
      steps: {
        a: { kind: "task", output: obj, handle: () => ({ checked: true }), next: "b" },
        b: { kind: "task", output: obj, handle: () => ({ sent: true }), next: "done" },
        done: { kind: "end", outcome: "done" },
      },
    });
    const p: LoadedPipeline = { file: "inline", def, flow: compileFlow(def) };
    await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
    const { stream } = pipelineSubjects(def);
    const count = async (subject: string) => {
      const info = await t.jsm.streams.info(stream, { subjects_filter: subject });
      return Object.values(info.state.subjects ?? {}).reduce((a, b) => a + b, 0);
    };
    const runners = [
      await runStage({ nc: t.nc, stage: workStage(p, "a"), config: t.config, log: t.log }),
      await runStage({ nc: t.nc, stage: workStage(p, "b"), config: t.config, log: t.log }),
    ];
    try {
      await submitItem(t.nc, p, "i1", {}, { source: "test", traceId: TRACE });
      await waitFor(async () => (await count("twice.done.i1")) === 1, 10_000, "the item done");

      // Step a's event again under another id: b's handler runs, but b's event, like the
      // end, is stored once per item (b is on no loop), so nothing after it runs again.
      const real = (await t.jsm.streams.getMessage(stream, { last_by_subj: "twice.a.i1" }))!
        .json<Record<string, unknown>>();
      await jetstream(t.nc).publish("twice.a.i1", JSON.stringify({ ...real, id: "forged-a" }));
      await waitFor(
        async () => {
          const info = await t.jsm.consumers.info(stream, durableOf(def, "b"));
          return info.num_pending === 0 && info.num_ack_pending === 0 &&
            info.delivered.stream_seq > 0;
        },
        10_000,
        "step b to settle",
      );
      assert.equal(await count("twice.b.i1"), 1, "b's event stored once");
      assert.equal(await count("twice.done.i1"), 1, "one end");

      // Garbage on the same subject is dead-lettered, naming the item, and fails the done
      // item no more than a forged copy ends it twice.
      const ack = await jetstream(t.nc).publish("twice.a.i1", '{"garbage":true}');
      await waitFor(
        async () =>
          (await listDeadLetters(jetstream(t.nc), { item_id: "i1" }))
            .some((l) => l.letter.stream_seq === ack.seq),
        10_000,
        "the garbage's dead letter",
      );
      assert.equal(await count("twice.failed.i1"), 0, "a done item is not failed");
    } finally {
      for (const r of runners) await r.stop();
    }
  },
});

Deno.test("a submission re-sent on feedback.submit after the duplicate window does not run the item again", async () => {
  await using t = await startTestNats({ duplicateWindowMs: 1000 });
  await using _p = await startPipeline(t);
  const js = jetstream(t.nc);
  const submission = JSON.stringify({ id: "resent-1", text: "The app is slow to start" });
  await js.publish("feedback.submit", submission, { msgID: "submit-resent-1" });
  await processed(t, "resent-1");
  await duplicateWindowPassed(t);
  await js.publish("feedback.submit", submission, { msgID: "submit-resent-1" });
  await js.publish("feedback.submit", submission);
  await settled(t.jsm);
  assert.equal(await countOn(t.jsm, "feedback.submit"), 3);
  for (const type of ["ingested", "sentiment_analyzed", "topics_extracted", "processed"]) {
    assert.equal(await countOn(t.jsm, `feedback.${type}.resent-1`), 1, `one ${type} event`);
  }
});

/** A stage that copies an ingested item forward: the probe for redeliveries. */
const forward: Stage<{ kind: "event"; types: readonly ["feedback.ingested"] }> = {
  name: "forward",
  filterSubject: "feedback.ingested.*",
  stream: "FEEDBACK",
  failedType: "feedback.failed",
  input: { kind: "event", types: ["feedback.ingested"] },
  handle: (event, ctx) => [
    nextEvent(event, "feedback.sentiment_analyzed", {
      ...event.data,
      sentiment: { label: "neutral", score: 0, analyzer: "probe" },
    }, ctx),
  ],
};

function collect(nc: NatsConnection, subject: string): string[] {
  const seen: string[] = [];
  const sub = nc.subscribe(subject);
  (async () => {
    for await (const m of sub) seen.push(m.headers?.get("Nats-Msg-Id") ?? "");
  })();
  return seen;
}

Deno.test("a redelivered message whose output was already stored does not publish it again: plain subscribers see it once", async () => {
  await using t = await startTestNats();
  const js = jetstream(t.nc);
  const input = createEvent({
    type: "feedback.ingested",
    itemId: "redelivered-1",
    traceId: TRACE,
    source: "test",
    data: { text: "hello" },
  });
  // A first delivery whose process published its output and died before the ack: the
  // output is in the stream, the input is delivered again.
  const output = forward.handle(input, {
    source: "weft-forward",
    message: { subject: "", seq: 0, storedAt: 0, deliveryCount: 1 },
    now: () => new Date(),
    signal: new AbortController().signal,
  }) as ReturnType<typeof nextEvent>[];
  const h = headers();
  h.set("Weft-Event-Type", output[0]!.type);
  await js.publish(`feedback.sentiment_analyzed.redelivered-1`, JSON.stringify(output[0]), {
    msgID: output[0]!.id,
    headers: h,
  });
  await t.jsm.consumers.add(FEEDBACK_STREAM, {
    durable_name: "forward",
    filter_subject: "feedback.ingested.*",
    ack_policy: AckPolicy.Explicit,
  });
  await js.publish("feedback.ingested.redelivered-1", JSON.stringify(input));
  const first = await (await js.consumers.get(FEEDBACK_STREAM, "forward")).next();
  first!.nak(); // the "crash": delivered, never acknowledged

  const seen = collect(t.nc, "feedback.sentiment_analyzed.*");
  await t.nc.flush();
  const runner = await runStage({ nc: t.nc, stage: forward, config: t.config, log: t.log });
  await waitFor(() => runner.stats.processed === 1, 10_000, "the redelivery handled");
  await runner.stop();
  await t.nc.flush();
  assert.deepEqual(seen, [], "nothing re-published");
  assert.equal(await countOn(t.jsm, "feedback.sentiment_analyzed.redelivered-1"), 1);
});

Deno.test({
  name:
    "a forged decision racing moderation's outcome on two storage steps at once still leaves each item one outcome",
  ignore: !FENCES,
  async fn() {
    await using t = await startTestNats();
    const runners = [
      await runStage({
        nc: t.nc,
        // As the storage service runs them (services/storage.ts).
        stage: storageModeratedStage(itemModerationReader(t.jsm), contentOutcomeGuard(t.jsm)),
        config: t.config,
        log: t.log,
      }),
      await runStage({
        nc: t.nc,
        stage: storageDecidedStage(uploadedContentReader(t.jsm), contentOutcomeGuard(t.jsm)),
        config: t.config,
        log: t.log,
      }),
    ];
    const js = jetstream(t.nc);
    const N = 40;
    const content = { text: "a photo of a sunset" };
    const ev = (type: string, id: string, data: Record<string, unknown>) =>
      JSON.stringify({
        id: `${type}-${id}`,
        type,
        version: 1,
        item_id: id,
        trace_id: TRACE,
        time: new Date().toISOString(),
        source: "test",
        data,
      });
    try {
      // Moderation found each item safe (storage publishes it) while a forged rejection for
      // it arrives at the same moment (storage would archive it): both steps check for an
      // outcome, see none, and publish.
      await Promise.all(Array.from({ length: N }, async (_, i) => {
        const id = `race${i}`;
        // Uploaded first (storage publishes the item's content as uploaded).
        await js.publish(`content.uploaded.${id}`, ev("content.uploaded", id, content));
        await Promise.all([
          js.publish(
            `content.moderated.${id}`,
            ev("content.moderated", id, {
              content,
              moderation: { verdict: "safe", categories: [], score: 0, analyzer: "t", reasons: [] },
            }),
          ),
          js.publish(
            `content.decided.${id}`,
            ev("content.decided", id, {
              content,
              decision: "reject",
              reason: "forged",
              reviewer: "mallory",
              automatic: false,
            }),
          ),
        ]);
      }));
      const outcomes = async () => {
        const info = await t.jsm.streams.info(CONTENT_STREAM, { subjects_filter: "content.*.*" });
        const by = new Map<string, string[]>();
        for (const subject of Object.keys(info.state.subjects ?? {})) {
          const [, type, id] = subject.split(".");
          if (type !== "published" && type !== "archived") continue;
          by.set(id!, [...(by.get(id!) ?? []), type]);
        }
        return by;
      };
      await waitFor(async () => (await outcomes()).size === N, 20_000, "every item's outcome");
      for (const name of ["storage-moderated", "storage-decided"]) {
        await waitFor(
          async () => {
            const info = await t.jsm.consumers.info(CONTENT_STREAM, name);
            return info.num_pending === 0 && info.num_ack_pending === 0;
          },
          20_000,
          `${name} to settle`,
        );
      }
      const two = [...(await outcomes())].filter(([, types]) => types.length > 1);
      assert.deepEqual(two, [], "items with two outcomes");
      // The loser of each race is kept as a `conflict`, failing nothing.
      const failed = await t.jsm.streams.info(CONTENT_STREAM, {
        subjects_filter: "content.failed.*",
      });
      assert.deepEqual(Object.keys(failed.state.subjects ?? {}), [], "no item failed");
    } finally {
      for (const r of runners) await r.stop();
    }
  },
});

Deno.test({
  name:
    "two branches of one fan-out that end an item differently store one outcome per item; the other is a conflict and fails nothing",
  ignore: !FENCES,
  async fn() {
    await using t = await startTestNats();
    const obj = { type: "object" } as const;
    // Loading refuses this graph (loadPipelines): the runtime's fence is what holds here.
    const def = definePipeline({
      name: "forked",
      input: { schema: obj },
      start: "a",
      steps: {
        a: { kind: "task", output: obj, handle: () => ({ split: true }), next: ["b", "c"] },
        b: { kind: "task", output: obj, handle: () => ({ left: true }), next: "x" },
        c: { kind: "task", output: obj, handle: () => ({ right: true }), next: "y" },
        x: { kind: "end", outcome: "x" },
        y: { kind: "end", outcome: "y" },
      },
    });
    const p: LoadedPipeline = { file: "inline", def, flow: compileFlow(def) };
    await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
    const { stream } = pipelineSubjects(def);
    const deps = { nc: t.nc, config: t.config, log: t.log };
    const runners = [
      await runStateWriter({ ...deps, spec: pipelineStateSpec(p) }),
      ...await Promise.all(
        ["a", "b", "c"].map((id) => runStage({ ...deps, stage: workStage(p, id) })),
      ),
    ];
    const N = 20;
    const ids = Array.from({ length: N }, (_, i) => `fork${i}`);
    try {
      await Promise.all(
        ids.map((id) => submitItem(t.nc, p, id, {}, { source: "test", traceId: TRACE })),
      );
      const subjects = async (filter: string) =>
        Object.keys(
          (await t.jsm.streams.info(stream, { subjects_filter: filter })).state.subjects ?? {},
        );
      const outcomes = async () => {
        const by = new Map<string, string[]>();
        for (const s of await subjects("forked.*.*")) {
          const [, type, id] = s.split(".");
          if (type === "x" || type === "y") by.set(id!, [...by.get(id!) ?? [], type]);
        }
        return by;
      };
      // Each branch has ended its item or been given up on (dead-lettered).
      const settled = async () => {
        const letters = await listDeadLetters(jetstream(t.nc), {});
        const gaveUp = (stage: string, id: string) =>
          letters.some((l) => l.letter.stage === stage && l.letter.item_id === id);
        const by = await outcomes();
        return ids.every((id) =>
          (by.get(id)?.includes("x") || gaveUp("forked-b", id)) &&
          (by.get(id)?.includes("y") || gaveUp("forked-c", id))
        );
      };
      await waitUntil(settled, 30_000, async () => JSON.stringify([...await outcomes()]));
      for (const step of ["a", "b", "c"]) {
        await waitFor(
          async () => {
            const info = await t.jsm.consumers.info(stream, durableOf(def, step));
            return info.num_pending === 0 && info.num_ack_pending === 0;
          },
          20_000,
          `step ${step} to settle`,
        );
      }
      const by = await outcomes();
      const two = [...by].filter(([, types]) => types.length > 1);
      assert.deepEqual(two, [], "items with two outcomes");
      assert.equal(by.size, N, "every item has its outcome");
      assert.deepEqual(await subjects("forked.failed.*"), [], "no item failed");
      // The branch that came second is kept as a conflict, naming its item.
      const letters = (await listDeadLetters(jetstream(t.nc), {}))
        .filter((l) => l.letter.stage === "forked-b" || l.letter.stage === "forked-c");
      assert.equal(letters.length, N);
      assert.ok(letters.every((l) => l.letter.code === "conflict"), JSON.stringify(letters[0]));
      // The item's state is the outcome the stream stored.
      const kv = await new Kvm(t.nc).open(stateBucketOf("forked"));
      for (const [id, [type]] of by) {
        const s = await waitFor(
          async () => {
            const s = await readItem(kv, id);
            return s?.status === "done" && s;
          },
          10_000,
          `${id} done`,
        );
        assert.equal(s.outcome, type, id);
        // The winning branch's step event was stored before the end it led to.
        assert.ok((type === "x" ? "b" : "c") in s.results, JSON.stringify(s.results));
      }
    } finally {
      for (const r of runners) await r.stop();
    }
  },
});
