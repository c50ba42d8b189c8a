/**
 * How a definition runs, as pure functions: the events of a run, what each event leads to,
 * and the events a step publishes when it completes. The services (src/pipeline/runtime.ts)
 * do the I/O around them.
 *
 * Every event of a run is `<pipeline>.<event>.<item>` with the usual envelope (id, type,
 * item, trace, time, source), the hash of the definition the item started on, and a
 * {@link FlowData}: the item's input, the value handed to the next step, and every result
 * so far. So each step is a pure function of the event that triggers it (no state to read),
 * and the item's context travels with it (context passing).
 *
 * @module
 */
import { Ajv, type ValidateFunction } from "ajv";
import { ErrorCode, ValidationError, WeftError } from "../errors.ts";
import { createEnvelope, deterministicId } from "../events.ts";
import type {
  PipelineDefinition,
  PipelineSpec,
  ScratchEntry,
  StepSpec,
  WaitStep,
} from "./definition.ts";
import { edgesOf, eventOf } from "./validate.ts";

/** The entry event type's token when the input names none: `<pipeline>.submitted.<item>`. */
export const SUBMITTED = "submitted";
/** The failure event's token: `<pipeline>.failed.<item>`. */
export const FAILED = "failed";
/** Timer firings (deadlines, timeouts, delays) from the scheduler: `<pipeline>._timer.<item>`. */
export const TIMER = "_timer";
/**
 * The id an awaited event (a person's or a callback's plain JSON, which has none) is known
 * by in an item's fold: from its subject.
 *
 * @example
 * ```ts
 * import { awaitedEventId } from "./flow.ts";
 * awaitedEventId("orders.approved.o1"); // "awaited-orders.approved.o1"
 * ```
 */
export function awaitedEventId(subject: string): string {
  return `awaited-${subject}`;
}

/** Tokens no step may publish: the runtime's own. */
export const RESERVED_EVENTS: ReadonlySet<string> = new Set([SUBMITTED, FAILED, "submit", TIMER]);

/** What every event of a run carries. */
export interface FlowData {
  /** The item's input document. */
  input: unknown;
  /** What the next step receives: the last step's result (a router or delay passes its own on). */
  value: unknown;
  /** Every completed step's result, by step id (a router's is `{ label }`). */
  results: Record<string, unknown>;
  /** How many times each step completed (loops are bounded by it). */
  runs: Record<string, number>;
  /** What this step appended to the item's scratchpad (an agent's tool calls and answer). */
  notes?: ScratchEntry[];
}

/** An event of a run. */
export interface FlowEvent {
  id: string;
  type: string;
  version: 1;
  item_id: string;
  trace_id: string;
  time: string;
  source: string;
  /** Hash of the definition the item started on. */
  definition: string;
  data: FlowData;
}

/** What a timer firing carries: which step it is for, and the data it resumes with. */
export interface TimerData {
  step: string;
  /** When it was due (ISO). */
  due: string;
  /** The data of the event that armed it (a delay resumes with it). */
  carry: FlowData;
  /** How often it was put off because its item had failed (each time twice as long). */
  postponed?: number;
}

/** The entry event type of `spec` (a token). */
export function entryEvent(spec: PipelineSpec): string {
  return spec.input.event ?? SUBMITTED;
}

/**
 * The id of the entry event a pipeline's intake publishes for a bus submission's item: fixed
 * by the item, so the entry of a redriven submission is known before it is stored (its item's
 * failure at intake names it, and the fold resumes the item from it).
 */
export function intakeEntryId(spec: PipelineSpec, item: string): string {
  const type = `${spec.name}.${entryEvent(spec)}`;
  // flowEvent's id for the entry the intake makes from its cause id, deterministicId(item, type).
  return deterministicId(deterministicId(item, type), type);
}

/** The event a wait or join publishes when its timeout or deadline wins. */
export function timeoutEventOf(id: string, step: StepSpec): string {
  return (step.kind === "wait" && step.timeoutEvent) || `${id.replaceAll("-", "_")}_timed_out`;
}

