/**
 * The feedback stages' analyzers and router, built from configuration: with `rules` the
 * ruleset's keyword rules (the reference ruleset reproduces the seed decisions exactly),
 * otherwise the configured analyzers (src/ai/configured_analyzers.ts). Routing is always the
 * ruleset's table, over whichever analyzers decided.
 *
 * @module
 */
import type { SentimentAnalyzer, TopicsAnalyzer, ToxicityAnalyzer } from "../../src/ai/analysis.ts";
import { sentimentAnalyzer, topicsAnalyzer, toxicityAnalyzer } from "../../src/ai/analyzers/mod.ts";
import { type AnalyzerConfig, llmAnalyzers } from "../../src/ai/configured_analyzers.ts";
import { AnalyzerKind } from "../../src/config.ts";
import { ConfigError } from "../../src/errors.ts";
import type { LlmStats } from "../../src/ai/llm/mod.ts";
import { loadRules, type Router } from "./rules.ts";

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
    return { ...(await llmAnalyzers(config)), route: rules.route };
  }
  return {
    sentiment: sentimentAnalyzer(),
    topics: topicsAnalyzer(),
    toxicity: toxicityAnalyzer(),
    route: rules.route,
  };
}
