/**
 * The scheduler service: fires delayed and recurring events kept in the KV bucket
 * `weft_schedules`. Run as many replicas as you like: each firing happens at most once.
 *
 * @module
 */
import { runScheduler } from "../src/scheduler/scheduler.ts";
import { defineService, runService, type ServiceDef } from "../src/service.ts";

/** The scheduler service. */
export const service: ServiceDef = defineService(
  "scheduler",
  (ctx) => runScheduler({ ...ctx, replica: `scheduler-${Deno.pid}` }),
);

if (import.meta.main) await runService(service);
