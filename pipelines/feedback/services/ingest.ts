/**
 * The ingest service: turns plain JSON published on `feedback.submit` (for example with
 * `nats pub feedback.submit '{"text":"..."}'`) into `feedback.ingested` events.
 *
 * @module
 */
import { runService, type ServiceDef, stageService } from "../../../src/service.ts";
import { ingestStage } from "../stages.ts";

/** The ingest service. */
export const service: ServiceDef = stageService("ingest", () => ingestStage());

if (import.meta.main) await runService(service);
