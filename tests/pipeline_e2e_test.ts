/**
 * A team's own pipeline, run from its definition alone, every service its own process: see
 * tests/helpers/claims_scenario.ts (tests/pipeline_e2e_together_test.ts runs it in one).
 */
import { claimsEndToEnd } from "./helpers/claims_scenario.ts";
import { PER_PROCESS_MODE } from "./helpers/fault_scenarios.ts";

claimsEndToEnd(PER_PROCESS_MODE);
