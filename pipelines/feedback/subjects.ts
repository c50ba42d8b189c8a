/**
 * Where the feedback pipeline lives on the bus: its stream, state bucket, subjects and event types.
 * Its events are published on `feedback.<type>.<item_id>`, so
 * `nats sub --stream FEEDBACK 'feedback.>'` shows them all, `feedback.*.<id>` selects one item's
 * history, and `feedback.<type>.*` one type across items.
 *
 * @module
 */

/** The JetStream stream holding submissions and every feedback event. */
export const FEEDBACK_STREAM = "FEEDBACK";
/** KV bucket with one entry per item: its current state. */
export const STATE_BUCKET = "weft_feedback_state";

/** Plain-JSON submissions published straight onto the bus (`nats pub feedback.submit ...`). */
export const SUBMIT_SUBJECT = "feedback.submit";
/** Request/reply submission (`nats req weft.feedback.submit ...`): replies with the id. */
export const SUBMIT_REQUEST_SUBJECT = "weft.feedback.submit";
/** Request/reply state lookup (`nats req weft.feedback.get ID`). */
export const GET_REQUEST_SUBJECT = "weft.feedback.get";

/** The subject filter matching every event of one item. */
export function itemEventsFilter(itemId: string): string {
  return `feedback.*.${itemId}`;
}

/** Where a feedback digest is requested (the recurring schedule publishes here). */
export const DIGEST_REQUEST_SUBJECT = "digest.request.feedback";
/**
 * The id of the recurring schedule that requests the feedback digest: the pipeline's own
 * (`feedback.<...>`), which only its digest service may write.
 */
export const DIGEST_SCHEDULE_ID = "feedback.digest";
/** Its id before schedules had owners: removed by the scheduler when it starts (wiring.ts). */
export const LEGACY_DIGEST_SCHEDULE_ID = "feedback-digest";

/** The event types of the feedback pipeline, in pipeline order. */
export const FeedbackEventType = {
  Ingested: "feedback.ingested",
  SentimentAnalyzed: "feedback.sentiment_analyzed",
  TopicsExtracted: "feedback.topics_extracted",
  Dispatched: "feedback.dispatched",
  Processed: "feedback.processed",
  Failed: "feedback.failed",
} as const;
/** One of {@link FeedbackEventType}. */
export type FeedbackEventType = typeof FeedbackEventType[keyof typeof FeedbackEventType];

/** Event types after which nothing more happens to an item. */
export const FINAL_EVENT_TYPES: ReadonlySet<string> = new Set([
  FeedbackEventType.Processed,
  FeedbackEventType.Failed,
]);
