/**
 * The topics service: `feedback.sentiment_analyzed` -> `feedback.topics_extracted`;
 * abusive text also gets the topic `abuse`.
 *
 * @module
 */
import { feedbackAnalyzers } from "../src/configured_analyzers.ts";
import { registerLlmMetrics } from "../src/metrics.ts";
import { runService, type ServiceDef, stageService } from "../src/service.ts";
import { topicsStage } from "../src/stages/feedback.ts";

/** The topics service. */
export const service: ServiceDef = stageService("topics", async ({ config, metrics }) => {
  const { topics, toxicity, llmStats } = await feedbackAnalyzers(config);
  if (llmStats) registerLlmMetrics(metrics.registry, llmStats, "topics");
  return topicsStage(topics, toxicity);
});

if (import.meta.main) await runService(service);
