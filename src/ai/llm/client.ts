/**
 * HTTP client for any OpenAI-compatible chat-completions endpoint, with per-stage bounded
 * concurrency, a token-bucket rate limit that honours 429 + Retry-After, retries with
 * exponential backoff and full jitter (429, 408, 5xx, network errors only), and deadlines.
 * The API key only ever goes into the Authorization header: no message, error or log
 * entry contains it.
 *
 * @module
 */

import pLimit from "p-limit";
import { type Clock, systemClock } from "./clock.ts";
import {
  errorFromAbort,
  LlmError,
  LlmHttpError,
  LlmNetworkError,
  LlmRateLimitedError,
  LlmTimeoutError,
  type LlmUsage,
} from "./errors.ts";
import {
  createRateLimiter,
  parseRetryAfter,
  type RateLimiter,
  type RateLimitOptions,
} from "./rate_limit.ts";
import type { LlmStats } from "./stats.ts";
import { type LlmPricing, usageOf } from "./usage.ts";

/**
 * Retry policy for 429, 408, 5xx and network errors.
 *
 * @example
 * ```ts
 * import type { RetryOptions } from "./client.ts";
 * const r: RetryOptions = { maxRetries: 3, baseDelayMs: 250, maxDelayMs: 8000 };
 * ```
 */
export interface RetryOptions {
  /** Retries after the first try. Default 3. */
  maxRetries?: number;
  /** First backoff ceiling in ms; doubles per retry. Default 250. */
  baseDelayMs?: number;
  /** Largest backoff ceiling in ms. Default 8000. */
  maxDelayMs?: number;
}

/**
 * A log entry. Never contains the API key, the analyzed text or the model's content.
 *
 * @example
 * ```ts
 * import type { LlmLogEntry } from "./client.ts";
 * const e: LlmLogEntry = { level: "warn", message: "retrying", fields: { status: 503 } };
 * ```
 */
export interface LlmLogEntry {
  /** Severity. */
  level: "debug" | "warn";
  /** What happened. */
  message: string;
  /** Structured facts (status, delay, attempt, code...). */
  fields: Record<string, string | number | boolean | undefined>;
}

/**
 * Receives log entries; the project forbids console.*, so logging is injected.
 *
 * @example
 * ```ts
 * import type { LlmLogger } from "./client.ts";
 * const entries: unknown[] = [];
 * const log: LlmLogger = (e) => entries.push(e);
 * ```
 */
export type LlmLogger = (entry: LlmLogEntry) => void;

/**
 * Connection and flow-control settings of one stage's client.
 *
 * @example
 * ```ts
 * import type { ChatClientOptions } from "./client.ts";
 * const o: ChatClientOptions = {
 *   baseUrl: "https://llm.example/v1",
 *   apiKey: "sk-...",
 *   model: "gpt-4o-mini",
 *   pricing: { inputPer1k: 0.00015, outputPer1k: 0.0006 },
 *   concurrency: 4,
 *   rateLimit: { requestsPerSecond: 5, burst: 5 },
 * };
 * ```
 */
export interface ChatClientOptions {
  /** Base URL; requests go to `{baseUrl}/chat/completions`. */
  baseUrl: string;
  /** Bearer token. Never logged. */
  apiKey: string;
  /** Model name sent in the body and recorded as `llm:<model>`. */
  model: string;
  /** Sampling temperature. Default 0. */
  temperature?: number;
  /** Prices for the cost estimate; cost is 0 without them. */
  pricing?: LlmPricing;
  /** Requests in flight at once for this stage. Default 4. */
  concurrency?: number;
  /**
   * Token bucket for this stage, or one shared with other clients (`createRateLimiter`);
   * without it only 429 pauses apply.
   */
  rateLimit?: RateLimitOptions | RateLimiter;
  /** Retry policy. */
  retry?: RetryOptions;
  /** Counters to update (requests, retries). */
  stats?: LlmStats;
  /** Injected log sink. */
  logger?: LlmLogger;
  /** Time source for waits (tests inject a fake one). Default the system clock. */
  clock?: Clock;
  /** Jitter source in [0, 1). Default Math.random. */
  random?: () => number;
  /** fetch implementation. Default globalThis.fetch. */
  fetch?: typeof fetch;
}

/**
 * One chat message.
 *
 * @example
 * ```ts
 * import type { ChatMessage } from "./client.ts";
 * const m: ChatMessage = { role: "user", content: "hello" };
 * ```
 */
