/**
 * A content item's moderation state, folded from its events: the content pipeline's
 * counterpart of src/state.ts. Like it, the fold is pure, idempotent and
 * order-insensitive (the furthest step wins), so the generic state writer
 * (src/state_writer.ts) keeps it in the KV bucket `weft_content_state`.
 *
 * @module
 */
import type { ContentState } from "./events.gen.ts";
import type { AnyEvent } from "../../src/schemas.ts";
import type { ContentEvent } from "./events.ts";
import type { StateSpec } from "../../src/state_writer.ts";
import { definedStageInputs } from "../../src/pipeline/derive.ts";
import { MODERATION_PIPELINE } from "./pipeline.ts";
import { CONTENT_FINAL_EVENT_TYPES, ContentEventType as T, ONCE_PER_ITEM_TYPES } from "./events.ts";
import { CONTENT_STATE_BUCKET, CONTENT_STREAM } from "./subjects.ts";
import { spanTimes } from "../../src/state.ts";

/**
 * Step order of content event types; final events rank last, and an outcome (published,
 * archived) outranks a failure: an item that reached one keeps it whatever failure is stored
 * for it later (a poison or forged copy of one of its events after it finished; a redrive that
 * succeeds after a failure reaches its outcome after it either way).
 */
const RANK: Record<string, number> = {
  [T.Uploaded]: 1,
  [T.Moderated]: 2,
  [T.ReviewRequested]: 3,
  [T.ReviewClaimed]: 4,
  [T.SlaExpired]: 4,
  [T.Escalated]: 5,
  [T.Decided]: 6,
  [T.Failed]: 7,
  [T.Published]: 8,
  [T.Archived]: 8,
};

const STATUS: Record<string, ContentState["status"]> = {
  [T.Uploaded]: "uploaded",
  [T.Moderated]: "moderated",
  [T.ReviewRequested]: "pending_review",
  [T.ReviewClaimed]: "pending_review",
  [T.Escalated]: "escalated",
  [T.Decided]: "decided",
  [T.Published]: "published",
  [T.Archived]: "archived",
  [T.Failed]: "failed",
};

/**
 * Applies one content event (stored at stream sequence `seq`) to an item's state.
 *
 * @example
 * ```ts
 * import { applyContentEvent } from "./state.ts";
 * const s = applyContentEvent(undefined, {
 *   id: "e1", type: "content.uploaded", version: 1, item_id: "c1",
 *   trace_id: "0af7651916cd43dd8448eb211c80319c", time: "2026-01-01T00:00:00.000Z",
 *   source: "gateway", data: { text: "hi" },
 * }, 1);
 * console.assert(s.status === "uploaded" && s.content?.text === "hi");
 * ```
 */
export function applyContentEvent(
  state: ContentState | undefined,
  anyEvent: AnyEvent,
  seq: number,
): ContentState {
  const event = anyEvent as ContentEvent;
  const key = event.type.slice("content.".length);
  const next: ContentState = state
    ? { ...state, stages: { ...state.stages }, review: { ...state.review } }
    : {
      id: event.item_id,
      status: "uploaded",
      stage: "", // set below by the first event that has a step
      trace_id: event.trace_id,
      created_at: event.time,
      updated_at: event.time,
      stages: {},
    };
  const seen = next.stages[key];
  if (seen && seen.event_id === event.id) return state!; // already applied
  // One event of each once-per-item type: the first stored wins, a later one is ignored.
  if (seen && ONCE_PER_ITEM_TYPES.has(event.type) && seen.seq < seq) return state!;
  // A failure stored before the one the state holds, taken after it (by a writer's replica, or
  // a writer that put it off for its letter), was superseded by it: it changes nothing, as in a
  // fold in the stream's order (it overwrote the later failure's record, so the state
  // disagreed with a rebuild).
  if (seen && event.type === T.Failed && seen.seq > seq) return state!;
  const currentSeq = next.stages[next.stage]?.seq ?? 0;
  next.stages[key] = { at: event.time, event_id: event.id, seq };
  spanTimes(next);
  const review = next.review ??= {};

  switch (event.type) {
    case T.Uploaded:
      next.content ??= event.data;
      break;
    case T.Moderated:
      next.content ??= event.data.content;
      next.moderation = event.data.moderation;
      break;
    case T.ReviewRequested:
      next.content ??= event.data.content;
      next.moderation ??= event.data.moderation;
      if (event.data.due_at) review.due_at = event.data.due_at;
      break;
    case T.ReviewClaimed:
      if (review.decision === undefined) {
        review.reviewer = event.data.reviewer;
        review.claimed_at = event.data.claimed_at;
      }
      break;
    case T.Escalated:
      review.escalation_level = Math.max(review.escalation_level ?? 0, event.data.level);
      if (event.data.due_at) review.due_at = event.data.due_at;
      break;
    case T.Decided:
      next.content ??= event.data.content;
      review.decision = event.data.decision;
      review.reason = event.data.reason;
      review.reviewer = event.data.reviewer;
      review.automatic = event.data.automatic;
      break;
    case T.Published:
    case T.Archived: {
      // The item's one outcome is the first stored (see below): a later one changes nothing.
      const other = next.stages[event.type === T.Published ? "archived" : "published"];
      if (!other || other.seq > seq) next.content = event.data.content;
      break;
    }
    case T.Failed:
      // Recorded below, when the failure is where the item is.
      break;
    case T.SlaExpired:
      break;
  }
  // Moderation found it safe: it was never reviewed, so review events for it (a forged or
  // stray decision, which the storage step dead-letters as a conflict) show nowhere, whatever
  // order they are folded in.
  if (next.moderation?.verdict === "safe") {
    for (const k of Object.keys(review)) delete review[k as keyof typeof review];
  }
  if (Object.keys(review).length === 0) delete next.review;

  const rank = RANK[event.type] ?? 0;
  const currentRank = RANK[`content.${next.stage}`] ?? 0;
  // Between equals of different types: of the outcomes (published, archived), the one stored
  // first, since an item has one outcome (a second is a forged or repeated decision); of the
  // others, the one stored later. A failure after a redriven failure is the item's error.
  const between = rank === RANK[T.Published] ? seq < currentSeq : seq > currentSeq;
  // (Another type, or another failure: a failure after a failure takes over the item's error.)
  const takesOver = key !== next.stage || event.type === T.Failed;
  if (
    STATUS[event.type] !== undefined &&
    (rank > currentRank || (rank === currentRank && takesOver && between))
  ) {
    next.stage = key;
    next.status = STATUS[event.type]!;
    if (event.type === T.Failed) {
      next.error = {
        stage: event.data.stage,
        code: event.data.code,
        reason: event.data.reason,
        attempts: event.data.attempts,
      };
    } else if (rank === RANK[T.Published]) delete next.error;
  }
  return next;
}

