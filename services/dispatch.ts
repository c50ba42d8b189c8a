/**
 * The dispatch service: routes each item to a team with the ruleset's routing table,
 * `feedback.topics_extracted` -> `feedback.dispatched` and `feedback.processed`.
 *
 * @module
 */
import { loadRules } from "../src/rules.ts";
import { runStageService } from "../src/service.ts";
import { dispatchStage } from "../src/stages/feedback.ts";

if (import.meta.main) {
  await runStageService(
    "dispatch",
    async ({ config }) => dispatchStage((await loadRules(config.rulesPath)).route),
  );
}
