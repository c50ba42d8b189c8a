/**
 * The shadow service: runs the live shadows (src/shadow/live.ts), each a candidate version
 * of a pipeline step on its own consumer, publishing only on `shadow.>`. Its own process and
 * NATS identity: killed or failing, it takes nothing from production.
 *
 * @module
 */
import { defineService, runService, type ServiceDef } from "../src/service.ts";
import { hostShadows } from "../src/shadow/host.ts";

/** The shadow service. */
export const service: ServiceDef = defineService("shadow", (ctx) => hostShadows(ctx), {
  description: "Weft live shadows: candidate step versions compared with production",
});

if (import.meta.main) await runService(service);
