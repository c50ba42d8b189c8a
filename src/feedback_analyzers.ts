/**
 * Builds the analyzers and router the feedback stages use, from configuration, in one
 * place:
 * - `embedded` (default): the in-process sentiment, topics and toxicity analyzers;
 * - `rules`: the ruleset's keyword rules (the reference ruleset reproduces the seed
 *   decisions exactly);
 * - `llm`: an OpenAI-compatible endpoint, falling back to the embedded analyzers when it
 *   fails, times out or is over budget (the event records which analyzer decided).
 * Routing is always the ruleset's table, over whichever analyzers decided.
 *
 * @module
 */
import type { SentimentAnalyzer, TopicsAnalyzer, ToxicityAnalyzer } from "./analysis.ts";
import { sentimentAnalyzer, topicsAnalyzer, toxicityAnalyzer } from "./analyzers/mod.ts";
import { AnalyzerKind, type Config } from "./config.ts";
import { ConfigError } from "./errors.ts";
import { createLlmAnalyzers, withFallback } from "./llm/mod.ts";
import { loadRules, type Router } from "./rules.ts";

/** What the feedback stages need. */
export interface FeedbackAnalyzers {
  sentiment: SentimentAnalyzer;
  topics: TopicsAnalyzer;
  /** Absent with `rules`, so the reference ruleset stays exactly the reference. */
  toxicity?: ToxicityAnalyzer;
  route: Router;
}

/**
 * Builds the configured analyzers and the router.
 *
 * @example
 * ```ts ignore
 * const { sentiment } = await feedbackAnalyzers(loadConfig());
 * ```
 */
export async function feedbackAnalyzers(
  config: Pick<
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
  >,
): Promise<FeedbackAnalyzers> {
  const rules = await loadRules(config.rulesPath);
  if (config.analyzers === AnalyzerKind.Rules) {
    if (!rules.sentiment || !rules.topics) {
      throw new ConfigError(
        `WEFT_ANALYZERS=rules needs keyword rules for sentiment and topics in ${config.rulesPath}`,
      );
    }
    return { sentiment: rules.sentiment, topics: rules.topics, route: rules.route };
  }
  const topics = topicsAnalyzer();
  const embedded = { sentiment: sentimentAnalyzer(), topics, toxicity: toxicityAnalyzer() };
  if (config.analyzers === AnalyzerKind.Embedded) return { ...embedded, route: rules.route };

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
  });
  return {
    sentiment: withFallback(llm.sentiment, embedded.sentiment),
    topics: withFallback(llm.topics, embedded.topics),
    toxicity: withFallback(llm.toxicity, embedded.toxicity),
    route: rules.route,
  };
}
