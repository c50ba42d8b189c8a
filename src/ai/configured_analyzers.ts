/**
 * Builds analyzers from configuration, in one place:
 * - `embedded` (default): the in-process sentiment, topics and toxicity analyzers;
 * - `llm`: an OpenAI-compatible endpoint, falling back to the embedded analyzers when it
 *   fails, times out or is over budget (the event records which analyzer decided);
 * - `rules`: a pipeline's own keyword rules (its ruleset, built in its folder); screening for
 *   toxicity stays embedded.
 *
 * @module
 */
import type { ToxicityAnalyzer } from "./analysis.ts";
import { sentimentAnalyzer, topicsAnalyzer, toxicityAnalyzer } from "./analyzers/mod.ts";
import { AnalyzerKind, type Config } from "../config.ts";
import { createLlmAnalyzers, type LlmStats, withFallback } from "./llm/mod.ts";
import { createBudget } from "./llm/budget.ts";
import { createRateLimiter } from "./llm/rate_limit.ts";

/** The settings analyzers are built from. */
export type AnalyzerConfig =
  & Pick<
    Config,
    | "analyzers"
    | "rulesPath"
    | "llmBaseUrl"
    | "llmModel"
    | "llmApiKey"
    | "llmTimeoutMs"
    | "llmConcurrency"
    | "llmRps"
    | "llmBudgetUsd"
    | "llmPriceInPer1k"
    | "llmPriceOutPer1k"
  >
  & {
    /** Prompt versions of the LLM analyzers (`prompts/<kind>.<version>.md`); default v1. */
    llmPromptVersions?: { sentiment?: string; topics?: string; toxicity?: string };
    /**
     * Fall back to the embedded analyzers when the LLM fails (default true). A live shadow
     * does not: its agreement must be the candidate's, and a spent budget means no decision.
     */
    llmFallback?: boolean;
  };

/**
 * The LLM analyzers, each falling back to its embedded twin (unless `llmFallback` is false),
 * and their stats.
 */
export async function llmAnalyzers(config: AnalyzerConfig) {
  const topics = topicsAnalyzer();
  // The rate and the budget are the process's (a topics stage runs topics and toxicity): one
  // token bucket and one budget shared by its analyzers, not one each.
  const stage = {
    timeoutMs: config.llmTimeoutMs,
    concurrency: config.llmConcurrency,
    ...(config.llmRps > 0
      ? { rateLimit: createRateLimiter({ requestsPerSecond: config.llmRps }) }
      : {}),
    ...(config.llmBudgetUsd > 0
      ? { budget: createBudget({ maxCostUsd: config.llmBudgetUsd }) }
      : {}),
  };
  const llm = await createLlmAnalyzers({
    baseUrl: config.llmBaseUrl,
    apiKey: config.llmApiKey,
    model: config.llmModel,
    taxonomy: topics.labels,
    pricing: { inputPer1k: config.llmPriceInPer1k, outputPer1k: config.llmPriceOutPer1k },
    stages: { sentiment: stage, topics: stage, toxicity: stage },
    ...(config.llmPromptVersions ? { promptVersions: config.llmPromptVersions } : {}),
  });
  if (config.llmFallback === false) {
    return {
      sentiment: llm.sentiment,
      topics: llm.topics,
      toxicity: llm.toxicity,
      llmStats: llm.stats,
    };
  }
  return {
    sentiment: withFallback(llm.sentiment, sentimentAnalyzer()),
    topics: withFallback(llm.topics, topics),
    toxicity: withFallback(llm.toxicity, toxicityAnalyzer()),
    llmStats: llm.stats,
  };
}

/**
 * The configured toxicity analyzer: with `llm` the LLM one, falling back to the embedded one;
 * otherwise the embedded one.
 */
export async function configuredToxicity(
  config: AnalyzerConfig,
): Promise<{ toxicity: ToxicityAnalyzer; llmStats?: LlmStats }> {
  if (config.analyzers !== AnalyzerKind.Llm) return { toxicity: toxicityAnalyzer() };
  const { toxicity, llmStats } = await llmAnalyzers(config);
  return { toxicity, llmStats };
}
