/**
 * The storage service: publishes content moderation found safe (`content.moderated`) and
 * acts on human decisions (`content.decided`): approved -> `content.published`, rejected
 * -> `content.archived`. Two durable consumers, one per input.
 *
 * @module
 */
import { runStage } from "../src/runner.ts";
import { combineRunnables, runService } from "../src/service.ts";
import { storageDecidedStage, storageModeratedStage } from "../src/stages/content.ts";

if (import.meta.main) {
  await runService("storage", async (ctx) =>
    combineRunnables([
      await runStage({ ...ctx, stage: storageModeratedStage() }),
      await runStage({ ...ctx, stage: storageDecidedStage() }),
    ]));
}
