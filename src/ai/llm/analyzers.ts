/**
 * LLM analyzers (sentiment, topics, toxicity) behind the interfaces of `../analysis.ts`.
 * Each call: cache lookup -> budget check -> chat completion in JSON mode -> schema
 * validation -> at most one repair request quoting the validation error -> cache store (of
 * answers up to `MAX_CACHED_ANSWER_CHARS`).
 * Results carry `analyzer: "llm:<model>"`, `prompt_version`, `usage` and flags.
 *
 * @module
 */

import type {
  AnalyzeOptions,
  Analyzer,
  SentimentLabel,
  SentimentResult,
  TopicsResult,
  ToxicityResult,
} from "../analysis.ts";
import { type Budget, type BudgetOptions, createBudget } from "./budget.ts";
import { cacheKey, createLruCache, type LlmCache, MAX_CACHED_ANSWER_CHARS } from "./cache.ts";
import {
  type ChatClient,
  type ChatMessage,
  createChatClient,
  createDeadline,
  type LlmLogger,
  type RetryOptions,
} from "./client.ts";
import type { Clock } from "./clock.ts";
import { LlmError, LlmInvalidOutputError, LlmOverBudgetError, type LlmUsage } from "./errors.ts";
import { createOutputValidator, type OutputValidator } from "./output.ts";
import { loadPrompt, type PromptTemplate, renderPrompt } from "./prompts.ts";
import type { RateLimiter, RateLimitOptions } from "./rate_limit.ts";
import { createLlmStats, type LlmStats } from "./stats.ts";
import { addUsage, type LlmPricing, ZERO_USAGE } from "./usage.ts";

/**
 * Where and what to call; shared by all stages.
 *
 * @example
 * ```ts
 * import type { LlmConnectionOptions } from "./analyzers.ts";
 * const c: LlmConnectionOptions = {
 *   baseUrl: "https://llm.example/v1", apiKey: "sk-...", model: "gpt-4o-mini",
 *   pricing: { inputPer1k: 0.00015, outputPer1k: 0.0006 },
 * };
 * ```
 */
export interface LlmConnectionOptions {
  /** Base URL of the OpenAI-compatible API (requests go to `{baseUrl}/chat/completions`). */
  baseUrl: string;
  /** Bearer key. Never logged, never put in errors or results. */
  apiKey: string;
  /** Model name. */
  model: string;
  /** Sampling temperature. Default 0. */
  temperature?: number;
  /** USD per 1k input/output tokens, for `usage.cost_usd` and cost budgets. */
  pricing?: LlmPricing;
}

/**
 * Flow control and limits of one stage.
 *
 * @example
 * ```ts
 * import type { LlmStageOptions } from "./analyzers.ts";
 * const s: LlmStageOptions = {
 *   timeoutMs: 10_000, concurrency: 4, rateLimit: { requestsPerSecond: 5, burst: 5 },
 *   retry: { maxRetries: 3 }, budget: { maxCostUsd: 5, windowMs: 86_400_000 },
 * };
 * ```
 */
export interface LlmStageOptions {
  /** Deadline of one analyze call, retries and repair included. Default 15000 ms. */
  timeoutMs?: number;
  /** Requests in flight at once. Default 4. */
  concurrency?: number;
  /** Token bucket, or a {@link RateLimiter} to share between analyzers; 429 pauses apply regardless. */
  rateLimit?: RateLimitOptions | RateLimiter;
  /** Retry policy for 429/408/5xx/network errors. */
  retry?: RetryOptions;
  /** Limits, or a {@link Budget} object to share between analyzers. */
  budget?: BudgetOptions | Budget;
}

