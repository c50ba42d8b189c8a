/**
 * The one Idempotency-Key of a request, over HTTP and NATS alike. A repeated header is a 422
 * problem naming it, never read as one key: HTTP (the Fetch `Headers` every runtime hands
 * the gateway) joins repeated headers into one value with ", ", so two keys `A` and `B`
 * would otherwise become the key `A, B`. As the repeat cannot be told from the joined value,
 * a key may not contain a comma.
 *
 * @module
 */
import { ValidationError } from "../errors.ts";

/** The header's name, as problems name it. */
const HEADER = "Idempotency-Key";

/**
 * The request's Idempotency-Key from the values it arrived with (HTTP: the one, perhaps
 * joined, value of `Headers.get`; NATS: `msg.headers.values(...)`), undefined when absent.
 * More than one value, or a comma in it, is a 422 problem naming the header.
 *
 * @example
 * ```ts
 * import { idempotencyKey } from "./idempotency_key.ts";
 * console.assert(idempotencyKey(["order-7"]) === "order-7");
 * console.assert(idempotencyKey(undefined) === undefined);
 * try {
 *   idempotencyKey(["A, B"]);
 * } catch (err) {
 *   console.assert((err as { field: string }).field === "Idempotency-Key");
 * }
 * ```
 */
export function idempotencyKey(
  values: readonly (string | null | undefined)[] | undefined,
): string | undefined {
  const present = (values ?? []).filter((v): v is string => typeof v === "string");
  if (present.length === 0) return undefined;
  if (present.length > 1 || present[0]!.includes(",")) {
    throw new ValidationError(
      `${HEADER} takes one value: send it once (repeated headers arrive joined by commas, so a key may not contain one)`,
      { field: HEADER },
    );
  }
  return present[0];
}
