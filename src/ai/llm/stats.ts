/**
 * Counters of the LLM path (calls, tokens, cost, failures, fallbacks...) that metrics can
 * read later. One stats object may be shared by several analyzers.
 *
 * @module
 */

import type { LlmUsage } from "./errors.ts";

/**
 * A point-in-time copy of the counters.
 *
 * @example
 * ```ts
 * import { createLlmStats } from "./stats.ts";
 * const s = createLlmStats().snapshot();
 * s.cost_usd; // 0
 * ```
 */
export interface LlmStatsSnapshot {
  /** Analyze calls that went to the endpoint (not cache hits, not over budget). */
  calls: number;
  /** HTTP requests sent (first tries, retries and repairs). */
  requests: number;
  /** Requests that were retries after 429/5xx/network errors. */
  retries: number;
  /** Repair requests after invalid output. */
  repairs: number;
  /** Analyze calls that ended in an error (including over budget). */
  failures: number;
  /** Analyze calls refused because the budget was spent. */
  over_budget: number;
  /** Analyze calls answered from the cache. */
  cache_hits: number;
  /** Results decided by the fallback analyzer instead. */
  fallbacks: number;
  /** Input tokens reported by the endpoint. */
  prompt_tokens: number;
  /** Output tokens reported by the endpoint. */
  completion_tokens: number;
  /** All tokens. */
  total_tokens: number;
  /** Estimated cost in USD. */
  cost_usd: number;
}

/**
 * A counter that {@link LlmStats.count} can bump.
 *
 * @example
 * ```ts
 * import type { LlmCounter } from "./stats.ts";
 * const c: LlmCounter = "fallbacks";
 * ```
 */
export type LlmCounter = Exclude<
  keyof LlmStatsSnapshot,
  "prompt_tokens" | "completion_tokens" | "total_tokens" | "cost_usd"
>;

/**
 * Mutable counters.
 *
 * @example
 * ```ts
 * import { createLlmStats } from "./stats.ts";
 * const stats = createLlmStats();
 * stats.count("calls");
 * stats.addUsage({ prompt_tokens: 10, completion_tokens: 5, total_tokens: 15, cost_usd: 0.001 });
 * stats.snapshot().total_tokens; // 15
 * ```
 */
export interface LlmStats {
  /** Adds `n` (default 1) to a counter. */
  count(counter: LlmCounter, n?: number): void;
  /** Adds spent tokens and cost. */
  addUsage(usage: LlmUsage): void;
  /** Copies the counters. */
  snapshot(): LlmStatsSnapshot;
}

/**
 * Creates zeroed counters.
 *
 * @example
 * ```ts
 * import { createLlmStats } from "./stats.ts";
 * const stats = createLlmStats();
 * ```
 */
export function createLlmStats(): LlmStats {
  const s: LlmStatsSnapshot = {
    calls: 0,
    requests: 0,
    retries: 0,
    repairs: 0,
    failures: 0,
    over_budget: 0,
    cache_hits: 0,
    fallbacks: 0,
    prompt_tokens: 0,
    completion_tokens: 0,
    total_tokens: 0,
    cost_usd: 0,
  };
  return {
    count(counter, n = 1) {
      s[counter] += n;
    },
    addUsage(u) {
      s.prompt_tokens += u.prompt_tokens;
      s.completion_tokens += u.completion_tokens;
      s.total_tokens += u.total_tokens;
      s.cost_usd += u.cost_usd;
    },
    snapshot: () => ({ ...s }),
  };
}
