/**
 * Builds the analyzers the stages use, and the feedback router, from configuration, in
 * one place:
 * - `embedded` (default): the in-process sentiment, topics and toxicity analyzers;
 * - `rules`: the ruleset's keyword rules (the reference ruleset reproduces the seed
 *   decisions exactly);
 * - `llm`: an OpenAI-compatible endpoint, falling back to the embedded analyzers when it
 *   fails, times out or is over budget (the event records which analyzer decided).
 * Routing is always the ruleset's table, over whichever analyzers decided. Moderation
 * screens with the embedded toxicity analyzer, or the LLM one with it as fallback.
 *
 * @module
 */
import type { SentimentAnalyzer, TopicsAnalyzer, ToxicityAnalyzer } from "./analysis.ts";
import { sentimentAnalyzer, topicsAnalyzer, toxicityAnalyzer } from "./analyzers/mod.ts";
import { AnalyzerKind, type Config } from "../config.ts";
import { ConfigError } from "../errors.ts";
import { createLlmAnalyzers, type LlmStats, withFallback } from "./llm/mod.ts";
import { loadRules, type Router } from "../rules.ts";

/** What the feedback stages need. */
export interface FeedbackAnalyzers {
  /** Classifies an item's sentiment. */
  sentiment: SentimentAnalyzer;
  /** Extracts an item's topics. */
  topics: TopicsAnalyzer;
  /** Absent with `rules`, so the reference ruleset stays exactly the reference. */
  toxicity?: ToxicityAnalyzer;
  /** Routes an item to a team: the ruleset's routing table. */
  route: Router;
  /** Token, cost and call counters of the LLM analyzers, with `llm`. */
  llmStats?: LlmStats;
}

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

/** The LLM analyzers, each falling back to its embedded twin, and their stats. */
async function llmWithFallback(config: AnalyzerConfig) {
  const topics = topicsAnalyzer();
  const stage = {
    timeoutMs: config.llmTimeoutMs,
    concurrency: config.llmConcurrency,
    ...(config.llmRps > 0 ? { rateLimit: { requestsPerSecond: config.llmRps } } : {}),
    ...(config.llmBudgetUsd > 0 ? { budget: { maxCostUsd: config.llmBudgetUsd } } : {}),
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
 * Builds the configured feedback analyzers and the router.
 *
 * @example
 * ```ts ignore
 * const { sentiment } = await feedbackAnalyzers(loadConfig());
 * ```
 */
export async function feedbackAnalyzers(config: AnalyzerConfig): Promise<FeedbackAnalyzers> {
  const rules = await loadRules(config.rulesPath);
  if (config.analyzers === AnalyzerKind.Rules) {
    if (!rules.sentiment || !rules.topics) {
      throw new ConfigError(
        `WEFT_ANALYZERS=rules needs keyword rules for sentiment and topics in ${config.rulesPath}`,
      );
    }
    return { sentiment: rules.sentiment, topics: rules.topics, route: rules.route };
  }
  if (config.analyzers === AnalyzerKind.Llm) {
    return { ...(await llmWithFallback(config)), route: rules.route };
  }
  return {
    sentiment: sentimentAnalyzer(),
    topics: topicsAnalyzer(),
    toxicity: toxicityAnalyzer(),
    route: rules.route,
  };
}

/**
 * The toxicity analyzer moderation screens with: with `llm` the LLM one, falling back to
 * the embedded one; otherwise the embedded one.
 */
export async function moderationAnalyzer(
  config: AnalyzerConfig,
): Promise<{ toxicity: ToxicityAnalyzer; llmStats?: LlmStats }> {
  if (config.analyzers !== AnalyzerKind.Llm) return { toxicity: toxicityAnalyzer() };
  const { toxicity, llmStats } = await llmWithFallback(config);
  return { toxicity, llmStats };
}
