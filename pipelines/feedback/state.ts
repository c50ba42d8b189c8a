/**
 * A feedback item's state, folded from its events. The fold is pure, idempotent (applying
 * an event twice changes nothing) and, short of a failure, order-insensitive (the furthest
 * stage wins whatever order events arrive in; between equals, the one stored later in the
 * stream), so redeliveries, concurrent writers and a rebuild from the stream all reach the
 * same state. Ordering uses stream sequences only, never the times producers wrote.
 *
 * What a step's key could publish on its own subjects changes nothing: an event carrying
 * another text, channel or customer than the item's (its ingested event's) is not applied,
 * and an item that failed on an event takes no later event until that event is stored again
 * after the failure (a redrive of its dead letter, byte for byte, so under its id), which
 * resumes it; one that failed on a step's message that is no event takes none.
 *
 * @module
 */
import type { FeedbackState } from "./events.gen.ts";
import type { AnyEvent } from "../../src/schemas.ts";
import type { FeedbackEvent } from "./events.ts";
import { spanTimes } from "../../src/state.ts";
import { FEEDBACK_STREAM, STATE_BUCKET, SUBMIT_SUBJECT } from "./subjects.ts";

/** The stage that turns `feedback.submit` messages into items (stages.ts's ingestStage). */
const INGEST_STAGE = "ingest";
import { FeedbackEventType as T, ONCE_PER_ITEM_TYPES } from "./events.ts";
import type { StateSpec } from "../../src/state_writer.ts";
import { definedStageInputs } from "../../src/pipeline/derive.ts";
import { FEEDBACK_PIPELINE } from "./pipeline.ts";

/**
 * Pipeline order of event types; final events rank last. Processed outranks failed: an item
 * that was processed stays processed whatever failure is stored for it later (a poison or
 * forged copy of one of its events after it finished; a redrive that succeeds after a
 * failure is processed after it either way).
 */
const RANK: Record<string, number> = {
  [T.Ingested]: 1,
  [T.SentimentAnalyzed]: 2,
  [T.TopicsExtracted]: 3,
  [T.Dispatched]: 4,
  [T.Failed]: 5,
  [T.Processed]: 6,
};

function shortType(type: string): string {
  return type.slice("feedback.".length);
}

/**
 * Applies one event (stored at stream sequence `seq`) to an item's state.
 *
 * @example
 * ```ts
 * import { applyEvent } from "./state.ts";
 * const s = applyEvent(undefined, {
 *   id: "e1", type: "feedback.ingested", version: 1, item_id: "fb1",
 *   trace_id: "0af7651916cd43dd8448eb211c80319c", time: "2026-01-01T00:00:00.000Z",
 *   source: "gateway", data: { text: "hi" },
 * }, 1);
 * console.assert(s.status === "accepted" && s.text === "hi");
 * ```
 */