/**
 * Why an item's history, folded into `state`, does not lead to `event` (stored at `seq`), else
 * undefined. An outcome is its storage step's event, and the item reaches storage only so:
 * `content.published` after a moderation that found it safe or an approving decision (a
 * reviewer's, or the SLA's default action), `content.archived` after a rejecting decision,
 * stored before it. The storage step's key may publish either for any item (found by probing:
 * a `content.published` for an item waiting for review read as published, its review skipped):
 * one its history does not lead to is not folded, and the state writer dead-letters it
 * `conflict`.
 *
 * @example
 * ```ts
 * import { applyContentEvent, contentRefuses } from "./state.ts";
 * const base = { version: 1, item_id: "c1", trace_id: "0af7651916cd43dd8448eb211c80319c",
 *   time: "2026-01-01T00:00:00.000Z", source: "test" };
 * const s = applyContentEvent(undefined, {
 *   ...base, id: "e1", type: "content.uploaded", data: { text: "hi" } }, 1);
 * const forged = { ...base, id: "e2", type: "content.published",
 *   data: { content: { text: "hi" }, via: "review" } };
 * console.assert(contentRefuses(s, forged, 2) !== undefined);
 * ```
 */
export function contentRefuses(
  state: ContentState,
  event: AnyEvent,
  seq: number,
): string | undefined {
  if (event.type !== T.Published && event.type !== T.Archived) return undefined;
  const before = (key: string) => (state.stages[key]?.seq ?? Infinity) < seq;
  if (event.type === T.Published) {
    if (state.moderation?.verdict === "safe" && before("moderated")) return undefined;
    if (state.review?.decision === "approve" && before("decided")) return undefined;
    return `content item ${state.id} has neither a moderation that found it safe nor an ` +
      "approving decision stored before it: it has not reached storage, so it is not published";
  }
  if (state.review?.decision === "reject" && before("decided")) return undefined;
  return `content item ${state.id} has no rejecting decision stored before it: it has not ` +
    "reached storage, so it is not archived";
}

/** The content state writer's spec: everything on `content.*.*` into `weft_content_state`. */
export const CONTENT_STATE_SPEC: StateSpec<ContentState> = {
  durable: "content-state",
  stream: CONTENT_STREAM,
  filter: "content.*.*",
  bucket: CONTENT_STATE_BUCKET,
  eventTypes: Object.values(T),
  apply: applyContentEvent,
  isFinal: (s) => CONTENT_FINAL_EVENT_TYPES.has(`content.${s.stage}`),
  failedType: T.Failed,
  // A failure's letter names what its stage consumes: one of the step's inputs.
  stageInputs: definedStageInputs(MODERATION_PIPELINE),
  source: "weft-content-state",
  // An item starts at its upload: any other event for an id with no state, stored before
  // anything on its upload subject, is dead-lettered `not_found` (a step's forged event for an
  // id never uploaded, or uploaded later, makes no item).
  starts: (e) => e.type === T.Uploaded,
  entrySubject: (item) => `${T.Uploaded}.${item}`,
  // An outcome its history does not lead to (the storage key's, for an item that has not
  // reached storage) is dead-lettered `conflict` and folds nothing.
  refuses: contentRefuses,
};
