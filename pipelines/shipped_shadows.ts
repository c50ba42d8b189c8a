/**
 * The shipped pipelines' steps a live shadow can follow, by pipeline and step, with how each
 * is shadowed (src/shadow/live.ts). Loaded only where shadows run or are checked; each
 * pipeline's wiring names the same steps (`shadowSteps`).
 *
 * @module
 */
import type { ShadowStepDef } from "../src/shadow/live.ts";
import { FEEDBACK_WIRING } from "./feedback/wiring.ts";
import { FEEDBACK_SHADOW_STEPS } from "./feedback/shadow.ts";

/** Shadowable steps of the shipped pipelines: pipeline -> step -> how it is shadowed. */
export const SHIPPED_SHADOW_STEPS: Readonly<
  Record<string, Readonly<Record<string, ShadowStepDef>>>
> = { [FEEDBACK_WIRING.name]: FEEDBACK_SHADOW_STEPS };
