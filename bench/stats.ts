/**
 * Pure helpers of `deno task bench`: percentiles, clock-paced sending, and the offset
 * between this process's clock and a load generator's.
 *
 * @module
 */

/**
 * The `q` quantile (0..1) of an ascending array, nearest-rank: the smallest value with at
 * least `q` of the values at or below it. NaN for an empty array.
 *
 * @example
 * ```ts
 * import { percentile } from "./stats.ts";
 * console.assert(percentile([1, 2, 3, 4], 0.5) === 2);
 * console.assert(percentile([1, 2, 3, 4], 0.99) === 4);
 * ```
 */
export function percentile(sorted: readonly number[], q: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]!;
}

/**
 * How many of `total` sends are due `elapsedMs` after the start of a run paced by the
 * clock at `perS` sends a second: send `k` (0-based) is due at `k * 1000 / perS` ms, so the
 * first is due at once.
 *
 * @example
 * ```ts
 * import { dueSends } from "./stats.ts";
 * console.assert(dueSends(0, 500, 100) === 1);
 * console.assert(dueSends(10, 500, 100) === 6);
 * console.assert(dueSends(1e6, 500, 100) === 100);
 * ```
 */
export function dueSends(elapsedMs: number, perS: number, total: number): number {
  return Math.min(total, Math.floor((elapsedMs * perS) / 1000) + 1);
}

/** One clock probe: our time before asking, the other clock's answer, our time after. */
export interface ClockSample {
  sentAt: number;
  remote: number;
  receivedAt: number;
}

/**
 * The other clock minus ours, from the probe with the shortest round trip (the answer
 * assumed taken half-way): subtract it from a remote time to get ours.
 *
 * @example
 * ```ts
 * import { clockOffset } from "./stats.ts";
 * const off = clockOffset([
 *   { sentAt: 0, remote: 105, receivedAt: 10 },
 *   { sentAt: 20, remote: 121, receivedAt: 22 },
 * ]);
 * console.assert(off === 100);
 * ```
 */
export function clockOffset(samples: readonly ClockSample[]): number {
  if (samples.length === 0) throw new RangeError("clockOffset needs at least one sample");
  let best = samples[0]!;
  for (const s of samples) {
    if (s.receivedAt - s.sentAt < best.receivedAt - best.sentAt) best = s;
  }
  return best.remote - (best.sentAt + best.receivedAt) / 2;
}
