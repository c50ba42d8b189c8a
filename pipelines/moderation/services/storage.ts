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
  itemModerationReader,
  storageDecidedStage,
  storageModeratedStage,
  uploadedContentReader,
} from "../stages.ts";
import { jetstreamManager } from "@nats-io/jetstream";

/** The storage service. */
export const service: ServiceDef = defineService("storage", async (ctx) => {
  const jsm = await jetstreamManager(ctx.nc);
  return combineRunnables([
    await runStage({ ...ctx, stage: storageModeratedStage(itemModerationReader(jsm)) }),
    await runStage({ ...ctx, stage: storageDecidedStage(uploadedContentReader(jsm)) }),
  ]);
});

if (import.meta.main) await runService(service);
