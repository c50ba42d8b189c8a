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
import { moderationStage } from "../stages.ts";

/** The moderation service. */
export const service: ServiceDef = stageService("moderation", async ({ config, metrics }) => {
  const { toxicity, llmStats } = await configuredToxicity(config);
  if (llmStats) registerLlmMetrics(metrics.registry, llmStats, "moderation");
  return moderationStage(toxicity);
});

if (import.meta.main) await runService(service);
