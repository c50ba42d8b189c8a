/**
 * Weft's one error hierarchy. Every error has a stable `code`; the code decides, in one
 * place each, the HTTP problem a client sees ({@link toProblem}) and whether a stage
 * retries or dead-letters ({@link isPermanent}).
 *
 * @module
 */
import {
  ClosedConnectionError,
  ConnectionError,
  DrainingConnectionError,
  NoRespondersError,
  RequestError,
  TimeoutError,
} from "@nats-io/nats-core";
import { JetStreamApiCodes, JetStreamApiError } from "@nats-io/jetstream";
import { StreamReadStalled } from "./stream_reader.ts";

/** Stable error codes. Clients and dead-letter consumers may branch on these. */
export const ErrorCode = {
  /** The request body is not JSON, or not an object. */
  MalformedJson: "malformed_json",
  /** A value does not match its schema; `field` names it as a JSON pointer. */
  InvalidField: "invalid_field",
  /** The body is larger than allowed. */
  PayloadTooLarge: "payload_too_large",
  /** The request's content type is not application/json. */
  UnsupportedMediaType: "unsupported_media_type",
  /** No item with that id. */
  NotFound: "not_found",
  /** An Idempotency-Key was reused with a different request. */
  IdempotencyMismatch: "idempotency_mismatch",
  /** An event on the bus failed validation: poison message. */
  InvalidEvent: "invalid_event",
  /** An event of a schema version this service does not know. */
  UnknownVersion: "unknown_version",
  /** A stage handler failed and may succeed if retried. */
  HandlerFailed: "handler_failed",
  /** A stage handler refused the input for good (bad input, policy). */
  Rejected: "rejected",
  /** NATS or JetStream is unavailable. */
  Unavailable: "unavailable",
  /** Configuration is invalid. */
  InvalidConfig: "invalid_config",
  /** No credential, or one that is not configured. */
  Unauthorized: "unauthorized",
  /** The credential's role may not do this. */
  Forbidden: "forbidden",
  /** The item is not in a state that allows this (already claimed or decided). */
  Conflict: "conflict",
  /**
   * An event on the bus whose body disagrees with its subject (another item id or event
   * type): refused, dead-lettered, and no item is changed or failed by it.
   */
  SubjectMismatch: "subject_mismatch",
  /**
   * A stream is too full to accept new items (past its high-water mark): retry after the
   * Retry-After interval, or grow the stream. Accepted items are never discarded for room.
   */
  InsufficientStorage: "insufficient_storage",
  /** The caller's ingest rate or daily quota is used up: retry after Retry-After. */
  RateLimited: "rate_limited",
  /**
   * An item's event names a step the running definition no longer has (it changed while
   * the item was in flight): dead-lettered, redrivable once a definition has it again.
   */
  DefinitionChanged: "definition_changed",
  /** A loop of a definition would pass its declared bound (`maxIterations`). */
  LoopLimit: "loop_limit",
  /**
   * An awaited event (a person's decision, a callback) whose body is not what its wait step's
   * `schema` describes: refused over HTTP (422 naming the field), dead-lettered from the bus;
   * either way the item keeps waiting for a valid one or its timeout.
   */
  InvalidAwaitedEvent: "invalid_awaited_event",
  /**
   * An item's scratchpad (KV `weft_<pipeline>_scratchpad`) holds what no agent wrote: not a
   * JSON list of entries. The step is dead-lettered at once; delete or fix the key, then redrive.
   */
  InvalidScratchpad: "invalid_scratchpad",
  /** The path exists but not with this method: the answer's `Allow` header lists its methods. */
  MethodNotAllowed: "method_not_allowed",
  /**
   * The request body did not arrive in full within `WEFT_BODY_TIMEOUT_MS` of its request
   * reaching the gateway: nothing was accepted; send it again.
   */
  RequestTimeout: "request_timeout",
} as const;
/** One of {@link ErrorCode}. */
export type ErrorCode = typeof ErrorCode[keyof typeof ErrorCode];

/** Options common to Weft errors. */
export interface WeftErrorOptions extends ErrorOptions {
  /** JSON pointer to the offending field, e.g. `/text` or `/items/3/text`. */
  field?: string;
  /** When true, retrying cannot help. Defaults by code. */
  permanent?: boolean;
  /** Seconds after which a retry may succeed (HTTP `Retry-After`). */
  retryAfterSeconds?: number;
  /**
   * The message is safe to show in a 5xx problem's detail (written for the client, no
   * internals): a 5xx detail is otherwise only its title.
   */
  shown?: boolean;
}

