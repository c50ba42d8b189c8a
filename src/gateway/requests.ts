/**
 * How the gateway answers NATS requests (`nats req weft.<...> ...`): JSON replies, and
 * `{"error": <problem>}` with the same problem document HTTP would send.
 *
 * @module
 */
import type { Msg } from "@nats-io/nats-core";
import { ErrorCode, isServerFault, toProblem, ValidationError, WeftError } from "../errors.ts";
import type { Logger } from "../observability/log.ts";
import { decodeJson } from "../runner.ts";

/** `WEFT_BODY_LIMIT`'s default: a request subject's limit when its caller names none. */
export const DEFAULT_BODY_LIMIT = 64 * 1024;

/**
 * A request body as JSON, over HTTP (`readJson`) and NATS alike: one that is not UTF-8 JSON
 * is a 400 `malformed_json` problem naming the body (`/`), the same answer on both. With
 * `maxBytes` (a request subject's, the same as its HTTP route's body limit), a larger body is
 * the 413 `payload_too_large` problem HTTP answers, before it is read.
 *
 * @example
 * ```ts
 * import { requestJson } from "./requests.ts";
 * console.assert((requestJson(new TextEncoder().encode('{"id":"a"}')) as { id: string }).id === "a");
 * try {
 *   requestJson(new TextEncoder().encode(JSON.stringify({ text: "x".repeat(2000) })), 1024);
 * } catch (err) {
 *   console.assert((err as { code: string }).code === "payload_too_large");
 * }
 * ```
 */
export function requestJson(data: Uint8Array, maxBytes?: number): unknown {
  if (maxBytes !== undefined && data.length > maxBytes) {
    throw new WeftError(ErrorCode.PayloadTooLarge, `body is larger than ${maxBytes} bytes`);
  }
  try {
    return decodeJson(data);
  } catch (err) {
    // Valid JSON holding a number it cannot keep names the field (422); else it is no JSON.
    if (err instanceof ValidationError && err.code === ErrorCode.InvalidField) throw err;
    throw new ValidationError((err as Error).message, {
      code: ErrorCode.MalformedJson,
      field: "/",
      cause: err,
    });
  }
}

/** The server's max_payload when a connection does not say (nats-server's default, 1 MB). */
export const DEFAULT_MAX_PAYLOAD = 1024 * 1024;

const encoder = new TextEncoder();
const byteLength = (text: string) => encoder.encode(text).length;

/**
 * `value` as a JSON reply of at most `maxPayload` bytes (a connection's
 * `nc.info.max_payload`). One that fits is sent whole. One that would not has its top-level
 * arrays cut to the first elements that fit, in field order, and says so with
 * `"truncated": true` and `hint` (how to ask for less: a filter or a limit); the other fields
 * (a list's `total`, a redrive's counts) stay whole. Never an answer past max_payload, which
 * nats.js refuses to send, so a request whose work was done never answers 500.
 *
 * @example
 * ```ts
 * import { fitReply } from "./requests.ts";
 * const value = { items: ["a".repeat(60), "b".repeat(60)], total: 2 };
 * const reply = JSON.parse(fitReply(value, 130, "ask for fewer"));
 * console.assert(reply.truncated === true && reply.items.length === 1 && reply.total === 2);
 * ```
 */
export function fitReply(value: unknown, maxPayload: number, hint?: string): string {
  const whole = JSON.stringify(value);
  if (byteLength(whole) <= maxPayload) return whole;
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    return JSON.stringify({ truncated: true, hint: hint ?? "the answer passes max_payload" });
  }
  const out: Record<string, unknown> = {
    ...value as Record<string, unknown>,
    truncated: true,
    hint: hint ?? `only what fits the server's max_payload (${maxPayload} bytes); ask for less`,
  };
  const arrays = Object.entries(out).filter((e): e is [string, unknown[]] => Array.isArray(e[1]));
  for (const [k] of arrays) out[k] = [];
  let size = byteLength(JSON.stringify(out));
  if (size > maxPayload) return JSON.stringify({ truncated: true, hint: out.hint });
  for (const [k, all] of arrays) {
    const kept = out[k] as unknown[];
    for (const item of all) {
      const more = byteLength(JSON.stringify(item) ?? "null") + (kept.length > 0 ? 1 : 0);
      if (size + more > maxPayload) break;
      kept.push(item);
      size += more;
    }
  }
  return JSON.stringify(out);
}

/** A connection's max_payload, or nats-server's default before it has said. */
export function maxPayloadOf(nc: { info?: { max_payload: number } }): number {
  return nc.info?.max_payload ?? DEFAULT_MAX_PAYLOAD;
}

/**
 * Answers request `m` with what `work` returns as JSON, cut to fit `maxPayload` (see
 * {@link fitReply}), or `{"error": <problem>}` with the problem HTTP would answer (NATS slow
 * or away is 503 `unavailable`, see toProblem); a 5xx of Weft's own (isServerFault) is
 * logged. Every request subject answers this way.
 */
export async function replyTo(
  m: Msg,
  log: Logger,
  work: () => Promise<unknown>,
  maxPayload = DEFAULT_MAX_PAYLOAD,
  hint?: string,
): Promise<void> {
  try {
    m.respond(fitReply(await work(), maxPayload, hint));
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
