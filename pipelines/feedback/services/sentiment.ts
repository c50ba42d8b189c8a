/**
 * The sentiment service: `feedback.ingested` -> `feedback.sentiment_analyzed`. Runs the
 * configured analyzer, or the version promoted from a live shadow (src/step_versions.ts).
 *
 * @module
 */
import { feedbackAnalyzers } from "../analyzers.ts";
import { registerLlmMetrics } from "../../../src/observability/metrics.ts";
import { runService, type ServiceDef, stageService } from "../../../src/service.ts";
import { feedbackOutcomeLeads, sentimentStage } from "../stages.ts";
import { jetstreamManager } from "@nats-io/jetstream";
import { followStepVersion } from "../../../src/step_versions.ts";

/** The sentiment service. */
export const service: ServiceDef = stageService("sentiment", async (ctx) => {
  const live = await followStepVersion(ctx, "feedback", "sentiment", feedbackAnalyzers);
  const { llmStats } = live.current();
  if (llmStats) registerLlmMetrics(ctx.metrics.registry, llmStats, "sentiment");
  return {
    ...sentimentStage({
      name: "live",
      analyze: (text, options) => live.current().sentiment.analyze(text, options),
    }),
    // A `processed` the item's history does not lead to is no end of it: giving up on the
    // item still fails it.
    holdsOutcome: feedbackOutcomeLeads(await jetstreamManager(ctx.nc)),
  };
});

if (import.meta.main) await runService(service);
