/**
 * The generic per-item state fold: from a pipeline's events, in stream order, the item's
 * status, current steps, each step's result, what it waits on and until when, timestamps.
 * Pure and idempotent: an event at or below the last applied sequence changes nothing.
 *
 * @module
 */
import type { PipelineSpec, ScratchEntry } from "./definition.ts";
import { awaitedEventId, entryEvent, FAILED, type FlowData, intakeEntryId, TIMER } from "./flow.ts";
import { eventOf, WORK_KINDS } from "./validate.ts";
import { canonicalDigest, canonicalJson } from "../canonical_json.ts";

/** An event as the fold sees it. */
export interface FoldEvent {
  /** Stream sequence: orders events and makes the fold idempotent. */
  seq: number;
  /** The event's id (a redrive republishes an event with its id). */
  id?: string;
  /** `<pipeline>.<event>`. */
  type: string;
  /** ISO time of the event. */
  time: string;
  /** The item, when the event names it. */
  item_id?: string;
  /** Definition hash the item's run is pinned to. */
  definition?: string;
  data?: unknown;
  /**
   * The message as stored (decoded JSON: the event, or an awaited event's plain JSON). A copy
   * of the message an item failed on resumes it only when this is that message's (the same
   * canonical JSON): a redrive stores it again byte for byte; another body with its id is no
   * redrive. Without it, no such copy resumes an item whose failure records the original.
   */
  body?: unknown;
  /**
   * A hand-over's copy (its `Weft-Handover-To` header set): an event stored again for the
   * steps a changed definition sends it to. It is never a new run of its step.
   */
  handover?: boolean;
}

/** One item's state, as kept in `weft_<pipeline>_state` (`nats kv get`). */
export interface ItemState {
  id?: string;
  status: "running" | "waiting" | "done" | "failed";
  /** The steps the item is at now (several after a fan-out). */
  current: string[];
  /** The input document. */
  input?: unknown;
  /** Result of each completed step, by step id (the latest, for a step in a loop). */
  results: Record<string, unknown>;
  /** How many times each step completed: a loop's bound is checked against it. */
  runs: Record<string, number>;
  /** The shared scratchpad's history: what agents called, found and answered. */
  scratchpad?: ScratchEntry[];
  /** What the item waits on, and until when (ISO), while waiting. */
  waiting?: { step: string; event: string; until: string };
  /** Terminal outcome (`failed` with `error` when it failed). */
  outcome?: string;
  /**
   * Why it failed: the failing step, code and reason, and the id of the event it failed on
   * (`event`): a redrive of that event's dead letter resumes the item.
   */
  error?: {
    stage?: string;
    code?: string;
    reason?: string;
    event?: string;
    /** SHA-256 of the canonical JSON of the message it failed on (what a redrive stores). */
    digest?: string;
  };
  /** Stream sequence of the failure the item ended with, while failed. */
  failed_seq?: number;
  /** The failures a redrive resumed the item from, oldest first. */
  redriven?: { stage?: string; code?: string; reason?: string; seq: number }[];
  /** Hash of the definition the item started on. */
  definition?: string;
  created_at: string;
  updated_at: string;
  /** Stream sequence of the item's first event (where its SSE replay starts). */
  first_seq: number;
  /** Highest stream sequence applied. */
  last_seq: number;
}

interface Index {
  byEvent: Map<string, { id: string; timeout?: boolean }>;
  waits: Map<string, { event: string; timeoutMs: number }>;
}

const indexes = new WeakMap<PipelineSpec, Index>();

