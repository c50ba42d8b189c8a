/**
 * The content moderation pipeline as a definition. Handlers are today's stages from
 * pipelines/moderation/stages.ts, unchanged; the review queue and SLA become one `wait` step whose
 * timeout leads to the SLA stage (escalate, then the default action), at most twice.
 * The runtime does not run this definition yet (see docs/PIPELINES.md).
 *
 * @module
 */
import { definePipeline } from "../../src/pipeline/definition.ts";
import type { Stage } from "../../src/stage.ts";

/** Today's stage objects, run as the steps of the same name. */
export interface ModerationStages {
  // deno-lint-ignore no-explicit-any
  [step: string]: Stage<any> | undefined;
}

/** The moderation pipeline's definition; `slaMs` is the review deadline. */
export function moderationPipeline(stages: ModerationStages = {}, slaMs = 3_600_000) {
  const obj = { type: "object" } as const;
  return definePipeline({
    name: "content",
    description: "Content moderation with human review",
    input: { schema: obj, event: "uploaded" },
    start: "moderation",
    steps: {
      moderation: {
        kind: "task",
        emits: "moderated",
        output: obj,
        stage: stages["moderation"],
        next: ["storage-moderated", "review-queue"],
      },
      "storage-moderated": {
        kind: "task",
        emits: "published",
        output: obj,
        stage: stages["storage-moderated"],
        next: "published",
      },
      "review-queue": {
        kind: "task",
        emits: "review_requested",
        output: obj,
        stage: stages["review-queue"],
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
        emits: "escalated",
        alsoEmits: ["decided"],
        output: obj,
        stage: stages["review-sla"],
        next: "review",
      },
      "storage-decided": {
        kind: "task",
        emits: "archived",
        alsoEmits: ["published"],
        output: obj,
        stage: stages["storage-decided"],
        next: ["archived", "published"],
      },
      published: { kind: "end", outcome: "published" },
      archived: { kind: "end", outcome: "archived" },
    },
    loops: [{ from: "review-sla", to: "review", maxIterations: 2 }],
  });
}
