/**
 * The sentiment service: `feedback.ingested` -> `feedback.sentiment_analyzed`.
 *
 * @module
 */
import { feedbackAnalyzers } from "../src/configured_analyzers.ts";
import { registerLlmMetrics } from "../src/metrics.ts";
import { runStageService } from "../src/service.ts";
import { sentimentStage } from "../src/stages/feedback.ts";

if (import.meta.main) {
  await runStageService("sentiment", async ({ config, metrics }) => {
    const { sentiment, llmStats } = await feedbackAnalyzers(config);
    if (llmStats) registerLlmMetrics(metrics.registry, llmStats, "sentiment");
    return sentimentStage(sentiment);
  });
}
