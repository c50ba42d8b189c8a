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
import { SHIPPED_SERVICES } from "../pipelines/shipped_services.ts";
import { service as gateway } from "./gateway.ts";
import { service as scheduler } from "./scheduler.ts";
import { service as shadow } from "./shadow.ts";

/**
 * Every service by name, in the supervisor's start order (the shipped pipelines' services,
 * then the runtime's): each loads only when asked for.
 */
export const ALL: ReadonlyMap<string, () => Promise<ServiceDef>> = new Map([
  ...SHIPPED_SERVICES,
  ...[gateway, scheduler, shadow].map((s) => [s.name, () => Promise.resolve(s)] as const),
]);

if (import.meta.main) {
  const names = Deno.args.filter((a) => !a.startsWith("-"));
  // The services of the pipelines in WEFT_PIPELINES (which the supervisor passes on).
  const root = new URL("../", import.meta.url).pathname;
  const pipelines = [
    ...pipelineServices(await loadPipelines(loadConfig().pipelines, root)).values(),
  ];
  const known = [...ALL.keys(), ...pipelines.map((s) => s.name)];
  const unknown = names.filter((n) => !known.includes(n));
  if (unknown.length > 0) throw new Error(`no such service: ${unknown.join(", ")}`);
  // Without names: every shipped and runtime service but the shadows (apart by design).
  const wanted = names.length === 0 ? [...ALL.keys()].filter((n) => n !== shadow.name) : names;
  const defs: ServiceDef[] = [];
  for (const name of known.filter((n) => wanted.includes(n))) {
    defs.push(await (ALL.get(name)?.() ?? pipelines.find((s) => s.name === name)!));
  }
  await runTogether(defs);
}
