/**
 * The state service: folds every feedback event into the item's entry in the KV bucket
 * `weft_feedback_state` (`nats kv get weft_feedback_state ID`).
 *
 * @module
 */
import { runService } from "../src/service.ts";
import { runStateWriter } from "../src/state_writer.ts";

if (import.meta.main) await runService("state", (ctx) => runStateWriter(ctx));
