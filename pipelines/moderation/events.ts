/**
 * The content moderation pipeline's events and documents: their schemas
 * (schemas/content.*.json and the review decision's), registered in the event catalog when
 * this module loads, and their types, added to the catalog's {@link EventMap} and
 * {@link DocumentMap}. Every module that handles content events imports its event types from
 * here, so the schemas are registered wherever they are validated.
 *
 * @module
 */
import { registerEvents } from "../../src/schemas.ts";
import type { EventMap } from "../../src/schemas.ts";
import { CONTENT_FINAL_EVENT_TYPES, ContentEventType } from "./subjects.ts";
import defs from "../../schemas/defs.v1.json" with { type: "json" };
import contentSubmit from "../../schemas/content.submit.v1.json" with { type: "json" };
import contentUploaded from "../../schemas/content.uploaded.v1.json" with { type: "json" };
import contentModerated from "../../schemas/content.moderated.v1.json" with { type: "json" };
import contentReviewRequested from "../../schemas/content.review_requested.v1.json" with {
  type: "json",
};
import contentReviewClaimed from "../../schemas/content.review_claimed.v1.json" with {
  type: "json",
};
import contentSlaExpired from "../../schemas/content.sla_expired.v1.json" with { type: "json" };
import contentEscalated from "../../schemas/content.escalated.v1.json" with { type: "json" };
import contentDecided from "../../schemas/content.decided.v1.json" with { type: "json" };
import contentPublished from "../../schemas/content.published.v1.json" with { type: "json" };
import contentArchived from "../../schemas/content.archived.v1.json" with { type: "json" };
import contentFailed from "../../schemas/content.failed.v1.json" with { type: "json" };
import contentState from "../../schemas/content.state.v1.json" with { type: "json" };
import reviewDecision from "../../schemas/review.decision.v1.json" with { type: "json" };
import type {
  ContentArchived,
  ContentDecided,
  ContentEscalated,
  ContentFailed,
  ContentModerated,
  ContentPublished,
  ContentReviewClaimed,
  ContentReviewRequested,
  ContentSlaExpired,
  ContentState,
  ContentSubmission,
  ContentUploaded,
  ReviewDecisionRequest,
} from "./events.gen.ts";

declare module "../../src/schemas.ts" {
  interface EventMap {
    /** A user uploaded content; it awaits moderation (content.uploaded). */
    "content.uploaded": ContentUploaded;
    /** Automatic moderation decided: safe or flagged (content.moderated). */
    "content.moderated": ContentModerated;
    /** A flagged item entered the human review queue (content.review_requested). */
    "content.review_requested": ContentReviewRequested;
    /** A reviewer claimed the item (content.review_claimed). */
    "content.review_claimed": ContentReviewClaimed;
    /** A review deadline passed (content.sla_expired). */
    "content.sla_expired": ContentSlaExpired;
    /** The item was not decided in time and was escalated (content.escalated). */
    "content.escalated": ContentEscalated;
    /** A human (or the SLA default action) decided a flagged item (content.decided). */
    "content.decided": ContentDecided;
    /** The item was stored and published: a final event (content.published). */
    "content.published": ContentPublished;
    /** A rejected item was archived: a final event (content.archived). */
    "content.archived": ContentArchived;
    /** A stage gave up on the item: a final event (content.failed). */
    "content.failed": ContentFailed;
  }
  interface DocumentMap {
    /** A text content submission: the JSON body of POST /content. */
    "content.submit": ContentSubmission;
    /** A content item's moderation state, folded from its events. */
    "content.state": ContentState;
    /** A reviewer's decision: the body of POST /reviews/ID/decision. */
    "review.decision": ReviewDecisionRequest;
  }
}

// Every module that handles this pipeline's events imports their types from here (so the
// schemas are registered wherever they are validated).
export { CONTENT_FINAL_EVENT_TYPES, ContentEventType };

/** Any event of the content moderation pipeline. */
export type ContentEvent = EventMap[ContentEventType];

/**
 * Event types an item has at most once: the state fold keeps the first stored and ignores
 * any later copy. Failures repeat (a redriven item may fail again), as do review claims,
 * SLA expiries and escalations.
 */
export const ONCE_PER_ITEM_TYPES: ReadonlySet<string> = new Set([
  ContentEventType.Uploaded,
  ContentEventType.Moderated,
  ContentEventType.ReviewRequested,
  ContentEventType.Decided,
  ContentEventType.Published,
  ContentEventType.Archived,
]);

registerEvents({
  shared: { defs },
  events: {
    [ContentEventType.Uploaded]: contentUploaded,
    [ContentEventType.Moderated]: contentModerated,
    [ContentEventType.ReviewRequested]: contentReviewRequested,
    [ContentEventType.ReviewClaimed]: contentReviewClaimed,
    [ContentEventType.SlaExpired]: contentSlaExpired,
    [ContentEventType.Escalated]: contentEscalated,
    [ContentEventType.Decided]: contentDecided,
    [ContentEventType.Published]: contentPublished,
    [ContentEventType.Archived]: contentArchived,
    [ContentEventType.Failed]: contentFailed,
  },
  documents: {
    "content.submit": contentSubmit,
    "content.state": contentState,
    "review.decision": reviewDecision,
  },
  entry: [ContentEventType.Uploaded],
});
