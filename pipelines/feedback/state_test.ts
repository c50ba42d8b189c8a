import assert from "node:assert/strict";
import { applyEvent, FEEDBACK_STATE_SPEC, foldEvents } from "./state.ts";
import { createEvent, deterministicId } from "../../src/events.ts";
import type { AnyEvent } from "../../src/schemas.ts";

const TRACE = "0af7651916cd43dd8448eb211c80319c";
const at = (s: number) => new Date(Date.UTC(2026, 0, 1, 0, 0, s));
const sentiment = { label: "positive" as const, score: 0.8, analyzer: "rules" };
const topics = { topics: ["praise"], evidence: {}, analyzer: "rules" };
const routing = { team: "General Support", rule: 3 };

function history(): { event: AnyEvent; seq: number }[] {
  const base = { itemId: "fb1", traceId: TRACE, source: "test" };
  const data = { text: "I love it", channel: "email" };
  return [
    createEvent({ ...base, type: "feedback.ingested", data, time: at(1) }),
    createEvent({
      ...base,
      type: "feedback.sentiment_analyzed",
      data: { ...data, sentiment },
      time: at(2),
    }),
    createEvent({
      ...base,
      type: "feedback.topics_extracted",
      data: { ...data, sentiment, topics },
      time: at(3),
    }),
    createEvent({
      ...base,
      type: "feedback.dispatched",
      data: { ...data, sentiment, topics, routing },
      time: at(4),
    }),
    createEvent({
      ...base,
      type: "feedback.processed",
      data: { ...data, sentiment, topics, routing },
      time: at(4),
    }),
  ].map((event, i) => ({ event, seq: i + 1 }));
}

Deno.test("foldEvents() builds the full state of a processed item", () => {
  const s = foldEvents(history())!;
  assert.equal(s.status, "processed");
  assert.equal(s.stage, "processed");
  assert.equal(s.text, "I love it");
  assert.equal(s.channel, "email");
  assert.deepEqual(s.sentiment, sentiment);
  assert.deepEqual(s.topics, topics);
  assert.deepEqual(s.routing, routing);
  assert.equal(s.created_at, at(1).toISOString());
  assert.equal(s.updated_at, at(4).toISOString());
  assert.deepEqual(Object.keys(s.stages), [
    "ingested",
    "sentiment_analyzed",
    "topics_extracted",
    "dispatched",
    "processed",
  ]);
});

Deno.test("applyEvent() reaches the same state whatever order the events arrive in", () => {
  const h = history();
  const forward = foldEvents(h);
  const backward = foldEvents([...h].reverse());
  const shuffled = foldEvents([h[2]!, h[4]!, h[0]!, h[3]!, h[1]!]);
  assert.deepEqual(backward, forward);
  assert.deepEqual(shuffled, forward);
});

Deno.test("applyEvent() applied twice with the same event changes nothing", () => {
  const h = history();
  const once = foldEvents(h.slice(0, 3))!;
  assert.equal(applyEvent(once, h[2]!.event, 3), once);
  assert.deepEqual(foldEvents([...h, ...h]), foldEvents(h));
});

Deno.test("an item in the middle of the pipeline is processing at its furthest stage", () => {
  const s = foldEvents(history().slice(0, 2))!;
  assert.equal(s.status, "processing");
  assert.equal(s.stage, "sentiment_analyzed");
  assert.equal(foldEvents(history().slice(0, 1))!.status, "accepted");
});

Deno.test("a failed event marks the item failed with the stage, code and reason", () => {
  const h = history().slice(0, 2);
  const failed = createEvent({
    type: "feedback.failed",
    itemId: "fb1",
    traceId: TRACE,
    source: "weft-topics",
    time: at(9),
    data: { stage: "topics", code: "handler_failed", reason: "boom", attempts: 5 },
  });
  const s = foldEvents([...h, { event: failed, seq: 9 }])!;
  assert.equal(s.status, "failed");
  assert.deepEqual(s.error, {
    stage: "topics",
    code: "handler_failed",
    reason: "boom",
    attempts: 5,
  });
  assert.deepEqual(s.sentiment, sentiment, "earlier results are kept");
});

