/**
 * The embedded (offline, in-process, synchronous) analyzers: sentiment, topics and
 * toxicity, plus their throughput benchmark.
 *
 * @example
 * ```ts
 * import { sentimentAnalyzer, topicsAnalyzer, toxicityAnalyzer } from "./mod.ts";
 * sentimentAnalyzer().analyze("Love it").label; // "positive"
 * topicsAnalyzer().analyze("please add dark mode").topics; // ["feature_request"]
 * toxicityAnalyzer().analyze("kill the process").flagged; // false
 * ```
 *
 * @module
 */

export {
  createDetailScorer,
  defaultSentimentLexicon,
  type EmbeddedSentimentAnalyzer,
  SENTIMENT_DEFAULTS,
  sentimentAnalyzer,
  type SentimentDetail,
  sentimentLabel,
  type SentimentLexicon,
  type SentimentOptions,
  sentimentScore,
} from "./sentiment.ts";
export {
  type EmbeddedTopicsAnalyzer,
  parseTaxonomy,
  type Taxonomy,
  TaxonomyError,
  type TaxonomyLabel,
  type TaxonomyPattern,
  topicsAnalyzer,
  type TopicsOptions,
} from "./topics.ts";
export {
  type EmbeddedToxicityAnalyzer,
  TOXICITY_DEFAULT_THRESHOLD,
  toxicityAnalyzer,
  ToxicityCategory,
  type ToxicityOptions,
} from "./toxicity.ts";
export {
  benchAnalyzer,
  benchAnalyzers,
  type BenchOptions,
  type SyncAnalyzer,
  type Throughput,
} from "./bench.ts";
export {
  contrastWeights,
  hedgeScope,
  irrealisScope,
  isNegator,
  normalize,
  type Token,
  tokenize,
} from "./text.ts";
export { groupAttacks, type GroupSpan } from "./group_attack.ts";
export type { SentimentLabel, SentimentResult, TopicsResult, ToxicityResult } from "../analysis.ts";
