/**
 * The scheduler service: fires delayed and recurring events kept in the KV bucket
 * `weft_schedules`. Run as many replicas as you like: each firing happens at most once.
 *
 * @module
 */
import { runScheduler } from "../src/scheduler/scheduler.ts";
import { runService } from "../src/service.ts";

if (import.meta.main) {
  await runService(
    "scheduler",
    (ctx) => runScheduler({ ...ctx, replica: `scheduler-${Deno.pid}` }),
  );
}