function index(spec: PipelineSpec): Index {
  let idx = indexes.get(spec);
  if (idx) return idx;
  const byEvent = new Map<string, { id: string; timeout?: boolean }>();
  const waits = new Map<string, { event: string; timeoutMs: number }>();
  // End steps last: a terminal event published directly by the step before it ends the item.
  const entries = Object.entries(spec.steps).sort(([, a], [, b]) =>
    Number(a.kind === "end") - Number(b.kind === "end")
  );
  for (const [id, step] of entries) {
    byEvent.set(`${spec.name}.${eventOf(id, step)}`, { id });
    if (step.kind === "wait" || step.kind === "join") {
      const to = (step.kind === "wait" && step.timeoutEvent) ||
        `${id.replaceAll("-", "_")}_timed_out`;
      byEvent.set(`${spec.name}.${to}`, { id, timeout: true });
    }
    if (step.kind === "wait") {
      waits.set(id, { event: `${spec.name}.${step.event}`, timeoutMs: step.timeoutMs });
    }
  }
  idx = { byEvent, waits };
  indexes.set(spec, idx);
  return idx;
}

function successors(spec: PipelineSpec, id: string, data: FlowData | undefined, timeout: boolean) {
  const s = spec.steps[id]!;
  if (timeout) return s.kind === "wait" ? [s.onTimeout] : s.kind === "join" ? [s.onDeadline] : [];
  if (s.kind === "end") return [];
  if (s.kind === "router") {
    const label = (data?.results?.[id] as { label?: string } | undefined)?.label;
    return label && s.routes[label] ? [s.routes[label]!] : [];
  }
  const n = s.next;
  return n === undefined ? [] : typeof n === "string" ? [n] : [...n];
}

/**
 * Applies one event to `state` (undefined before the first). Returns `state` itself when
 * the event was already applied, and undefined for an event of no item state.
 *
 * @example
 * ```ts
 * import { applyPipelineEvent } from "./fold.ts";
 * import type { PipelineSpec, ScratchEntry } from "./definition.ts";
 * const spec: PipelineSpec = {
 *   name: "p", input: { schema: {} }, start: "done",
 *   steps: { done: { kind: "end", outcome: "done" } },
 * };
 * const s = applyPipelineEvent(spec, undefined, { seq: 1, type: "p.done", time: "2026-01-01T00:00:00Z" });
 * console.log(s?.status); // "done"
 * ```
 */