export function applyEvent(
  state: FeedbackState | undefined,
  event: AnyEvent,
  seq: number,
): FeedbackState {
  const key = shortType(event.type);
  let resumed = false;
  if (state && event.type !== T.Failed) {
    // Failed on an event (its id is known): only that event, stored again after the failure
    // (a redrive), moves the item on; any other (a forged step event) is not applied. Failed on
    // a step's message that is no event (junk: a redrive of it fails again), nothing does. (A
    // failed submission, on `feedback.submit`, is redriven to make the item, as before.)
    const error = state.status === "failed" ? state.error : undefined;
    if (error?.event_id !== undefined) {
      if (event.id !== error.event_id || seq <= (state.stages.failed?.seq ?? 0)) return state;
      resumed = true;
    } else if (error?.subject === SUBMIT_SUBJECT) {
      // Failed at intake, the item never entered: only its entry event, stored after the
      // failure (a redrive or a resubmission of it), makes the item; a step's event for it (a
      // step's key could publish one) is not applied.
      if (event.type !== T.Ingested || seq <= (state.stages.failed?.seq ?? 0)) return state;
      resumed = true;
    } else if (error?.subject !== undefined) return state;
    // The item's input is what its first event (its ingested one) carried: an event carrying
    // another is forged or altered, and is not applied.
    if (!carriesItemOf(state, event)) return state;
  }
  const next: FeedbackState = state ? { ...state, stages: { ...state.stages } } : {
    id: event.item_id,
    status: "accepted",
    stage: key,
    trace_id: event.trace_id,
    created_at: event.time,
    updated_at: event.time,
    stages: {},
  };
  if (resumed) {
    next.status = "processing";
    delete next.error;
  }
  const seen = next.stages[key];
  if (seen && seen.event_id === event.id) return resumed ? next : state!; // already applied
  // One event of each once-per-item type: the first stored wins, a later one is ignored.
  if (seen && ONCE_PER_ITEM_TYPES.has(event.type) && seen.seq < seq) return state!;
  // A failure stored before the one the state holds, taken after it (out of the stream's order:
  // by a writer's replica, or a writer that put it off for its letter), was superseded by it
  // there: it changes nothing, as in a fold in order (found by a loaded run: it overwrote the
  // later failure's record, and the state disagreed with a rebuild).
  if (seen && event.type === T.Failed && seen.seq > seq) return state!;
  const currentSeq = next.stages[next.stage]?.seq ?? 0;
  next.stages[key] = { at: event.time, event_id: event.id, seq };
  spanTimes(next);

  // Order is the stream's (sequence), never a time the producer wrote: between events of one
  // rank (one type: a failure after a redriven failure), the one stored later.
  const rank = RANK[event.type] ?? 0;
  const currentRank = RANK[`feedback.${next.stage}`] ?? 0;
  const furthest = rank > currentRank || (rank === currentRank && seq > currentSeq);

  if (event.type === T.Failed) {
    if (furthest) {
      next.error = {
        stage: event.data.stage,
        code: event.data.code,
        reason: event.data.reason,
        attempts: event.data.attempts,
      };
      const { event_id: on, subject } = event.data as { event_id?: unknown; subject?: unknown };
      if (typeof on === "string") next.error.event_id = on;
      if (typeof subject === "string") next.error.subject = subject;
    }
  } else {
    const d = (event as Exclude<FeedbackEvent, { type: "feedback.failed" }>).data;
    // Later stages carry every earlier field; never let an earlier event erase a later one.
    if (rank >= currentRank || next.text === undefined) {
      next.text = d.text;
      if (d.channel !== undefined) next.channel = d.channel;
      if (d.customer_id !== undefined) next.customer_id = d.customer_id;
    }
    if ("sentiment" in d && (next.sentiment === undefined || rank >= currentRank)) {
      next.sentiment = d.sentiment;
    }
    if ("topics" in d && (next.topics === undefined || rank >= currentRank)) next.topics = d.topics;
    if ("routing" in d && (next.routing === undefined || rank >= currentRank)) {
      next.routing = d.routing;
    }
  }
  if (furthest) {
    next.stage = key;
    next.status = event.type === T.Processed
      ? "processed"
      : event.type === T.Failed
      ? "failed"
      : event.type === T.Ingested
      ? "accepted"
      : "processing";
    if (event.type === T.Processed) delete next.error;
  }
  return next;
}

/**
 * Whether `event` carries the item's text, channel and customer as `state` holds them (from
 * its first event carrying any); a failure carries none, and a state with no text yet (started
 * by its intake's failure) takes any.
 */
function carriesItemOf(state: FeedbackState, event: AnyEvent): boolean {
  if (event.type === T.Failed || state.text === undefined) return true;
  const d = event.data as { text?: unknown; channel?: unknown; customer_id?: unknown };
  return d.text === state.text && d.channel === state.channel &&
    d.customer_id === state.customer_id;
}

/**
 * The event each step's events need stored before them: the step's input. The item reaches
 * topics with its `sentiment_analyzed`, and dispatch with its `topics_extracted`.
 */
