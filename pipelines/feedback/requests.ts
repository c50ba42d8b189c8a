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
import type { Logger } from "../../src/observability/log.ts";
import { validateDocument } from "../../src/schemas.ts";
import { GET_REQUEST_SUBJECT, SUBMIT_REQUEST_SUBJECT } from "./subjects.ts";
import { parseTraceparent } from "../../src/observability/trace.ts";
import type { Auth } from "../../src/gateway/auth.ts";
import { Role } from "../../src/config.ts";
import {
  DEFAULT_BODY_LIMIT,
  replyTo,
  requestedId,
  requestJson,
} from "../../src/gateway/requests.ts";
import type { Intake } from "./intake.ts";
import { idempotencyKey } from "../../src/gateway/idempotency_key.ts";

const QUEUE = "weft-gateway";

/**
 * Serves the request/reply subjects; errors reply as problem documents. A submission larger
 * than `bodyLimit` (`WEFT_BODY_LIMIT`, as POST /feedback) is the same 413.
 */
export function serveRequests(
  nc: NatsConnection,
  intake: Intake,
  log: Logger,
  auth?: Auth,
  bodyLimit: number = DEFAULT_BODY_LIMIT,
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
          const submission = validateDocument("feedback.submit", requestJson(m.data, bodyLimit));
          const { body } = await intake.submit(submission, {
            // Present but empty is refused (422), as over HTTP; absent is no key.
            idempotencyKey: idempotencyKey(m.headers?.values("Idempotency-Key")),
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
