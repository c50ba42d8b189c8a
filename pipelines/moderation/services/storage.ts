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
import {
  contentOutcomeGuard,
  itemModerationReader,
  storageDecidedStage,
  storageModeratedStage,
  uploadedContentReader,
} from "../stages.ts";
import { jetstreamManager } from "@nats-io/jetstream";

/** The storage service. */
export const service: ServiceDef = defineService("storage", async (ctx) => {
  const jsm = await jetstreamManager(ctx.nc);
  // An outcome stored for an item that its history does not lead to is not the item's, and
  // only an item its moderation sent to review is decided.
  const guard = contentOutcomeGuard(jsm);
  return combineRunnables([
    await runStage({ ...ctx, stage: storageModeratedStage(itemModerationReader(jsm), guard) }),
    await runStage({ ...ctx, stage: storageDecidedStage(uploadedContentReader(jsm), guard) }),
  ]);
});

if (import.meta.main) await runService(service);
