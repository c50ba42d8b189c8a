/**
 * Where the content moderation pipeline lives on the bus: its stream, buckets, event types and
 * request subjects. Its events are published on `content.<type>.<item_id>`
 * (`nats sub --stream CONTENT 'content.>'`).
 *
 * @module
 */

/** The JetStream stream holding every event of the content moderation pipeline. */
export const CONTENT_STREAM = "CONTENT";
/** KV bucket with one entry per content item: its moderation state. */
export const CONTENT_STATE_BUCKET = "weft_content_state";
/** KV bucket of the human review queue: one entry per item under review. */
export const REVIEW_BUCKET = "weft_reviews";
/** Object store bucket holding binary uploads. */
export const CONTENT_OBJECT_BUCKET = "weft_content_objects";

/** Request/reply content submission (`nats req weft.content.submit '{"text":"..."}'`). */
export const CONTENT_SUBMIT_REQUEST_SUBJECT = "weft.content.submit";
/** Request/reply content state lookup (`nats req weft.content.get ID`). */
export const CONTENT_GET_REQUEST_SUBJECT = "weft.content.get";
/** Request/reply review queue listing (`nats req weft.reviews.list '{"status":"pending"}'`). */
export const REVIEWS_LIST_REQUEST_SUBJECT = "weft.reviews.list";
/** Request/reply claim (`nats req weft.reviews.claim '{"id":"...","reviewer":"alice"}'`). */
export const REVIEWS_CLAIM_REQUEST_SUBJECT = "weft.reviews.claim";
/** Request/reply decision (`nats req weft.reviews.decide '{"id":"...","decision":"approve",...}'`). */
export const REVIEWS_DECIDE_REQUEST_SUBJECT = "weft.reviews.decide";

/** The subject filter matching every content event of one item. */
export function contentEventsFilter(itemId: string): string {
  return `content.*.${itemId}`;
}

/** The event types of the content moderation pipeline. */
export const ContentEventType = {
  Uploaded: "content.uploaded",
  Moderated: "content.moderated",
  ReviewRequested: "content.review_requested",
  ReviewClaimed: "content.review_claimed",
  SlaExpired: "content.sla_expired",
  Escalated: "content.escalated",
  Decided: "content.decided",
  Published: "content.published",
  Archived: "content.archived",
  Failed: "content.failed",
} as const;
/** One of {@link ContentEventType}. */
export type ContentEventType = typeof ContentEventType[keyof typeof ContentEventType];

/** Content event types after which nothing more happens to an item. */
export const CONTENT_FINAL_EVENT_TYPES: ReadonlySet<string> = new Set([
  ContentEventType.Published,
  ContentEventType.Archived,
  ContentEventType.Failed,
]);
