/**
 * The moderation service: `content.uploaded` -> `content.moderated` (safe or flagged, with
 * reasons), screened by the configured toxicity analyzer (embedded, or LLM with the
 * embedded one as fallback).
 *
 * @module
 */
import { moderationAnalyzer } from "../src/configured_analyzers.ts";
import { registerLlmMetrics } from "../src/metrics.ts";
import { runStageService } from "../src/service.ts";
import { moderationStage } from "../src/stages/content.ts";

if (import.meta.main) {
  await runStageService("moderation", async ({ config, metrics }) => {
    const { toxicity, llmStats } = await moderationAnalyzer(config);
    if (llmStats) registerLlmMetrics(metrics.registry, llmStats, "moderation");
    return moderationStage(toxicity);
  });
}
