/**
 * Typed errors of the LLM analyzer path. Every error is an {@link LlmError} with a stable
 * `code` from {@link LlmErrorCode}, so callers (and the fallback wrapper) can branch on the
 * code instead of on messages. Messages never contain the API key.
 *
 * @module
 */

/**
 * Stable error codes.
 *
 * @example
 * ```ts
 * import { LlmErrorCode } from "./errors.ts";
 * const code: LlmErrorCode = LlmErrorCode.Timeout; // "timeout"
 * ```
 */
export const LlmErrorCode = {
  /** The stage deadline passed before an answer came. */
  Timeout: "timeout",
  /** The endpoint answered 429 and the wait would not fit in the deadline or retries ran out. */
  RateLimited: "rate_limited",
  /** The endpoint answered a non-2xx status (other than 429) or an unreadable body. */
  HttpError: "http_error",
  /** The model's content was not valid JSON for the schema, even after one repair. */
  InvalidOutput: "invalid_output",
  /** The stage budget (cost or tokens) is spent: no call was made. */
  OverBudget: "over_budget",
  /** The request never got an HTTP answer (connection refused, reset, DNS...). */
  Network: "network",
  /** The caller's own signal aborted the call. */
  Aborted: "aborted",
} as const;

/**
 * One of the values of {@link LlmErrorCode}.
 *
 * @example
 * ```ts
 * import type { LlmErrorCode } from "./errors.ts";
 * const c: LlmErrorCode = "over_budget";
 * ```
 */
export type LlmErrorCode = typeof LlmErrorCode[keyof typeof LlmErrorCode];

/**
 * Tokens spent by a call (possibly a failed one).
 *
 * @example
 * ```ts
 * import type { LlmUsage } from "./errors.ts";
 * const u: LlmUsage = { prompt_tokens: 10, completion_tokens: 2, total_tokens: 12, cost_usd: 0 };
 * ```
 */
export interface LlmUsage {
  /** Input tokens reported by the endpoint. */
  prompt_tokens: number;
  /** Output tokens reported by the endpoint. */
  completion_tokens: number;
  /** prompt + completion (as reported, or summed when missing). */
  total_tokens: number;
  /** Estimated cost from the configured prices per 1k tokens. */
  cost_usd: number;
}

/**
 * Extra facts an {@link LlmError} may carry.
 *
 * @example
 * ```ts
 * import type { LlmErrorDetails } from "./errors.ts";
 * const d: LlmErrorDetails = { status: 503, retryable: true };
 * ```
 */
export interface LlmErrorDetails {
  /** The underlying error, if any. */
  cause?: unknown;
  /** HTTP status when the endpoint answered. */
  status?: number;
  /** `error.type` from an OpenAI-style error body. */
  errorType?: string;
  /** `error.code` from an OpenAI-style error body. */
  errorCode?: string;
  /** Milliseconds the endpoint asked us to wait (429 Retry-After). */
  retryAfterMs?: number;
  /** Whether trying again may help. */
  retryable?: boolean;
  /** Tokens already spent before the failure (e.g. an invalid answer and its repair). */
  usage?: LlmUsage;
  /** An answer of the wrong shape: the JSON pointer of its first field at fault. */
  field?: string;
}

/**
 * Base class of every LLM error.
 *
 * @example
 * ```ts
 * import { LlmError } from "./errors.ts";
 * try { throw new LlmError("network", "connection refused") } catch (e) {
 *   if (e instanceof LlmError && e.code === "network") { // fall back
 *   }
 * }
 * ```
 */
export class LlmError extends Error {
  /** Stable code. */
  readonly code: LlmErrorCode;
  /** HTTP status, when the endpoint answered. */
  readonly status?: number;
  /** `error.type` from the error body. */
  readonly errorType?: string;
  /** `error.code` from the error body. */
  readonly errorCode?: string;
  /** Requested wait in ms (429). */
  readonly retryAfterMs?: number;
  /** Whether a retry may help. */
  readonly retryable: boolean;
  /** Tokens spent before the failure (set by the analyzer when a call spent some). */
  usage?: LlmUsage;

  /** Creates the error; `details.cause` becomes the standard `cause`. */
  constructor(code: LlmErrorCode, message: string, details: LlmErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = "LlmError";
    this.code = code;
    this.status = details.status;
    this.errorType = details.errorType;
    this.errorCode = details.errorCode;
    this.retryAfterMs = details.retryAfterMs;
    this.retryable = details.retryable ?? false;
    this.usage = details.usage;
  }
}

