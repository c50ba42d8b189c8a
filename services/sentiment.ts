/**
 * The sentiment service: `feedback.ingested` -> `feedback.sentiment_analyzed`.
 *
 * @module
 */
import { feedbackAnalyzers } from "../src/configured_analyzers.ts";
import { registerLlmMetrics } from "../src/metrics.ts";
import { runService, type ServiceDef, stageService } from "../src/service.ts";
import { sentimentStage } from "../src/stages/feedback.ts";

/** The sentiment service. */
export const service: ServiceDef = stageService("sentiment", async ({ config, metrics }) => {
  const { sentiment, llmStats } = await feedbackAnalyzers(config);
  if (llmStats) registerLlmMetrics(metrics.registry, llmStats, "sentiment");
  return sentimentStage(sentiment);
});

if (import.meta.main) await runService(service);