/**
 * Everything one LLM analyzer takes.
 *
 * @example
 * ```ts
 * import { createLlmSentimentAnalyzer, type LlmAnalyzerOptions } from "./analyzers.ts";
 * import { loadPrompt } from "./prompts.ts";
 * const options: LlmAnalyzerOptions = {
 *   baseUrl: "http://127.0.0.1:8080/v1", apiKey: "k", model: "m",
 *   prompt: await loadPrompt("sentiment", "v1"),
 * };
 * const sentiment = createLlmSentimentAnalyzer(options);
 * ```
 */
export interface LlmAnalyzerOptions extends LlmConnectionOptions, LlmStageOptions {
  /** The versioned system prompt. */
  prompt: PromptTemplate;
  /** Result cache; default a 1000-entry LRU per analyzer; `null` disables caching. */
  cache?: LlmCache | null;
  /** Counters; default a fresh object per analyzer (readable as `analyzer.stats`). */
  stats?: LlmStats;
  /** Log sink (retries, repairs); nothing is logged without it. */
  logger?: LlmLogger;
  /** Time source for waits and budget windows. */
  clock?: Clock;
  /** Jitter source in [0, 1). */
  random?: () => number;
  /** fetch implementation. */
  fetch?: typeof fetch;
}

/**
 * What every LLM result records besides the analysis.
 *
 * @example
 * ```ts
 * import type { LlmResultMeta } from "./analyzers.ts";
 * const m: LlmResultMeta = {
 *   analyzer: "llm:gpt-4o-mini", prompt_version: "v1", cached: false, repaired: false,
 *   usage: { prompt_tokens: 120, completion_tokens: 12, total_tokens: 132, cost_usd: 0.0000252 },
 * };
 * ```
 */
export interface LlmResultMeta {
  /** `llm:<model>`. */
  analyzer: string;
  /** Prompt template version. */
  prompt_version: string;
  /** Tokens and cost of this call (all zero on a cache hit). */
  usage: LlmUsage;
  /** True when answered from the cache. */
  cached: boolean;
  /** True when the first answer was invalid and the repair answer was used. */
  repaired: boolean;
}

/**
 * Sentiment result of the LLM analyzer.
 *
 * @example
 * ```ts
 * import type { LlmSentimentResult } from "./analyzers.ts";
 * declare const r: LlmSentimentResult;
 * ```
 */
export type LlmSentimentResult = SentimentResult & LlmResultMeta;
/**
 * Topics result of the LLM analyzer.
 *
 * @example
 * ```ts
 * import type { LlmTopicsResult } from "./analyzers.ts";
 * declare const r: LlmTopicsResult;
 * ```
 */
export type LlmTopicsResult = TopicsResult & LlmResultMeta;
/**
 * Toxicity result of the LLM analyzer.
 *
 * @example
 * ```ts
 * import type { LlmToxicityResult } from "./analyzers.ts";
 * declare const r: LlmToxicityResult;
 * ```
 */
export type LlmToxicityResult = ToxicityResult & LlmResultMeta;

/**
 * An LLM analyzer: the common interface plus its model, prompt version and counters.
 *
 * @example
 * ```ts
 * import type { LlmAnalyzer, LlmSentimentResult } from "./analyzers.ts";
 * declare const a: LlmAnalyzer<LlmSentimentResult>;
 * const r = await a.analyze("Great service!");
 * a.stats.snapshot().cost_usd;
 * ```
 */
export interface LlmAnalyzer<R> extends Analyzer<R> {
  /** `llm:<model>`. */
  readonly name: string;
  /** Model name. */
  readonly model: string;
  /** Prompt version in use. */
  readonly promptVersion: string;
  /** Counters. */
  readonly stats: LlmStats;
  /** Spending in the current budget window. */
  readonly budget: Budget;
  /** Always async. */
  analyze(text: string, options?: AnalyzeOptions): Promise<R>;
}

/**
 * Toxicity categories the model may report unless configured otherwise.
 *
 * @example
 * ```ts
 * import { DEFAULT_TOXICITY_CATEGORIES } from "./analyzers.ts";
 * DEFAULT_TOXICITY_CATEGORIES.includes("threat"); // true
 * ```
 */
