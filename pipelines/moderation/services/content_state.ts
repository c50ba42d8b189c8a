/**
 * The content state service: folds every content event into the item's entry in the KV
 * bucket `weft_content_state` (`nats kv get weft_content_state ID`).
 *
 * @module
 */
import { CONTENT_STATE_SPEC } from "../state.ts";
import { defineService, runService, type ServiceDef } from "../../../src/service.ts";
import { runStateWriter } from "../../../src/state_writer.ts";

/** The content-state service. */
export const service: ServiceDef = defineService(
  "content-state",
  (ctx) => runStateWriter({ ...ctx, spec: CONTENT_STATE_SPEC }),
);

if (import.meta.main) await runService(service);
