/**
 * A fake {@link Clock} for tests: `sleep` resolves at once, advances `now` and records the
 * requested delay, so backoff, Retry-After and rate-limit waits are asserted, not slept.
 *
 * @module
 */

import type { Clock } from "../../src/ai/llm/clock.ts";

/**
 * A fake clock with its recorded sleeps.
 *
 * @example
 * ```ts
 * import { createFakeClock } from "./fake_clock.ts";
 * const clock = createFakeClock();
 * await clock.sleep(500);
 * clock.sleeps; // [500]
 * ```
 */
export interface FakeClock extends Clock {
  /** Every delay asked of `sleep`, in order. */
  sleeps: number[];
  /** Moves time forward. */
  advance(ms: number): void;
}

/**
 * Creates a fake clock starting at a whole second.
 *
 * @example
 * ```ts
 * import { createFakeClock } from "./fake_clock.ts";
 * createFakeClock(0).now(); // 0
 * ```
 */
export function createFakeClock(start = 1_800_000_000_000): FakeClock {
  let t = start;
  const sleeps: number[] = [];
  return {
    sleeps,
    now: () => t,
    advance(ms) {
      t += ms;
    },
    sleep(ms, signal) {
      if (signal?.aborted) return Promise.reject(signal.reason);
      sleeps.push(ms);
      t += Math.max(0, ms);
      return Promise.resolve();
    },
  };
}
