/**
 * The topics service: `feedback.sentiment_analyzed` -> `feedback.topics_extracted`;
 * abusive text also gets the topic `abuse`.
 *
 * @module
 */
import { feedbackAnalyzers } from "../src/configured_analyzers.ts";
import { registerLlmMetrics } from "../src/metrics.ts";
import { runStageService } from "../src/service.ts";
import { topicsStage } from "../src/stages/feedback.ts";

if (import.meta.main) {
  await runStageService("topics", async ({ config, metrics }) => {
    const { topics, toxicity, llmStats } = await feedbackAnalyzers(config);
    if (llmStats) registerLlmMetrics(metrics.registry, llmStats, "topics");
    return topicsStage(topics, toxicity);
  });
}
