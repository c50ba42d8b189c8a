import assert from "node:assert/strict";
import { jetstream } from "@nats-io/jetstream";
import { failureVerdict, storedLetters } from "./failure_letter.ts";
import { deterministicId } from "./events.ts";
import { startTestNats } from "../tests/helpers/nats.ts";
import { FEEDBACK_STATE_SPEC } from "../pipelines/feedback/state.ts";

const FAILED = "feedback.failed";

/** A runner's failure event for item `item`: its stage failed on the message at `seq`. */
function failure(item: string, stage: string, subject: string, seq: number) {
  return {
    id: deterministicId(item, FAILED, String(seq)),
    item_id: item,
    data: { stage, subject, dead_letter_subject: `deadletter.${stage}.${item}` },
  };
}

Deno.test("a failure is vouched for only by its stage's letter for a message of the pipeline's stream", async (t) => {
  await using n = await startTestNats();
  const js = jetstream(n.nc);
  const reads = storedLetters(n.jsm, "FEEDBACK");
  /** Stores `stage`'s letter for item `item` of the message at `seq` on `subject`. */
  const letter = (stage: string, item: string, subject: string, seq: number) =>
    js.publish(
      `deadletter.${stage}.${item}`,
      JSON.stringify({ stage, subject, item_id: item, stream_seq: seq }),
    );

  await t.step("a letter of the message the stream holds vouches for the failure", async () => {
    const m = await js.publish("feedback.ingested.fb1", "{}");
    const event = failure("fb1", "sentiment", "feedback.ingested.fb1", m.seq);
    assert.equal((await failureVerdict(reads, FAILED, event)).type, "pending");
    await letter("sentiment", "fb1", "feedback.ingested.fb1", m.seq);
    assert.deepEqual(await failureVerdict(reads, FAILED, event), { type: "vouched" });
  });

  await t.step("a letter naming a sequence that holds another subject does not", async () => {
    const m = await js.publish("feedback.ingested.fb3", "{}");
    await letter("sentiment", "fb2", "feedback.ingested.fb2", m.seq);
    const event = failure("fb2", "sentiment", "feedback.ingested.fb2", m.seq);
    assert.equal((await failureVerdict(reads, FAILED, event)).type, "pending");
  });

  await t.step(
    "a letter naming a message of another stream (a digest request) does not",
    async () => {
      // Any key that may publish the failure event and letters of its own stage could name a
      // subject outside the pipeline's stream; before, such a letter vouched with no read.
      const m = await js.publish("digest.request.feedback", "{}");
      await letter("topics", "fb4", "digest.request.feedback", m.seq);
      const event = failure("fb4", "topics", "digest.request.feedback", m.seq);
      const v = await failureVerdict(reads, FAILED, event);
      assert.equal(v.type, "pending", JSON.stringify(v));
    },
  );

  await t.step(
    "with its stages' inputs, a letter naming a message its stage does not consume does not",
    async () => {
      // The topics key stores a letter of its own naming the item's ingested event, which only
      // sentiment consumes, as a runner of topics never would.
      const m = await js.publish("feedback.ingested.fb5", "{}");
      await letter("topics", "fb5", "feedback.ingested.fb5", m.seq);
      const event = failure("fb5", "topics", "feedback.ingested.fb5", m.seq);
      const inputs = FEEDBACK_STATE_SPEC.stageInputs;
      const v = await failureVerdict(reads, FAILED, event, inputs);
      assert.equal(v.type, "refused", JSON.stringify(v));
      assert.match(
        (v as { reason: string }).reason,
        /topics consumes no message on feedback\.ingested/,
      );
      // Sentiment's letter of it, as its runner stores one, does.
      await letter("sentiment", "fb5", "feedback.ingested.fb5", m.seq);
      const real = failure("fb5", "sentiment", "feedback.ingested.fb5", m.seq);
      assert.deepEqual(await failureVerdict(reads, FAILED, real, inputs), { type: "vouched" });
    },
  );

  await t.step("a redrive marker's subject is no stage's letter", async () => {
    // The gateway's key may publish `deadletter.redriven.*` and any event of a pipeline.
    const m = await js.publish("feedback.ingested.fb6", "{}");
    await letter("redriven", "fb6", "feedback.ingested.fb6", m.seq);
    const event = failure("fb6", "redriven", "feedback.ingested.fb6", m.seq);
    const v = await failureVerdict(reads, FAILED, event);
    assert.equal(v.type, "refused", JSON.stringify(v));
  });
});
