/**
 * The dispatch service: routes each item to a team with the ruleset's routing table,
 * `feedback.topics_extracted` -> `feedback.dispatched` and `feedback.processed`. Runs the
 * configured ruleset, or the one promoted from a live shadow (src/step_versions.ts).
 *
 * @module
 */
import { loadRules } from "../rules.ts";
import { runService, type ServiceDef, stageService } from "../../../src/service.ts";
import { dispatchStage, feedbackItemReader } from "../stages.ts";
import { jetstreamManager } from "@nats-io/jetstream";
import { followStepVersion } from "../../../src/step_versions.ts";

/** The dispatch service. */
export const service: ServiceDef = stageService("dispatch", async (ctx) => {
  const live = await followStepVersion(
    ctx,
    "feedback",
    "dispatch",
    async (config) => (await loadRules(config.rulesPath)).route,
  );
  return dispatchStage(
    (sentiment, topics) => live.current()(sentiment, topics),
    feedbackItemReader(await jetstreamManager(ctx.nc), ctx.nc),
  );
});

if (import.meta.main) await runService(service);