/** The base of every error Weft raises on purpose. */
export class WeftError extends Error {
  /** Stable machine-readable code. */
  readonly code: ErrorCode;
  /** JSON pointer to the offending field, when one is at fault. */
  readonly field?: string;
  /** True when retrying cannot help. */
  readonly permanent: boolean;
  /** Seconds after which a retry may succeed, when known (HTTP `Retry-After`). */
  readonly retryAfterSeconds?: number;
  /** True when the message may be a 5xx problem's detail ({@link WeftErrorOptions.shown}). */
  readonly shown: boolean;

  /** An error with `code`; `options.permanent` defaults by code. */
  constructor(code: ErrorCode, message: string, options: WeftErrorOptions = {}) {
    super(message, options);
    this.name = "WeftError";
    this.code = code;
    this.field = options.field;
    this.permanent = options.permanent ?? PERMANENT_BY_DEFAULT.has(code);
    if (options.retryAfterSeconds !== undefined) this.retryAfterSeconds = options.retryAfterSeconds;
    this.shown = options.shown ?? false;
  }
}

const PERMANENT_BY_DEFAULT: ReadonlySet<ErrorCode> = new Set([
  ErrorCode.MalformedJson,
  ErrorCode.InvalidField,
  ErrorCode.PayloadTooLarge,
  ErrorCode.UnsupportedMediaType,
  ErrorCode.NotFound,
  ErrorCode.IdempotencyMismatch,
  ErrorCode.InvalidEvent,
  ErrorCode.UnknownVersion,
  ErrorCode.Rejected,
  ErrorCode.InvalidConfig,
  ErrorCode.Unauthorized,
  ErrorCode.Forbidden,
  ErrorCode.Conflict,
  ErrorCode.SubjectMismatch,
  ErrorCode.DefinitionChanged,
  ErrorCode.LoopLimit,
  ErrorCode.InvalidAwaitedEvent,
  ErrorCode.InvalidScratchpad,
  ErrorCode.MethodNotAllowed,
]);

/** Input failed validation against its JSON Schema. */
export class ValidationError extends WeftError {
  /** A validation error; its code defaults to `invalid_field`. */
  constructor(message: string, options: WeftErrorOptions & { code?: ErrorCode } = {}) {
    super(options.code ?? ErrorCode.InvalidField, message, options);
    this.name = "ValidationError";
  }
}

/** Nothing is known under the given id. */
export class NotFoundError extends WeftError {
  /** A `not_found` error. */
  constructor(message: string, options: WeftErrorOptions = {}) {
    super(ErrorCode.NotFound, message, options);
    this.name = "NotFoundError";
  }
}

/**
 * Thrown by a stage handler to refuse an input for good: the item is dead-lettered at
 * once, without retries.
 *
 * @example
 * ```ts
 * import { PermanentError } from "./errors.ts";
 * function handle(text: string) {
 *   if (text.length === 0) throw new PermanentError("empty text");
 * }
 * ```
 */
export class PermanentError extends WeftError {
  /** A permanent `rejected` error. */
  constructor(message: string, options: ErrorOptions = {}) {
    super(ErrorCode.Rejected, message, { ...options, permanent: true });
    this.name = "PermanentError";
  }
}

/** The item's state does not allow the action (claimed by another, already decided). */
export class ConflictError extends WeftError {
  constructor(message: string, options: WeftErrorOptions = {}) {
    super(ErrorCode.Conflict, message, options);
    this.name = "ConflictError";
  }
}

/** Configuration is missing or invalid; services refuse to start. */
export class ConfigError extends WeftError {
  /** An `invalid_config` error. */
  constructor(message: string, options: WeftErrorOptions = {}) {
    super(ErrorCode.InvalidConfig, message, options);
    this.name = "ConfigError";
  }
}

/**
 * A new item's publish that NATS did not answer in time (or whose connection went away
 * meanwhile): the item may be stored, now or when the publish still queued in the client
 * lands. Answered 503 `unavailable` with Retry-After like NATS being away, but its problem
 * names the item's `id` and says to retry WITH it: a request with the item's id stores it
 * once, however late the first publish lands; one without makes a second item.
 */
