/**
 * The LLM analyzer path: OpenAI-compatible chat-completions analyzers for sentiment,
 * topics and toxicity, with retries, rate limits, cache, budget, stats and fallback.
 *
 * @example
 * ```ts
 * import { createLlmAnalyzers, withFallback } from "./mod.ts";
 * import type { SentimentAnalyzer } from "../analysis.ts";
 * declare const embeddedSentiment: SentimentAnalyzer;
 * const llm = await createLlmAnalyzers({
 *   baseUrl: "https://llm.example/v1", apiKey: "sk-...", model: "gpt-4o-mini",
 *   taxonomy: ["billing", "shipping", "other"],
 * });
 * const sentiment = withFallback(llm.sentiment, embeddedSentiment);
 * ```
 *
 * @module
 */

export type {
  AnalyzeOptions,
  Analyzer,
  SentimentLabel,
  SentimentResult,
  TopicsResult,
  ToxicityResult,
} from "../analysis.ts";
export * from "./analyzers.ts";
export * from "./budget.ts";
export * from "./cache.ts";
export * from "./client.ts";
export * from "./clock.ts";
export * from "./errors.ts";
export * from "./fallback.ts";
export * from "./output.ts";
export * from "./prompts.ts";
export * from "./rate_limit.ts";
export * from "./stats.ts";
export { addUsage, type LlmPricing, usageOf, ZERO_USAGE } from "./usage.ts";
