/**
 * Token usage and cost arithmetic (pure).
 *
 * @module
 */

import type { LlmUsage } from "./errors.ts";

export type { LlmUsage } from "./errors.ts";

/**
 * Prices in USD per 1000 tokens.
 *
 * @example
 * ```ts
 * import type { LlmPricing } from "./usage.ts";
 * const p: LlmPricing = { inputPer1k: 0.00015, outputPer1k: 0.0006 };
 * ```
 */
export interface LlmPricing {
  /** USD per 1000 prompt (input) tokens. */
  inputPer1k: number;
  /** USD per 1000 completion (output) tokens. */
  outputPer1k: number;
}

/**
 * Usage with no tokens (cache hits).
 *
 * @example
 * ```ts
 * import { ZERO_USAGE } from "./usage.ts";
 * ZERO_USAGE.cost_usd; // 0
 * ```
 */
export const ZERO_USAGE: Readonly<LlmUsage> = Object.freeze({
  prompt_tokens: 0,
  completion_tokens: 0,
  total_tokens: 0,
  cost_usd: 0,
});

/**
 * Builds a usage record from token counts and prices.
 *
 * @example
 * ```ts
 * import { usageOf } from "./usage.ts";
 * usageOf(1000, 500, { inputPer1k: 0.001, outputPer1k: 0.002 }).cost_usd; // 0.002
 * ```
 */
export function usageOf(
  promptTokens: number,
  completionTokens: number,
  pricing: LlmPricing | undefined,
  totalTokens: number = promptTokens + completionTokens,
): LlmUsage {
  const cost = pricing === undefined
    ? 0
    : (promptTokens / 1000) * pricing.inputPer1k + (completionTokens / 1000) * pricing.outputPer1k;
  return {
    prompt_tokens: promptTokens,
    completion_tokens: completionTokens,
    total_tokens: totalTokens,
    cost_usd: cost,
  };
}

/**
 * Sums two usage records.
 *
 * @example
 * ```ts
 * import { addUsage, ZERO_USAGE } from "./usage.ts";
 * addUsage(ZERO_USAGE, ZERO_USAGE).total_tokens; // 0
 * ```
 */
export function addUsage(a: LlmUsage, b: LlmUsage): LlmUsage {
  return {
    prompt_tokens: a.prompt_tokens + b.prompt_tokens,
    completion_tokens: a.completion_tokens + b.completion_tokens,
    total_tokens: a.total_tokens + b.total_tokens,
    cost_usd: a.cost_usd + b.cost_usd,
  };
}
