/**
 * Several services in one Deno process (`deno task start --together`, or
 * `WEFT_TOGETHER=gateway,ingest,...`): the services named on the command line (all of them
 * without names), each with its own NATS connection, identity, consumers, acks, retries
 * and metrics, exactly as when they run apart, in a fraction of the memory. For edge
 * devices and small VMs.
 *
 * @module
 */
import { loadConfig } from "../src/config.ts";
import { loadPipelines, pipelineServices } from "../src/pipeline/runtime.ts";
import { runTogether, type ServiceDef } from "../src/service.ts";
import { service as contentState } from "./content_state.ts";
import { service as digest } from "./digest.ts";
import { service as dispatch } from "./dispatch.ts";
import { service as gateway } from "./gateway.ts";
import { service as ingest } from "./ingest.ts";
import { service as moderation } from "./moderation.ts";
import { service as review } from "./review.ts";
import { service as scheduler } from "./scheduler.ts";
import { service as sentiment } from "./sentiment.ts";
import { service as shadow } from "./shadow.ts";
import { service as state } from "./state.ts";
import { service as storage } from "./storage.ts";
import { service as topics } from "./topics.ts";

/** Every service, in the supervisor's start order. */
export const ALL: readonly ServiceDef[] = [
  state,
  ingest,
  sentiment,
  topics,
  dispatch,
  digest,
  contentState,
  moderation,
  review,
  storage,
  gateway,
  scheduler,
  shadow,
];

if (import.meta.main) {
  const names = Deno.args.filter((a) => !a.startsWith("-"));
  // The services of the pipelines in WEFT_PIPELINES (which the supervisor passes on).
  const root = new URL("../", import.meta.url).pathname;
  const pipelines = [
    ...pipelineServices(await loadPipelines(loadConfig().pipelines, root)).values(),
  ];
  const all = [...ALL, ...pipelines];
  const unknown = names.filter((n) => !all.some((s) => s.name === n));
  if (unknown.length > 0) throw new Error(`no such service: ${unknown.join(", ")}`);
  await runTogether(
    names.length === 0
      ? ALL.filter((s) => s !== shadow)
      : all.filter((s) => names.includes(s.name)),
  );
}
