/**
 * The content state service: folds every content event into the item's entry in the KV
 * bucket `weft_content_state` (`nats kv get weft_content_state ID`).
 *
 * @module
 */
import { CONTENT_STATE_SPEC } from "../src/content_state.ts";
import { runService } from "../src/service.ts";
import { runStateWriter } from "../src/state_writer.ts";

if (import.meta.main) {
  await runService("content-state", (ctx) => runStateWriter({ ...ctx, spec: CONTENT_STATE_SPEC }));
}