export interface ChatMessage {
  /** Who speaks (`tool`: a tool's result, answering one of the assistant's `tool_calls`). */
  role: "system" | "user" | "assistant" | "tool";
  /** What is said ("" for an assistant turn that only calls tools). */
  content: string;
  /** The tools an assistant turn called (OpenAI's `tool_calls`). */
  tool_calls?: { id: string; type: "function"; function: { name: string; arguments: string } }[];
  /** Which call a `tool` message answers. */
  tool_call_id?: string;
}

/** A tool the model may call: a function with JSON-Schema parameters. */
export interface ChatTool {
  name: string;
  description: string;
  parameters: Record<string, unknown>;
}

/** One tool call the model asked for; `arguments` is JSON text, as on the wire. */
export interface ChatToolCall {
  id: string;
  name: string;
  arguments: string;
}

/**
 * Per-call options.
 *
 * @example
 * ```ts
 * import type { ChatCallOptions } from "./client.ts";
 * const o: ChatCallOptions = { deadline: Date.now() + 5000 };
 * ```
 */
export interface ChatCallOptions {
  /** Aborts the call (waits, queueing and the request itself). */
  signal?: AbortSignal;
  /** Time (clock ms) after which waiting is pointless: a Retry-After past it fails at once. */
  deadline?: number;
  /**
   * Tools the model may call (`tools` with `tool_choice: "auto"` on the wire; JSON mode is
   * then off, the prompt asks for JSON). Calls come back in {@link ChatCompletion.toolCalls}.
   */
  tools?: readonly ChatTool[];
  /**
   * Called right before each request is sent (a retry's too), once it has its concurrency
   * slot and rate token: an error it throws ends the call unsent, e.g. a budget spent by the
   * requests that went before it while it queued.
   */
  beforeSend?: () => void;
}

/**
 * What the endpoint answered.
 *
 * @example
 * ```ts
 * import type { ChatCompletion } from "./client.ts";
 * const c: ChatCompletion = {
 *   content: "{}",
 *   usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2, cost_usd: 0 },
 *   attempts: 1,
 * };
 * ```
 */
export interface ChatCompletion {
  /** `choices[0].message.content`. */
  content: string;
  /** Tokens and estimated cost of the successful request. */
  usage: LlmUsage;
  /** Requests it took (1 + retries). */
  attempts: number;
  /** The tools the model called, when it called any. */
  toolCalls?: ChatToolCall[];
}

/**
 * A chat-completions client for one stage.
 *
 * @example
 * ```ts
 * import { createChatClient } from "./client.ts";
 * const client = createChatClient({ baseUrl: "http://127.0.0.1:8080/v1", apiKey: "k", model: "m" });
 * const { content } = await client.complete([{ role: "user", content: "Say {}" }]);
 * ```
 */
export interface ChatClient {
  /** The model name. */
  readonly model: string;
  /** Sends messages with `response_format: json_object` and returns the first choice. */
  complete(messages: ChatMessage[], options?: ChatCallOptions): Promise<ChatCompletion>;
}

/**
 * Backoff ceiling for a retry (exponential, capped); the wait is `random() * ceiling`
 * ("full jitter").
 *
 * @example
 * ```ts
 * import { backoffDelay } from "./client.ts";
 * backoffDelay(2, { baseDelayMs: 100, maxDelayMs: 1000 }, () => 0.5); // 200
 * ```
 */
export function backoffDelay(
  retry: number,
  options: RetryOptions,
  random: () => number,
): number {
  const base = options.baseDelayMs ?? 250;
  const max = options.maxDelayMs ?? 8000;
  const ceiling = Math.min(max, base * 2 ** retry);
  return Math.round(random() * ceiling);
}

/**
 * Whether an HTTP status is worth retrying: 408, 429 and 5xx.
 *
 * @example
 * ```ts
 * import { isRetryableStatus } from "./client.ts";
 * isRetryableStatus(503); // true
 * isRetryableStatus(400); // false
 * ```
 */
export function isRetryableStatus(status: number): boolean {
  return status === 408 || status === 429 || status >= 500;
}

/**
 * Creates a client. Concurrency, rate limit and 429 pauses are per client, so create one
 * client per stage.
 *
 * @example
 * ```ts
 * import { createChatClient } from "./client.ts";
 * const client = createChatClient({
 *   baseUrl: "http://127.0.0.1:8080/v1",
 *   apiKey: "secret",
 *   model: "gpt-4o-mini",
 *   retry: { maxRetries: 2 },
 * });
 * ```
 */
