/**
 * Query parameters, validated: a value that is present but not what the parameter takes
 * is a 422 problem naming the parameter, never silently read as a default.
 *
 * @module
 */
import { ValidationError } from "../errors.ts";

/**
 * An integer parameter in `[min, max]` (`min` at least 0), written in decimal digits only:
 * `0x10`, `1e2` or ` 5 ` is refused, never read as 16, 100 or 5; undefined when absent.
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
  const n = /^[0-9]{1,16}$/.test(raw) ? Number(raw) : NaN;
  if (!Number.isSafeInteger(n) || n < min || n > max) {
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

/**
 * A request URL's query parameters as `[name, value]` pairs in their order, decoded strictly:
 * a name or value whose percent-encoding is not UTF-8 (`%C3%28`, a lone surrogate's
 * `%ED%A0%80`, `%zz`) is a 422 problem naming the parameter, never stored with U+FFFD in
 * place of the bytes (as `URLSearchParams` does). `+` is a space, as in a form.
 *
 * @example
 * ```ts
 * import { strictQuery } from "./query.ts";
 * const pairs = strictQuery("http://x/upload?meta.city=S%C3%A3o+Paulo");
 * console.assert(pairs[0]![0] === "meta.city" && pairs[0]![1] === "São Paulo");
 * ```
 */
export function strictQuery(url: string): [string, string][] {
  const query = new URL(url).search.slice(1);
  const pairs: [string, string][] = [];
  for (const part of query.split("&")) {
    if (part === "") continue;
    const eq = part.indexOf("=");
    const rawName = eq < 0 ? part : part.slice(0, eq);
    const name = strictDecode(rawName, rawName);
    pairs.push([name, strictDecode(eq < 0 ? "" : part.slice(eq + 1), name)]);
  }
  return pairs;
}

/** `raw` percent-decoded as UTF-8, or a 422 problem naming `field`. */
function strictDecode(raw: string, field: string): string {
  try {
    return decodeURIComponent(raw.replaceAll("+", " "));
  } catch {
    throw new ValidationError(`${field} is not percent-encoded UTF-8`, { field });
  }
}