/** What an event type is in a definition. */
export type EventRole =
  | { role: "entry" }
  | { role: "done"; step: string }
  | { role: "timeout"; step: string }
  | { role: "end"; step: string }
  | { role: "failed" }
  | { role: "awaited"; waits: string[] }
  | { role: "timer" };

/** A definition ready to run: its event roles and compiled schemas. */
export interface Flow {
  readonly def: PipelineDefinition;
  readonly name: string;
  /** Role of each event token (`sentiment_analyzed`, `approved`, ...). */
  readonly roles: ReadonlyMap<string, EventRole>;
  /** Validates an input document. */
  readonly checkInput: ValidateFunction;
  /** Validates a step's result, by step id. */
  readonly checkOutput: ReadonlyMap<string, ValidateFunction>;
  /** Validates an awaited event's body, by the id of a wait step with a `schema`. */
  readonly checkAwaited: ReadonlyMap<string, ValidateFunction>;
  /** Declared loop bounds, by `from>to`. */
  readonly loops: ReadonlyMap<string, number>;
}

/** Prepares a validated definition to run. */
export function compileFlow(def: PipelineDefinition): Flow {
  const ajv = new Ajv({ strict: false, allErrors: false });
  const roles = new Map<string, EventRole>();
  roles.set(entryEvent(def), { role: "entry" });
  roles.set(FAILED, { role: "failed" });
  roles.set(TIMER, { role: "timer" });
  const checkOutput = new Map<string, ValidateFunction>();
  for (const [id, step] of Object.entries(def.steps)) {
    if (step.kind === "end") {
      roles.set(eventOf(id, step), { role: "end", step: id });
      continue;
    }
    // An end step's event may also be the event of the step before it (validate.ts).
    if (!roles.has(eventOf(id, step))) roles.set(eventOf(id, step), { role: "done", step: id });
    if (step.kind === "wait" || step.kind === "join") {
      roles.set(timeoutEventOf(id, step), { role: "timeout", step: id });
    }
    if ("output" in step) checkOutput.set(id, ajv.compile(step.output as object));
  }
  const checkAwaited = new Map<string, ValidateFunction>();
  for (const [id, step] of Object.entries(def.steps)) {
    if (step.kind !== "wait") continue;
    if (step.schema) checkAwaited.set(id, ajv.compile(step.schema as object));
    const r = roles.get(step.event);
    if (r?.role === "awaited") r.waits.push(id);
    else if (!r) roles.set(step.event, { role: "awaited", waits: [id] });
  }
  return {
    def,
    name: def.name,
    roles,
    checkInput: ajv.compile(def.input.schema as object),
    checkOutput,
    checkAwaited,
    loops: new Map((def.loops ?? []).map((l) => [`${l.from}>${l.to}`, l.maxIterations])),
  };
}

/** The steps an event of type `token` (with `data`) hands the item to. */
export function targetsOf(flow: Flow, token: string, data: FlowData | undefined): string[] {
  const role = flow.roles.get(token);
  if (!role) return [];
  const steps = flow.def.steps;
  if (role.role === "entry") return [flow.def.start];
  if (role.role === "timeout") {
    const s = steps[role.step]!;
    return s.kind === "wait" ? [s.onTimeout] : s.kind === "join" ? [s.onDeadline] : [];
  }
  if (role.role !== "done") return [];
  const s = steps[role.step]!;
  if (s.kind === "router") {
    const label = (data?.results?.[role.step] as { label?: unknown } | undefined)?.label;
    const to = typeof label === "string" ? s.routes[label] : undefined;
    return to ? [to] : [];
  }
  return edgesOf(s).filter(([, via]) => via === "next").map(([t]) => t);
}

const TOKEN = /^[A-Za-z0-9_-]+$/;

/**
 * Checks that `raw` is an event of this flow stored on `subject`: the envelope, a known
 * type, the subject's item (the subject names the item; a body cannot name another).
 */
