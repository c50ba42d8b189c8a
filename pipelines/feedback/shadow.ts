/**
 * How live shadows follow the feedback pipeline's steps (src/shadow/live.ts): what each
 * consumes and emits, which fields of its output are compared, and the candidate's version
 * of the step, built from the candidate's analyzers.
 *
 * @module
 */
import type { ShadowStepDef } from "../../src/shadow/live.ts";
import { typeFilter } from "../../src/subjects.ts";
import { FEEDBACK_STREAM } from "./subjects.ts";
import { FeedbackEventType as T } from "./events.ts";
import { dispatchStage, sentimentStage, topicsStage } from "./stages.ts";
import { type FeedbackAnalyzers, feedbackAnalyzers } from "./analyzers.ts";
import type { AnalyzerConfig } from "../../src/ai/configured_analyzers.ts";
import type { Stage } from "../../src/stage.ts";

/** A step's candidate: the stage built from the candidate's analyzers. */
const candidateOf = (
  // deno-lint-ignore no-explicit-any
  stage: (a: FeedbackAnalyzers) => Stage<any>,
) =>
async (config: AnalyzerConfig) => {
  const analyzers = await feedbackAnalyzers(config);
  return {
    stage: stage(analyzers),
    ...(analyzers.llmStats ? { llmStats: analyzers.llmStats } : {}),
  };
};

const label = (v: unknown) => (typeof v === "string" && v !== "" ? v : "none");
const get = (d: Record<string, unknown>, path: string[]) =>
  path.reduce<unknown>((v, k) => (v as Record<string, unknown> | undefined)?.[k], d);

/** The feedback pipeline's shadowable steps: their inputs, outputs and compared fields. */
export const FEEDBACK_SHADOW_STEPS: Readonly<Record<string, ShadowStepDef>> = {
  sentiment: {
    stream: FEEDBACK_STREAM,
    filterSubject: typeFilter(T.Ingested),
    output: T.SentimentAnalyzed,
    fields: (d) => ({ sentiment: label(get(d, ["sentiment", "label"])) }),
    bounded: ["sentiment"],
    candidate: candidateOf((a) => sentimentStage(a.sentiment)),
  },
  topics: {
    stream: FEEDBACK_STREAM,
    filterSubject: typeFilter(T.SentimentAnalyzed),
    output: T.TopicsExtracted,
    fields: (d) => {
      const topics = (get(d, ["topics", "topics"]) ?? []) as string[];
      return { topic: label(topics[0]), topics: [...topics].sort().join(",") || "none" };
    },
    bounded: ["topic"],
    candidate: candidateOf((a) => topicsStage(a.topics, a.toxicity)),
  },
  dispatch: {
    stream: FEEDBACK_STREAM,
    filterSubject: typeFilter(T.TopicsExtracted),
    output: T.Dispatched,
    fields: (d) => ({ team: label(get(d, ["routing", "team"])) }),
    bounded: ["team"],
    candidate: candidateOf((a) => dispatchStage(a.route)),
  },
};
