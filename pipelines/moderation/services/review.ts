/**
 * The review service: puts flagged items in the human review queue (KV `weft_reviews`)
 * with an SLA deadline schedule, and acts on deadlines (`content.sla_expired`): escalate,
 * then apply the configured default action.
 *
 * @module
 */
import { Kvm } from "@nats-io/kv";
import { createReviewQueue } from "../review_queue.ts";
import { runStage } from "../../../src/runner.ts";
import { createScheduleStore } from "../../../src/scheduler/store.ts";
import {
  combineRunnables,
  defineService,
  runService,
  type ServiceDef,
} from "../../../src/service.ts";
import {
  contentOutcomeLeads,
  contentOutcomeReader,
  itemModerationReader,
  reviewQueueStage,
  reviewSlaStage,
} from "../stages.ts";
import { jetstreamManager } from "@nats-io/jetstream";
import { SCHEDULE_BUCKET } from "../../../src/subjects.ts";
import { REVIEW_BUCKET } from "../subjects.ts";

/** The review service. */
export const service: ServiceDef = defineService("review", async (ctx) => {
  const kvm = new Kvm(ctx.nc);
  const queue = createReviewQueue(await kvm.open(REVIEW_BUCKET), ctx.config);
  const schedules = createScheduleStore(await kvm.open(SCHEDULE_BUCKET));
  const jsm = await jetstreamManager(ctx.nc);
  const outcomeOf = contentOutcomeReader(jsm);
  // An outcome stored for an item that its history does not lead to is no end of it: giving
  // up on the item still fails it.
  const holdsOutcome = contentOutcomeLeads(jsm);
  return combineRunnables([
    await runStage({
      ...ctx,
      stage: {
        ...reviewQueueStage(queue, schedules, ctx.config, outcomeOf, itemModerationReader(jsm)),
        holdsOutcome,
      },
    }),
    await runStage({
      ...ctx,
      stage: { ...reviewSlaStage(queue, schedules, ctx.config), holdsOutcome },
    }),
  ]);
});

if (import.meta.main) await runService(service);
