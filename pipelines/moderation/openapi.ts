/**
 * The content moderation pipeline's routes in the gateway's OpenAPI document
 * (`GET /openapi.json`): uploads, content items and reviews.
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

/** The OpenAPI paths of pipelines/moderation/routes.ts. */
export function moderationPaths(): Json {
  return {
    "/content": {
      post: op("Upload content for moderation (JSON text, or a binary body)", {
        "202": json(accepted, "Accepted"),
      }, { requestBody: body(ref("content.submit")) }),
    },
    "/content/{id}": {
      get: op("A content item's state", { "200": json(ref("content.state")) }, {
        parameters: [idParam],
      }),
    },
    "/content/{id}/object": {
      get: op("A binary upload", { "200": { description: "The bytes" } }, {
        parameters: [idParam],
      }),
    },
    "/content/{id}/events": {
      get: op("A content item's events", { "200": sse("The item's events") }, {
        parameters: [idParam],
      }),
    },
    "/reviews": {
      get: op("The human review queue", { "200": json({ type: "object" }) }, {
        parameters: [{ name: "status", in: "query", schema: { type: "string" } }],
      }),
    },
    "/reviews/{id}": {
      get: op("One review", { "200": json({ type: "object" }) }, { parameters: [idParam] }),
    },
    "/reviews/{id}/claim": {
      post: op("Claim a review", { "200": json({ type: "object" }) }, {
        parameters: [idParam],
        requestBody: body({ type: "object", properties: { reviewer: { type: "string" } } }),
      }),
    },
    "/reviews/{id}/decision": {
      post: op("Decide a review", { "200": json({ type: "object" }) }, {
        parameters: [idParam],
        requestBody: body(ref("review.decision")),
      }),
    },
  };
}
