/**
 * The dispatch service: routes each item to a team with the ruleset's routing table,
 * `feedback.topics_extracted` -> `feedback.dispatched` and `feedback.processed`. Runs the
 * configured ruleset, or the one promoted from a live shadow (src/step_versions.ts).
 *
 * @module
 */
import { loadRules } from "../rules.ts";
import { runService, type ServiceDef, stageService } from "../../../src/service.ts";
import { dispatchStage, feedbackItemReader, feedbackOutcomeLeads } from "../stages.ts";
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
  const jsm = await jetstreamManager(ctx.nc);
  return {
    ...dispatchStage(
      (sentiment, topics) => live.current()(sentiment, topics),
      feedbackItemReader(jsm, ctx.nc),
    ),
    // A `processed` the item's history does not lead to is no end of it: giving up on the
    // item still fails it.
    holdsOutcome: feedbackOutcomeLeads(jsm),
  };
});

if (import.meta.main) await runService(service);