export function createChatClient(options: ChatClientOptions): ChatClient {
  const url = `${options.baseUrl.replace(/\/+$/, "")}/chat/completions`;
  const clock = options.clock ?? systemClock;
  const random = options.random ?? Math.random;
  const doFetch = options.fetch ?? globalThis.fetch;
  const retry = options.retry ?? {};
  const maxRetries = retry.maxRetries ?? 3;
  const limit = pLimit(Math.max(1, options.concurrency ?? 4));
  const limiter = options.rateLimit !== undefined && "acquire" in options.rateLimit
    ? options.rateLimit
    : createRateLimiter(options.rateLimit, clock);
  const log = options.logger ?? (() => {});
  const headers = {
    "content-type": "application/json",
    authorization: `Bearer ${options.apiKey}`,
  };

  // p-limit cannot drop a queued task on abort, so the caller's promise rejects at once
  // and the task, when it finally starts, sees the aborted signal and returns.
  const limited = <T>(fn: () => Promise<T>, signal?: AbortSignal): Promise<T> =>
    new Promise<T>((resolve, reject) => {
      if (signal?.aborted) return reject(signal.reason);
      const onAbort = () => reject(signal?.reason);
      signal?.addEventListener("abort", onAbort, { once: true });
      void limit(async () => {
        if (signal?.aborted) return;
        try {
          resolve(await fn());
        } catch (e) {
          reject(e);
        } finally {
          signal?.removeEventListener("abort", onAbort);
        }
      });
    });

  const once = (
    body: string,
    signal?: AbortSignal,
    beforeSend?: () => void,
  ): Promise<ChatCompletion> =>
    limited(async () => {
      await limiter.acquire(signal);
      beforeSend?.();
      options.stats?.count("requests");
      let res: Response;
      try {
        res = await doFetch(url, { method: "POST", headers, body, signal });
      } catch (e) {
        if (signal?.aborted) throw errorFromAbort(signal);
        throw new LlmNetworkError(`request to ${url} failed: ${describe(e)}`, { cause: e });
      }
      let text: string;
      try {
        text = await res.text();
      } catch (e) {
        if (signal?.aborted) throw errorFromAbort(signal);
        throw new LlmNetworkError(`reading the answer from ${url} failed: ${describe(e)}`, {
          cause: e,
        });
      }
      if (!res.ok) {
        throw httpError(
          res.status,
          text,
          res.headers.get("retry-after"),
          clock.now(),
          options.apiKey,
        );
      }
      return parseCompletion(text, options.pricing);
    }, signal);

  return {
    model: options.model,
    async complete(messages, call = {}) {
      const { signal, deadline, tools, beforeSend } = call;
      const body = JSON.stringify({
        model: options.model,
        messages,
        temperature: options.temperature ?? 0,
        ...(tools && tools.length > 0
          ? {
            tools: tools.map((t) => ({
              type: "function",
              function: { name: t.name, description: t.description, parameters: t.parameters },
            })),
            tool_choice: "auto",
          }
          : { response_format: { type: "json_object" } }),
      });
      for (let attempt = 0;; attempt++) {
        let err: LlmError;
        try {
          const done = await once(body, signal, beforeSend);
          return { ...done, attempts: attempt + 1 };
        } catch (e) {
          err = toLlmError(e, signal);
        }
        if (!err.retryable || attempt >= maxRetries) throw err;
        const delay = err.retryAfterMs ?? backoffDelay(attempt, retry, random);
        if (deadline !== undefined && clock.now() + delay >= deadline) {
          throw err.code === "rate_limited" && err.retryAfterMs !== undefined
            ? new LlmRateLimitedError(
              `rate limited: Retry-After of ${delay} ms does not fit in the deadline`,
              { cause: err, status: err.status, retryAfterMs: delay, retryable: false },
            )
            : err;
        }
        log({
          level: "warn",
          message: "retrying LLM request",
          fields: { code: err.code, status: err.status, attempt: attempt + 1, delay_ms: delay },
        });
        options.stats?.count("retries");
        // only a wait this call takes pauses the stage (a Retry-After it gives up on does not)
        if (err.retryAfterMs !== undefined) limiter.pauseUntil(clock.now() + delay);
        try {
          await clock.sleep(delay, signal);
        } catch (e) {
          throw toLlmError(e, signal);
        }
      }
    },
  };
}

/**
 * Creates a signal that aborts with an {@link LlmTimeoutError} after `timeoutMs` or when
 * `signal` aborts; call `dispose` to clear the timer.
 *
 * @example
 * ```ts
 * import { createDeadline } from "./client.ts";
 * const d = createDeadline(5000);
 * try { await fetch("http://127.0.0.1:1", { signal: d.signal }).catch(() => {}) } finally { d.dispose() }
 * ```
 */
