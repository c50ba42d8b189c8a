/**
 * The content moderation pipeline's settings, read, validated and printed with the rest of
 * the configuration (src/config.ts): upload size, the review SLA and what happens after it,
 * and how long a reviewer's claim lasts. Registered when this module loads; every module that
 * reads them imports it.
 *
 * @module
 */
import { registerSettings, settingParsers } from "../../src/config.ts";

const { int } = settingParsers;

declare module "../../src/config.ts" {
  interface Config {
    /** Largest accepted binary upload to POST /content, bytes. `WEFT_CONTENT_MAX_BYTES`. */
    contentMaxBytes: number;
    /** A flagged item not decided within this time is escalated, ms. `WEFT_REVIEW_SLA_MS`. */
    reviewSlaMs: number;
    /** An escalated item not decided within this time gets the default action, ms. `WEFT_ESCALATION_SLA_MS`. */
    escalationSlaMs: number;
    /** What happens to an item still undecided after escalation. `WEFT_SLA_DEFAULT_ACTION`. */
    slaDefaultAction: "approve" | "reject";
  }
}

registerSettings([
  {
    key: "contentMaxBytes",
    env: "WEFT_CONTENT_MAX_BYTES",
    default: 8 * 1024 * 1024,
    parse: int(1024),
  },
  { key: "reviewSlaMs", env: "WEFT_REVIEW_SLA_MS", default: 3600_000, parse: int(100) },
  { key: "escalationSlaMs", env: "WEFT_ESCALATION_SLA_MS", default: 4 * 3600_000, parse: int(100) },
  {
    key: "slaDefaultAction",
    env: "WEFT_SLA_DEFAULT_ACTION",
    default: "reject",
    parse: (raw: string) => (raw === "approve" || raw === "reject" ? raw : undefined),
  },
]);