export const DEFAULT_TOXICITY_CATEGORIES: readonly string[] = [
  "insult",
  "hate",
  "threat",
  "profanity",
  "harassment",
  "sexual",
  "self_harm",
];

/**
 * What an LLM analyzer asks for and how its answer becomes a result: the prompt kind, the
 * output's JSON Schema, the prompt's placeholders and the mapping of a valid answer.
 *
 * @example
 * ```ts
 * import type { LlmOutputSpec } from "./analyzers.ts";
 * const spec: LlmOutputSpec<{ label: string }, { label: string }> = {
 *   kind: "triage", schema: { type: "object" }, vars: {}, toResult: (p) => p,
 * };
 * ```
 */
export interface LlmOutputSpec<P, R> {
  kind: string;
  schema: Record<string, unknown>;
  vars: Record<string, string>;
  toResult(payload: P): Omit<R, "analyzer">;
}
type Spec<P, R> = LlmOutputSpec<P, R>;

/**
 * An LLM analyzer for any JSON output: cache, budget, JSON mode, schema validation and one
 * repair, as for the built-in ones (a pipeline definition's `llm` steps use it).
 *
 * @example
 * ```ts ignore
 * const triage = createLlmAnalyzer(options, {
 *   kind: "triage", schema, vars: {}, toResult: (p) => p,
 * });
 * const r = await triage.analyze(JSON.stringify(ticket));
 * ```
 */
