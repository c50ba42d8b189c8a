/**
 * The storage service: publishes content moderation found safe (`content.moderated`) and
 * acts on human decisions (`content.decided`): approved -> `content.published`, rejected
 * -> `content.archived`. Two durable consumers, one per input.
 *
 * @module
 */
import { runStage } from "../../../src/runner.ts";
import {
  combineRunnables,
  defineService,
  runService,
  type ServiceDef,
} from "../../../src/service.ts";
import { storageDecidedStage, storageModeratedStage } from "../stages.ts";

/** The storage service. */
export const service: ServiceDef = defineService("storage", async (ctx) =>
  combineRunnables([
    await runStage({ ...ctx, stage: storageModeratedStage() }),
    await runStage({ ...ctx, stage: storageDecidedStage() }),
  ]));

if (import.meta.main) await runService(service);
