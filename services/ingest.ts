/**
 * The ingest service: turns plain JSON published on `feedback.submit` (for example with
 * `nats pub feedback.submit '{"text":"..."}'`) into `feedback.ingested` events.
 *
 * @module
 */
import { runStageService } from "../src/service.ts";
import { ingestStage } from "../src/stages/feedback.ts";

if (import.meta.main) await runStageService("ingest", () => ingestStage());