export function createLlmAnalyzer<P, R>(
  options: LlmAnalyzerOptions,
  spec: Spec<P, R>,
): LlmAnalyzer<R & LlmResultMeta> {
  if (options.prompt.kind !== spec.kind) {
    throw new TypeError(
      `a ${spec.kind} analyzer needs a ${spec.kind} prompt, not ${options.prompt.kind}`,
    );
  }
  const name = `llm:${options.model}`;
  const stats = options.stats ?? createLlmStats();
  const cache = options.cache === null
    ? undefined
    : options.cache ?? createLruCache({ maxEntries: 1000 });
  const budget = options.budget !== undefined && "exceeded" in options.budget
    ? options.budget
    : createBudget(options.budget, options.clock);
  const timeoutMs = options.timeoutMs ?? 15_000;
  const log = options.logger ?? (() => {});
  const client: ChatClient = createChatClient({ ...options, stats });
  const schemaText = JSON.stringify(spec.schema);
  const system = renderPrompt(options.prompt.text, { ...spec.vars, schema: schemaText });
  const check: OutputValidator<P> = createOutputValidator<P>(spec.schema);
  const promptVersion = options.prompt.version;

  const finish = (payload: P, meta: Omit<LlmResultMeta, "analyzer">) =>
    ({ ...spec.toResult(payload), analyzer: name, ...meta }) as R & LlmResultMeta;

  const ensureBudget = (spent: LlmUsage) => {
    const reason = budget.exceeded();
    if (reason === undefined) return;
    stats.count("over_budget");
    throw new LlmOverBudgetError(`${spec.kind} budget exceeded: ${reason}`, { usage: spent });
  };

  const ask = async (
    messages: ChatMessage[],
    signal: AbortSignal | undefined,
    deadline: number | undefined,
    spent: LlmUsage,
  ) => {
    // Checked again when the request leaves its queue: calls that queued behind others (for
    // a concurrency slot or a rate token) may find the budget spent by them.
    const done = await client.complete(messages, {
      signal,
      deadline,
      beforeSend: () => ensureBudget(spent),
    });
    budget.record(done.usage);
    stats.addUsage(done.usage);
    return done;
  };

  return {
    name,
    model: options.model,
    promptVersion,
    stats,
    budget,
    async analyze(text, call = {}) {
      const key = cache
        ? await cacheKey({ kind: spec.kind, promptVersion, model: options.model, text })
        : undefined;
      if (cache && key !== undefined) {
        const hit = await cache.get(key);
        if (hit !== undefined) {
          const checked = check(JSON.stringify(hit));
          if (checked.ok) {
            stats.count("cache_hits");
            return finish(checked.value, {
              prompt_version: promptVersion,
              usage: { ...ZERO_USAGE },
              cached: true,
              repaired: false,
            });
          }
        }
      }
      let spent: LlmUsage = { ...ZERO_USAGE };
      try {
        ensureBudget(spent);
      } catch (e) {
        stats.count("failures");
        throw e;
      }
      stats.count("calls");
      const deadline = createDeadline(timeoutMs, call.signal, options.clock);
      try {
        const messages: ChatMessage[] = [
          { role: "system", content: system },
          { role: "user", content: text },
        ];
        const first = await ask(messages, deadline.signal, deadline.deadline, spent);
        spent = addUsage(spent, first.usage);
        let checked = check(first.content);
        let repaired = false;
        if (!checked.ok) {
          stats.count("repairs");
          log({
            level: "warn",
            message: "invalid LLM output, asking for a repair",
            // a JSON parse error quotes the content, which may echo the analyzed text
            fields: {
              kind: spec.kind,
              reason: checked.reason,
              error: checked.reason === "schema" ? checked.error : undefined,
            },
          });
          ensureBudget(spent);
          const second = await ask(
            [
              ...messages,
              { role: "assistant", content: first.content },
              {
                role: "user",
                content: `Your previous reply is invalid: ${checked.error}. ` +
                  `Reply again with only the corrected JSON object, matching this JSON Schema: ${schemaText}`,
              },
            ],
            deadline.signal,
            deadline.deadline,
            spent,
          );
          spent = addUsage(spent, second.usage);
          checked = check(second.content);
          if (!checked.ok) {
            // No JSON may be a glitch another try gets past; a wrong shape twice is the
            // model's answer to this input.
            throw new LlmInvalidOutputError(
              `${spec.kind} output still invalid after one repair: ${checked.error}`,
              {
                usage: spent,
                retryable: checked.reason === "json",
                ...(checked.field ? { field: checked.field } : {}),
              },
            );
          }
          repaired = true;
        }
        // a padded answer (valid, plus megabytes of extra fields) is not kept
        if (
          cache && key !== undefined &&
          JSON.stringify(checked.value).length <= MAX_CACHED_ANSWER_CHARS
        ) {
          await cache.set(key, checked.value);
        }
        return finish(checked.value, {
          prompt_version: promptVersion,
          usage: spent,
          cached: false,
          repaired,
        });
      } catch (e) {
        stats.count("failures");
        if (e instanceof LlmError && e.usage === undefined && spent.total_tokens > 0) {
          e.usage = spent;
        }
        throw e;
      } finally {
        deadline.dispose();
      }
    },
  };
}

/**
 * Creates the LLM sentiment analyzer (prompt kind `"sentiment"`).
 *
 * @example
 * ```ts
 * import { createLlmSentimentAnalyzer } from "./analyzers.ts";
 * import { loadPrompt } from "./prompts.ts";
 * const sentiment = createLlmSentimentAnalyzer({
 *   baseUrl: "http://127.0.0.1:8080/v1", apiKey: "k", model: "gpt-4o-mini",
 *   prompt: await loadPrompt("sentiment", "v1"), timeoutMs: 5000,
 * });
 * const r = await sentiment.analyze("Love it"); // { label: "positive", score: 0.9, analyzer: "llm:gpt-4o-mini", ... }
 * ```
 */
export function createLlmSentimentAnalyzer(
  options: LlmAnalyzerOptions,
): LlmAnalyzer<LlmSentimentResult> {
  return createLlmAnalyzer<{ label: SentimentLabel; score: number }, SentimentResult>(options, {
    kind: "sentiment",
    schema: {
      type: "object",
      required: ["label", "score"],
      properties: {
        label: { enum: ["positive", "negative", "neutral"] },
        score: { type: "number", minimum: -1, maximum: 1 },
      },
    },
    vars: {},
    toResult: (p) => ({ label: p.label, score: p.score }),
  });
}

