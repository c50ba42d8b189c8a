/**
 * The feedback pipeline as a definition: ingest -> sentiment -> topics -> dispatch ->
 * processed. The mesh derives from it the steps' services, durable consumers, NATS
 * permissions and stream, and the dashboard's graph (pipelines/feedback/wiring.ts); each
 * step runs its stage module (pipelines/feedback/services/, on pipelines/feedback/stages.ts),
 * which publishes the pipeline's own events (schemas/feedback.*.json), not a definition's
 * generic ones. See docs/PIPELINES.md, "The shipped pipelines' wiring".
 *
 * @module
 */
import { definePipeline } from "../../src/pipeline/definition.ts";

const obj = { type: "object" } as const;

/** The feedback pipeline's definition. */
export const FEEDBACK_PIPELINE = definePipeline({
  name: "feedback",
  description: "Customer feedback: sentiment, topics, routing",
  // The full schema (schemas/feedback.submit.v1.json) $refs defs.v1.json; the intake validates
  // with it. This is its outline.
  // Submissions (`feedback.submit`, POST /feedback) become `feedback.ingested` entry events in
  // the pipeline's intake (pipelines/feedback/intake.ts).
  input: {
    schema: { type: "object", required: ["text"], properties: { text: { type: "string" } } },
    event: "ingested",
  },
  start: "sentiment",
  steps: {
    // Each step keeps the durable consumer it had before it was defined here.
    sentiment: {
      kind: "task",
      emits: "sentiment_analyzed",
      output: obj,
      durable: "sentiment",
      next: "topics",
    },
    topics: {
      kind: "task",
      emits: "topics_extracted",
      output: obj,
      durable: "topics",
      next: "dispatch",
    },
    dispatch: {
      kind: "task",
      emits: "dispatched",
      output: obj,
      durable: "dispatch",
      next: "processed",
    },
    processed: { kind: "end", outcome: "processed" },
  },
});