export function applyPipelineEvent(
  spec: PipelineSpec,
  state: ItemState | undefined,
  event: FoldEvent,
): ItemState | undefined {
  if (state && event.seq <= state.last_seq) return lateEvent(spec, state, event);
  const n = spec.name;
  // The runtime's own clock ticks fold to nothing, except the timer a failed item failed on,
  // redriven (a timer dead-lettered `definition_changed`): it resumes the item, below.
  const timer = event.type === `${n}.${TIMER}`;
  if (timer && !(state && resumes(state, event))) return state;
  const idx = index(spec);
  const data = event.data as FlowData | undefined;
  const base: ItemState = state
    ? {
      ...state,
      current: [...state.current],
      results: { ...state.results },
      runs: { ...state.runs },
    }
    : {
      ...(event.item_id ? { id: event.item_id } : {}),
      status: "running",
      current: [],
      results: {},
      runs: {},
      created_at: event.time,
      updated_at: event.time,
      first_seq: event.seq,
      last_seq: 0,
      ...(event.definition ? { definition: event.definition } : {}),
    };
  base.last_seq = event.seq;
  // Events apply in stream order: a time a producer wrote earlier than the state's never moves
  // it back (and a copy of a completion the state holds leaves it, below).
  base.updated_at = later(base.updated_at, event.time);
  const resumed = resumes(base, event);
  if (resumed) {
    // The event the item failed on, stored again after the failure: its dead letter was
    // redriven (byte for byte, so with its id and body). The item resumes from it, as if new.
    const { event: _, digest: _d, ...why } = base.error!;
    base.redriven = [...base.redriven ?? [], { ...why, seq: event.seq }];
    base.status = "running";
    delete base.error;
    delete base.failed_seq;
    delete base.outcome;
    if (timer) {
      // At the step whose timer fires: the control step decides it now (its deadline passed).
      const step = (data as { step?: unknown } | undefined)?.step;
      base.current = typeof step === "string" && step in spec.steps ? [step] : [];
      return base;
    }
  }
  if (base.status === "done" || base.status === "failed") {
    // A copy of a step's run the state holds changes nothing, not even `updated_at`, as for an
    // item in flight (below): a step's key storing the event a failed item failed on again
    // with another result dated 2099 was dead-lettered `conflict`, yet set the item's
    // updated_at to 2099. (Any other event stored after the end still dates it.)
    const hit = idx.byEvent.get(event.type);
    if (
      state && hit && spec.steps[hit.id]?.kind !== "end" &&
      (data?.runs?.[hit.id] ?? 0) <= (state.runs[hit.id] ?? 0)
    ) {
      return { ...state, last_seq: event.seq };
    }
    return base;
  }
  if (event.type === `${n}.${FAILED}`) {
    base.status = "failed";
    base.outcome = FAILED;
    const d = event.data as
      | {
        stage?: string;
        code?: string;
        reason?: string;
        subject?: string;
        event_id?: string;
        original_sha256?: unknown;
        original?: unknown;
      }
      | undefined;
    base.error = { stage: d?.stage, code: d?.code, reason: d?.reason };
    // What the message it failed on was (a failure stored before the digest was recorded has
    // the message itself, when it was small).
    const digest = typeof d?.original_sha256 === "string"
      ? d.original_sha256
      : d?.original !== undefined
      ? canonicalDigest(d.original)
      : undefined;
    base.failed_seq = event.seq;
    // The event it failed on: a Weft event by its id, an awaited one (plain JSON) by its
    // subject, as it is known when stored again. A bus submission the intake refused (the
    // item never entered) by the entry event its redrive makes of it.
    const failedOn = d?.subject === `${n}.submit` && event.item_id
      ? intakeEntryId(spec, event.item_id)
      : typeof d?.event_id === "string"
      ? d.event_id
      : typeof d?.subject === "string" && d.subject.split(".")[1] !== FAILED
      ? awaitedEventId(d.subject)
      : undefined;
    if (failedOn !== undefined) base.error.event = failedOn;
    // (A redrive of a refused submission stores an entry event made from it, not its bytes:
    // the digest is the submission's, checked where the submission is read again.)
    const atIntake = d?.subject === `${n}.submit`;
    if (failedOn !== undefined && digest !== undefined && !atIntake) base.error.digest = digest;
    base.current = [];
    delete base.waiting;
    return base;
  }
  if (event.type === `${n}.${entryEvent(spec)}`) {
    base.input = data?.input;
    base.current = [spec.start];
    return base;
  }
  const hit = idx.byEvent.get(event.type);
  if (!hit) return state ? base : undefined; // an awaited event: the wait's own event follows
  // An event the item's history does not lead to (a step's key publishing its event, or the
  // end its step leads to, for an item not at the step) changes nothing.
  if (state && !resumed && refusal(spec, state, event) !== undefined) {
    return { ...state, last_seq: event.seq };
  }
  const { id } = hit;
  const step = spec.steps[id]!;
  if (step.kind === "end") {
    base.status = step.outcome === FAILED ? "failed" : "done";
    base.outcome = step.outcome;
    base.current = [];
    delete base.waiting;
    return base;
  }
  const run = data?.runs?.[id] ?? 0;
  let next: string[];
  if (
    state && !resumed &&
    (run <= (state.runs[id] ?? 0) || (id in state.runs && !state.current.includes(id)))
  ) {
    // A step's completion counts once per run (a loop runs a step again: its run count
    // grows). A copy of the run the state holds, with its result, stored again (a hand-over's,
    // for the steps the running definition now sends it to), brings the item to those of its
    // next steps that have not run since, and nothing else. Any other copy (a step's key
    // publishing its event again with another result), or a run of a step that ran and that
    // the item is not at, changes nothing, not even `updated_at` (the redrive that resumes an
    // item from the event it failed on is taken as new, above).
    const same = run === (state.runs[id] ?? 0) &&
      canonicalJson(data?.results?.[id]) === canonicalJson(state.results[id]);
    next = !same
      ? []
      : successors(spec, id, data, hit.timeout === true).filter((t) =>
        spec.steps[t]!.kind !== "end" && !state.current.includes(t) &&
        (state.runs[t] ?? 0) <= (data?.runs?.[t] ?? 0)
      );
    if (next.length === 0) return { ...state, last_seq: event.seq };
    base.current = [...base.current, ...next];
  } else {
    if (hit.timeout && step.kind === "join") {
      // The branches a timed-out join went on without: the control step counts this round's
      // run of each of their steps, and the item is no longer at them (their late run of this
      // round, a copy of that count, changes nothing).
      base.current = base.current.filter((c) => (data?.runs?.[c] ?? 0) <= (base.runs[c] ?? 0));
    }
    if (data?.results) {
      for (const [k, v] of Object.entries(data.results)) {
        // Only a result of a run at least as late as the one the state holds (a parallel
        // branch's event carries the results from before it split).
        if ((data.runs?.[k] ?? 0) >= (base.runs[k] ?? 0)) base.results[k] = v;
      }
      for (const [k, v] of Object.entries(data.runs ?? {})) {
        base.runs[k] = Math.max(base.runs[k] ?? 0, v);
      }
    }
    if (hit.timeout) base.results[id] = { timed_out: true };
    if (data?.notes?.length) {
      const have = new Set((base.scratchpad ?? []).map((e) => e.id));
      base.scratchpad = [
        ...base.scratchpad ?? [],
        ...data.notes.filter((e) => !have.has(e.id)),
      ];
    }
    // End steps are never current: their event follows at once, from this step.
    next = successors(spec, id, data, hit.timeout === true)
      .filter((t) => spec.steps[t]!.kind !== "end");
    // A join becomes current with its first input; it leaves when it completes.
    base.current = [...new Set([...base.current.filter((c) => c !== id), ...next])];
    if (base.waiting?.step === id) delete base.waiting;
  }
  const wait = next.map((t) => [t, idx.waits.get(t)] as const).find(([, w]) => w);
  if (wait) {
    base.waiting = {
      step: wait[0],
      event: wait[1]!.event,
      until: new Date(Date.parse(event.time) + wait[1]!.timeoutMs).toISOString(),
    };
  }
  base.status = base.waiting ? "waiting" : "running";
  return base;
}

