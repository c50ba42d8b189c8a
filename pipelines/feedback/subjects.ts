/**
 * Where the feedback pipeline lives on the bus: its stream, state bucket and subjects.
 * Its events are published on `feedback.<type>.<item_id>`, so `nats sub 'feedback.>'` shows
 * them all, `feedback.*.<id>` selects one item's history, and `feedback.<type>.*` one type
 * across items.
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
/** The id of the recurring schedule that requests the feedback digest. */
export const DIGEST_SCHEDULE_ID = "feedback-digest";
