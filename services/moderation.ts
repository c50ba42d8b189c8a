/**
 * The moderation service: `content.uploaded` -> `content.moderated` (safe or flagged),
 * screened by the toxicity analyzer (rules-based until the embedded one is merged).
 *
 * @module
 */
import { loadToxicityRules, toxicityRulesAnalyzer } from "../src/analyzers/toxicity_rules.ts";
import { runStageService } from "../src/service.ts";
import { moderationStage } from "../src/stages/content.ts";

if (import.meta.main) {
  await runStageService(
    "moderation",
    async ({ config }) =>
      moderationStage(toxicityRulesAnalyzer(await loadToxicityRules(config.toxicityRulesPath))),
  );
}
