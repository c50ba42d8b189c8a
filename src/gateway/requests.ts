/**
 * How the gateway answers NATS requests (`nats req weft.<...> ...`): JSON replies, and
 * `{"error": <problem>}` with the same problem document HTTP would send.
 *
 * @module
 */
import type { Msg } from "@nats-io/nats-core";
import { toProblem, ValidationError } from "../errors.ts";
import type { Logger } from "../observability/log.ts";
import { decodeJson } from "../runner.ts";

/**
 * Answers request `m` with what `work` returns as JSON, or `{"error": <problem>}`; a 5xx
 * problem is logged. Every request subject answers this way.
 */
export async function replyTo(m: Msg, log: Logger, work: () => Promise<unknown>): Promise<void> {
  try {
    m.respond(JSON.stringify(await work()));
  } catch (err) {
    const problem = toProblem(err);
    if (problem.status >= 500) log.error("request failed", { subject: m.subject, err });
    m.respond(JSON.stringify({ error: problem }));
  }
}

/**
 * The item id of a lookup request: the body itself (`nats req weft.<pipeline>.get ID`) or a
 * JSON object's `id`. Malformed JSON or a missing id is a clear error, never a 500.
 */
export function requestedId(data: Uint8Array): string {
  const text = new TextDecoder().decode(data).trim();
  if (!text.startsWith("{")) return text;
  const value = decodeJson(data) as { id?: unknown };
  if (typeof value.id !== "string") {
    throw new ValidationError("/id must be a string", { field: "/id" });
  }
  return value.id;
}
