/**
 * Canonical JSON: one text per JSON value, whatever the order of its object keys, for
 * comparing documents (is a repeated submission the same one?) and fingerprinting them.
 *
 * The text is RFC 8785's (JCS) for every well-formed value: keys sorted by UTF-16 code
 * units, no whitespace, numbers and strings serialized as `JSON.stringify` does. Written
 * here rather than taken from the `canonicalize` package because JCS refuses strings with
 * a lone UTF-16 surrogate (`"\ud800"`), which `JSON.parse` accepts and `JSON.stringify`
 * writes back as an escape: a submission carrying one was accepted, and its repeat, and any
 * comparison of states holding it, threw. Here such a string is written as `JSON.stringify`
 * writes it (`"\ud800"`, escaped), so it compares equal only to itself.
 *
 * @module
 */
import { createHash } from "node:crypto";

/**
 * The canonical JSON text of `value`; `undefined` for what JSON cannot hold (`undefined`,
 * a function), as `JSON.stringify` does. Object members whose value JSON cannot hold are
 * left out, and array elements become `null`, as `JSON.stringify` does.
 *
 * @example
 * ```ts
 * import { canonicalJson } from "./canonical_json.ts";
 * console.assert(canonicalJson({ b: 1, a: [true, "x"] }) === '{"a":[true,"x"],"b":1}');
 * console.assert(canonicalJson({ text: "\ud800" }) === '{"text":"\\ud800"}');
 * ```
 */
export function canonicalJson(value: unknown): string | undefined {
  if (value !== null && typeof value === "object" && "toJSON" in value) {
    const toJSON = (value as { toJSON: unknown }).toJSON;
    if (typeof toJSON === "function") return canonicalJson(toJSON.call(value));
  }
  if (value === null || typeof value !== "object") return JSON.stringify(value);
  if (Array.isArray(value)) {
    return `[${value.map((v) => canonicalJson(v) ?? "null").join(",")}]`;
  }
  const members: string[] = [];
  for (const key of Object.keys(value).sort()) {
    const v = canonicalJson((value as Record<string, unknown>)[key]);
    if (v !== undefined) members.push(`${JSON.stringify(key)}:${v}`);
  }
  return `{${members.join(",")}}`;
}

/**
 * The SHA-256 (hex) of `value`'s canonical JSON text: one digest per JSON value, whatever
 * its key order or whitespace (a message and its byte-for-byte copy have the same one);
 * `undefined` for what JSON cannot hold.
 *
 * @example
 * ```ts
 * import { canonicalDigest } from "./canonical_json.ts";
 * console.assert(canonicalDigest({ a: 1, b: 2 }) === canonicalDigest({ b: 2, a: 1 }));
 * console.assert(canonicalDigest({ a: 1 }) !== canonicalDigest({ a: 2 }));
 * ```
 */
export function canonicalDigest(value: unknown): string | undefined {
  const text = canonicalJson(value);
  return text === undefined ? undefined : createHash("sha256").update(text).digest("hex");
}
