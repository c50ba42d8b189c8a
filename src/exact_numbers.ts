/**
 * JSON numbers that a JavaScript number cannot hold: `1e400` parses to `Infinity` (and
 * `JSON.stringify` then writes `null`), and an integer past 2^53 such as
 * `12345678901234567890123` (or `...123.0`) parses to the nearest double
 * (`1.2345678901234568e+22`). Either would be stored as another value than the one sent, so
 * bodies holding one are refused rather than rewritten. A float's rounding (`0.1`, or any
 * number written with an exponent) is JSON's ordinary meaning, not refused.
 *
 * Hand-written rather than a library: it needs only `JSON.parse`'s source text access (the
 * reviver's third argument, in V8 since 11.4), and it runs on every message a stage decodes,
 * so a cheap scan skips the reviver for the bodies that cannot hold such a number (no run of
 * 16 digits, no exponent of 3 digits).
 *
 * @module
 */

/** A body may hold an inexact number only if it has one of these. */
const SUSPECT = /\d{16}|[eE]\+?\d{3}/;
/** An integer as written: digits, or digits and a fraction of zeros (`9007199254740993.0`). */
const INTEGER = /^(-?\d+)(?:\.0+)?$/;

/** Where the first inexact number of a JSON text is, and how it was written. */
export interface InexactNumber {
  /** JSON Pointer of the number (`""` for the whole body, shown as `/`). */
  pointer: string;
  /** The number as the text wrote it (its first 40 characters). */
  source: string;
}

/**
 * The first number in `text` (valid JSON) that a JavaScript number does not hold exactly, or
 * undefined. Text nested too deep for a reviver is left to the depth limit that refuses it.
 *
 * @example
 * ```ts
 * import { inexactNumber } from "./exact_numbers.ts";
 * console.assert(inexactNumber('{"a":[1e400]}')?.pointer === "/a/0");
 * console.assert(inexactNumber('{"n":12345678901234567890123}')?.pointer === "/n");
 * console.assert(inexactNumber('{"n":9007199254740992,"f":0.1,"e":1e300}') === undefined);
 * ```
 */
export function inexactNumber(text: string): InexactNumber | undefined {
  if (!SUSPECT.test(text)) return undefined;
  const marker = {};
  let source: string | undefined;
  let parsed: unknown;
  try {
    parsed = (JSON.parse as (t: string, r: Reviver) => unknown)(text, (_key, value, context) => {
      if (
        source === undefined && typeof value === "number" && context?.source !== undefined &&
        !exact(value, context.source)
      ) {
        source = context.source;
        return marker;
      }
      return value;
    });
  } catch {
    return undefined; // a reviver recurses: nesting this deep is refused by the depth limit
  }
  if (source === undefined) return undefined;
  return { pointer: pointerOf(parsed, marker), source: source.slice(0, 40) };
}

type Reviver = (key: string, value: unknown, context?: { source?: string }) => unknown;

/** Whether `value`, parsed from `source`, is the number the text wrote. */
function exact(value: number, source: string): boolean {
  if (!Number.isFinite(value)) return false;
  if (Number.isSafeInteger(value)) return true;
  const integer = INTEGER.exec(source);
  // Written with an exponent or a fraction, a number is a float: rounded as JSON's are.
  return !integer || BigInt(integer[1]!) === BigInt(value);
}

/** The JSON Pointer of `target` in `root` (iterative: any depth). */
function pointerOf(root: unknown, target: object): string {
  const stack: [unknown, string][] = [[root, ""]];
  while (stack.length > 0) {
    const [v, at] = stack.pop()!;
    if (v === target) return at;
    if (v === null || typeof v !== "object") continue;
    for (const [k, child] of Object.entries(v)) {
      stack.push([child, `${at}/${k.replaceAll("~", "~0").replaceAll("/", "~1")}`]);
    }
  }
  return "";
}
