/**
 * The state service: folds every feedback event into the item's entry in the KV bucket
 * `weft_feedback_state` (`nats kv get weft_feedback_state ID`).
 *
 * @module
 */
import { defineService, runService, type ServiceDef } from "../../../src/service.ts";
import { runStateWriter } from "../../../src/state_writer.ts";
import { FEEDBACK_STATE_SPEC } from "../state.ts";

/** The state service. */
export const service: ServiceDef = defineService(
  "state",
  (ctx) => runStateWriter({ ...ctx, spec: FEEDBACK_STATE_SPEC }),
);

if (import.meta.main) await runService(service);
