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
  const runs = new Cron(cron, { paused: true, timezone: "UTC" }).nextRuns(count, after);
  let longest = 0;
  for (let i = 1; i < runs.length; i++) {
    longest = Math.max(longest, runs[i]!.getTime() - runs[i - 1]!.getTime());
  }
  return longest;
}