export function decodeFlowEvent(flow: Flow, raw: unknown, subject: string): FlowEvent {
  const parts = subject.split(".");
  const e = raw as Partial<FlowEvent> | null;
  const bad = (field: string, why: string): never => {
    throw new ValidationError(`${field} ${why}`, { code: ErrorCode.InvalidEvent, field });
  };
  if (e === null || typeof e !== "object" || Array.isArray(e)) bad("/", "must be an object");
  for (const f of ["id", "type", "item_id", "trace_id", "time", "source"] as const) {
    if (typeof e![f] !== "string" || e![f]!.length === 0) bad(`/${f}`, "must be a string");
  }
  if (parts.length !== 3 || parts[0] !== flow.name || !TOKEN.test(parts[2]!)) {
    bad("/type", `is not an event of pipeline ${flow.name} (subject ${subject})`);
  }
  if (e!.type !== `${flow.name}.${parts[1]}`) bad("/type", `does not match its subject ${subject}`);
  if (e!.item_id !== parts[2]) {
    throw new ValidationError(`/item_id does not match its subject ${subject}`, {
      code: ErrorCode.SubjectMismatch,
      field: "/item_id",
    });
  }
  const d = e!.data as Partial<FlowData> | undefined;
  if (parts[1] !== FAILED) {
    if (!d || typeof d !== "object") bad("/data", "must be an object");
    if (parts[1] !== TIMER) {
      if (!d!.results || typeof d!.results !== "object") bad("/data/results", "must be an object");
      if (!d!.runs || typeof d!.runs !== "object") bad("/data/runs", "must be an object");
    }
  }
  return e as FlowEvent;
}

/** Context of a step's completion: who publishes it, when, on which trace. */
export interface EmitContext {
  source: string;
  now: Date;
}

/**
 * The events a step publishes when it completes with `data`: its own (`<name>.<event>`
 * or, with `timedOut`, its timeout event), plus the terminal event of each end step it
 * leads to (end steps have no service). Ids follow from `cause` and the type, so a
 * redelivered input publishes the same ids and the stream's duplicate window drops them.
 * Throws a permanent error when a loop's bound would be passed.
 */
export function completion(
  flow: Flow,
  step: string,
  cause: { id: string; item_id: string; trace_id: string; definition?: string },
  data: FlowData,
  ctx: EmitContext,
  opts: { timedOut?: boolean } = {},
): FlowEvent[] {
  const spec = flow.def.steps[step]!;
  const token = opts.timedOut ? timeoutEventOf(step, spec) : eventOf(step, spec);
  const event = flowEvent(flow, token, cause, data, ctx);
  for (const t of targetsOf(flow, token, data)) {
    const bound = flow.loops.get(`${step}>${t}`);
    if (bound !== undefined && (data.runs[t] ?? 0) >= bound) {
      throw new WeftError(
        ErrorCode.LoopLimit,
        `loop ${step} -> ${t} would run ${t} more than its bound of ${bound} times`,
        { permanent: true },
      );
    }
  }
  return [event, ...endEventsAfter(flow, event, ctx)];
}

/**
 * The terminal events of the end steps `event` (a step's completion) leads to, as
 * {@link completion} publishes them beside it: their ids follow from the event's, so the
 * same event always ends its item with the same ids.
 */
export function endEventsAfter(flow: Flow, event: FlowEvent, ctx: EmitContext): FlowEvent[] {
  const token = event.type.slice(flow.name.length + 1);
  const out: FlowEvent[] = [];
  for (const t of targetsOf(flow, token, event.data)) {
    const ts = flow.def.steps[t]!;
    if (ts.kind === "end" && eventOf(t, ts) !== token) {
      out.push(flowEvent(flow, eventOf(t, ts), event, event.data, ctx));
    }
  }
  return out;
}

/** One event of the run, its id derived from `cause`'s. */
export function flowEvent(
  flow: Flow,
  token: string,
  cause: { id: string; item_id: string; trace_id: string; definition?: string },
  data: FlowData | TimerData,
  ctx: EmitContext,
): FlowEvent {
  const e = createEnvelope({
    type: `${flow.name}.${token}`,
    itemId: cause.item_id,
    traceId: cause.trace_id,
    source: ctx.source,
    data,
    id: deterministicId(cause.id, `${flow.name}.${token}`),
    time: ctx.now,
  }) as unknown as Omit<FlowEvent, "definition">;
  return { ...e, definition: cause.definition ?? flow.def.hash } as FlowEvent;
}

