/**
 * The sentiment service: `feedback.ingested` -> `feedback.sentiment_analyzed`. Runs the
 * configured analyzer, or the version promoted from a live shadow (src/step_versions.ts).
 *
 * @module
 */
import { feedbackAnalyzers } from "../analyzers.ts";
import { registerLlmMetrics } from "../../../src/observability/metrics.ts";
import { runService, type ServiceDef, stageService } from "../../../src/service.ts";
import { sentimentStage } from "../stages.ts";
import { followStepVersion } from "../../../src/step_versions.ts";

/** The sentiment service. */
export const service: ServiceDef = stageService("sentiment", async (ctx) => {
  const live = await followStepVersion(ctx, "feedback", "sentiment", feedbackAnalyzers);
  const { llmStats } = live.current();
  if (llmStats) registerLlmMetrics(ctx.metrics.registry, llmStats, "sentiment");
  return sentimentStage({
    name: "live",
    analyze: (text, options) => live.current().sentiment.analyze(text, options),
  });
});

if (import.meta.main) await runService(service);
