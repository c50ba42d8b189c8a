/**
 * The likely intended name of a mistyped one (a flag, a field, a kind), for a refusal's
 * "did you mean ...?" hint.
 *
 * @module
 */

/** Levenshtein distance, written here: a dozen lines against a dependency for one hint. */
function distance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const row = [i];
    for (let j = 1; j <= b.length; j++) {
      row[j] = Math.min(
        prev[j]! + 1,
        row[j - 1]! + 1,
        prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1),
      );
    }
    prev = row;
  }
  return prev[b.length]!;
}

/**
 * The one of `known` closest to `name`, when at most `maxDistance` edits away (a likely
 * typo); `undefined` otherwise.
 *
 * @example
 * ```ts
 * import { closest } from "./did_you_mean.ts";
 * console.assert(closest("nxt", ["next", "emits"]) === "next");
 * console.assert(closest("colour", ["next", "emits"]) === undefined);
 * ```
 */
export function closest(
  name: string,
  known: Iterable<string>,
  maxDistance = 2,
): string | undefined {
  const near = [...known].map((k) => ({ k, d: distance(name, k) })).sort((a, b) => a.d - b.d)[0];
  return near && near.d <= maxDistance ? near.k : undefined;
}
