/**
 * How the gateway answers NATS requests (`nats req weft.<...> ...`): JSON replies, and
 * `{"error": <problem>}` with the same problem document HTTP would send.
 *
 * @module
 */
import type { Msg } from "@nats-io/nats-core";
import { ErrorCode, isServerFault, toProblem, ValidationError } from "../errors.ts";
import type { Logger } from "../observability/log.ts";
import { decodeJson } from "../runner.ts";

/**
 * A request body as JSON, over HTTP (`readJson`) and NATS alike: one that is not UTF-8 JSON
 * is a 400 `malformed_json` problem naming the body (`/`), the same answer on both.
 *
 * @example
 * ```ts
 * import { requestJson } from "./requests.ts";
 * console.assert((requestJson(new TextEncoder().encode('{"id":"a"}')) as { id: string }).id === "a");
 * ```
 */
export function requestJson(data: Uint8Array): unknown {
  try {
    return decodeJson(data);
  } catch (err) {
    throw new ValidationError((err as Error).message, {
      code: ErrorCode.MalformedJson,
      field: "/",
      cause: err,
    });
  }
}

/**
 * Answers request `m` with what `work` returns as JSON, or `{"error": <problem>}` with the
 * problem HTTP would answer (NATS slow or away is 503 `unavailable`, see toProblem); a 5xx
 * of Weft's own (isServerFault) is logged. Every request subject answers this way.
 */
export async function replyTo(m: Msg, log: Logger, work: () => Promise<unknown>): Promise<void> {
  try {
    m.respond(JSON.stringify(await work()));
  } catch (err) {
    if (isServerFault(err)) log.error("request failed", { subject: m.subject, err });
    m.respond(JSON.stringify({ error: toProblem(err) }));
  }
}

/**
 * The item id of a lookup request: the body itself (`nats req weft.<pipeline>.get ID`) or a
 * JSON object's `id`. Malformed JSON or a missing id is a clear error, never a 500.
 */
export function requestedId(data: Uint8Array): string {
  const text = new TextDecoder().decode(data).trim();
  if (!text.startsWith("{")) return text;
  const value = requestJson(data) as { id?: unknown };
  if (typeof value.id !== "string") {
    throw new ValidationError("/id must be a string", { field: "/id" });
  }
  return value.id;
}