/**
 * Creates the LLM topics analyzer (prompt kind `"topics"`); topics are restricted to the
 * taxonomy, and evidence keys to the returned topics' labels.
 *
 * @example
 * ```ts
 * import { createLlmTopicsAnalyzer } from "./analyzers.ts";
 * import { loadPrompt } from "./prompts.ts";
 * const topics = createLlmTopicsAnalyzer({
 *   baseUrl: "http://127.0.0.1:8080/v1", apiKey: "k", model: "gpt-4o-mini",
 *   prompt: await loadPrompt("topics", "v1"), taxonomy: ["billing", "shipping", "other"],
 * });
 * ```
 */
export function createLlmTopicsAnalyzer(
  options: LlmAnalyzerOptions & { taxonomy: readonly string[] },
): LlmAnalyzer<LlmTopicsResult> {
  if (options.taxonomy.length === 0) throw new TypeError("topics taxonomy is empty");
  const labels = [...options.taxonomy];
  return createLlmAnalyzer<{ topics: string[]; evidence?: Record<string, string[]> }, TopicsResult>(
    options,
    {
      kind: "topics",
      schema: {
        type: "object",
        required: ["topics", "evidence"],
        properties: {
          topics: { type: "array", minItems: 1, uniqueItems: true, items: { enum: labels } },
          evidence: {
            type: "object",
            propertyNames: { enum: labels },
            additionalProperties: { type: "array", items: { type: "string" } },
          },
        },
      },
      vars: { taxonomy: labels.join(", ") },
      toResult: (p) => ({
        topics: p.topics,
        evidence: Object.fromEntries(p.topics.map((t) => [t, p.evidence?.[t] ?? []])),
      }),
    },
  );
}

/**
 * Creates the LLM toxicity analyzer (prompt kind `"toxicity"`).
 *
 * @example
 * ```ts
 * import { createLlmToxicityAnalyzer } from "./analyzers.ts";
 * import { loadPrompt } from "./prompts.ts";
 * const toxicity = createLlmToxicityAnalyzer({
 *   baseUrl: "http://127.0.0.1:8080/v1", apiKey: "k", model: "gpt-4o-mini",
 *   prompt: await loadPrompt("toxicity", "v1"),
 * });
 * ```
 */
export function createLlmToxicityAnalyzer(
  options: LlmAnalyzerOptions & { categories?: readonly string[] },
): LlmAnalyzer<LlmToxicityResult> {
  const categories = [...(options.categories ?? DEFAULT_TOXICITY_CATEGORIES)];
  return createLlmAnalyzer<
    { flagged: boolean; categories: string[]; score: number },
    ToxicityResult
  >(options, {
    kind: "toxicity",
    schema: {
      type: "object",
      required: ["flagged", "categories", "score"],
      properties: {
        flagged: { type: "boolean" },
        categories: { type: "array", uniqueItems: true, items: { enum: categories } },
        score: { type: "number", minimum: 0, maximum: 1 },
      },
    },
    vars: { categories: categories.join(", ") },
    toResult: (p) => ({ flagged: p.flagged, categories: p.categories, score: p.score }),
  });
}

/**
 * Settings for {@link createLlmAnalyzers}: one connection, per-stage limits.
 *
 * @example
 * ```ts
 * import type { LlmAnalyzersConfig } from "./analyzers.ts";
 * const cfg: LlmAnalyzersConfig = {
 *   baseUrl: "https://llm.example/v1", apiKey: "sk-...", model: "gpt-4o-mini",
 *   taxonomy: ["billing", "shipping", "other"],
 *   stages: { sentiment: { timeoutMs: 5000, concurrency: 8 }, topics: { budget: { maxCostUsd: 1 } } },
 * };
 * ```
 */
