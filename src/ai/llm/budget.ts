/**
 * Per-stage spending limit: maximum cost in USD and/or tokens, over the process lifetime or
 * per fixed time window. Checked before every request; a spent budget means no call.
 *
 * @module
 */

import { type Clock, systemClock } from "./clock.ts";
import type { LlmUsage } from "./errors.ts";

/**
 * Budget limits. Omitted limits do not apply.
 *
 * @example
 * ```ts
 * import type { BudgetOptions } from "./budget.ts";
 * const perHour: BudgetOptions = { maxCostUsd: 2, maxTokens: 500_000, windowMs: 3_600_000 };
 * ```
 */
export interface BudgetOptions {
  /** Stop calling once this much (estimated) USD is spent. */
  maxCostUsd?: number;
  /** Stop calling once this many tokens are spent. */
  maxTokens?: number;
  /** Window length in ms; spending resets when a window ends. Default: process lifetime. */
  windowMs?: number;
}

/**
 * What the budget has seen in the current window.
 *
 * @example
 * ```ts
 * import { createBudget } from "./budget.ts";
 * createBudget({ maxTokens: 10 }).snapshot().tokens; // 0
 * ```
 */
export interface BudgetSnapshot {
  /** USD spent in the window. */
  cost_usd: number;
  /** Tokens spent in the window. */
  tokens: number;
  /** When the window started (clock ms). */
  window_start: number;
}

/**
 * A spending limit.
 *
 * @example
 * ```ts
 * import { createBudget } from "./budget.ts";
 * const budget = createBudget({ maxCostUsd: 1 });
 * if (budget.exceeded() === undefined) {
 *   // call, then:
 *   budget.record({ prompt_tokens: 10, completion_tokens: 5, total_tokens: 15, cost_usd: 0.01 });
 * }
 * ```
 */
export interface Budget {
  /** Why no more calls may be made now, or undefined when there is budget left. */
  exceeded(): string | undefined;
  /** Adds spent usage; negative or NaN amounts count as 0. */
  record(usage: LlmUsage): void;
  /** Current window's spending. */
  snapshot(): BudgetSnapshot;
}

/**
 * Creates a budget.
 *
 * @example
 * ```ts
 * import { createBudget } from "./budget.ts";
 * const budget = createBudget({ maxTokens: 100_000, windowMs: 60_000 });
 * ```
 */
export function createBudget(options: BudgetOptions = {}, clock: Clock = systemClock): Budget {
  let start = clock.now();
  let cost = 0;
  let tokens = 0;
  const roll = () => {
    const { windowMs } = options;
    if (windowMs === undefined || windowMs <= 0) return;
    const now = clock.now();
    if (now - start >= windowMs) {
      start = now - ((now - start) % windowMs);
      cost = 0;
      tokens = 0;
    }
  };
  return {
    exceeded() {
      roll();
      if (options.maxCostUsd !== undefined && cost >= options.maxCostUsd) {
        return `spent ${cost.toFixed(6)} USD of a ${options.maxCostUsd} USD budget`;
      }
      if (options.maxTokens !== undefined && tokens >= options.maxTokens) {
        return `spent ${tokens} tokens of a ${options.maxTokens} token budget`;
      }
      return undefined;
    },
    record(usage) {
      roll();
      // a negative or unreadable (NaN) amount never lowers the spend
      if (usage.cost_usd > 0) cost += usage.cost_usd;
      if (usage.total_tokens > 0) tokens += usage.total_tokens;
    },
    snapshot() {
      roll();
      return { cost_usd: cost, tokens, window_start: start };
    },
  };
}
