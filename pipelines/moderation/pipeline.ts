/**
 * The content moderation pipeline as a definition. The mesh derives from it the steps'
 * services, durable consumers, NATS permissions and stream, and the dashboard's graph
 * (pipelines/moderation/wiring.ts); each step runs its stage module (pipelines/moderation/
 * services/, on stages.ts), which publishes the pipeline's own events (schemas/content.*.json).
 * The review queue and SLA are one `wait` step whose timeout leads to the SLA stage
 * (escalate, then the default action), at most twice; the review service and the gateway's
 * claim/decision API hold the wait (pipelines/moderation/review_queue.ts).
 *
 * @module
 */
import { definePipeline } from "../../src/pipeline/definition.ts";

/**
 * The moderation pipeline's definition; `slaMs` is the review deadline (the review service's
 * setting, WEFT_REVIEW_SLA_MS: what the mesh derives does not depend on it).
 */
export function moderationPipeline(slaMs = 3_600_000) {
  const obj = { type: "object" } as const;
  return definePipeline({
    name: "content",
    description: "Content moderation with human review",
    input: { schema: obj, event: "uploaded" },
    start: "moderation",
    // Each step keeps the durable consumer it had before it was defined here.
    steps: {
      moderation: {
        kind: "task",
        durable: "moderation",
        emits: "moderated",
        output: obj,
        next: ["storage-moderated", "review-queue"],
      },
      "storage-moderated": {
        kind: "task",
        description: "storage (safe)",
        durable: "storage-moderated",
        emits: "published",
        output: obj,
        next: "published",
      },
      "review-queue": {
        kind: "task",
        description: "review queue (flagged)",
        durable: "review-queue",
        emits: "review_requested",
        output: obj,
        next: "review",
      },
      review: {
        kind: "wait",
        // A reviewer's decision (the claim/decision API) resumes the item as `decided`.
        event: "decision",
        emits: "decided",
        timeoutMs: slaMs,
        timeoutEvent: "sla_expired",
        onTimeout: "review-sla",
        next: "storage-decided",
      },
      "review-sla": {
        kind: "task",
        description: "review SLA",
        durable: "review-sla",
        emits: "escalated",
        alsoEmits: ["decided"],
        output: obj,
        next: "review",
      },
      "storage-decided": {
        kind: "task",
        description: "storage (decided)",
        durable: "storage-decided",
        emits: "archived",
        alsoEmits: ["published"],
        output: obj,
        next: ["archived", "published"],
      },
      published: { kind: "end", outcome: "published" },
      archived: { kind: "end", outcome: "archived" },
    },
    loops: [{ from: "review-sla", to: "review", maxIterations: 2 }],
  });
}

/**
 * The definition's structure, built once for every module of the pipeline that reads it
 * (its wiring, its stages): the review deadline here is the default, the review service's
 * setting is what runs.
 */
export const MODERATION_PIPELINE = moderationPipeline();
