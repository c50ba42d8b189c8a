/**
 * The moderation service: `content.uploaded` -> `content.moderated` (safe or flagged, with
 * reasons), screened by the configured toxicity analyzer (embedded, or LLM with the
 * embedded one as fallback).
 *
 * @module
 */
import { configuredToxicity } from "../../../src/ai/configured_analyzers.ts";
import { registerLlmMetrics } from "../../../src/observability/metrics.ts";
import { runService, type ServiceDef, stageService } from "../../../src/service.ts";
import { contentOutcomeLeads, moderationStage } from "../stages.ts";
import { jetstreamManager } from "@nats-io/jetstream";

/** The moderation service. */
export const service: ServiceDef = stageService("moderation", async ({ config, metrics, nc }) => {
  const { toxicity, llmStats } = await configuredToxicity(config);
  if (llmStats) registerLlmMetrics(metrics.registry, llmStats, "moderation");
  // An outcome stored for an item that its history does not lead to is no end of it: giving
  // up on the item still fails it.
  return {
    ...moderationStage(toxicity),
    holdsOutcome: contentOutcomeLeads(await jetstreamManager(nc)),
  };
});

if (import.meta.main) await runService(service);