export function createDeadline(
  timeoutMs: number | undefined,
  signal?: AbortSignal,
  clock: Clock = systemClock,
): { signal: AbortSignal | undefined; deadline: number | undefined; dispose(): void } {
  if (timeoutMs === undefined || !Number.isFinite(timeoutMs)) {
    return { signal, deadline: undefined, dispose() {} };
  }
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(new LlmTimeoutError(timeoutMs)), timeoutMs);
  const combined = signal ? AbortSignal.any([signal, controller.signal]) : controller.signal;
  return {
    signal: combined,
    deadline: clock.now() + timeoutMs,
    dispose: () => clearTimeout(timer),
  };
}

function describe(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** `text` with every occurrence of `secret` (an API key) masked. */
function scrub(text: string, secret: string): string {
  return secret.length >= 4 ? text.replaceAll(secret, "***") : text;
}

function toLlmError(e: unknown, signal?: AbortSignal): LlmError {
  if (e instanceof LlmError) return e;
  if (signal?.aborted) return errorFromAbort(signal);
  return new LlmNetworkError(describe(e), { cause: e });
}

/** How much of a provider's error text an error keeps (it rides on items' events). */
const MAX_ERROR_TEXT = 200;

function httpError(
  status: number,
  text: string,
  retryAfter: string | null,
  now: number,
  apiKey: string,
): LlmError {
  let message = text;
  let errorType: string | undefined;
  let errorCode: string | undefined;
  try {
    const parsed: unknown = JSON.parse(text);
    const error = isRecord(parsed) ? parsed.error : undefined;
    if (isRecord(error)) {
      if (typeof error.message === "string") message = error.message;
      if (typeof error.type === "string") errorType = error.type;
      if (typeof error.code === "string" || typeof error.code === "number") {
        errorCode = String(error.code);
      }
    }
  } catch {
    // not a JSON error body: keep the raw text
  }
  // The provider's words are cut (a 600 KB message rode on two events of the item and failed
  // it as too large), and the key is never kept: some proxies quote the request's
  // Authorization in their 401, and the message reaches items' events and their readers.
  message = scrub(message, apiKey).slice(0, MAX_ERROR_TEXT);
  errorType = errorType === undefined ? undefined : scrub(errorType, apiKey).slice(0, 100);
  errorCode = errorCode === undefined ? undefined : scrub(errorCode, apiKey).slice(0, 100);
  const details = { status, errorType, errorCode, retryable: isRetryableStatus(status) };
  // Retry-After is honoured on 429 and on retryable 5xx (e.g. 503 during maintenance)
  const retryAfterMs = details.retryable ? parseRetryAfter(retryAfter, now) : undefined;
  if (status === 429) {
    return new LlmRateLimitedError(`HTTP 429: ${message}`, { ...details, retryAfterMs });
  }
  return new LlmHttpError(`HTTP ${status}: ${message}`, { ...details, retryAfterMs });
}

function parseCompletion(text: string, pricing: LlmPricing | undefined): ChatCompletion {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (e) {
    throw new LlmHttpError("the endpoint answered 2xx with a body that is not JSON", {
      cause: e,
    });
  }
  const choices = isRecord(parsed) ? parsed.choices : undefined;
  const first: unknown = Array.isArray(choices) ? choices[0] : undefined;
  const message = isRecord(first) ? first.message : undefined;
  const content = isRecord(message) ? message.content : undefined;
  const calls = isRecord(message) && Array.isArray(message.tool_calls)
    ? message.tool_calls.flatMap((c: unknown): ChatToolCall[] => {
      const f = isRecord(c) && isRecord(c.function) ? c.function : undefined;
      return isRecord(c) && typeof c.id === "string" && f && typeof f.name === "string"
        ? [{
          id: c.id,
          name: f.name,
          arguments: typeof f.arguments === "string" ? f.arguments : "{}",
        }]
        : [];
    })
    : [];
  if (typeof content !== "string" && calls.length === 0) {
    throw new LlmHttpError("the answer has no choices[0].message.content string");
  }
  const u = isRecord(parsed) && isRecord(parsed.usage) ? parsed.usage : {};
  // Token counts are taken only as non-negative safe integers; anything else (negative,
  // fractional, 1e400 read as Infinity, not a number) is unknown and counted as 0. The total
  // is never below its parts, so an odd total cannot lower the spend.
  const count = (v: unknown) => (Number.isSafeInteger(v) && (v as number) >= 0 ? v as number : 0);
  const prompt = count(u.prompt_tokens);
  const completion = count(u.completion_tokens);
  const total = Math.max(count(u.total_tokens), prompt + completion);
  return {
    content: typeof content === "string" ? content : "",
    usage: usageOf(prompt, completion, pricing, total),
    attempts: 1,
    ...(calls.length > 0 ? { toolCalls: calls } : {}),
  };
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}
