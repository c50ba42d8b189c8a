/**
 * Every subject, stream, consumer and bucket name Weft uses, defined once.
 *
 * Events of the feedback pipeline are published on `feedback.<type>.<item_id>`, so
 * `nats sub 'feedback.>'` shows them all, `feedback.*.<id>` selects one item's history,
 * and `feedback.<type>.*` one type across items.
 *
 * @module
 */

/** An item id: letters, digits, `_` and `-`, at most 64 characters (it is a subject token and a KV key). */
export const ITEM_ID: RegExp = /^[A-Za-z0-9_-]{1,64}$/;

/** The JetStream stream holding submissions and every feedback event. */
export const FEEDBACK_STREAM = "FEEDBACK";
/** The JetStream stream holding dead letters. */
export const DEADLETTER_STREAM = "DEADLETTER";
/** KV bucket with one entry per item: its current state. */
export const STATE_BUCKET = "weft_feedback_state";
/** KV bucket remembering the first answer to each Idempotency-Key. */
export const IDEMPOTENCY_BUCKET = "weft_idempotency";

/** Plain-JSON submissions published straight onto the bus (`nats pub feedback.submit ...`). */
export const SUBMIT_SUBJECT = "feedback.submit";
/** Request/reply submission (`nats req weft.feedback.submit ...`): replies with the id. */
export const SUBMIT_REQUEST_SUBJECT = "weft.feedback.submit";
/** Request/reply state lookup (`nats req weft.feedback.get ID`). */
export const GET_REQUEST_SUBJECT = "weft.feedback.get";

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

/**
 * Event types an item has at most once: the state fold keeps the first stored and ignores
 * any later copy. Failures repeat (a redriven item may fail again), as do review claims,
 * SLA expiries and escalations.
 */
export const ONCE_PER_ITEM_TYPES: ReadonlySet<string> = new Set([
  "feedback.ingested",
  "feedback.sentiment_analyzed",
  "feedback.topics_extracted",
  "feedback.dispatched",
  "feedback.processed",
  "content.uploaded",
  "content.moderated",
  "content.review_requested",
  "content.decided",
  "content.published",
  "content.archived",
]);

/**
 * The event that starts an item in each pipeline. It is published with "expected last
 * subject sequence 0", so the stream stores one per item however late a re-sent submission
 * comes, and the first step handles only the first one stored on its subject (or a byte
 * for byte redrive of it): a forged or repeated entry event never runs an item again.
 * (Checking every step's output the same way costs a per-subject lookup on the stream's
 * write path for every event, which under bursts delayed publish acks past their timeout.)
 */
export const ENTRY_EVENT_TYPES: ReadonlySet<string> = new Set([
  "feedback.ingested",
  "content.uploaded",
]);

/** Event types after which nothing more happens to an item. */
export const FINAL_EVENT_TYPES: ReadonlySet<string> = new Set([
  FeedbackEventType.Processed,
  FeedbackEventType.Failed,
]);

/** The subject an event of `type` about `itemId` is published on. */
export function eventSubject(type: string, itemId: string): string {
  return `${type}.${itemId}`;
}

/** The subject filter matching every event of one item. */
export function itemEventsFilter(itemId: string): string {
  return `feedback.*.${itemId}`;
}

/** The subject filter matching every event of one type (all items). */
export function typeFilter(type: string): string {
  return `${type}.*`;
}

/** The pipelines whose events live on `<pipeline>.<type>.<item_id>`. */
const EVENT_PIPELINES: ReadonlySet<string> = new Set(["feedback", "content"]);

/**
 * Splits an event subject, `feedback.<type>.<id>` or `content.<type>.<id>`, into its event
 * type and item id; null for any other subject. The subject, not the body, says which item
 * an event is about: NATS permissions guard subjects, so a body cannot name another item.
 *
 * @example
 * ```ts
 * import { parseEventSubject } from "./subjects.ts";
 * const s = parseEventSubject("feedback.processed.fb1");
 * console.assert(s?.type === "feedback.processed" && s.itemId === "fb1");
 * ```
 */
export function parseEventSubject(subject: string): { type: string; itemId: string } | null {
  const parts = subject.split(".");
  if (parts.length !== 3 || !EVENT_PIPELINES.has(parts[0]!) || !parts[1] || !parts[2]) return null;
  return { type: `${parts[0]}.${parts[1]}`, itemId: parts[2] };
}

/** The subject a dead letter from `stage` about `itemId` is kept on. */
export function deadLetterSubject(stage: string, itemId: string | undefined): string {
  return `deadletter.${stage}.${itemId ?? "unknown"}`;
}

/**
 * The JetStream stream holding every event of the content moderation pipeline, on
 * `content.<type>.<item_id>` (`nats sub 'content.>'`).
 */