/** The data after `step` completed with `result`, handing `value` on. */
export function advance(data: FlowData, step: string, result: unknown, value: unknown): FlowData {
  return {
    input: data.input,
    value,
    results: { ...data.results, [step]: result },
    runs: { ...data.runs, [step]: (data.runs[step] ?? 0) + 1 },
  };
}

/** The first data of an item. */
export function entryData(input: unknown): FlowData {
  return { input, value: input, results: {}, runs: {} };
}

/**
 * Checks an awaited event's body against the schema of each wait step awaiting it (`waits`).
 * Throws a ValidationError (`invalid_awaited_event`) whose `field` is a JSON pointer into the
 * body: the gateway answers it with 422, the control step dead-letters it, and the item keeps
 * waiting.
 */
export function checkAwaitedEvent(flow: Flow, waits: readonly string[], body: unknown): void {
  for (const w of waits) {
    const check = flow.checkAwaited.get(w);
    if (!check || check(body)) continue;
    const { field, message } = schemaFailure(check);
    throw new ValidationError(
      `the awaited event ${flow.name}.${(flow.def.steps[w] as WaitStep).event}: ${message}`,
      { code: ErrorCode.InvalidAwaitedEvent, field },
    );
  }
}

/**
 * The first field a compiled schema refused, as a JSON pointer, and what is wrong with it
 * (`/amount is required`, `/weight must be >= 1`), for a problem or dead letter naming it.
 */
export function schemaFailure(
  check: ValidateFunction,
  at = "",
): { field: string; message: string } {
  const e = check.errors?.[0];
  const missing = (e?.params as { missingProperty?: string } | undefined)?.missingProperty;
  const field = `${at}${e?.instancePath ?? ""}${missing ? `/${missing}` : ""}` || "/";
  return {
    field,
    message: missing ? `${field} is required` : `${field} ${e?.message ?? "is invalid"}`,
  };
}

/**
 * The steps on join `join`'s branch to its input `input`: those from which `input` is reached
 * (`input` included) without passing through the join, and from which no other input of the
 * join is (the step that fans out reaches them all: it is no branch's).
 *
 * @example
 * ```ts
 * import { branchSteps } from "./flow.ts";
 * import type { PipelineSpec } from "./definition.ts";
 * const task = (next: string | string[]) => ({ kind: "task" as const, output: {}, next });
 * const spec: PipelineSpec = {
 *   name: "orders", input: { schema: {} }, start: "split",
 *   steps: {
 *     split: task(["a1", "b"]), a1: task("a2"), a2: task("j"), b: task("j"),
 *     j: { kind: "join", after: ["a2", "b"], deadlineMs: 1000, onDeadline: "done", next: "done" },
 *     done: { kind: "end", outcome: "done" },
 *   },
 * };
 * console.log(branchSteps(spec, "j", "a2")); // ["a1", "a2"]
 * ```
 */
export function branchSteps(spec: PipelineSpec, join: string, input: string): string[] {
  const j = spec.steps[join];
  if (j?.kind !== "join") return [];
  const reaches = (from: string): Set<string> => {
    const seen = new Set([from]);
    const queue = [from];
    while (queue.length > 0) {
      const at = queue.shift()!;
      const step = at === join ? undefined : spec.steps[at];
      for (const [t] of step ? edgesOf(step) : []) {
        if (!seen.has(t)) (seen.add(t), queue.push(t));
      }
    }
    return seen;
  };
  const others = j.after.filter((a) => a !== input);
  return Object.keys(spec.steps).filter((s) => {
    if (s === join || spec.steps[s]!.kind === "end") return false;
    const r = reaches(s);
    return r.has(input) && !others.some((o) => r.has(o));
  }).sort();
}
