/**
 * What every item state shares, whatever its pipeline: the earliest event a state records
 * (where a replay of its events starts) and its first and last times, by stream sequence.
 * Each hand-wired pipeline's fold (`pipelines/<name>/state.ts`) builds on
 * them; folds are pure, idempotent and order-insensitive, ordered by stream sequences only,
 * never by the times producers wrote.
 *
 * @module
 */

/**
 * The stream sequence of the earliest event a state records (any pipeline's), or
 * undefined when it records none. An item's events all come after it in its stream, so
 * replaying from there replays them all without reading what came before.
 *
 * @example
 * ```ts
 * import { firstEventSeq } from "./state.ts";
 * const stages = { ingested: { seq: 40 }, sentiment_analyzed: { seq: 42 } };
 * console.assert(firstEventSeq({ stages }) === 40);
 * ```
 */
export function firstEventSeq(
  state: { stages: Record<string, { seq: number }> },
): number | undefined {
  let first: number | undefined;
  for (const { seq } of Object.values(state.stages)) {
    if (seq > 0 && (first === undefined || seq < first)) first = seq;
  }
  return first;
}

/**
 * Sets `created_at` and `updated_at` to the times of the item's first and last stored
 * events, by stream sequence: a producer's clock (or a forged date) can move them only
 * until the next event, never lock them.
 */
export function spanTimes(
  state: {
    created_at: string;
    updated_at: string;
    stages: Record<string, { at: string; seq: number }>;
  },
): void {
  let first: { at: string; seq: number } | undefined;
  let last: { at: string; seq: number } | undefined;
  for (const stage of Object.values(state.stages)) {
    if (!first || stage.seq < first.seq) first = stage;
    if (!last || stage.seq > last.seq) last = stage;
  }
  if (first) state.created_at = first.at;
  if (last) state.updated_at = last.at;
}
