/**
 * The topics service: `feedback.sentiment_analyzed` -> `feedback.topics_extracted`;
 * abusive text also gets the topic `abuse`. Runs the configured analyzers, or the version
 * promoted from a live shadow (src/step_versions.ts).
 *
 * @module
 */
import { feedbackAnalyzers } from "../analyzers.ts";
import { registerLlmMetrics } from "../../../src/observability/metrics.ts";
import { runService, type ServiceDef, stageService } from "../../../src/service.ts";
import { feedbackOutcomeLeads, topicsStage } from "../stages.ts";
import { jetstreamManager } from "@nats-io/jetstream";
import { followStepVersion } from "../../../src/step_versions.ts";

/** The topics service. */
export const service: ServiceDef = stageService("topics", async (ctx) => {
  const live = await followStepVersion(ctx, "feedback", "topics", feedbackAnalyzers);
  const { llmStats } = live.current();
  if (llmStats) registerLlmMetrics(ctx.metrics.registry, llmStats, "topics");
  return {
    ...topicsStage(
      { name: "live", analyze: (text, options) => live.current().topics.analyze(text, options) },
      {
        name: "live",
        // Without a toxicity analyzer (`rules`), nothing is flagged: as with none at all.
        analyze: (text, options) =>
          live.current().toxicity?.analyze(text, options) ??
            { flagged: false, categories: [], score: 0, analyzer: "none" },
      },
    ),
    // A `processed` the item's history does not lead to is no end of it: giving up on the
    // item still fails it.
    holdsOutcome: feedbackOutcomeLeads(await jetstreamManager(ctx.nc)),
  };
});

if (import.meta.main) await runService(service);