export class OutcomeUnknownError extends WeftError {
  /** The id the item was (or was not) stored under. */
  readonly itemId: string;

  /**
   * The error for item `itemId`, the NATS error as `cause`; `advice` says how to retry it
   * safely (by default: with the id in the body, which stores it once).
   */
  constructor(itemId: string, options: ErrorOptions & { advice?: string } = {}) {
    const { advice, ...rest } = options;
    super(
      ErrorCode.Unavailable,
      `NATS did not confirm storing item ${itemId} in time, so it may be stored: ${
        advice ??
          `retry shortly with "id": ${JSON.stringify(itemId)} in the body, which stores it once`
      }`,
      { ...rest, retryAfterSeconds: 5 },
    );
    this.name = "OutcomeUnknownError";
    this.itemId = itemId;
  }
}

/**
 * True when a publish failed without telling whether the server stored its message: NATS
 * unreachable or slow ({@link isNatsUnavailable}), except the answers that say nothing was
 * stored (no responder, JetStream's own refusal).
 */
export function isOutcomeUnknown(err: unknown): boolean {
  return isNatsUnavailable(err) && !(err instanceof NoRespondersError) &&
    !(err instanceof JetStreamApiError) && !(err instanceof StreamReadStalled) &&
    !(err instanceof Error && err.name === "JetStreamNotEnabled");
}

/**
 * True when `err` is answered with a 5xx that is worth an error log: not NATS being slow or
 * away ({@link isNatsUnavailable}, {@link OutcomeUnknownError}), which the client is told to
 * retry.
 */
export function isServerFault(err: unknown): boolean {
  const problem = toProblem(err);
  // A full stream's 507 is a refusal by design (its alerts are the capacity guard's).
  return problem.status >= 500 && problem.code !== ErrorCode.InsufficientStorage &&
    !isNatsUnavailable(err) && !(err instanceof OutcomeUnknownError);
}

/** True when retrying `err` cannot help. Unknown errors are worth retrying. */
export function isPermanent(err: unknown): boolean {
  return err instanceof WeftError && err.permanent;
}

/** The code of any error: its own for Weft errors, `handler_failed` otherwise. */
export function errorCode(err: unknown): ErrorCode {
  return err instanceof WeftError ? err.code : ErrorCode.HandlerFailed;
}

/** An RFC 9457 problem document. */
export interface Problem {
  /** URI identifying the problem type: `https://weft.dev/problems/<code>`. */
  type: string;
  /** Short human-readable summary of the problem type. */
  title: string;
  /** HTTP status code. */
  status: number;
  /** What went wrong; for 5xx only the title, never internals. */
  detail: string;
  /** Stable machine-readable code. */
  code: ErrorCode;
  /** JSON pointer to the offending field, when one is at fault. */
  field?: string;
  /**
   * The item a 503 may have stored after all (its publish went unanswered): retry the
   * request with this id, which stores the item once.
   */
  id?: string;
}

const HTTP_STATUS: Record<ErrorCode, number> = {
  malformed_json: 400,
  invalid_field: 422,
  payload_too_large: 413,
  unsupported_media_type: 415,
  not_found: 404,
  idempotency_mismatch: 422,
  invalid_event: 422,
  unknown_version: 422,
  handler_failed: 500,
  rejected: 422,
  unavailable: 503,
  invalid_config: 500,
  unauthorized: 401,
  forbidden: 403,
  conflict: 409,
  subject_mismatch: 422,
  insufficient_storage: 507,
  rate_limited: 429,
  definition_changed: 409,
  loop_limit: 422,
  invalid_awaited_event: 422,
  invalid_scratchpad: 500,
  method_not_allowed: 405,
  request_timeout: 408,
};