export const CONTENT_STREAM = "CONTENT";
/** KV bucket with one entry per content item: its moderation state. */
export const CONTENT_STATE_BUCKET = "weft_content_state";
/** KV bucket of the human review queue: one entry per item under review. */
export const REVIEW_BUCKET = "weft_reviews";
/** Object store bucket holding binary uploads. */
export const CONTENT_OBJECT_BUCKET = "weft_content_objects";
/** KV bucket of schedules (delayed and recurring events). */
export const SCHEDULE_BUCKET = "weft_schedules";
/** KV bucket of per-firing leases: the replica that creates the lease fires. */
export const SCHEDULE_LEASE_BUCKET = "weft_schedule_leases";

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
/** Request/reply schedule management: `weft.schedules.<create|list|get|cancel>`. */
export const SCHEDULES_REQUEST_PREFIX = "weft.schedules";

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

/** The subject filter matching every content event of one item. */
export function contentEventsFilter(itemId: string): string {
  return `content.*.${itemId}`;
}

/** The JetStream stream of digests and their requests (`digest.>`). */
export const DIGEST_STREAM = "DIGEST";

/**
 * The JetStream stream of live shadows' decisions, `shadow.<pipeline>.<step>.<item_id>`,
 * and of the audit events of attaching, detaching and promoting them
 * (`shadow._audit.<action>.<pipeline>.<step>`). Small, short-lived and discard-old: it never
 * refuses a shadow's publish and shares no limit with production's streams.
 */
export const SHADOW_STREAM = "SHADOW";
/** KV bucket of the live shadows attached over the API (`weft.shadow.attach`, `POST /shadows`). */
export const SHADOW_BUCKET = "weft_shadows";
/**
 * KV bucket of promoted step versions, key `<pipeline>.<step>`: the candidate a step runs
 * instead of its configured analyzers (history kept: every promotion is recorded).
 */
export const STEP_VERSION_BUCKET = "weft_step_versions";
/** Request/reply shadow control: `weft.shadow.<attach|detach|list|promote>`. */
export const SHADOW_REQUEST_PREFIX = "weft.shadow";
/** Audit events of shadow control: `shadow._audit.<action>.<pipeline>.<step>`. */
export const SHADOW_AUDIT_PREFIX = "shadow._audit";

/** The streams the runtime keeps for itself; each pipeline's come besides. */
export const RUNTIME_STREAMS: readonly string[] = [DEADLETTER_STREAM, DIGEST_STREAM, SHADOW_STREAM];

/** Where a feedback digest is requested (the recurring schedule publishes here). */
export const DIGEST_REQUEST_SUBJECT = "digest.request.feedback";
/** The id of the recurring schedule that requests the feedback digest. */
export const DIGEST_SCHEDULE_ID = "feedback-digest";

/**
 * True when `subject` matches the NATS subject `filter` (`*`: one token, `>`: the rest).
 *
 * @example
 * ```ts
 * import { subjectMatches } from "./subjects.ts";
 * console.assert(subjectMatches("feedback.ingested.*", "feedback.ingested.fb1"));
 * console.assert(!subjectMatches("feedback.ingested.*", "$KV.weft_feedback_state.fb1"));
 * ```
 */
export function subjectMatches(filter: string, subject: string): boolean {
  const f = filter.split(".");
  const s = subject.split(".");
  for (let i = 0; i < f.length; i++) {
    if (f[i] === ">") return s.length > i;
    if (i >= s.length || (f[i] !== "*" && f[i] !== s[i]) || s[i] === "") return false;
  }
  return f.length === s.length;
}

/**
 * The subjects a caller may schedule (`POST /schedules`, `weft.schedules.create`): the
 * pipelines' bus inputs, which validate what they consume like any submission. Never an
 * event subject of a step, a JetStream API, KV or object-store subject, or a request subject.
 */
export const CALLER_SCHEDULABLE_SUBJECTS: readonly string[] = [SUBMIT_SUBJECT, "digest.request.*"];

/**
 * What the scheduler fires on at all: what callers may schedule, and the SLA timers the
 * review service sets itself. A schedule on anything else (e.g. written straight into the
 * bucket) is refused when fired.
 */
export const SCHEDULABLE_SUBJECTS: readonly string[] = [
  ...CALLER_SCHEDULABLE_SUBJECTS,
  "content.sla_expired.*",
  // The timers of definitions' pipelines (deadlines, timeouts, delays: src/pipeline/).
  "*._timer.*",
];

/** True when `subject` matches one of `filters`. */
export function subjectAllowed(filters: readonly string[], subject: string): boolean {
  return filters.some((f) => subjectMatches(f, subject));
}