/**
 * Why the item `state` (in flight, before `event`) does not take `event`, a step's event or an
 * end: undefined when it does, or when the fold judges it elsewhere (a copy of a run the state
 * holds, a redrive resuming a failed item, an event of an item that has ended, a control step's
 * event). A work step's new run counts only for a step the item is at, or one a completion the
 * state holds leads to (a step a changed definition added after it, whose consumer reads the
 * stream's history); an end only after a completion the state holds that leads there, with the
 * run and result the end carries (the end's event follows its step's completion at once).
 * Otherwise a step's key could end any item, or run its step for one, wherever the item is: an
 * item waiting for a person's decision, done with no decision.
 */
export function refusal(
  spec: PipelineSpec,
  state: ItemState,
  event: FoldEvent,
): string | undefined {
  if (event.seq <= state.last_seq || state.status === "done" || state.status === "failed") {
    return undefined;
  }
  if (resumes(state, event)) return undefined;
  const idx = index(spec);
  const hit = idx.byEvent.get(event.type);
  if (!hit) return undefined;
  const data = event.data as FlowData | undefined;
  const runs = data?.runs ?? {};
  const results = data?.results ?? {};
  /** A completion the state holds, with the run and result `event` carries, leads to `to`. */
  const heldLeadsTo = (to: string) =>
    Object.keys(state.runs).some((p) => {
      const ps = spec.steps[p];
      if (!ps || ps.kind === "end" || (runs[p] ?? 0) < 1 || state.runs[p] !== runs[p]) {
        return false;
      }
      if (canonicalJson(state.results[p]) !== canonicalJson(results[p])) return false;
      const timedOut = (ps.kind === "wait" || ps.kind === "join") &&
        canonicalJson(results[p]) === canonicalJson({ timed_out: true });
      return successors(spec, p, data, timedOut).includes(to);
    });
  /** Whether a new run of work step `s` is one the item's history leads to. */
  const workLeads = (s: string) =>
    state.current.includes(s) || heldLeadsTo(s) ||
    // The entry leads to the start (a start a changed definition names).
    (s === spec.start && !(s in state.runs));
  const step = spec.steps[hit.id]!;
  const item = state.id ?? event.item_id;
  if (step.kind === "end") {
    // A step whose own event is the end's: its completion is the end.
    const own = Object.entries(spec.steps).find(([k, v]) =>
      v.kind !== "end" && eventOf(k, v) === event.type.slice(spec.name.length + 1)
    );
    if (own) {
      const [k, v] = own;
      const fresh = (runs[k] ?? 0) > (state.runs[k] ?? 0);
      return !WORK_KINDS.has(v.kind) || !fresh || workLeads(k)
        ? undefined
        : notAt(spec.name, item, k);
    }
    if (hit.id === spec.start && Object.keys(runs).length === 0) return undefined;
    if (heldLeadsTo(hit.id)) return undefined;
    return `${spec.name} item ${item} holds no completion that leads to its end ` +
      `${JSON.stringify(hit.id)} with the run and result this ${event.type} carries ` +
      `(it is at ${state.current.join(", ") || "no step"}): it does not end there`;
  }
  if (!WORK_KINDS.has(step.kind) || hit.timeout) return undefined;
  const run = runs[hit.id] ?? 0;
  const have = state.runs[hit.id] ?? 0;
  // A copy of a run the state holds: judged by the fold itself. A new run of a step the item
  // went past is judged below like any other: found by probing, a step's key publishing its
  // event again with a run count above the state's (a router's, with the label of another
  // branch, for an item waiting for a decision) was taken by the next step, which ran for an
  // item its state did not lead there, though the fold took nothing from it.
  if (run <= have) return undefined;
  if (event.handover) {
    return `${spec.name} item ${item} has no run ${run} of step ${JSON.stringify(hit.id)} for ` +
      `this hand-over copy to be a copy of (only the runtime's hand-over sets its header)`;
  }
  // A step that ran and that the item is not at: a completion held from before its run (the
  // step before it's) no longer leads there (found by re-probing: the tickets route key's
  // `runs.route: 2` for an item waiting for approval, led to by triage's completion, ran the
  // reply step). A loop makes such a step current again before its next run.
  if (hit.id in state.runs && !state.current.includes(hit.id)) {
    return notAt(spec.name, item, hit.id);
  }
  return workLeads(hit.id) ? undefined : notAt(spec.name, item, hit.id);
}