const LEADS_FROM: Readonly<Record<string, string>> = {
  [T.TopicsExtracted]: shortType(T.SentimentAnalyzed),
  [T.Dispatched]: shortType(T.TopicsExtracted),
  [T.Processed]: shortType(T.TopicsExtracted),
};

/**
 * Why an item's history, folded into `state`, does not lead to `event` (stored at `seq`), else
 * undefined: a step's event counts only once the item reached the step, its input (the event
 * before it in the pipeline) stored before it. A step's key may publish its events for any
 * item: dispatch's `processed` for an item still at sentiment or topics, or topics'
 * `topics_extracted` for one still at sentiment, is not folded, and the state writer
 * dead-letters it `conflict`.
 *
 * @example
 * ```ts
 * import { applyEvent, feedbackRefuses } from "./state.ts";
 * const base = { version: 1, item_id: "fb1", trace_id: "0af7651916cd43dd8448eb211c80319c",
 *   time: "2026-01-01T00:00:00.000Z", source: "test" };
 * const s = applyEvent(undefined, {
 *   ...base, id: "e1", type: "feedback.ingested", data: { text: "hi" } }, 1);
 * const forged = { ...base, id: "e2", type: "feedback.processed", data: { text: "hi" } };
 * console.assert(feedbackRefuses(s, forged, 2) !== undefined);
 * ```
 */
export function feedbackRefuses(
  state: FeedbackState,
  event: AnyEvent,
  seq: number,
): string | undefined {
  const from = LEADS_FROM[event.type];
  if (from === undefined || (state.stages[from]?.seq ?? Infinity) < seq) return undefined;
  return `feedback item ${state.id} has no ${from} stored before it: it had not reached the ` +
    `step that publishes ${shortType(event.type)}`;
}

/** Folds a whole history, e.g. when rebuilding state from the stream. */
export function foldEvents(
  events: Iterable<{ event: AnyEvent; seq: number }>,
): FeedbackState | undefined {
  let state: FeedbackState | undefined;
  for (const { event, seq } of events) state = applyEvent(state, event, seq);
  return state;
}

/**
 * What the feedback pipeline's state writer (services/state.ts here) and `deno task rebuild-state`
 * fold: every `feedback.*.*` event of the FEEDBACK stream into `weft_feedback_state`.
 *
 * @example
 * ```ts ignore
 * import { runStateWriter } from "../../mod.ts";
 * import { FEEDBACK_STATE_SPEC } from "./mod.ts";
 * const writer = await runStateWriter({ nc, config, log, spec: FEEDBACK_STATE_SPEC });
 * ```
 */
export const FEEDBACK_STATE_SPEC: StateSpec<FeedbackState> = {
  durable: "state",
  stream: FEEDBACK_STREAM,
  filter: "feedback.*.*",
  bucket: STATE_BUCKET,
  eventTypes: Object.values(T),
  apply: applyEvent,
  isFinal: (s) => s.status === "processed" || s.status === "failed",
  // Alone, a processed or failed event makes a final state, any other none (applyEvent).
  isFinalEvent: (e) => e.type === T.Processed || e.type === T.Failed,
  failedType: T.Failed,
  // A failure's letter names what its stage consumes: a step's input, or a submission.
  stageInputs: definedStageInputs(FEEDBACK_PIPELINE, { [INGEST_STAGE]: [SUBMIT_SUBJECT] }),
  source: "weft-state",
  // An item starts at its ingested event, or the failure of its submission on feedback.submit
  // (the ingest stage's): any other event for an id with no state, stored before any
  // ingested event of it, is dead-lettered `not_found` (a step's forged event for an id that
  // never entered, or that a caller submits later, makes no item).
  starts: (e) =>
    e.type === T.Ingested ||
    (e.type === T.Failed && (e.data as { stage?: unknown }).stage === INGEST_STAGE),
  entrySubject: (item) => `${T.Ingested}.${item}`,
  // A step's event for an item that had not reached the step (its input stored before it) is
  // dead-lettered `conflict` and folds nothing.
  refuses: feedbackRefuses,
};
