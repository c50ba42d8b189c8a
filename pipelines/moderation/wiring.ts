/**
 * How the content moderation pipeline plugs into the mesh: its stream, state and review
 * buckets and object store of uploads, its services (state writer, moderation, review,
 * storage), and what the gateway needs for it (src/wiring.ts).
 *
 * @module
 */
import type { PipelineWiring } from "../../src/wiring.ts";
import { stepAccess } from "../../src/wiring.ts";
import { SCHEDULE_BUCKET, typeFilter } from "../../src/subjects.ts";
import { CONTENT_FINAL_EVENT_TYPES, ContentEventType } from "./events.ts";
import {
  CONTENT_OBJECT_BUCKET,
  CONTENT_STATE_BUCKET,
  CONTENT_STREAM,
  REVIEW_BUCKET,
} from "./subjects.ts";
import { CONTENT_STATE_SPEC } from "./state.ts";

/** The moderation pipeline's part of the mesh. */
export const MODERATION_WIRING: PipelineWiring = {
  name: "content",
  streams: [{
    name: CONTENT_STREAM,
    description: "Weft content moderation: every event of every content item",
    subjects: ["content.>"],
  }],
  buckets: [
    {
      name: CONTENT_STATE_BUCKET,
      description: "Weft: current moderation state of each content item",
      ttl: "retention",
    },
    {
      name: REVIEW_BUCKET,
      description: "Weft: the human review queue (compare-and-set claims and decisions)",
      // Decided entries stay (a second decision must find them) until retention ends.
      ttl: "retention",
    },
  ],
  objectStores: [{ name: CONTENT_OBJECT_BUCKET, description: "Weft: binary content uploads" }],
  // The review service's SLA timers.
  timers: [typeFilter(ContentEventType.SlaExpired)],
  dashboard: {
    title: "Content moderation pipeline",
    stages: [
      ["moderation", "moderation"],
      ["storage-moderated", "storage (safe)"],
      ["review-queue", "review queue (flagged)"],
      ["review-sla", "review SLA"],
      ["storage-decided", "storage (decided)"],
      ["content-state", "state writer"],
    ],
  },
  items: {
    what: "content item",
    entryType: ContentEventType.Uploaded,
    finalTypes: CONTENT_FINAL_EVENT_TYPES,
    state: CONTENT_STATE_SPEC,
    statusField: "content_items",
  },
  services: [
    {
      name: "content-state",
      entry: "pipelines/moderation/services/content_state.ts",
      access: {
        consumes: [{ stream: CONTENT_STREAM, durable: CONTENT_STATE_SPEC.durable }],
        writesBuckets: [CONTENT_STATE_BUCKET],
        publishes: [`deadletter.${CONTENT_STATE_SPEC.durable}.*`],
      },
    },
    {
      name: "moderation",
      entry: "pipelines/moderation/services/moderation.ts",
      analyzes: true,
      access: stepAccess(CONTENT_STREAM, ["moderation"], ["content.moderated"], "content.failed", {
        readsObjects: [CONTENT_OBJECT_BUCKET],
      }),
    },
    {
      name: "review",
      entry: "pipelines/moderation/services/review.ts",
      access: stepAccess(
        CONTENT_STREAM,
        ["review-queue", "review-sla"],
        ["content.review_requested", "content.escalated", "content.decided"],
        "content.failed",
        { writesBuckets: [REVIEW_BUCKET, SCHEDULE_BUCKET] },
      ),
    },
    {
      name: "storage",
      entry: "pipelines/moderation/services/storage.ts",
      access: stepAccess(
        CONTENT_STREAM,
        ["storage-moderated", "storage-decided"],
        ["content.published", "content.archived"],
        "content.failed",
        { readsObjects: [CONTENT_OBJECT_BUCKET] },
      ),
    },
  ],
  gateway: {
    // Uploads and reviewers' decisions; redrives of any of the pipeline's subjects.
    publishes: ["content.>"],
    serves: ["weft.content.>", "weft.reviews.>"],
    readsStreams: [CONTENT_STREAM],
    readsBuckets: [CONTENT_STATE_BUCKET],
    writesBuckets: [REVIEW_BUCKET],
    writesObjects: [CONTENT_OBJECT_BUCKET],
  },
};
