/**
 * Parses a model's content as JSON and validates it against a JSON Schema (Ajv), giving a
 * readable error to quote in the repair request when it does not fit.
 *
 * @module
 */

import { depthWithin, MAX_DEPTH } from "../../runner.ts";
import { Ajv } from "ajv";

const ajv = new Ajv({ allErrors: true, strict: false });

/**
 * The outcome of checking one answer.
 *
 * @example
 * ```ts
 * import type { OutputCheck } from "./output.ts";
 * const bad: OutputCheck<unknown> = { ok: false, reason: "json", error: "not valid JSON: ..." };
 * ```
 */
export type OutputCheck<T> =
  | { ok: true; value: T }
  | {
    ok: false;
    /** What to quote in the repair request (a JSON error may quote the content). */
    error: string;
    /** `"json"`: not parseable; `"schema"`: parsed but does not match. */
    reason: "json" | "schema";
    /** A wrong shape: the JSON pointer of the answer's first field at fault (`/` for all). */
    field?: string;
  };

/**
 * Checks model content against one schema.
 *
 * @example
 * ```ts
 * import { createOutputValidator } from "./output.ts";
 * const check = createOutputValidator<{ a: number }>({ type: "object", required: ["a"] });
 * check('{"a": 1}'); // { ok: true, value: { a: 1 } }
 * ```
 */
export type OutputValidator<T> = (content: string) => OutputCheck<T>;

/**
 * Compiles a validator. Content wrapped in a single ```json fence is unwrapped first (some
 * models do that even in JSON mode).
 *
 * @example
 * ```ts
 * import { createOutputValidator } from "./output.ts";
 * const check = createOutputValidator({ type: "object", properties: { label: { enum: ["x"] } } });
 * check("nope").ok; // false
 * ```
 */
export function createOutputValidator<T>(schema: Record<string, unknown>): OutputValidator<T> {
  const validate = ajv.compile(schema);
  return (content) => {
    let value: unknown;
    try {
      value = JSON.parse(unfence(content));
    } catch (e) {
      return {
        ok: false,
        reason: "json",
        error: `not valid JSON: ${e instanceof Error ? e.message : String(e)}`,
      };
    }
    // An answer nested deeper than any event may hold could not be published anyway, and
    // walking it (the schema check, the cache's key) would overflow the stack: refused here,
    // as a wrong shape is (one repair request, then the call fails with the reason).
    if (!depthWithin(value, MAX_DEPTH)) {
      return {
        ok: false,
        reason: "schema",
        error: `nests deeper than ${MAX_DEPTH} levels`,
        field: "/",
      };
    }
    // A lone UTF-16 surrogate in a string (`"\ud83d"`, which JSON.parse takes) would ride on
    // into events and item state, where strict JSON readers (jq, serde) refuse it: replaced
    // with U+FFFD, as a well-formed string has it.
    value = wellFormed(value);
    if (!validate(value)) {
      return {
        ok: false,
        reason: "schema",
        error: `does not match the schema: ${ajv.errorsText(validate.errors, { dataVar: "$" })}`,
        field: fieldOf(validate.errors?.[0]),
      };
    }
    return { ok: true, value: value as T };
  };
}

/**
 * The JSON pointer of the field an Ajv error is about: its instance path, and for a missing or
 * unknown property that property (`/label` for "must have required property 'label'").
 */
function fieldOf(
  e: { instancePath: string; params: Record<string, unknown> } | undefined,
): string {
  if (!e) return "/";
  const name = e.params.missingProperty ?? e.params.additionalProperty;
  const path = typeof name === "string"
    ? `${e.instancePath}/${name.replaceAll("~", "~0").replaceAll("/", "~1")}`
    : e.instancePath;
  return path || "/";
}

/** `value` with every string (keys included) well-formed UTF-16 (depth already bounded). */
function wellFormed(value: unknown): unknown {
  if (typeof value === "string") return value.isWellFormed() ? value : value.toWellFormed();
  if (value === null || typeof value !== "object") return value;
  if (Array.isArray(value)) return value.map(wellFormed);
  return Object.fromEntries(
    Object.entries(value).map(([k, v]) => [wellFormed(k) as string, wellFormed(v)]),
  );
}

function unfence(content: string): string {
  const m = /^\s*```(?:json)?\s*\n([\s\S]*?)\n?```\s*$/i.exec(content);
  return m?.[1] ?? content;
}