const TITLES: Record<ErrorCode, string> = {
  malformed_json: "Malformed JSON",
  invalid_field: "Invalid field",
  payload_too_large: "Payload too large",
  unsupported_media_type: "Unsupported media type",
  not_found: "Not found",
  idempotency_mismatch: "An id or Idempotency-Key reused with a different request",
  invalid_event: "Invalid event",
  unknown_version: "Unknown schema version",
  handler_failed: "Internal error",
  rejected: "Rejected",
  unavailable: "Service unavailable",
  invalid_config: "Invalid configuration",
  unauthorized: "Unauthorized",
  forbidden: "Forbidden",
  conflict: "Conflict",
  subject_mismatch: "Event does not match its subject",
  insufficient_storage: "Insufficient storage",
  rate_limited: "Too many requests",
  definition_changed: "The pipeline's definition changed under the item",
  loop_limit: "Loop bound reached",
  invalid_awaited_event: "Invalid awaited event",
  invalid_scratchpad: "Invalid scratchpad",
  method_not_allowed: "Method not allowed",
  request_timeout: "Request body timeout",
};

/**
 * True for the errors a NATS client raises when the server is unreachable or slow: a
 * client sees them as `unavailable` (see {@link fromNatsError}).
 */
export function isNatsUnavailable(err: unknown): boolean {
  return err instanceof TimeoutError || err instanceof ClosedConnectionError ||
    err instanceof ConnectionError || err instanceof DrainingConnectionError ||
    err instanceof NoRespondersError || err instanceof RequestError ||
    // A stream without a leader for a moment (a cluster node died, a new leader is being
    // elected): its publishes find no responder, which nats.js reports as JetStream off
    // (its JetStreamNotEnabled class is not exported from the package's main module).
    (err instanceof Error && err.name === "JetStreamNotEnabled") ||
    // "JetStream system temporarily unavailable"
    (err instanceof JetStreamApiError && err.code === 10008) ||
    // A history read that found no message for its whole stall budget, consumer restarts included.
    err instanceof StreamReadStalled;
}

/**
 * True when `err` is JetStream refusing a write made on a condition of the last sequence
 * (`wrong last sequence`): a KV `create` whose key exists, an `update` whose revision moved.
 * Any other failure of such a write (a timeout, no stream leader) is not this.
 *
 * @example
 * ```ts
 * import { isWrongLastSequence } from "./errors.ts";
 * console.assert(!isWrongLastSequence(new Error("timeout")));
 * ```
 */
export function isWrongLastSequence(err: unknown): boolean {
  return err instanceof JetStreamApiError &&
    (err.code === JetStreamApiCodes.StreamWrongLastSequence ||
      err.code === JetStreamApiCodes.StreamWrongLastSequenceUnknown);
}

/**
 * The error a client is answered for `err`: NATS unreachable or slow
 * ({@link isNatsUnavailable}) is `unavailable` (503, retry after 5 s) carrying it as its
 * cause; any other error is itself. {@link toProblem} applies it, so HTTP and NATS
 * request/reply answer alike.
 */
export function fromNatsError(err: unknown): unknown {
  if (!isNatsUnavailable(err)) return err;
  return new WeftError(ErrorCode.Unavailable, "NATS did not answer; retry shortly", {
    cause: err,
    retryAfterSeconds: 5,
  });
}

/**
 * Maps any error to the problem document the gateway answers with, over HTTP and NATS
 * request/reply alike; NATS being unreachable or slow is `unavailable` ({@link fromNatsError}).
 */
export function toProblem(error: unknown): Problem {
  const err = fromNatsError(error);
  const code = errorCode(err);
  const status = HTTP_STATUS[code];
  const problem: Problem = {
    type: `https://weft.dev/problems/${code}`,
    title: TITLES[code],
    status,
    // 5xx details are logged, never shown (they may carry internals), unless written for it
    // (an unknown outcome's is ours, and tells the client what to do).
    detail: !(err instanceof Error) ||
        (status >= 500 && !(err instanceof WeftError && err.shown) &&
          !(err instanceof OutcomeUnknownError))
      ? TITLES[code]
      : err.message,
    code,
  };
  if (err instanceof WeftError && err.field !== undefined) problem.field = err.field;
  if (err instanceof OutcomeUnknownError) problem.id = err.itemId;
  return problem;
}

/** The reason recorded on a dead letter for `err`. */
export function toDeadLetterReason(err: unknown): { code: ErrorCode; reason: string } {
  const reason = err instanceof Error ? err.message : String(err);
  const field = err instanceof WeftError && err.field ? ` (field ${err.field})` : "";
  return { code: errorCode(err), reason: `${reason}${field}`.slice(0, 2000) };
}
