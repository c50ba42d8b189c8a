/**
 * A per-stage token-bucket rate limiter that can also be paused (after an HTTP 429 with
 * Retry-After, every caller of the stage waits, not just the one that got the 429).
 *
 * Written by hand rather than taken from npm: it must wait on an injected {@link Clock}
 * (so tests never really sleep), be abortable per waiter, and support `pauseUntil`; the
 * small npm limiters do not offer all three, and the logic is ~40 lines.
 *
 * @module
 */

import { type Clock, systemClock } from "./clock.ts";

/**
 * Rate limit of one stage.
 *
 * @example
 * ```ts
 * import type { RateLimitOptions } from "./rate_limit.ts";
 * const o: RateLimitOptions = { requestsPerSecond: 5, burst: 10 };
 * ```
 */
export interface RateLimitOptions {
  /** Sustained requests per second (the refill rate). */
  requestsPerSecond: number;
  /** Bucket size: requests allowed at once after idling. Default 1. */
  burst?: number;
}

/**
 * Hands out permission to send one request.
 *
 * @example
 * ```ts
 * import { createRateLimiter } from "./rate_limit.ts";
 * const limiter = createRateLimiter({ requestsPerSecond: 2, burst: 2 });
 * await limiter.acquire();
 * ```
 */
export interface RateLimiter {
  /** Waits for a token (and for any pause to end); rejects when `signal` aborts. */
  acquire(signal?: AbortSignal): Promise<void>;
  /** Holds every `acquire` until the given time (ms since epoch); later pauses win. */
  pauseUntil(timeMs: number): void;
}

/**
 * Creates a token bucket. Without options (or with a non-positive rate), `acquire` only
 * honours pauses.
 *
 * @example
 * ```ts
 * import { createRateLimiter } from "./rate_limit.ts";
 * const limiter = createRateLimiter({ requestsPerSecond: 1 });
 * limiter.pauseUntil(Date.now() + 1000); // e.g. after a 429 with Retry-After: 1
 * ```
 */
export function createRateLimiter(
  options: RateLimitOptions | undefined,
  clock: Clock = systemClock,
): RateLimiter {
  const rate = options?.requestsPerSecond ?? 0;
  const capacity = Math.max(1, options?.burst ?? 1);
  let tokens = capacity;
  let last = clock.now();
  let pausedUntil = 0;

  const refill = (now: number) => {
    if (rate > 0) tokens = Math.min(capacity, tokens + ((now - last) / 1000) * rate);
    last = now;
  };

  return {
    async acquire(signal?: AbortSignal): Promise<void> {
      for (;;) {
        signal?.throwIfAborted();
        const now = clock.now();
        if (pausedUntil > now) {
          await clock.sleep(pausedUntil - now, signal);
          continue;
        }
        if (rate <= 0) return;
        refill(now);
        if (tokens >= 1) {
          tokens -= 1;
          return;
        }
        await clock.sleep(Math.ceil(((1 - tokens) / rate) * 1000), signal);
      }
    },
    pauseUntil(timeMs: number): void {
      pausedUntil = Math.max(pausedUntil, timeMs);
    },
  };
}

/**
 * The longest `Retry-After` honoured, in ms (60 s): a larger one (a misbehaving server's
 * `Retry-After: 1000000000`) is read as this, so one header cannot stall a stage.
 *
 * @example
 * ```ts
 * import { MAX_RETRY_AFTER_MS } from "./rate_limit.ts";
 * MAX_RETRY_AFTER_MS; // 60000
 * ```
 */
export const MAX_RETRY_AFTER_MS = 60_000;

/**
 * Parses an HTTP `Retry-After` value (delay in seconds, or an HTTP-date) into a delay in
 * ms from `nowMs`. Returns `undefined` when absent or unreadable; never negative, and never
 * more than {@link MAX_RETRY_AFTER_MS}.
 *
 * @example
 * ```ts
 * import { parseRetryAfter } from "./rate_limit.ts";
 * parseRetryAfter("2", 0); // 2000
 * parseRetryAfter("Wed, 21 Oct 2015 07:28:00 GMT", Date.parse("Wed, 21 Oct 2015 07:27:58 GMT")); // 2000
 * ```
 */
export function parseRetryAfter(
  value: string | null | undefined,
  nowMs: number,
): number | undefined {
  if (value === null || value === undefined) return undefined;
  const v = value.trim();
  if (v === "") return undefined;
  if (/^\d+(\.\d+)?$/.test(v)) return Math.min(MAX_RETRY_AFTER_MS, Math.round(Number(v) * 1000));
  const date = Date.parse(v);
  if (Number.isNaN(date)) return undefined;
  return Math.min(MAX_RETRY_AFTER_MS, Math.max(0, date - nowMs));
}
