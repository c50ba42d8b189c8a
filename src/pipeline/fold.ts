/**
 * The generic per-item state fold: from a pipeline's events, in stream order, the item's
 * status, current steps, each step's result, what it waits on and until when, timestamps.
 * Pure and idempotent: an event at or below the last applied sequence changes nothing.
 *
 * @module
 */
import type { PipelineSpec, StepSpec } from "./definition.ts";
import { eventOf } from "./validate.ts";

/** An event as the fold sees it. */
export interface FoldEvent {
  /** Stream sequence: orders events and makes the fold idempotent. */
  seq: number;
  /** `<pipeline>.<event>`. */
  type: string;
  /** ISO time of the event. */
  time: string;
  /** Definition hash the item's run is pinned to. */
  definition?: string;
  data?: unknown;
}

/** One item's state. */
export interface ItemState {
  status: "running" | "waiting" | "done" | "failed";
  /** The steps the item is at now (several after a fan-out). */
  current: string[];
  /** Result of each completed step, by step id (the latest, for a step in a loop). */
  results: Record<string, unknown>;
  /** How many times each step completed: a loop's bound is checked against it. */
  runs: Record<string, number>;
  /** What the item waits on, and until when (ISO), while waiting. */
  waiting?: { step: string; event: string; until: string };
  /** Terminal outcome. */
  outcome?: string;
  definition?: string;
  createdAt: string;
  updatedAt: string;
  /** Highest stream sequence applied. */
  lastSeq: number;
}

interface Index {
  byEvent: Map<string, { id: string; step: StepSpec; timeout?: boolean }>;
  successors: (id: string) => string[];
}

function index(spec: PipelineSpec): Index {
  const byEvent = new Map<string, { id: string; step: StepSpec; timeout?: boolean }>();
  // End steps last: a terminal event published directly by the step before it ends the item.
  const entries = Object.entries(spec.steps).sort(([, a], [, b]) =>
    Number(a.kind === "end") - Number(b.kind === "end")
  );
  for (const [id, step] of entries) {
    byEvent.set(`${spec.name}.${eventOf(id, step)}`, { id, step });
    if (step.kind === "wait") {
      const to = step.timeoutEvent ?? `${id.replaceAll("-", "_")}_timed_out`;
      byEvent.set(`${spec.name}.${to}`, { id, step, timeout: true });
    }
  }
  const successors = (id: string): string[] => {
    const s = spec.steps[id]!;
    if (s.kind === "end" || s.kind === "router") return [];
    const n = s.next;
    return n === undefined ? [] : typeof n === "string" ? [n] : [...n];
  };
  return { byEvent, successors };
}

/**
 * Applies one event to `state` (undefined before the first). Returns `state` itself when
 * the event was already applied or is not of this pipeline.
 *
 * @example
 * ```ts
 * import { applyPipelineEvent } from "./fold.ts";
 * import type { PipelineSpec } from "./definition.ts";
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
  idx: Index = index(spec),
): ItemState | undefined {
  if (state && event.seq <= state.lastSeq) return state;
  const n = spec.name;
  const base: ItemState = state
    ? {
      ...state,
      current: [...state.current],
      results: { ...state.results },
      runs: { ...state.runs },
    }
    : {
      status: "running",
      current: [spec.start],
      results: {},
      runs: {},
      createdAt: event.time,
      updatedAt: event.time,
      lastSeq: 0,
      ...(event.definition ? { definition: event.definition } : {}),
    };
  base.lastSeq = event.seq;
  base.updatedAt = event.time;
  if (base.status === "done" || base.status === "failed") return base;
  if (event.type === `${n}.failed`) {
    base.status = "failed";
    base.current = [];
    delete base.waiting;
    return base;
  }
  if (spec.input.event && event.type === `${n}.${spec.input.event}`) {
    base.results["$input"] = event.data;
    return base;
  }
  const hit = idx.byEvent.get(event.type);
  if (!hit) return state ? base : undefined;
  const { id, step } = hit;
  const leave = (from: string, to: string[]) => {
    base.current = [...new Set([...base.current.filter((c) => c !== from), ...to])];
  };
  if (step.kind === "end") {
    base.status = step.outcome === "failed" ? "failed" : "done";
    base.outcome = step.outcome;
    base.current = [];
    delete base.waiting;
    return base;
  }
  if (step.kind === "wait") {
    base.results[id] = hit.timeout ? { timedOut: true } : event.data;
    delete base.waiting;
    base.status = "running";
    leave(id, hit.timeout ? [step.onTimeout] : idx.successors(id));
    return base;
  }
  base.results[id] = event.data;
  base.runs[id] = (base.runs[id] ?? 0) + 1;
  let next = idx.successors(id);
  if (step.kind === "router") {
    const label = (event.data as { label?: string } | undefined)?.label;
    next = label && step.routes[label] ? [step.routes[label]!] : [];
  }
  // A join is current only once all its inputs are in.
  next = next.filter((t) => {
    const ts = spec.steps[t]!;
    return ts.kind !== "join" || ts.after.every((a) => a in base.results);
  });
  leave(id, next);
  for (const t of next) {
    const ts = spec.steps[t]!;
    if (ts.kind === "wait") {
      base.status = "waiting";
      base.waiting = {
        step: t,
        event: `${n}.${ts.event}`,
        until: new Date(Date.parse(event.time) + ts.timeoutMs).toISOString(),
      };
    }
  }
  return base;
}

/** Folds events (any order; applied by stream sequence) into one item's state. */
export function foldPipelineEvents(
  spec: PipelineSpec,
  events: readonly FoldEvent[],
): ItemState | undefined {
  const idx = index(spec);
  let s: ItemState | undefined;
  for (const e of [...events].sort((a, b) => a.seq - b.seq)) {
    s = applyPipelineEvent(spec, s, e, idx);
  }
  return s;
}
