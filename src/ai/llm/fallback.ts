/**
 * Falls back from an LLM analyzer to another analyzer (the embedded one) when the LLM
 * fails, times out, is rate limited past the deadline or is over budget. The result is the
 * fallback's own (its `analyzer` names who decided) plus `fallback_reason`, `fallback_from`
 * and, when the failed LLM call already spent tokens, their `usage`.
 *
 * @module
 */

import type { AnalyzeOptions, Analyzer } from "../analysis.ts";
import { LlmError, type LlmErrorCode, type LlmUsage } from "./errors.ts";
import type { LlmStats } from "./stats.ts";

/**
 * Why the fallback decided: an {@link LlmErrorCode}, or `"error"` for anything else the
 * primary threw.
 *
 * @example
 * ```ts
 * import type { FallbackReason } from "./fallback.ts";
 * const r: FallbackReason = "timeout";
 * ```
 */
export type FallbackReason = Exclude<LlmErrorCode, "aborted"> | "error";

/**
 * Fields added to a result decided by the fallback.
 *
 * @example
 * ```ts
 * import type { FallbackMeta } from "./fallback.ts";
 * const m: FallbackMeta = { fallback_reason: "over_budget", fallback_from: "llm:gpt-4o-mini" };
 * ```
 */
export interface FallbackMeta {
  /** Why the primary did not decide. */
  fallback_reason: FallbackReason;
  /** The primary's name. */
  fallback_from: string;
  /** The primary's error message (no secrets: LLM errors never carry the key). */
  fallback_error?: string;
  /** Tokens the failed primary call spent, if any. */
  usage?: LlmUsage;
}

/**
 * Options of {@link withFallback}.
 *
 * @example
 * ```ts
 * import type { FallbackOptions } from "./fallback.ts";
 * const o: FallbackOptions = { onFallback: (reason) => void reason };
 * ```
 */
export interface FallbackOptions {
  /** Counters whose `fallbacks` to bump; default the primary's `stats`, if it has one. */
  stats?: LlmStats;
  /** Called once per fallback (e.g. to log or count per reason). */
  onFallback?: (reason: FallbackReason, error: unknown) => void;
}

/**
 * An analyzer answered by `primary`, or by a fallback whose result says why.
 *
 * @example
 * ```ts
 * import type { FallbackAnalyzer } from "./fallback.ts";
 * import type { SentimentResult } from "../analysis.ts";
 * declare const a: FallbackAnalyzer<SentimentResult, SentimentResult>;
 * const r = await a.analyze("text");
 * if ("fallback_reason" in r) r.fallback_reason;
 * ```
 */
export interface FallbackAnalyzer<P, F> extends Analyzer<P | (F & FallbackMeta)> {
  /** Always async. */
  analyze(text: string, options?: AnalyzeOptions): Promise<P | (F & FallbackMeta)>;
}

/**
 * Wraps `primary` so that a failure is answered by `fallback`. A call aborted by the
 * caller's own signal is not a failure: the abort is rethrown.
 *
 * @example
 * ```ts
 * import { withFallback } from "./fallback.ts";
 * import type { SentimentAnalyzer } from "../analysis.ts";
 * declare const llm: SentimentAnalyzer;
 * declare const embedded: SentimentAnalyzer;
 * const sentiment = withFallback(llm, embedded);
 * const r = await sentiment.analyze("meh"); // r.analyzer is "llm:..." or "embedded"
 * ```
 */
export function withFallback<P, F>(
  primary: Analyzer<P>,
  fallback: Analyzer<F>,
  options: FallbackOptions = {},
): FallbackAnalyzer<P, F> {
  const stats = options.stats ?? (primary as { stats?: LlmStats }).stats;
  return {
    name: `${primary.name}>${fallback.name}`,
    async analyze(text, call = {}) {
      try {
        return await primary.analyze(text, call);
      } catch (e) {
        if (call.signal?.aborted || (e instanceof LlmError && e.code === "aborted")) throw e;
        const reason: FallbackReason = e instanceof LlmError && e.code !== "aborted"
          ? e.code
          : "error";
        stats?.count("fallbacks");
        options.onFallback?.(reason, e);
        const result = await fallback.analyze(text, call);
        const meta: FallbackMeta = {
          fallback_reason: reason,
          fallback_from: primary.name,
          // Bounded: it rides on the item's events.
          fallback_error: (e instanceof Error ? e.message : String(e)).slice(0, 500),
        };
        // Only tokens a call spent: a refusal before any call (over budget) has none to show.
        if (e instanceof LlmError && e.usage !== undefined && spentAny(e.usage)) {
          meta.usage = e.usage;
        }
        return { ...result, ...meta };
      }
    },
  };
}

/** Whether `usage` records any tokens or cost. */
function spentAny(usage: LlmUsage): boolean {
  return usage.prompt_tokens > 0 || usage.completion_tokens > 0 || usage.total_tokens > 0 ||
    usage.cost_usd > 0;
}
