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
import { ReviewStatus } from "./review_queue.ts";

/** A field of the stored state (schemas/content.state.v1.json), as the view has it. */
const stateField = (name: string): Json => ref(`content.state/properties/${name}`);

/**
 * `GET /content/{id}` (api.ts `ContentView`): the stored state without its `stages`, with
 * links to its events (and its object), its content once published, and no trace id before
 * its first event is folded.
 */
const contentView: Json = {
  type: "object",
  required: ["id", "status", "stage", "created_at", "updated_at", "links"],
  additionalProperties: false,
  properties: {
    ...Object.fromEntries(
      [
        "id",
        "status",
        "stage",
        "trace_id",
        "created_at",
        "updated_at",
        "moderation",
        "review",
        "error",
      ]
        .map((k) => [k, stateField(k)]),
    ),
    content: { ...stateField("content"), description: "Only once published" },
    links: {
      type: "object",
      required: ["events"],
      additionalProperties: false,
      properties: {
        events: { type: "string" },
        object: { type: "string", description: "A binary upload's bytes" },
      },
    },
  },
};

/** `meta.<key>` query parameters of a binary upload (at most 32). */
const metaParams: Json = {
  name: "meta",
  in: "query",
  description: "A binary upload's metadata, one `meta.<key>=<value>` parameter per key " +
    "(at most 32, each once, percent-encoded UTF-8; no other parameter is taken). A JSON submission takes no " +
    "query parameter: one is refused with 422 naming it",
  style: "deepObject",
  explode: true,
  schema: { type: "object", additionalProperties: { type: "string" }, maxProperties: 32 },
};

/** The OpenAPI paths of pipelines/moderation/routes.ts. */
export function moderationPaths(): Json {
  return {
    "/content": {
      post: op("Upload content for moderation (JSON text, or a binary body)", {
        "202": {
          ...json(accepted, "Accepted"),
          headers: { Location: { schema: { type: "string" }, description: "/content/{id}" } },
        },
      }, {
        parameters: [metaParams, {
          name: "Idempotency-Key",
          in: "header",
          description: "Not taken: a request carrying one is refused with 422 naming it. A JSON " +
            "submission's `id` in the body makes a repeat the same item; an upload is always new",
          schema: { type: "string" },
        }],
        requestBody: {
          required: true,
          description: "JSON (`{text, metadata?, id?}`), or any other content type as a binary " +
            "upload of at most WEFT_CONTENT_MAX_BYTES, kept in the object store, its metadata " +
            "in `meta.<key>` query parameters",
          content: {
            "application/json": { schema: ref("content.submit") },
            "application/octet-stream": { schema: { type: "string", format: "binary" } },
            "*/*": { schema: { type: "string", format: "binary" } },
          },
        },
      }),
    },
    "/content/{id}": {
      get: op("A content item's state", { "200": json(contentView) }, {
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
        parameters: [{
          name: "status",
          in: "query",
          schema: { enum: Object.values(ReviewStatus), default: ReviewStatus.Pending },
        }],
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