function notAt(pipeline: string, item: string | undefined, step: string): string {
  return `${pipeline} item ${item} has not reached step ${
    JSON.stringify(step)
  }, and no completion its ` +
    `state holds leads there: this run of it does not count`;
}

/** The later of two ISO times (`current` when `next` is no time, or not later). */
function later(current: string, next: string): string {
  const at = Date.parse(next);
  return Number.isNaN(at) || at <= Date.parse(current) ? current : next;
}

/**
 * Whether `event` resumes the failed item `state`: it is the message the item failed on,
 * stored again (a redrive): its id, and, when the failure records the message's digest, its
 * body. A copy with that id and another body (a step's key writing its event again) is none.
 */
function resumes(state: ItemState, event: FoldEvent): boolean {
  if (state.status !== "failed" || event.id === undefined || event.id !== state.error?.event) {
    return false;
  }
  const want = state.error.digest;
  return want === undefined || (event.body !== undefined && canonicalDigest(event.body) === want);
}

/**
 * An event stored before the last one applied, delivered late (redelivered after the state
 * writer restarted, while the item's later events were written). The state must not depend
 * on the order of delivery (a rebuild from the stream folds in order), so: an end or failure
 * ends the item as it would have; otherwise where the item is does not move back, but what
 * only this event carries still counts: its scratchpad entries (each once, in the order they
 * were written), the results no later event carries (a parallel branch's), and its step
 * leaving the current steps (or the wait it closes). The same state object when it adds
 * nothing.
 */
