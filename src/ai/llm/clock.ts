/**
 * A time source the LLM path reads and waits on, injectable so tests can run backoff,
 * Retry-After and rate-limit waits without real sleeps.
 *
 * @module
 */

/**
 * Reads the time and waits.
 *
 * @example
 * ```ts
 * import { systemClock } from "./clock.ts";
 * await systemClock.sleep(10);
 * systemClock.now(); // ms since the epoch
 * ```
 */
export interface Clock {
  /** Milliseconds since the epoch. */
  now(): number;
  /** Resolves after `ms`; rejects with `signal.reason` when the signal aborts first. */
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

/**
 * The real clock: `Date.now()` and `setTimeout`, with the timer cleared on abort.
 *
 * @example
 * ```ts
 * import { systemClock } from "./clock.ts";
 * const c = new AbortController();
 * const p = systemClock.sleep(60_000, c.signal);
 * c.abort(new Error("stop"));
 * await p.catch(() => {}); // rejected at once, no timer left behind
 * ```
 */
export const systemClock: Clock = {
  now: () => Date.now(),
  sleep(ms: number, signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (ms <= 0) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      const onAbort = () => {
        clearTimeout(timer);
        reject(signal?.reason);
      };
      const timer = setTimeout(() => {
        signal?.removeEventListener("abort", onAbort);
        resolve();
      }, ms);
      signal?.addEventListener("abort", onAbort, { once: true });
    });
  },
};
