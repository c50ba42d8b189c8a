/**
 * The digest service: answers `digest.request.feedback` with `digest.feedback_counts`
 * (items dispatched per team), and keeps the recurring schedule `feedback.digest`
 * (cron `WEFT_DIGEST_CRON`, `off` to disable) that requests it.
 *
 * @module
 */
import "../settings.ts";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { countDispatched, feedbackDigestStage } from "../digest.ts";
import { runStage } from "../../../src/runner.ts";
import { createScheduleStore } from "../../../src/scheduler/store.ts";
import { defineService, runService, type ServiceDef } from "../../../src/service.ts";
import { SCHEDULE_BUCKET } from "../../../src/subjects.ts";
import { DIGEST_REQUEST_SUBJECT, DIGEST_SCHEDULE_ID } from "../subjects.ts";

/** The digest service. */
export const service: ServiceDef = defineService("digest", async (ctx) => {
  const { config, log } = ctx;
  const schedules = createScheduleStore(await new Kvm(ctx.nc).open(SCHEDULE_BUCKET));
  if (config.digestCron === "off") {
    if (await schedules.cancel(DIGEST_SCHEDULE_ID)) log.info("feedback digest schedule removed");
  } else {
    const def = {
      id: DIGEST_SCHEDULE_ID,
      subject: DIGEST_REQUEST_SUBJECT,
      payload: {},
      cron: config.digestCron,
    };
    try {
      await schedules.create(def);
    } catch {
      // The cron changed: replace the schedule.
      await schedules.cancel(DIGEST_SCHEDULE_ID);
      await schedules.create(def);
    }
    log.info("feedback digest scheduled", { cron: config.digestCron });
  }
  return runStage({
    ...ctx,
    stage: feedbackDigestStage(countDispatched(jetstream(ctx.nc)), config.digestWindowMs),
  });
});

if (import.meta.main) await runService(service);
