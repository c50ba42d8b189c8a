/**
 * How the content moderation pipeline plugs into the mesh (src/wiring.ts): its stream, its
 * steps' services (moderation, review, storage) and the dashboard's graph derived from its
 * definition (pipeline.ts), and by hand its state and review buckets, object store of
 * uploads, state writer, and what the gateway needs for it.
 *
 * @module
 */
import type { PipelineWiring } from "../../src/wiring.ts";
import {
  definedGraph,
  definedItems,
  definedStream,
  definedTimers,
  stepServices,
} from "../../src/wiring.ts";
import { MODERATION_PIPELINE } from "./pipeline.ts";
import { DEADLETTER_STREAM, SCHEDULE_BUCKET } from "../../src/subjects.ts";
// Its events register in the catalog with the wiring, in every process that loads it.
import "./events.ts";
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
  streams: [
    definedStream(
      MODERATION_PIPELINE,
      "Weft content moderation: every event of every content item",
    ),
  ],
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
  timers: definedTimers(MODERATION_PIPELINE),
  dashboard: definedGraph(MODERATION_PIPELINE, "Content moderation pipeline", {
    after: [["content-state", "state writer"]],
  }),
  items: definedItems(MODERATION_PIPELINE, {
    what: "content item",
    state: CONTENT_STATE_SPEC,
    statusField: "content_items",
  }),
  services: [
    {
      name: "content-state",
      entry: "pipelines/moderation/services/content_state.ts",
      access: {
        consumes: [{ stream: CONTENT_STREAM, durable: CONTENT_STATE_SPEC.durable }],
        writesBuckets: [CONTENT_STATE_BUCKET],
        publishes: [`deadletter.${CONTENT_STATE_SPEC.durable}.*`],
        // A failure folds only when its runner's letter is stored (failure_letter.ts).
        readsStreams: [DEADLETTER_STREAM],
      },
    },
    // The definition's steps.
    ...stepServices(MODERATION_PIPELINE, [
      {
        name: "moderation",
        entry: "pipelines/moderation/services/moderation.ts",
        steps: ["moderation"],
        analyzes: true,
        access: { readsObjects: [CONTENT_OBJECT_BUCKET] },
      },
      {
        // The review wait's queue and SLA: it sets the SLA timers, and the gateway's
        // claim/decision API shares the review bucket.
        name: "review",
        entry: "pipelines/moderation/services/review.ts",
        steps: ["review-queue", "review-sla"],
        // Its SLA timers only (`content.<...>`): no other pipeline's schedules.
        access: {
          writesBuckets: [REVIEW_BUCKET],
          writesKeys: [{ bucket: SCHEDULE_BUCKET, keys: "content.>" }],
        },
      },
      {
        name: "storage",
        entry: "pipelines/moderation/services/storage.ts",
        steps: ["storage-moderated", "storage-decided"],
        access: { readsObjects: [CONTENT_OBJECT_BUCKET] },
      },
    ]),
  ],
  gateway: {
    // Uploads and reviewers' decisions; redrives of any of the pipeline's subjects.
    publishes: ["content.>"],
    serves: ["weft.content.>", "weft.reviews.>"],
    readsStreams: [CONTENT_STREAM],
    listsConsumers: [CONTENT_STREAM],
    readsBuckets: [CONTENT_STATE_BUCKET],
    writesBuckets: [REVIEW_BUCKET],
    // A decision cancels the item's SLA timers.
    writesKeys: [{ bucket: SCHEDULE_BUCKET, keys: "content.>" }],
    writesObjects: [CONTENT_OBJECT_BUCKET],
  },
};
