/**
 * Query parameters, validated: a value that is present but not what the parameter takes
 * is a 422 problem naming the parameter, never silently read as a default.
 *
 * @module
 */
import { ValidationError } from "../errors.ts";

/**
 * An integer parameter in `[min, max]`; undefined when absent.
 *
 * @example
 * ```ts
 * import { intQuery } from "./query.ts";
 * console.assert(intQuery("20", "limit", 1, 100) === 20);
 * console.assert(intQuery(undefined, "limit", 1, 100) === undefined);
 * ```
 */
export function intQuery(
  raw: string | undefined,
  name: string,
  min: number,
  max: number,
): number | undefined {
  if (raw === undefined) return undefined;
  const n = Number(raw);
  if (raw.trim() === "" || !Number.isSafeInteger(n) || n < min || n > max) {
    throw new ValidationError(`${name} must be an integer from ${min} to ${max}`, {
      field: name,
    });
  }
  return n;
}

/**
 * A boolean parameter, `true` or `false`; undefined when absent.
 *
 * @example
 * ```ts
 * import { boolQuery } from "./query.ts";
 * console.assert(boolQuery("true", "pending") === true);
 * ```
 */
export function boolQuery(raw: string | undefined, name: string): boolean | undefined {
  if (raw === undefined) return undefined;
  if (raw === "true") return true;
  if (raw === "false") return false;
  throw new ValidationError(`${name} must be true or false`, { field: name });
}

/**
 * Refuses a parameter the route does not take (a 422 naming it), instead of ignoring it:
 * `limit` on a route that has no limit would otherwise look honoured.
 *
 * @example
 * ```ts
 * import { onlyQuery } from "./query.ts";
 * onlyQuery({ status: "pending" }, ["status"]);
 * ```
 */
export function onlyQuery(query: Record<string, string>, known: readonly string[]): void {
  for (const name of Object.keys(query)) {
    if (!known.includes(name)) {
      throw new ValidationError(
        `unknown query parameter ${name}; this route takes ${known.join(", ") || "none"}`,
        { field: name },
      );
    }
  }
}

/**
 * The one value of a parameter that takes one (`c.req.queries(name)`); undefined when
 * absent. Repeated, it is a 422 problem naming it: reading only the first (or the last)
 * would silently drop the others.
 *
 * @example
 * ```ts
 * import { oneQuery } from "./query.ts";
 * console.assert(oneQuery(["processed"], "type") === "processed");
 * console.assert(oneQuery(undefined, "type") === undefined);
 * ```
 */
export function oneQuery(values: readonly string[] | undefined, name: string): string | undefined {
  if (values === undefined || values.length === 0) return undefined;
  if (values.length > 1) {
    throw new ValidationError(`${name} takes one value, not ${values.length}`, { field: name });
  }
  return values[0];
}
