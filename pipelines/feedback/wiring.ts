/**
 * How the feedback pipeline plugs into the mesh (src/wiring.ts): its stream, its steps'
 * services and the dashboard's graph derived from its definition (pipeline.ts), and by hand
 * its state bucket, intake, state writer and digest, and what the gateway and the shadow
 * service need for it.
 *
 * @module
 */
import type { PipelineWiring } from "../../src/wiring.ts";
import {
  definedGraph,
  definedItems,
  definedStream,
  stepAccess,
  stepServices,
} from "../../src/wiring.ts";
import { FEEDBACK_PIPELINE } from "./pipeline.ts";
import {
  DEADLETTER_STREAM,
  DIGEST_STREAM,
  SCHEDULE_BUCKET,
  STEP_VERSION_BUCKET,
} from "../../src/subjects.ts";
import {
  DIGEST_REQUEST_SUBJECT,
  FEEDBACK_STREAM,
  LEGACY_DIGEST_SCHEDULE_ID,
  STATE_BUCKET,
  SUBMIT_SUBJECT,
} from "./subjects.ts";
// Its events register in the catalog with the wiring, in every process that loads it.
import "./events.ts";
import { FEEDBACK_STATE_SPEC } from "./state.ts";

/** The feedback pipeline's part of the mesh. */
export const FEEDBACK_WIRING: PipelineWiring = {
  name: "feedback",
  // The gateway publishes the ingested event itself, as the ingest stage does for the bus.
  intakeStage: "ingest",
  // POST /feedback/batch is all or nothing on the bus too, where the server allows.
  streams: [
    definedStream(FEEDBACK_PIPELINE, "Weft feedback pipeline: submissions and every event", {
      atomicBatch: true,
    }),
  ],
  buckets: [{
    name: STATE_BUCKET,
    description: "Weft: current state of each feedback item",
    ttl: "retention",
  }],
  // Submissions and digest requests may be scheduled (POST /schedules), and the ops key may
  // publish them: their consumers validate what they read. Only the digest request the digest
  // service serves (`digest.request.feedback`): another name under `digest.request.` is read by
  // no one, and stayed in DIGEST until it was full (66 such 1 MB messages from the ops key
  // filled it, and every hourly digest request was refused from then on).
  schedulable: [SUBMIT_SUBJECT, DIGEST_REQUEST_SUBJECT],
  // The digest's schedule before schedules had owners (now `feedback.digest`).
  retiredSchedules: [{ id: LEGACY_DIGEST_SCHEDULE_ID, subject: DIGEST_REQUEST_SUBJECT }],
  dashboard: definedGraph(FEEDBACK_PIPELINE, "Feedback pipeline", {
    before: [["ingest", "ingest"]],
    after: [["state", "state writer"]],
  }),
  items: definedItems(FEEDBACK_PIPELINE, {
    what: "feedback item",
    state: FEEDBACK_STATE_SPEC,
    statusField: "items",
  }),
  services: [
    {
      name: "state",
      entry: "pipelines/feedback/services/state.ts",
      access: {
        consumes: [{ stream: FEEDBACK_STREAM, durable: FEEDBACK_STATE_SPEC.durable }],
        writesBuckets: [STATE_BUCKET],
        publishes: [`deadletter.${FEEDBACK_STATE_SPEC.durable}.*`],
        // A failure folds only when its runner's letter is stored (failure_letter.ts).
        readsStreams: [DEADLETTER_STREAM],
      },
    },
    {
      name: "ingest",
      entry: "pipelines/feedback/services/ingest.ts",
      access: stepAccess(FEEDBACK_STREAM, ["ingest"], ["feedback.ingested"], "feedback.failed"),
    },
    // The definition's steps: each reads the ruleset file (a promoted candidate's is in rules/)
    // and its promoted version (weft_step_versions).
    ...stepServices(FEEDBACK_PIPELINE, [
      {
        name: "sentiment",
        entry: "pipelines/feedback/services/sentiment.ts",
        steps: ["sentiment"],
        readsRules: true,
        analyzes: true,
        reads: ["rules"],
        access: { readsBuckets: [STEP_VERSION_BUCKET] },
      },
      {
        name: "topics",
        entry: "pipelines/feedback/services/topics.ts",
        steps: ["topics"],
        readsRules: true,
        analyzes: true,
        reads: ["rules"],
        access: { readsBuckets: [STEP_VERSION_BUCKET] },
      },
      {
        name: "dispatch",
        entry: "pipelines/feedback/services/dispatch.ts",
        steps: ["dispatch"],
        readsRules: true,
        reads: ["rules"],
        access: { readsBuckets: [STEP_VERSION_BUCKET] },
      },
    ]),
    {
      name: "digest",
      entry: "pipelines/feedback/services/digest.ts",
      background: true,
      access: stepAccess(
        DIGEST_STREAM,
        ["feedback-digest"],
        ["digest.feedback_counts"],
        // A digest request is no item: the digest fails none (digest.ts), so it may not
        // publish `feedback.failed` (with it, its own letter made any feedback item fail).
        undefined,
        {
          readsStreams: [FEEDBACK_STREAM],
          // Its own schedule only.
          writesKeys: [{ bucket: SCHEDULE_BUCKET, keys: "feedback.>" }],
        },
      ),
    },
  ],
  gateway: {
    // Entry events; a redrive republishes a letter's original to the input of the step
    // that consumed it, which may be any of the pipeline's subjects, or the digest's.
    publishes: ["feedback.>", DIGEST_REQUEST_SUBJECT],
    serves: ["weft.feedback.>"],
    readsStreams: [FEEDBACK_STREAM],
    listsConsumers: [FEEDBACK_STREAM],
    readsBuckets: [STATE_BUCKET],
  },
  // Live shadows read production's input and outputs and work consumers of their own on
  // FEEDBACK (never a step's).
  shadow: { readsStreams: [FEEDBACK_STREAM], managesConsumers: [FEEDBACK_STREAM] },
  shadowSteps: ["sentiment", "topics", "dispatch"],
};
