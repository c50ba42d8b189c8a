/**
 * The pipelines shipped with Weft and wired by hand (src/wiring.ts): what `deno task start`
 * runs besides the definitions listed in pipelines/run.json. The runtime reads this list
 * and names none of them itself.
 *
 * @module
 */
import type { PipelineWiring } from "../src/wiring.ts";
import { FEEDBACK_WIRING } from "./feedback/wiring.ts";
import { MODERATION_WIRING } from "./moderation/wiring.ts";

/** The shipped pipelines, in start order. */
export const SHIPPED_PIPELINES: readonly PipelineWiring[] = [FEEDBACK_WIRING, MODERATION_WIRING];
