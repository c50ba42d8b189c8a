/**
 * The analyzer interfaces that stage handlers call. An analyzer turns text into a typed
 * result and says which analyzer decided, so an event can record it. Rules, embedded
 * models and LLM clients all implement these.
 *
 * @module
 */

/** The three sentiment classes Weft reports. */
export type SentimentLabel = "positive" | "negative" | "neutral";

/** What a sentiment analyzer decided about one text. */
export interface SentimentResult {
  /** The class. */
  label: SentimentLabel;
  /** Signed strength in [-1, 1]: below 0 leans negative, above 0 positive. */
  score: number;
  /** Which analyzer decided, e.g. `"rules"`, `"embedded"`, `"llm:gpt-4o-mini"`. */
  analyzer: string;
}

/** What a topic analyzer decided about one text. */
export interface TopicsResult {
  /** Labels from the configured taxonomy, most relevant first; never empty. */
  topics: string[];
  /** For each topic, the words or phrases that triggered it. */
  evidence: Record<string, string[]>;
  /** Which analyzer decided. */
  analyzer: string;
}

/** What a toxicity analyzer decided about one text. */
export interface ToxicityResult {
  /** True when the text should go to human review. */
  flagged: boolean;
  /** Categories found, e.g. `"insult"`, `"hate"`, `"threat"`, `"profanity"`. */
  categories: string[];
  /** Confidence in [0, 1] that the text is toxic. */
  score: number;
  /** For each category, the words or phrases that triggered it, when the analyzer knows. */
  evidence?: Record<string, string[]>;
  /** Which analyzer decided. */
  analyzer: string;
}

/** Options every analyzer call accepts. */
export interface AnalyzeOptions {
  /** Aborts a slow analysis (LLM calls); embedded analyzers may ignore it. */
  signal?: AbortSignal;
}

/** An analyzer of text into `R`. Embedded analyzers answer synchronously. */
export interface Analyzer<R> {
  /** Stable name recorded on events. */
  readonly name: string;
  /** Analyzes one text. */
  analyze(text: string, options?: AnalyzeOptions): R | Promise<R>;
}

/** Analyzes sentiment. */
export type SentimentAnalyzer = Analyzer<SentimentResult>;
/** Extracts topics. */
export type TopicsAnalyzer = Analyzer<TopicsResult>;
/** Screens for toxicity. */
export type ToxicityAnalyzer = Analyzer<ToxicityResult>;
