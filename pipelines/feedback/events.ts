/**
 * The feedback pipeline's events and documents: their schemas (schemas/feedback.*.json and
 * the digest's), registered in the event catalog when this module loads, and their types,
 * added to the catalog's {@link EventMap} and {@link DocumentMap}. Every module that handles
 * feedback events imports its event types from here, so the schemas are registered wherever
 * they are validated.
 *
 * @module
 */
import { registerEvents } from "../../src/schemas.ts";
import type { EventMap } from "../../src/schemas.ts";
import defs from "../../schemas/defs.v1.json" with { type: "json" };
import submit from "../../schemas/feedback.submit.v1.json" with { type: "json" };
import submitBatch from "../../schemas/feedback.submit_batch.v1.json" with { type: "json" };
import ingested from "../../schemas/feedback.ingested.v1.json" with { type: "json" };
import sentimentAnalyzed from "../../schemas/feedback.sentiment_analyzed.v1.json" with {
  type: "json",
};
import topicsExtracted from "../../schemas/feedback.topics_extracted.v1.json" with {
  type: "json",
};
import dispatched from "../../schemas/feedback.dispatched.v1.json" with { type: "json" };
import processed from "../../schemas/feedback.processed.v1.json" with { type: "json" };
import failed from "../../schemas/feedback.failed.v1.json" with { type: "json" };
import state from "../../schemas/feedback.state.v1.json" with { type: "json" };
import rules from "../../schemas/rules.v1.json" with { type: "json" };
import digestRequest from "../../schemas/digest.request.v1.json" with { type: "json" };
import digestFeedbackCounts from "../../schemas/digest.feedback_counts.v1.json" with {
  type: "json",
};
import type {
  DigestFeedbackCounts,
  DigestRequest,
  FeedbackBatchSubmission,
  FeedbackDispatched,
  FeedbackFailed,
  FeedbackIngested,
  FeedbackProcessed,
  FeedbackSentimentAnalyzed,
  FeedbackState,
  FeedbackSubmission,
  FeedbackTopicsExtracted,
  Ruleset,
} from "./events.gen.ts";
import {
  DIGEST_REQUEST_SUBJECT,
  FeedbackEventType,
  FINAL_EVENT_TYPES,
  SUBMIT_SUBJECT,
} from "./subjects.ts";

declare module "../../src/schemas.ts" {
  interface EventMap {
    /** An item was accepted into the feedback pipeline (feedback.ingested). */
    "feedback.ingested": FeedbackIngested;
    /** The sentiment stage classified the item (feedback.sentiment_analyzed). */
    "feedback.sentiment_analyzed": FeedbackSentimentAnalyzed;
    /** The topics stage extracted the item's topics (feedback.topics_extracted). */
    "feedback.topics_extracted": FeedbackTopicsExtracted;
    /** The dispatch stage routed the item to a team (feedback.dispatched). */
    "feedback.dispatched": FeedbackDispatched;
    /** The item finished the pipeline: a final event (feedback.processed). */
    "feedback.processed": FeedbackProcessed;
    /** A stage gave up on the item: a final event (feedback.failed). */
    "feedback.failed": FeedbackFailed;
    /** The periodic digest: feedback items dispatched per team (digest.feedback_counts). */
    "digest.feedback_counts": DigestFeedbackCounts;
  }
  interface DocumentMap {
    /** A feedback submission: the body of POST /feedback. */
    "feedback.submit": FeedbackSubmission;
    /** A batch of feedback submissions: the body of POST /feedback/batch. */
    "feedback.submit_batch": FeedbackBatchSubmission;
    /** A feedback item's state, folded from its events. */
    "feedback.state": FeedbackState;
    /** A ruleset: the routing table and optional keyword rules. */
    "rules": Ruleset;
    /** A request for a feedback digest. */
    "digest.request": DigestRequest;
  }
}

// Every module that handles this pipeline's events imports their types from here (so the
// schemas are registered wherever they are validated).
export { FeedbackEventType, FINAL_EVENT_TYPES };

/** Any event of the feedback pipeline. */
export type FeedbackEvent = EventMap[FeedbackEventType];

/**
 * Event types an item has at most once: the state fold keeps the first stored and ignores
 * any later copy. Failures repeat (a redriven item may fail again).
 */
export const ONCE_PER_ITEM_TYPES: ReadonlySet<string> = new Set([
  FeedbackEventType.Ingested,
  FeedbackEventType.SentimentAnalyzed,
  FeedbackEventType.TopicsExtracted,
  FeedbackEventType.Dispatched,
  FeedbackEventType.Processed,
]);

registerEvents({
  shared: { defs },
  events: {
    [FeedbackEventType.Ingested]: ingested,
    [FeedbackEventType.SentimentAnalyzed]: sentimentAnalyzed,
    [FeedbackEventType.TopicsExtracted]: topicsExtracted,
    [FeedbackEventType.Dispatched]: dispatched,
    [FeedbackEventType.Processed]: processed,
    [FeedbackEventType.Failed]: failed,
    "digest.feedback_counts": digestFeedbackCounts,
  },
  documents: {
    "feedback.submit": submit,
    "feedback.submit_batch": submitBatch,
    "feedback.state": state,
    rules,
    "digest.request": digestRequest,
  },
  entry: [FeedbackEventType.Ingested],
  submissions: { [SUBMIT_SUBJECT]: "feedback.submit" },
  requests: { [DIGEST_REQUEST_SUBJECT]: "digest.request" },
});