Deno.test("applyEvent() orders by stream sequence: an event dated in the year 9999 cannot lock an item", () => {
  const base = { itemId: "fb1", traceId: TRACE, source: "test" };
  const [ingested, sentimented] = history();
  // Failed at topics by an event with a far-future date; redriven, then processed.
  const failed = createEvent({
    ...base,
    type: "feedback.failed",
    data: { stage: "topics", code: "handler_failed", reason: "boom", attempts: 4 },
    time: new Date("9999-01-01T00:00:00.000Z"),
  });
  const done = history()[4]!.event;
  const s = foldEvents([
    ingested!,
    sentimented!,
    { event: failed, seq: 3 },
    { event: done, seq: 9 },
  ])!;
  assert.equal(s.status, "processed", "the later-stored final event wins");
  assert.equal(s.error, undefined);
  assert.equal(s.updated_at, done.time, "updated_at is the last stored event's time");
  assert.equal(s.created_at, ingested!.event.time);
});

Deno.test("a failure stored after the item was processed leaves it processed, in any order", () => {
  // A poison or forged copy of one of its events, published after it finished, makes the
  // stage that reads it publish feedback.failed for the item.
  const late = createEvent({
    type: "feedback.failed",
    itemId: "fb1",
    traceId: TRACE,
    source: "weft-sentiment",
    time: at(9),
    data: { stage: "sentiment", code: "invalid_event", reason: "/text is required", attempts: 1 },
  });
  const h = [...history(), { event: late, seq: 9 }];
  const forward = foldEvents(h)!;
  assert.equal(forward.status, "processed");
  assert.equal(forward.stage, "processed");
  assert.equal(forward.error, undefined);
  assert.deepEqual(forward.routing, routing);
  assert.deepEqual(foldEvents([...h].reverse()), forward);
  assert.deepEqual(foldEvents([h[5]!, h[0]!, h[4]!, h[2]!, h[1]!, h[3]!]), forward);
});

Deno.test("applyEvent() keeps the first stored event of a once-per-item type: a later copy changes nothing", () => {
  const [ingested, ...rest] = history();
  const forged = createEvent({
    type: "feedback.ingested",
    itemId: "fb1",
    traceId: TRACE,
    id: "forged-ingested",
    source: "forger",
    data: { text: "something else entirely" },
    time: at(59),
  });
  assert.deepEqual(
    foldEvents([ingested!, { event: forged, seq: 2 }]),
    foldEvents([ingested!]),
    "a copy stored right after the first",
  );
  assert.deepEqual(
    foldEvents([ingested!, ...rest, { event: forged, seq: 99 }]),
    foldEvents(history()),
    "a copy stored at the end",
  );
});

Deno.test("applyEvent() does not apply an event carrying another text, channel or customer than the item's", () => {
  const h = history();
  const forged = createEvent({
    type: "feedback.sentiment_analyzed",
    itemId: "fb1",
    traceId: TRACE,
    id: "forged-sentiment",
    source: "forger",
    data: { text: "something else entirely", channel: "email", sentiment },
    time: at(2),
  });
  const ingested = foldEvents(h.slice(0, 1))!;
  assert.equal(applyEvent(ingested, forged, 2), ingested, "stored before the item's own");
  assert.deepEqual(
    foldEvents([
      h[0]!,
      { event: forged, seq: 2 },
      ...h.slice(1).map((e) => ({ ...e, seq: e.seq + 1 })),
    ])
      ?.stages.sentiment_analyzed?.event_id,
    h[1]!.event.id,
    "the item's own sentiment event is the one kept",
  );
  const processed = foldEvents(h)!;
  const late = createEvent({
    type: "feedback.processed",
    itemId: "fb1",
    traceId: TRACE,
    id: "forged-processed",
    source: "forger",
    data: { text: "I love it", channel: "web", sentiment, topics, routing },
    time: at(9),
  });
  assert.equal(applyEvent(processed, late, 9), processed, "another channel");
});

Deno.test("a failed item takes no later event until the event it failed on is stored again (a redrive), which resumes it", () => {
  const h = history();
  const failed = createEvent({
    type: "feedback.failed",
    itemId: "fb1",
    traceId: TRACE,
    source: "weft-topics",
    time: at(5),
    data: {
      stage: "topics",
      code: "handler_failed",
      reason: "boom",
      attempts: 5,
      dead_letter_subject: "deadletter.topics.fb1",
      subject: "feedback.sentiment_analyzed.fb1",
      event_id: h[1]!.event.id,
    },
  });
  const atFailure = foldEvents([h[0]!, h[1]!, { event: failed, seq: 3 }])!;
  assert.equal(atFailure.status, "failed");
  assert.equal(atFailure.error?.event_id, h[1]!.event.id);
  // The rest of the pipeline's events, not preceded by the redriven sentiment event: not applied.
  const rest = h.slice(2).map((e, i) => ({ ...e, seq: 10 + i }));
  assert.deepEqual(foldEvents([h[0]!, h[1]!, { event: failed, seq: 3 }, ...rest]), atFailure);
  // The sentiment event stored again after the failure (its redrive): the item resumes.
  const redriven = { event: h[1]!.event, seq: 9 };
  const resumed = foldEvents([h[0]!, h[1]!, { event: failed, seq: 3 }, redriven])!;
  assert.equal(resumed.status, "processing");
  assert.equal(resumed.error, undefined);
  const done = foldEvents([h[0]!, h[1]!, { event: failed, seq: 3 }, redriven, ...rest])!;
  assert.equal(done.status, "processed");
  assert.deepEqual(done.routing, routing);
});

