/**
 * Submission and state lookup over NATS request/reply, for the nats CLI:
 * `nats req weft.feedback.submit '{"text":"..."}'` answers like POST /feedback, and
 * `nats req weft.feedback.get ID` like GET /feedback/ID. Errors answer
 * `{"error": <problem>}` with the same problem document HTTP would send. With API keys
 * configured, a request needs an `Authorization: Bearer <key>` header, as over HTTP.
 *
 * @module
 */
import type { Msg, NatsConnection } from "@nats-io/nats-core";
import { toProblem, ValidationError } from "../errors.ts";
import type { Logger } from "../observability/log.ts";
import { decodeJson } from "../runner.ts";
import { validateDocument } from "../schemas.ts";
import { GET_REQUEST_SUBJECT, SUBMIT_REQUEST_SUBJECT } from "../subjects.ts";
import { parseTraceparent } from "../observability/trace.ts";
import type { Intake } from "./intake.ts";
import type { Auth } from "./auth.ts";
import { Role } from "../config.ts";

const QUEUE = "weft-gateway";

/** Serves the request/reply subjects; errors reply as problem documents. */
export function serveRequests(
  nc: NatsConnection,
  intake: Intake,
  log: Logger,
  auth?: Auth,
): { stop(): void } {
  // With API keys configured, the same roles as over HTTP, from an Authorization header.
  const check = (m: Msg, ...roles: Role[]) =>
    auth?.authorize(m.headers?.get("Authorization"), roles);
  const reply = (m: Msg, work: () => Promise<unknown>) => replyTo(m, log, work);
  const subs = [
    nc.subscribe(SUBMIT_REQUEST_SUBJECT, {
      queue: QUEUE,
      callback: (_e, m) => {
        void reply(m, async () => {
          const who = check(m, Role.Ingest) ?? { name: "anonymous", role: Role.Admin };
          const submission = validateDocument("feedback.submit", decodeJson(m.data));
          const { body } = await intake.submit(submission, {
            idempotencyKey: m.headers?.get("Idempotency-Key") || undefined,
            trace: parseTraceparent(m.headers?.get("traceparent")),
            who,
          });
          return body;
        });
      },
    }),
    nc.subscribe(GET_REQUEST_SUBJECT, {
      queue: QUEUE,
      callback: (_e, m) => {
        void reply(m, () => {
          check(m, Role.Ingest, Role.Reviewer);
          return intake.state(requestedId(m.data));
        });
      },
    }),
  ];
  return { stop: () => subs.forEach((s) => s.unsubscribe()) };
}

/**
 * The item id of a lookup request: the body itself (`nats req weft.feedback.get ID`) or a
 * JSON object's `id`. Malformed JSON or a missing id is a clear error, never a 500.
 */
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

export function requestedId(data: Uint8Array): string {
  const text = new TextDecoder().decode(data).trim();
  if (!text.startsWith("{")) return text;
  const value = decodeJson(data) as { id?: unknown };
  if (typeof value.id !== "string") {
    throw new ValidationError("/id must be a string", { field: "/id" });
  }
  return value.id;
}