/**
 * The stage deadline passed.
 *
 * @example
 * ```ts
 * import { LlmTimeoutError } from "./errors.ts";
 * const e = new LlmTimeoutError(5000);
 * e.code; // "timeout"
 * ```
 */
export class LlmTimeoutError extends LlmError {
  /** Creates the error; `details.cause` becomes the standard `cause`. */
  constructor(timeoutMs: number, details: LlmErrorDetails = {}) {
    super("timeout", `LLM call exceeded its ${timeoutMs} ms deadline`, details);
    this.name = "LlmTimeoutError";
  }
}

/**
 * The endpoint kept answering 429.
 *
 * @example
 * ```ts
 * import { LlmRateLimitedError } from "./errors.ts";
 * new LlmRateLimitedError("slow down", { status: 429, retryAfterMs: 1000 }).retryable; // true
 * ```
 */
export class LlmRateLimitedError extends LlmError {
  /** Creates the error; `details.cause` becomes the standard `cause`. */
  constructor(message: string, details: LlmErrorDetails = {}) {
    super("rate_limited", message, { retryable: true, ...details });
    this.name = "LlmRateLimitedError";
  }
}

/**
 * A non-2xx answer (other than 429) or an unreadable body.
 *
 * @example
 * ```ts
 * import { LlmHttpError } from "./errors.ts";
 * new LlmHttpError("HTTP 400: bad model", { status: 400 }).code; // "http_error"
 * ```
 */
export class LlmHttpError extends LlmError {
  /** Creates the error; `details.cause` becomes the standard `cause`. */
  constructor(message: string, details: LlmErrorDetails = {}) {
    super("http_error", message, details);
    this.name = "LlmHttpError";
  }
}

/**
 * The model's content did not validate, even after the repair attempt.
 *
 * @example
 * ```ts
 * import { LlmInvalidOutputError } from "./errors.ts";
 * new LlmInvalidOutputError("data/label must be equal to one of the allowed values").code;
 * ```
 */
export class LlmInvalidOutputError extends LlmError {
  /** A wrong shape (not retryable): the JSON pointer of the answer's first field at fault. */
  readonly field?: string;
  /** Creates the error; `details.cause` becomes the standard `cause`. */
  constructor(message: string, details: LlmErrorDetails = {}) {
    super("invalid_output", message, details);
    this.name = "LlmInvalidOutputError";
    this.field = details.field;
  }
}

/**
 * The stage budget is spent; no request was sent.
 *
 * @example
 * ```ts
 * import { LlmOverBudgetError } from "./errors.ts";
 * new LlmOverBudgetError("cost 1.02 USD >= max 1 USD").code; // "over_budget"
 * ```
 */
export class LlmOverBudgetError extends LlmError {
  /** Creates the error; `details.cause` becomes the standard `cause`. */
  constructor(message: string, details: LlmErrorDetails = {}) {
    super("over_budget", message, details);
    this.name = "LlmOverBudgetError";
  }
}

/**
 * No HTTP answer at all.
 *
 * @example
 * ```ts
 * import { LlmNetworkError } from "./errors.ts";
 * new LlmNetworkError("connection refused", { cause: new TypeError("fetch failed") });
 * ```
 */
export class LlmNetworkError extends LlmError {
  /** Creates the error; `details.cause` becomes the standard `cause`. */
  constructor(message: string, details: LlmErrorDetails = {}) {
    super("network", message, { retryable: true, ...details });
    this.name = "LlmNetworkError";
  }
}

/**
 * The caller's signal aborted the call. Not a reason to fall back: the caller gave up.
 *
 * @example
 * ```ts
 * import { LlmAbortedError } from "./errors.ts";
 * new LlmAbortedError({ cause: "shutdown" }).code; // "aborted"
 * ```
 */
export class LlmAbortedError extends LlmError {
  /** Creates the error; `details.cause` becomes the standard `cause`. */
  constructor(details: LlmErrorDetails = {}) {
    super("aborted", "LLM call aborted by the caller", details);
    this.name = "LlmAbortedError";
  }
}

/**
 * Turns an abort signal's reason into an {@link LlmError}: our own deadline aborts with an
 * {@link LlmTimeoutError} as reason, which is returned as is; any other reason means the
 * caller aborted.
 *
 * @example
 * ```ts
 * import { errorFromAbort } from "./errors.ts";
 * const c = new AbortController();
 * c.abort("bye");
 * errorFromAbort(c.signal).code; // "aborted"
 * ```
 */
export function errorFromAbort(signal: AbortSignal): LlmError {
  const reason: unknown = signal.reason;
  if (reason instanceof LlmError) return reason;
  return new LlmAbortedError({ cause: reason });
}
