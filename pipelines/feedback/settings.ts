/**
 * The feedback pipeline's settings, read, validated and printed with the rest of the
 * configuration (src/config.ts): when the digest runs and how far back it counts. Registered
 * when this module loads; every module that reads them imports it.
 *
 * @module
 */
import { registerSettings, settingParsers } from "../../src/config.ts";

const { int, str } = settingParsers;

declare module "../../src/config.ts" {
  interface Config {
    /** Cron expression (UTC) of the feedback digest; `off` disables it. `WEFT_DIGEST_CRON`. */
    digestCron: string;
    /** How far back a feedback digest counts, ms. `WEFT_DIGEST_WINDOW_MS`. */
    digestWindowMs: number;
  }
}

registerSettings([
  { key: "digestCron", env: "WEFT_DIGEST_CRON", default: "0 * * * *", parse: str },
  // At most 366 days, as a digest request's window_ms (schemas/digest.request.v1.json).
  {
    key: "digestWindowMs",
    env: "WEFT_DIGEST_WINDOW_MS",
    default: 3600_000,
    parse: int(1000, 366 * 86_400_000),
  },
]);
