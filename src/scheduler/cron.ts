/**
 * Cron times, the one reading of a cron expression every part of Weft uses (croner, UTC):
 * the scheduler's schedules, a definition's cron delays and their validation. No I/O.
 *
 * @module
 */
import { Cron } from "croner";

/**
 * The next firing of `cron` strictly after `after`, or null when it never comes. Throws on
 * an expression that does not parse.
 *
 * @example
 * ```ts
 * import { nextCronTime } from "./cron.ts";
 * nextCronTime("0 * * * *", new Date("2026-01-01T00:30:00Z")); // 2026-01-01T01:00:00.000Z
 * ```
 */
export function nextCronTime(cron: string, after: Date): Date | null {
  return new Cron(cron, { paused: true, timezone: "UTC" }).nextRun(after);
}

/**
 * The longest wait between the next `count` firings of `cron` after `after`, ms (0 when it
 * fires fewer than twice).
 *
 * @example
 * ```ts
 * import { longestCronGap } from "./cron.ts";
 * longestCronGap("0 0 * * *", new Date("2026-01-01T00:00:00Z")); // 86400000
 * ```
 */
export function longestCronGap(cron: string, after: Date, count = 9): number {
  return Math.max(0, ...cronGaps(cron, after, count));
}

/**
 * The shortest wait between the next `count` firings of `cron` after `after`, ms (0 when it
 * fires fewer than twice). Throws on an expression that does not parse.
 *
 * @example
 * ```ts
 * import { shortestCronGap } from "./cron.ts";
 * shortestCronGap("* * * * * *", new Date("2026-01-01T00:00:00Z")); // 1000
 * shortestCronGap("0 9,10 * * *", new Date("2026-01-01T00:00:00Z")); // 3600000
 * ```
 */
export function shortestCronGap(cron: string, after: Date, count = 16): number {
  const gaps = cronGaps(cron, after, count);
  return gaps.length === 0 ? 0 : Math.min(...gaps);
}

/** The waits between the next `count` firings of `cron` after `after`, ms. */
function cronGaps(cron: string, after: Date, count: number): number[] {
  const runs = new Cron(cron, { paused: true, timezone: "UTC" }).nextRuns(count, after);
  return runs.slice(1).map((r, i) => r.getTime() - runs[i]!.getTime());
}
