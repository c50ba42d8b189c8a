/**
 * A team's own pipeline, run from its definition alone, every service in one process
 * (`WEFT_TOGETHER=all`): see tests/helpers/claims_scenario.ts.
 */
import { claimsEndToEnd } from "./helpers/claims_scenario.ts";
import { ONE_PROCESS_MODE } from "./helpers/fault_scenarios.ts";

claimsEndToEnd(ONE_PROCESS_MODE);
