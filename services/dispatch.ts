/**
 * The dispatch service: routes each item to a team with the ruleset's routing table,
 * `feedback.topics_extracted` -> `feedback.dispatched` and `feedback.processed`.
 *
 * @module
 */
import { loadRules } from "../src/rules.ts";
import { runService, type ServiceDef, stageService } from "../src/service.ts";
import { dispatchStage } from "../src/stages/feedback.ts";

/** The dispatch service. */
export const service: ServiceDef = stageService(
  "dispatch",
  async ({ config }) => dispatchStage((await loadRules(config.rulesPath)).route),
);

if (import.meta.main) await runService(service);
