/**
 * The topics service: `feedback.sentiment_analyzed` -> `feedback.topics_extracted`.
 *
 * @module
 */
import { loadRules } from "../src/rules.ts";
import { runStageService } from "../src/service.ts";
import { topicsStage } from "../src/stages/feedback.ts";

if (import.meta.main) {
  await runStageService(
    "topics",
    async ({ config }) => topicsStage((await loadRules(config.rulesPath)).topics),
  );
}
