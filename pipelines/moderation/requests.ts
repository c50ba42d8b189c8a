/**
 * Content moderation over NATS request/reply, answering like the HTTP routes:
 *
 * - `weft.content.submit` `{"text": ...}` and `weft.content.get` `ID`
 * - `weft.reviews.list` `{"status": "pending"}`, `weft.reviews.claim` `{"id", "reviewer"?}`,
 *   `weft.reviews.decide` `{"id", "decision", "reason", "reviewer"?}`
 *
 * When API keys are configured a request carries one in an `Authorization: Bearer <key>`
 * header, with the same roles as HTTP. Errors answer `{"error": <problem>}`.
 *
 * @module
 */
import type { Msg, NatsConnection } from "@nats-io/nats-core";
import { Role } from "../../src/config.ts";
import { ValidationError } from "../../src/errors.ts";
import type { Logger } from "../../src/observability/log.ts";
import { claimBody, type ModerationApi, refuseIdempotencyKey } from "./api.ts";
import { ReviewStatus } from "./review_queue.ts";
import { validateDocument } from "../../src/schemas.ts";
import {
  CONTENT_GET_REQUEST_SUBJECT,
  CONTENT_SUBMIT_REQUEST_SUBJECT,
  REVIEWS_CLAIM_REQUEST_SUBJECT,
  REVIEWS_DECIDE_REQUEST_SUBJECT,
  REVIEWS_LIST_REQUEST_SUBJECT,
} from "./subjects.ts";
import { parseTraceparent } from "../../src/observability/trace.ts";
import type { Auth, Principal } from "../../src/gateway/auth.ts";
import { DEFAULT_BODY_LIMIT, replyTo, requestJson } from "../../src/gateway/requests.ts";

const QUEUE = "weft-gateway";
/** Largest body of a claim and of a decision, bytes: their HTTP routes' limits. */
const CLAIM_BODY_LIMIT = 4096;
const DECISION_BODY_LIMIT = 16 * 1024;

function idOf(m: Msg): string {
  const text = m.string().trim();
  if (!text.startsWith("{")) return text;
  const id = (requestJson(m.data) as { id?: unknown }).id;
  if (typeof id !== "string") throw new ValidationError("/id is required", { field: "/id" });
  return id;
}

function objectOf(m: Msg, maxBytes?: number): Record<string, unknown> {
  if (m.data.length === 0) return {};
  const v = requestJson(m.data, maxBytes);
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    throw new ValidationError("body must be a JSON object", { field: "/" });
  }
  return v as Record<string, unknown>;
}

/**
 * Serves the moderation request subjects. A body past its HTTP route's limit is the same 413:
 * a submission's `bodyLimit` (`WEFT_BODY_LIMIT`), a claim's 4 KiB, a decision's 16 KiB.
 *
 * @example
 * ```ts ignore
 * const requests = serveModerationRequests(nc, api, auth, log);
 * requests.stop();
 * ```
 */
export function serveModerationRequests(
  nc: NatsConnection,
  api: ModerationApi,
  auth: Auth,
  log: Logger,
  bodyLimit: number = DEFAULT_BODY_LIMIT,
): { stop(): void } {
  const handlers: Record<
    string,
    { roles: Role[]; run: (m: Msg, who: Principal) => Promise<unknown> }
  > = {
    [CONTENT_SUBMIT_REQUEST_SUBJECT]: {
      roles: [Role.Ingest],
      run: async (m, who) => {
        refuseIdempotencyKey(m.headers?.has("Idempotency-Key") ?? false);
        return (await api.submitText(
          validateDocument("content.submit", requestJson(m.data, bodyLimit)),
          who,
          parseTraceparent(m.headers?.get("traceparent")),
        )).body;
      },
    },
    [CONTENT_GET_REQUEST_SUBJECT]: {
      roles: [Role.Ingest, Role.Reviewer],
      run: (m) => api.content(idOf(m)),
    },
    [REVIEWS_LIST_REQUEST_SUBJECT]: {
      roles: [Role.Reviewer],
      run: async (m) => {
        const status = String(objectOf(m).status ?? ReviewStatus.Pending);
        if (!(Object.values(ReviewStatus) as string[]).includes(status)) {
          throw new ValidationError("status must be pending, escalated or decided", {
            field: "/status",
          });
        }
        return { items: await api.listReviews(status as ReviewStatus) };
      },
    },
    [REVIEWS_CLAIM_REQUEST_SUBJECT]: {
      roles: [Role.Reviewer],
      run: (m, who) => {
        const body = claimBody(objectOf(m, CLAIM_BODY_LIMIT), ["id", "reviewer"]);
        if (typeof body.id !== "string") {
          throw new ValidationError("/id is required", { field: "/id" });
        }
        return api.claim(body.id, who, body.reviewer);
      },
    },
    [REVIEWS_DECIDE_REQUEST_SUBJECT]: {
      roles: [Role.Reviewer],
      run: async (m, who) => {
        const req = validateDocument("review.decision", objectOf(m, DECISION_BODY_LIMIT));
        if (!req.id) throw new ValidationError("/id is required", { field: "/id" });
        return (await api.decide(req.id, req, who)).entry;
      },
    },
  };
  const subs = Object.entries(handlers).map(([subject, h]) =>
    nc.subscribe(subject, {
      queue: QUEUE,
      callback: (_e, m) => {
        void replyTo(m, log, () =>
          h.run(m, auth.authorize(m.headers?.get("Authorization"), h.roles)));
      },
    })
  );
  return { stop: () => subs.forEach((s) => s.unsubscribe()) };
}