Deno.test("an item failed on a step's message that is no event takes no later event; one failed on its submission does", () => {
  const h = history();
  const failedOn = (subject: string) =>
    createEvent({
      type: "feedback.failed",
      itemId: "fb1",
      traceId: TRACE,
      source: "weft-topics",
      time: at(5),
      data: {
        stage: subject === "feedback.submit" ? "ingest" : "topics",
        code: "invalid_event",
        reason: "body is not JSON",
        attempts: 1,
        dead_letter_subject: "deadletter.topics.fb1",
        subject,
      },
    });
  const junk = foldEvents([h[0]!, h[1]!, {
    event: failedOn("feedback.sentiment_analyzed.fb1"),
    seq: 3,
  }])!;
  assert.equal(junk.error?.subject, "feedback.sentiment_analyzed.fb1");
  const rest = h.slice(2).map((e, i) => ({ ...e, seq: 10 + i }));
  assert.deepEqual(
    foldEvents([
      h[0]!,
      h[1]!,
      { event: failedOn("feedback.sentiment_analyzed.fb1"), seq: 3 },
      ...rest,
    ]),
    junk,
  );
  // A failed submission, redriven, makes the item as before.
  const redriven = h.map((e, i) => ({ ...e, seq: 10 + i }));
  const made = foldEvents([{ event: failedOn("feedback.submit"), seq: 1 }, ...redriven])!;
  assert.equal(made.status, "processed");
});

Deno.test("FEEDBACK_STATE_SPEC.isFinalEvent answers as the fold of the event alone does", () => {
  const failed = createEvent({
    itemId: "fb1",
    traceId: TRACE,
    source: "test",
    type: "feedback.failed",
    data: { stage: "sentiment", code: "invalid_event", reason: "a test", attempts: 1 },
  });
  for (const { event } of [...history(), { event: failed, seq: 6 }]) {
    const alone = applyEvent(undefined, event, 1);
    assert.equal(
      FEEDBACK_STATE_SPEC.isFinalEvent!(event),
      FEEDBACK_STATE_SPEC.isFinal(alone),
      event.type,
    );
  }
});

Deno.test("a failure stored before the item's latest failure, applied after it, changes nothing: a redrive and its second failure fold to the same state in either order", () => {
  // A state writer with replicas (or one putting the first failure off for its letter) can
  // take the redrive's event and the second failure before the first failure; a rebuild takes
  // them in the stream's order. Found by a loaded run: the first failure, applied last,
  // overwrote the second's record, and the item's state disagreed with a rebuild.
  const h = history();
  const failure = (seq: number, reason: string) =>
    createEvent({
      // As a runner's: its id made from the stream sequence of the message it failed on.
      id: deterministicId("fb1", "feedback.failed", String(seq - 1)),
      type: "feedback.failed",
      itemId: "fb1",
      traceId: TRACE,
      source: "weft-topics",
      time: at(seq),
      data: {
        stage: "topics",
        code: "handler_failed",
        reason,
        attempts: 2,
        dead_letter_subject: "deadletter.topics.fb1",
        subject: "feedback.sentiment_analyzed.fb1",
        event_id: h[1]!.event.id,
      },
    });
  const first = { event: failure(3, "first"), seq: 3 };
  const redriven = { event: h[1]!.event, seq: 4 };
  const second = { event: failure(5, "second"), seq: 5 };
  const inOrder = foldEvents([h[0]!, h[1]!, first, redriven, second])!;
  assert.equal(inOrder.error?.reason, "second");
  assert.equal(inOrder.stages.failed?.seq, 5);
  const outOfOrder = foldEvents([h[0]!, h[1]!, redriven, second, first]);
  assert.deepEqual(outOfOrder, inOrder);
});