export interface LlmAnalyzersConfig extends LlmConnectionOptions {
  /** Topic labels. */
  taxonomy: readonly string[];
  /** Toxicity categories. Default {@link DEFAULT_TOXICITY_CATEGORIES}. */
  categories?: readonly string[];
  /** Per-stage limits. */
  stages?: { sentiment?: LlmStageOptions; topics?: LlmStageOptions; toxicity?: LlmStageOptions };
  /** Prompt versions to load. Default "v1" each. */
  promptVersions?: { sentiment?: string; topics?: string; toxicity?: string };
  /** Folder of prompt files. Default the repository's prompts/. */
  promptsDir?: URL | string;
  /** Shared cache (keys include the kind). Default one LRU of `cacheEntries` entries. */
  cache?: LlmCache | null;
  /** Size of the default LRU. Default 1000. */
  cacheEntries?: number;
  /** Shared counters. Default a fresh object. */
  stats?: LlmStats;
  /** Log sink. */
  logger?: LlmLogger;
}

/**
 * The three analyzers built by {@link createLlmAnalyzers}, and their shared counters.
 *
 * @example
 * ```ts
 * import type { LlmAnalyzers } from "./analyzers.ts";
 * declare const llm: LlmAnalyzers;
 * llm.stats.snapshot().calls;
 * ```
 */
export interface LlmAnalyzers {
  /** Sentiment stage analyzer. */
  sentiment: LlmAnalyzer<LlmSentimentResult>;
  /** Topics stage analyzer. */
  topics: LlmAnalyzer<LlmTopicsResult>;
  /** Toxicity stage analyzer. */
  toxicity: LlmAnalyzer<LlmToxicityResult>;
  /** Counters shared by the three. */
  stats: LlmStats;
}

/**
 * Loads the prompt files and builds the three analyzers with one connection, one cache and
 * one stats object; each stage keeps its own timeout, concurrency, rate limit and budget.
 *
 * @example
 * ```ts
 * import { createLlmAnalyzers } from "./analyzers.ts";
 * const llm = await createLlmAnalyzers({
 *   baseUrl: "https://llm.example/v1", apiKey: "sk-...", model: "gpt-4o-mini",
 *   taxonomy: ["billing", "shipping", "other"],
 * });
 * await llm.sentiment.analyze("The parcel was late again");
 * ```
 */
export async function createLlmAnalyzers(config: LlmAnalyzersConfig): Promise<LlmAnalyzers> {
  const dir = config.promptsDir;
  const v = config.promptVersions ?? {};
  const [sp, tp, xp] = await Promise.all([
    loadPrompt("sentiment", v.sentiment ?? "v1", dir),
    loadPrompt("topics", v.topics ?? "v1", dir),
    loadPrompt("toxicity", v.toxicity ?? "v1", dir),
  ]);
  const stats = config.stats ?? createLlmStats();
  const cache = config.cache === undefined
    ? createLruCache({ maxEntries: config.cacheEntries ?? 1000 })
    : config.cache;
  const common = {
    baseUrl: config.baseUrl,
    apiKey: config.apiKey,
    model: config.model,
    temperature: config.temperature,
    pricing: config.pricing,
    cache,
    stats,
    logger: config.logger,
  };
  const stages = config.stages ?? {};
  return {
    sentiment: createLlmSentimentAnalyzer({ ...common, ...stages.sentiment, prompt: sp }),
    topics: createLlmTopicsAnalyzer({
      ...common,
      ...stages.topics,
      prompt: tp,
      taxonomy: config.taxonomy,
    }),
    toxicity: createLlmToxicityAnalyzer({
      ...common,
      ...stages.toxicity,
      prompt: xp,
      categories: config.categories,
    }),
    stats,
  };
}
