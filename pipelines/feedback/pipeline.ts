/**
 * The feedback pipeline as a definition: ingest -> sentiment -> topics -> dispatch ->
 * processed. Handlers are today's stages from pipelines/feedback/stages.ts, unchanged; the
 * runtime does not run this definition yet (see docs/PIPELINES.md).
 *
 * @module
 */
import { definePipeline } from "../../src/pipeline/definition.ts";
import type { Stage } from "../../src/stage.ts";

/** Today's stage objects (e.g. `sentimentStage(analyzer)`), run as the steps of the same name. */
export interface FeedbackStages {
  // deno-lint-ignore no-explicit-any
  ingest?: Stage<any>;
  // deno-lint-ignore no-explicit-any
  sentiment?: Stage<any>;
  // deno-lint-ignore no-explicit-any
  topics?: Stage<any>;
  // deno-lint-ignore no-explicit-any
  dispatch?: Stage<any>;
}

/** The feedback pipeline's definition; pass the stages to run it, none to derive its wiring. */
export function feedbackPipeline(stages: FeedbackStages = {}) {
  const obj = { type: "object" } as const;
  return definePipeline({
    name: "feedback",
    description: "Customer feedback: sentiment, topics, routing",
    // The full schema (schemas/feedback.submit.v1.json) $refs defs.v1.json; the runtime keeps
    // validating with it. This is its outline until definitions resolve $refs.
    // Submissions (`feedback.submit`) become `feedback.ingested` entry events in the
    // runtime's intake, today's ingest stage.
    input: {
      schema: { type: "object", required: ["text"], properties: { text: { type: "string" } } },
      event: "ingested",
    },
    start: "sentiment",
    steps: {
      sentiment: {
        kind: "task",
        emits: "sentiment_analyzed",
        output: obj,
        stage: stages.sentiment,
        next: "topics",
      },
      topics: {
        kind: "task",
        emits: "topics_extracted",
        output: obj,
        stage: stages.topics,
        next: "dispatch",
      },
      dispatch: {
        kind: "task",
        emits: "dispatched",
        output: obj,
        stage: stages.dispatch,
        next: "processed",
      },
      processed: { kind: "end", outcome: "processed" },
    },
  });
}
