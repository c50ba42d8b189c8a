/**
 * What dispatch reads of an item before routing it (feedbackItemReader), against a real
 * nats-server: one batched direct get on 2.11+, the two reads of before otherwise, and the
 * same answer either way.
 */
import assert from "node:assert/strict";
import { jetstream } from "@nats-io/jetstream";
import { headers } from "@nats-io/nats-core";
import { FEEDBACK_STREAM } from "../pipelines/feedback/subjects.ts";
import { createIntake } from "../pipelines/feedback/intake.ts";
import { feedbackItemReader } from "../pipelines/feedback/stages.ts";
import { answersBatchedReads } from "../src/last_messages.ts";
import { startTestNats } from "./helpers/nats.ts";

async function setUp() {
  const t = await startTestNats();
  const requests: string[] = [];
  const spy = t.nc.subscribe("$JS.API.>", {
    callback: (_err, m) => void requests.push(m.subject),
  });
  await t.nc.flush();
  return {
    t,
    requests,
    js: jetstream(t.nc),
    batched: feedbackItemReader(t.jsm, t.nc),
    plain: feedbackItemReader(t.jsm),
    /** The API requests `read` makes. */
    async requestsOf<T>(read: () => Promise<T>): Promise<{ result: T; made: string[] }> {
      await t.nc.flush();
      requests.length = 0;
      const result = await read();
      await t.nc.flush();
      return { result, made: [...requests] };
    },
    async [Symbol.asyncDispose]() {
      spy.unsubscribe();
      await t[Symbol.asyncDispose]();
    },
  };
}

Deno.test("feedbackItemReader() reads a submitted item with one batched direct get on nats-server 2.11+, three reads before", async () => {
  await using s = await setUp();
  const { body } = await (await createIntake(s.t.nc)).submit({ text: "the app is great" });
  // Its sentiment (it reached topics), then the message admitted.
  await s.js.publish(
    `feedback.sentiment_analyzed.${body.id}`,
    JSON.stringify({ type: "feedback.sentiment_analyzed", data: { text: "the app is great" } }),
  );
  const last = await s.js.publish(`feedback.topics_extracted.${body.id}`, "{}");
  const { result, made } = await s.requestsOf(() => s.batched(body.id, last.seq));
  assert.equal(result.failed, false);
  assert.equal(result.analyzed, true);
  assert.equal((result.entry?.event as { item_id?: string }).item_id, body.id);
  assert.deepEqual(result, await s.plain(body.id, last.seq));
  if (answersBatchedReads(s.t.nc)) {
    assert.deepEqual(made, [`$JS.API.DIRECT.GET.${FEEDBACK_STREAM}`]);
  } else {
    assert.deepEqual(made, [
      `$JS.API.STREAM.MSG.GET.${FEEDBACK_STREAM}`,
      `$JS.API.STREAM.MSG.GET.${FEEDBACK_STREAM}`,
      `$JS.API.STREAM.MSG.GET.${FEEDBACK_STREAM}`,
    ]);
  }
});

Deno.test("feedbackItemReader() answers the same batched and not: failed after entry, failed before it, never entered, an entry stored again", async () => {
  await using s = await setUp();
  const intake = await createIntake(s.t.nc);
  // A failure after it entered that names nothing Weft knows, and no runner letter: no failure.
  const { body: a } = await intake.submit({ text: "failed after" });
  await s.js.publish(`feedback.failed.${a.id}`, "{}");
  // A failure stored for the id before it was submitted holds nothing.
  await s.js.publish("feedback.failed.fb_early", "{}");
  const { body: b } = await intake.submit({ id: "fb_early", text: "failed before" });
  // Never entered: a failure only.
  await s.js.publish("feedback.failed.fb_never", "{}");
  // An entry stored again after the first, without "expected last subject sequence 0" (as a
  // redrive or a hand publish does): the item's entry stays the first.
  const { body: c } = await intake.submit({ id: "fb_again", text: "the first text" });
  const h = headers();
  h.set("Nats-Msg-Id", "another");
  const again = await s.js.publish(
    `feedback.ingested.${c.id}`,
    JSON.stringify({ item_id: c.id, data: { text: "a second text" } }),
    { headers: h },
  );
  const cases: [string, boolean, boolean][] = [
    // (A failure no runner's dead letter is stored for fails nothing: failure_letter.ts.)
    [a.id, true, false],
    [b.id, true, false],
    ["fb_never", false, false], // (dispatch refuses it not_found before asking)
    [c.id, true, false],
  ];
  for (const [id, entered, failed] of cases) {
    const got = await s.batched(id, again.seq);
    assert.deepEqual(got, await s.plain(id, again.seq), id);
    assert.equal(got.entry !== null, entered, id);
    assert.equal(got.failed, failed, id);
  }
  const first = await s.batched(c.id, again.seq);
  assert.ok(first.entry!.seq < again.seq);
  assert.equal((first.entry!.event as { data: { text: string } }).data.text, "the first text");
  // Asked about a later sequence than the stream holds (a replica behind): read the other way.
  const { result, made } = await s.requestsOf(() => s.batched(a.id, again.seq + 100));
  assert.deepEqual(result, await s.plain(a.id, again.seq + 100));
  assert.ok(made.some((r) => r.startsWith("$JS.API.STREAM.MSG.GET.")));
});
