/**
 * Poison of any shape and size ends as a dead letter, never dropped: deep nesting, bodies
 * whose letter would pass the message size limit, and messages a stage process dies on
 * every time. Against a real nats-server and the real runner.
 */
import assert from "node:assert/strict";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { PermanentError } from "../src/errors.ts";
import { createEvent, sha256Hex } from "../src/events.ts";
import type { DeadLetter } from "../src/events.gen.ts";
import type { FeedbackState } from "../pipelines/feedback/events.gen.ts";
import { checkRedrivable, listDeadLetters } from "../src/redrive.ts";
import { runStage } from "../src/runner.ts";
import { nextEvent, type Stage } from "../src/stage.ts";
import { readState } from "../src/state_writer.ts";
import { FEEDBACK_STREAM, STATE_BUCKET } from "../pipelines/feedback/subjects.ts";
import { stageConsumerConfig } from "../src/topology.ts";
import { startTestNats, type TestNats } from "./helpers/nats.ts";
import { startPipeline } from "./helpers/pipeline.ts";
import { waitFor } from "./helpers/wait.ts";

const TRACE = "0af7651916cd43dd8448eb211c80319c";

async function letterFor(t: TestNats, seq: number): Promise<DeadLetter> {
  return await waitFor(
    async () =>
      (await listDeadLetters(jetstream(t.nc), {}, 100_000)).find((l) =>
        l.letter.stream_seq === seq && l.letter.stage !== "state"
      )?.letter,
    20_000,
    `the dead letter of message ${seq}`,
  ) as DeadLetter;
}

async function failedState(t: TestNats, id: string) {
  const kv = await new Kvm(t.nc).open(STATE_BUCKET);
  return await waitFor(
    async () => {
      const s = (await readState<FeedbackState>(kv, id))?.state;
      return s?.status === "failed" && s;
    },
    20_000,
    `${id} failed`,
  );
}

Deno.test("a 100,000-deep JSON nesting is dead-lettered on first delivery and fails its item", async () => {
  await using t = await startTestNats();
  await using _p = await startPipeline(t);
  const deep = "[".repeat(100_000) + "]".repeat(100_000);
  const ack = await jetstream(t.nc).publish("feedback.ingested.deep1", deep);
  const letter = await letterFor(t, ack.seq);
  assert.equal(letter.code, "invalid_event");
  assert.match(letter.reason, /nests deeper than 64 levels/);
  assert.equal(letter.attempts, 1);
  assert.equal(letter.payload.length, 128 * 1024, "the letter keeps the head");
  assert.equal(letter.payload_truncated, true);
  assert.equal(letter.payload_size, deep.length);
  assert.equal(letter.payload_sha256, sha256Hex(new TextEncoder().encode(deep)));
  const state = await failedState(t, "deep1");
  assert.equal(state.error?.code, "invalid_event");
});

Deno.test("poison whose dead letter would pass the 1 MB limit is dead-lettered truncated, with its size and hash", async () => {
  await using t = await startTestNats();
  await using _p = await startPipeline(t);
  const js = jetstream(t.nc);
  const invalidUtf8 = new Uint8Array(800 * 1024).fill(0xff);
  const quotes = '"'.repeat(600 * 1024);
  const a = await js.publish("feedback.ingested.big1", invalidUtf8);
  const b = await js.publish("feedback.ingested.big2", quotes);
  const la = await letterFor(t, a.seq);
  assert.equal(la.payload_encoding, "base64");
  assert.equal(la.payload_truncated, true);
  assert.equal(la.payload_size, invalidUtf8.length);
  assert.equal(la.payload_sha256, sha256Hex(invalidUtf8));
  const lb = await letterFor(t, b.seq);
  assert.equal(lb.payload_truncated, true);
  assert.equal(lb.payload_size, quotes.length);
  await failedState(t, "big1");
  await failedState(t, "big2");
});

Deno.test("a large original the letter keeps only the head of is redriven whole, from its stream, checked by its hash", async () => {
  await using t = await startTestNats();
  const refuseBig: Stage<{ kind: "event"; types: readonly ["feedback.ingested"] }> = {
    name: "refuse-big",
    filterSubject: "feedback.ingested.*",
    stream: "FEEDBACK",
    failedType: "feedback.failed",
    input: { kind: "event", types: ["feedback.ingested"] },
    handle: (event, ctx) => {
      if (JSON.stringify(event).length > 100_000) throw new PermanentError("too big for me");
      return [nextEvent(event, "feedback.sentiment_analyzed", {
        ...event.data,
        sentiment: { label: "neutral", score: 0, analyzer: "probe" },
      }, ctx)];
    },
  };
  const runner = await runStage({ nc: t.nc, stage: refuseBig, config: t.config, log: t.log });
  const event = createEvent({
    type: "feedback.ingested",
    itemId: "large1",
    traceId: TRACE,
    source: "test",
    data: { text: "hello", metadata: { blob: "x".repeat(300_000) } },
  });
  const body = new TextEncoder().encode(JSON.stringify(event));
  const ack = await jetstream(t.nc).publish("feedback.ingested.large1", body);
  const letter = await letterFor(t, ack.seq);
  await runner.stop();
  assert.equal(letter.payload_truncated, true);
  const checked = await checkRedrivable(t.jsm, letter);
  assert.equal(checked.refused, undefined);
  assert.deepEqual(checked.body, body, "the whole original, from the stream");
  // A letter whose hash does not match what the stream holds is refused.
  const forged = await checkRedrivable(t.jsm, { ...letter, payload_sha256: "0".repeat(64) });
  assert.match(forged.refused ?? "", /does not match/);
});

