/**
 * The feedback pipeline's routes in the gateway's OpenAPI document (`GET /openapi.json`).
 *
 * @module
 */
import {
  accepted,
  body,
  idParam,
  type Json,
  json,
  op,
  ref,
  sse,
} from "../../src/gateway/openapi.ts";
import { FeedbackEventType } from "./events.ts";

/** The Idempotency-Key header of a submission (intake.ts keeps one answer per key and caller). */
const idempotencyKey: Json = {
  name: "Idempotency-Key",
  in: "header",
  description: "A repeat with the same body gets the first answer (Idempotent-Replayed: " +
    "true); another body under the key is refused with 422 idempotency_mismatch; a request " +
    "refused with a 4xx leaves the key unused. Sent once: a repeated header (joined by " +
    "commas) or a key with a comma is refused with 422 naming it",
  schema: { type: "string", minLength: 1, maxLength: 255, pattern: "^[^,]*$" },
};

/** The OpenAPI paths of pipelines/feedback/routes.ts. */
export function feedbackPaths(): Json {
  return {
    "/feedback": {
      post: op("Submit one feedback item", { "202": json(accepted, "Accepted") }, {
        requestBody: body(ref("feedback.submit")),
        parameters: [idempotencyKey],
      }),
    },
    "/feedback/batch": {
      post: op("Submit up to 1000 feedback items", { "202": json({ type: "object" }) }, {
        requestBody: body(ref("feedback.submit_batch")),
        parameters: [idempotencyKey],
      }),
    },
    "/feedback/{id}": {
      get: op("A feedback item's state", { "200": json(ref("feedback.state")) }, {
        parameters: [idParam],
      }),
    },
    "/feedback/{id}/events": {
      get: op("A feedback item's events, from its first to its last", {
        "200": sse("The item's events"),
      }, { parameters: [idParam] }),
    },
    "/events": {
      get: op("Every feedback event as it happens", { "200": sse("Feedback events") }, {
        parameters: [
          {
            name: "type",
            in: "query",
            description: "One event type, with or without its `feedback.` prefix",
            schema: {
              enum: Object.values(FeedbackEventType).flatMap((t) => [
                t.slice("feedback.".length),
                t,
              ]),
            },
          },
          { name: "replay", in: "query", schema: { type: "boolean" } },
        ],
      }),
    },
  };
}