function lateEvent(spec: PipelineSpec, state: ItemState, event: FoldEvent): ItemState {
  const ended = state.status === "done" || state.status === "failed";
  const n = spec.name;
  const endStep = spec.steps[index(spec).byEvent.get(event.type)?.id ?? ""];
  if (
    state.status === "failed" && endStep?.kind === "end" && endStep.outcome !== FAILED &&
    state.failed_seq !== undefined && event.seq < state.failed_seq
  ) {
    // An end stored before the failure the item ended with, delivered after it: in order the
    // item ended there, and a failure after its end changes nothing.
    const { error: _, failed_seq: _at, ...rest } = state;
    return { ...rest, status: "done", outcome: endStep.outcome, current: [] };
  }
  const terminal = !ended && (event.type === `${n}.${FAILED}` ||
    spec.steps[index(spec).byEvent.get(event.type)?.id ?? ""]?.kind === "end");
  if (terminal) {
    // An end stored earlier ends the item, as it would have in order (it stays ended).
    const now = applyPipelineEvent(spec, { ...state, last_seq: event.seq - 1 }, event)!;
    return { ...now, last_seq: state.last_seq, updated_at: state.updated_at };
  }
  const data = event.data as FlowData | undefined;
  const have = new Set((state.scratchpad ?? []).map((e) => e.id));
  const notes = (data?.notes ?? []).filter((e) => !have.has(e.id));
  const results = Object.entries(data?.results ?? {}).filter(([k]) => !(k in state.results));
  // The step it completed leaves the current steps (unless a later run of it is under way),
  // and those it leads to that have not run join them, as in order.
  const hit = index(spec).byEvent.get(event.type);
  const done = hit && !ended &&
      spec.steps[hit.id]!.kind !== "end" && (data?.runs?.[hit.id] ?? 0) >= (state.runs[hit.id] ?? 0)
    ? hit
    : undefined;
  const current = done
    ? [
      ...new Set([
        ...state.current.filter((c) => c !== done.id),
        ...successors(spec, done.id, data, done.timeout === true).filter((t) =>
          spec.steps[t]!.kind !== "end" && !(t in state.results)
        ),
      ]),
    ]
    : state.current;
  const moved = current.length !== state.current.length ||
    current.some((c, i) => c !== state.current[i]);
  const waited = done !== undefined && state.waiting?.step === done.id;
  const earlier = event.seq < state.first_seq;
  const input = event.type === `${n}.${entryEvent(spec)}` && state.input === undefined;
  if (notes.length === 0 && results.length === 0 && !moved && !waited && !earlier && !input) {
    return state;
  }
  const next: ItemState = {
    ...state,
    current,
    results: { ...state.results },
    runs: { ...state.runs },
  };
  if (earlier) {
    next.first_seq = event.seq;
    next.created_at = event.time;
    if (event.definition) next.definition = event.definition;
  }
  if (input) next.input = data?.input;
  if (waited) {
    delete next.waiting;
    next.status = "running";
  }
  for (const [k, v] of results) {
    next.results[k] = v;
    next.runs[k] = Math.max(next.runs[k] ?? 0, data?.runs?.[k] ?? 1);
  }
  if (notes.length > 0) {
    // Stable: entries written at one time (a step's turn) keep their order.
    next.scratchpad = [...state.scratchpad ?? [], ...notes]
      .sort((a, b) => Date.parse(a.at) - Date.parse(b.at));
  }
  return next;
}

/** Folds events (any order; applied by stream sequence) into one item's state. */
export function foldPipelineEvents(
  spec: PipelineSpec,
  events: readonly FoldEvent[],
): ItemState | undefined {
  let s: ItemState | undefined;
  for (const e of [...events].sort((a, b) => a.seq - b.seq)) s = applyPipelineEvent(spec, s, e);
  return s;
}