Deno.test("a message the stage process died on at every attempt is dead-lettered when delivered once more, without running the handler", async () => {
  await using t = await startTestNats({ maxAttempts: 3 });
  let ran = 0;
  const fragile: Stage<{ kind: "event"; types: readonly ["feedback.ingested"] }> = {
    name: "fragile",
    filterSubject: "feedback.ingested.*",
    stream: "FEEDBACK",
    failedType: "feedback.failed",
    input: { kind: "event", types: ["feedback.ingested"] },
    handle: () => {
      ran++;
      throw new Error("should not run again");
    },
  };
  const js = jetstream(t.nc);
  await t.jsm.consumers.add(FEEDBACK_STREAM, stageConsumerConfig(fragile, t.config));
  const ack = await js.publish(
    "feedback.ingested.fatal1",
    JSON.stringify(createEvent({
      type: "feedback.ingested",
      itemId: "fatal1",
      traceId: TRACE,
      source: "test",
      data: { text: "the message that kills" },
    })),
  );
  // Three deliveries that never reached an outcome, as when the process dies on each one.
  const consumer = await js.consumers.get(FEEDBACK_STREAM, "fragile");
  for (let i = 1; i <= 3; i++) {
    const m = await consumer.next({ expires: 5000 });
    assert.equal(m?.info.deliveryCount, i);
    m!.nak();
  }
  const runner = await runStage({ nc: t.nc, stage: fragile, config: t.config, log: t.log });
  const letter = await letterFor(t, ack.seq);
  assert.equal(ran, 0, "the handler never ran again");
  assert.equal(letter.attempts, 4);
  assert.match(letter.reason, /delivered 4 times without an outcome/);
  await waitFor(
    async () => {
      const info = await t.jsm.consumers.info(FEEDBACK_STREAM, "fragile");
      return info.num_ack_pending + info.num_pending === 0;
    },
    10_000,
    "nothing left to redeliver (the message is terminated)",
  );
  await runner.stop();
});

Deno.test("a bus submission naming an id already taken by another body is dead-lettered conflict, failing nothing, and its letter is not redriven; the same body again is a replay", async () => {
  // Found by probing a running mesh: `nats pub feedback.submit '{"id":"KDUP1",...}'` with
  // another text than KDUP1's was acked with no dead letter and no log (over HTTP the same
  // body is refused 422 idempotency_mismatch): the submission was dropped.
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const js = jetstream(t.nc);
  const first = await p.app.request("/feedback", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ id: "taken-1", text: "the first text" }),
  });
  assert.equal(first.status, 202, await first.clone().text());
  await first.body?.cancel();
  const replay = await js.publish(
    "feedback.submit",
    JSON.stringify({ text: "the first text", id: "taken-1" }),
  );
  const other = await js.publish(
    "feedback.submit",
    JSON.stringify({ id: "taken-1", text: "another text" }),
  );
  const letters = await waitFor(
    async () => {
      const ls = (await listDeadLetters(js)).filter((l) => l.letter.subject === "feedback.submit");
      return ls.length > 0 && ls;
    },
    20_000,
    "the other body's dead letter",
  );
  // Both submissions handled (acked), so no second letter is still to come.
  await waitFor(
    async () => {
      const c = await t.jsm.consumers.info(FEEDBACK_STREAM, "ingest");
      return c.ack_floor.stream_seq >= Math.max(replay.seq, other.seq) && c.num_ack_pending === 0;
    },
    20_000,
    "ingest acked both submissions",
  );
  const all = (await listDeadLetters(js)).filter((l) => l.letter.subject === "feedback.submit");
  assert.equal(all.length, 1, JSON.stringify(all));
  const { letter } = letters[0]!;
  assert.equal(letter.stream_seq, other.seq);
  assert.equal(letter.code, "conflict");
  assert.equal(letter.item_id, "taken-1");
  assert.match(letter.reason, /item taken-1 was already submitted with a different body/);
  // The item stands as first submitted, and nothing failed it.
  const ingested = await t.jsm.streams.info(FEEDBACK_STREAM, {
    subjects_filter: "feedback.*.taken-1",
  });
  assert.equal(ingested.state.subjects?.["feedback.ingested.taken-1"], 1);
  assert.equal(ingested.state.subjects?.["feedback.failed.taken-1"], undefined);
  const stored = await t.jsm.streams.getMessage(FEEDBACK_STREAM, {
    last_by_subj: "feedback.ingested.taken-1",
  });
  assert.equal(stored!.json<{ data: { text: string } }>().data.text, "the first text");
  // Its redrive would only be dead-lettered again (the first body stands): refused, and no
  // second letter is made.
  const redrive = await p.app.request("/deadletters/redrive", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ ids: [letters[0]!.seq] }),
  });
  assert.equal(redrive.status, 422, await redrive.clone().text());
  assert.match(
    (await redrive.json()).detail,
    /the original would be dead-lettered again: item taken-1 has entered already/,
  );
  const submits = await t.jsm.streams.info(FEEDBACK_STREAM, {
    subjects_filter: "feedback.submit",
  });
  assert.equal(
    submits.state.subjects?.["feedback.submit"],
    2,
    "nothing republished on feedback.submit",
  );
});
