/**
 * What the runtime derives from a definition: subjects, stream, durable consumers,
 * per-step publish/subscribe permissions and the dashboard graph. Pure functions.
 *
 * @module
 */
import type { PipelineSpec, StepSpec } from "./definition.ts";
import type { StageInputs } from "../failure_letter.ts";
import { CONTROL, edgesOf, eventOf, FLOW, INTAKE, STATE, WORK_KINDS } from "./validate.ts";
import { entryEvent, FAILED, timeoutEventOf } from "./flow.ts";

/**
 * The durable consumer (and stage, metrics label, dead-letter subject) of a step or of the
 * runtime's own parts: `<pipeline>-<step>`, unique in the mesh, or the step's own `durable`.
 */
export function durableOf(
  spec: { name: string; steps?: Readonly<Record<string, unknown>> },
  step: string,
): string {
  const own = (spec.steps?.[step] as { durable?: string } | undefined)?.durable;
  return own ?? `${spec.name}-${step}`;
}
/** Step kinds the control service runs: they hold an item, with no handler of their own. */
export const CONTROL_KINDS: ReadonlySet<StepSpec["kind"]> = new Set(["join", "wait", "delay"]);
export { CONTROL, FLOW, INTAKE, STATE, WORK_KINDS };

/** Subjects and stream of one pipeline. */
export interface PipelineSubjects {
  /** JetStream stream name: the pipeline name upper-cased (`-` becomes `_`). */
  stream: string;
  /** The stream's subjects: `<name>.>`. */
  streamSubjects: string[];
  /** Plain submissions (`nats pub <name>.submit`). */
  submit: string;
  /** Request/reply submission (`nats req weft.<name>.submit`). */
  submitRequest: string;
  /** Request/reply state lookup. */
  getRequest: string;
  /** Every event type `<name>.<event>`, in step order, then `<name>.failed`. */
  eventTypes: string[];
}

/**
 * A KV bucket of the pipeline named `name`: `weft_<name>_<part>`, `-` as `_` (bucket names
 * cannot hold `-`).
 *
 * @example
 * ```ts
 * import { pipelineBucketOf } from "./derive.ts";
 * console.assert(pipelineBucketOf("sup-port", "state") === "weft_sup_port_state");
 * ```
 */
export function pipelineBucketOf(name: string, part: string): string {
  return `weft_${name.replaceAll("-", "_")}_${part}`;
}

/** The stream of the pipeline named `name`: its name in capitals, `-` as `_`. */
export function pipelineStreamOf(name: string): string {
  return name.toUpperCase().replaceAll("-", "_");
}

/** The subjects and stream of `spec`. */
export function pipelineSubjects(spec: PipelineSpec): PipelineSubjects {
  const n = spec.name;
  const types = new Set<string>();
  types.add(`${n}.${entryEvent(spec)}`);
  for (const [id, step] of Object.entries(spec.steps)) {
    for (const e of publishedEvents(spec, id, step)) types.add(e);
  }
  types.add(`${n}.failed`);
  return {
    stream: pipelineStreamOf(n),
    streamSubjects: [`${n}.>`],
    submit: `${n}.submit`,
    submitRequest: `weft.${n}.submit`,
    getRequest: `weft.${n}.get`,
    eventTypes: [...types],
  };
}

/** Event types (`<name>.<event>`) a step's service publishes. */
function publishedEvents(spec: PipelineSpec, id: string, step: StepSpec): string[] {
  const n = spec.name;
  if (step.kind === "end") return [`${n}.${eventOf(id, step)}`];
  const out = [`${n}.${eventOf(id, step)}`];
  if (step.kind === "wait" || step.kind === "join") out.push(`${n}.${timeoutEventOf(id, step)}`);
  if (step.kind === "task") { for (const e of step.alsoEmits ?? []) out.push(`${n}.${e}`); }
  return out;
}

/**
 * The subject filter a work step consumes: what leads into it. Control steps (join, wait,
 * delay) and end steps have none of their own (the control service holds the items).
 */
export function stepFilterSubject(spec: PipelineSpec, id: string): string | null {
  const subjects = stepFilterSubjects(spec, id);
  if (subjects === null) return null;
  return subjects.length === 1 ? subjects[0]! : `${spec.name}.*.*`;
}

/**
 * The subjects of work step `id`'s inputs, one per event that leads to it (null for other
 * kinds). A consumer filters on all of them at once on nats-server 2.10+ (`filter_subjects`);
 * {@link stepFilterSubject} is their wildcard, for older servers.
 *
 * @example
 * ```ts
 * import { definePipeline } from "./definition.ts";
 * import { stepFilterSubjects } from "./derive.ts";
 * const p = definePipeline({
 *   name: "p",
 *   input: { schema: { type: "object" } },
 *   start: "a",
 *   steps: {
 *     a: { kind: "router", route: () => "x" as const, routes: { x: "b", y: "c" } },
 *     b: { kind: "task", output: { type: "object" }, handle: (v) => v, next: "c" },
 *     c: { kind: "task", output: { type: "object" }, handle: (v) => v, next: "done" },
 *     done: { kind: "end", outcome: "done" },
 *   },
 * });
 * console.assert(stepFilterSubjects(p, "c")!.join() === "p.a.*,p.b.*");
 * ```
 */
export function stepFilterSubjects(spec: PipelineSpec, id: string): string[] | null {
  const n = spec.name;
  const step = spec.steps[id]!;
  if (!WORK_KINDS.has(step.kind)) return null;
  const filters: string[] = id === spec.start ? [`${n}.${entryEvent(spec)}.*`] : [];
  for (const [from, s] of Object.entries(spec.steps)) {
    for (const [t, via] of edgesOf(s)) {
      if (t !== id) continue;
      if (via === "onTimeout" || via === "onDeadline") {
        filters.push(`${n}.${timeoutEventOf(from, s)}.*`);
      } else filters.push(`${n}.${eventOf(from, s)}.*`);
    }
  }
  return [...new Set(filters)];
}

/** What a stage running a work step takes from the definition: where it reads and fails. */
export interface StepInput {
  /** Its durable consumer. */
  name: string;
  stream: string;
  filterSubject: string;
  /** The pipeline's failure event type, `<name>.failed`. */
  failedType: string;
  /** The pipeline's outcome event types (see `Stage.finalTypes`). */
  finalTypes: ReadonlySet<string>;
  /** Its event types an item has at most one of ({@link onceTypesOf}; see `Stage.once`). */
  once: ReadonlySet<string>;
}

/**
 * The durable consumer, stream, filter, failure and outcome events, and once-per-item events
 * of work step `id`: a stage module
 * that runs the step spreads this into its stage, so the definition decides what it reads.
 *
 * @example
 * ```ts
 * import { definePipeline } from "./definition.ts";
 * import { stepInput } from "./derive.ts";
 * const orders = definePipeline({
 *   name: "orders",
 *   input: { schema: { type: "object" }, event: "placed" },
 *   start: "price",
 *   steps: { price: { kind: "task", output: { type: "object" }, next: "done" }, done: { kind: "end", outcome: "done" } },
 * });
 * console.assert(stepInput(orders, "price").filterSubject === "orders.placed.*");
 * ```
 */
export function stepInput(spec: PipelineSpec, id: string): StepInput {
  const filterSubject = stepFilterSubject(spec, id);
  if (filterSubject === null) throw new Error(`step ${id} of ${spec.name} is not a work step`);
  return {
    name: durableOf(spec, id),
    stream: pipelineSubjects(spec).stream,
    filterSubject,
    failedType: `${spec.name}.${FAILED}`,
    finalTypes: endTypesOf(spec),
    once: onceTypesOf(spec),
  };
}

/**
 * What each stage of `spec` consumes, by its durable's name: each work step's input subjects
 * ({@link stepFilterSubjects}), and `extra`'s (a hand-wired stage, such as an intake). A stage
 * it does not name is undefined (a step of an earlier definition): see {@link StageInputs}.
 *
 * @example
 * ```ts
 * import { definePipeline } from "./definition.ts";
 * import { definedStageInputs } from "./derive.ts";
 * const orders = definePipeline({
 *   name: "orders",
 *   input: { schema: { type: "object" }, event: "placed" },
 *   start: "price",
 *   steps: { price: { kind: "task", output: { type: "object" }, next: "done" }, done: { kind: "end", outcome: "done" } },
 * });
 * console.assert(definedStageInputs(orders)("orders-price")!.join() === "orders.placed.*");
 * ```
 */
export function definedStageInputs(
  spec: PipelineSpec,
  extra: Readonly<Record<string, readonly string[]>> = {},
): StageInputs {
  const inputs = new Map<string, readonly string[]>(Object.entries(extra));
  for (const id of Object.keys(spec.steps)) {
    const subjects = stepFilterSubjects(spec, id);
    if (subjects !== null) inputs.set(durableOf(spec, id), subjects);
  }
  return (stage) => inputs.get(stage);
}

/**
 * The event types of a definition that an item has at most one of: its outcomes, and the
 * completion (and timeout) events of every step that runs at most once per item. A step
 * runs more than once when it is on a cycle (a bounded loop, an agent handing back to its
 * router) or when two branches of one fan-out reach it without a join between; those steps'
 * events may repeat, so they are not in the set. Each of the set is stored once per item
 * (`Stage.once`): a copy of an earlier event under another id (forged, or stray) runs
 * nothing again.
 */
export function onceTypesOf(spec: PipelineSpec): ReadonlySet<string> {
  const steps = spec.steps as Readonly<Record<string, StepSpec>>;
  const next = (id: string) => steps[id] ? edgesOf(steps[id]!).map(([t]) => t) : [];
  /** Steps reached from `from` (itself included), not going on past `stopAtJoins` joins. */
  const reach = (from: string, stopAtJoins: boolean): Set<string> => {
    const seen = new Set<string>([from]);
    const todo = [from];
    while (todo.length > 0) {
      const at = todo.pop()!;
      if (stopAtJoins && steps[at]?.kind === "join") continue;
      for (const t of next(at)) if (!seen.has(t)) seen.add(t), todo.push(t);
    }
    return seen;
  };
  const repeats = new Set<string>();
  for (const id of Object.keys(steps)) {
    // On a cycle: reached again from one of its own successors.
    if (next(id).some((t) => reach(t, false).has(id))) repeats.add(id);
    const s = steps[id]!;
    const fanOut = "next" in s && Array.isArray(s.next) ? s.next as readonly string[] : [];
    if (fanOut.length < 2) continue;
    const counts = new Map<string, number>();
    for (const t of new Set(fanOut)) {
      for (const r of reach(t, true)) counts.set(r, (counts.get(r) ?? 0) + 1);
    }
    for (const [r, n] of counts) if (n > 1 && steps[r]?.kind !== "join") repeats.add(r);
  }
  const out = new Set(endTypesOf(spec));
  for (const [id, step] of Object.entries(steps)) {
    if (step.kind === "end" || repeats.has(id)) continue;
    out.add(`${spec.name}.${eventOf(id, step)}`);
    if (step.kind === "wait" || step.kind === "join") {
      out.add(`${spec.name}.${timeoutEventOf(id, step)}`);
    }
  }
  return out;
}

/**
 * A definition's outcome event types: the events of its end steps, but not its failure
 * (which a redrive may follow with another). An item reaches one of them, once: the runtime's
 * steps name them as their `Stage.outcomes`, so a second end (another branch's) is refused
 * and dead-lettered as a `conflict`, failing nothing.
 */
export function endTypesOf(spec: PipelineSpec): ReadonlySet<string> {
  const out = new Set<string>();
  for (const [id, step] of Object.entries(spec.steps) as [string, StepSpec][]) {
    if (step.kind === "end" && step.outcome !== FAILED) {
      out.add(`${spec.name}.${eventOf(id, step)}`);
    }
  }
  return out;
}

/** Settings a consumer config is built from (the Config fields topology.ts uses). */
export interface ConsumerSettings {
  ackWaitMs: number;
  maxAttempts: number;
}

/** One durable consumer, in the JetStream field names topology.ts uses. */
export interface DerivedConsumer {
  stream: string;
  durable_name: string;
  filter_subject: string;
  ack_wait_ms: number;
  max_deliver: number;
  /** Which pipeline and step made it (kept where the server has metadata, 2.10+). */
  metadata: Record<string, string>;
}

/** The consumer metadata key naming the pipeline whose step made the consumer. */
export const PIPELINE_KEY = "weft_pipeline";
/** The consumer metadata key naming the step that made the consumer. */
export const STEP_KEY = "weft_step";

/**
 * What a work step's durable consumer records about its maker: its pipeline and step, so a
 * later definition without the step finds the consumer it left (a retired step's).
 *
 * @example
 * ```ts
 * import { stepConsumerMetadata } from "./derive.ts";
 * console.assert(stepConsumerMetadata({ name: "orders" }, "price").weft_step === "price");
 * ```
 */
export function stepConsumerMetadata(spec: { name: string }, step: string): Record<string, string> {
  return { [PIPELINE_KEY]: spec.name, [STEP_KEY]: step };
}

/**
 * Each step's durable consumer: named for the step id (so a step keeps its consumer across
 * versions), on the predecessor's events. End and wait steps have none.
 */
export function stepConsumers(spec: PipelineSpec, settings: ConsumerSettings): DerivedConsumer[] {
  const stream = pipelineSubjects(spec).stream;
  const out: DerivedConsumer[] = [];
  for (const id of Object.keys(spec.steps)) {
    const filter = stepFilterSubject(spec, id);
    if (filter === null) continue;
    out.push({
      stream,
      durable_name: durableOf(spec, id),
      filter_subject: filter,
      ack_wait_ms: settings.ackWaitMs,
      max_deliver: settings.maxAttempts + 2,
      metadata: stepConsumerMetadata(spec, id),
    });
  }
  return out;
}

/**
 * The events (`<name>.<event>.*`) the completions of steps `ids` publish: their own, and the
 * end events they lead to (a step whose successor is an end step publishes it itself).
 */
export function stepPublishes(spec: PipelineSpec, ids: readonly string[]): string[] {
  const n = spec.name;
  const out = new Set<string>();
  for (const id of ids) {
    const step = spec.steps[id]!;
    for (const e of publishedEvents(spec, id, step)) out.add(`${e}.*`);
    for (const [t] of edgesOf(step)) {
      const ts = spec.steps[t]!;
      if (ts.kind === "end") out.add(`${n}.${eventOf(t, ts)}.*`);
    }
  }
  return [...out];
}

/** What one step's service may publish and subscribe to (for per-service NATS permissions). */
export interface StepPermissions {
  step: string;
  publish: string[];
  subscribe: string[];
}

/** Per-step publish/subscribe subjects: its own events (+ failed, + dead letters) and its input. */
export function stepPermissions(spec: PipelineSpec): StepPermissions[] {
  const n = spec.name;
  const out: StepPermissions[] = [];
  for (const id of Object.keys(spec.steps)) {
    const filter = stepFilterSubject(spec, id);
    if (filter === null) continue;
    const publish = new Set(stepPublishes(spec, [id]));
    publish.add(`${n}.${FAILED}.*`);
    publish.add(`deadletter.${durableOf(spec, id)}.*`);
    out.push({ step: id, publish: [...publish], subscribe: [filter] });
  }
  return out;
}

/** The dashboard's drawing of a pipeline. */
export interface PipelineGraph {
  /** Work steps carry their durable consumer: the metrics label their figures. */
  nodes: { id: string; kind: StepSpec["kind"] | "input"; label: string; durable?: string }[];
  edges: { from: string; to: string; label?: string; loop?: number }[];
}

/** Nodes and edges for the dashboard; loop edges carry their bound. */
export function pipelineGraph(spec: PipelineSpec): PipelineGraph {
  const nodes: PipelineGraph["nodes"] = [{ id: "$input", kind: "input", label: spec.name }];
  const edges: PipelineGraph["edges"] = [{ from: "$input", to: spec.start }];
  const loops = new Map((spec.loops ?? []).map((l) => [`${l.from}>${l.to}`, l.maxIterations]));
  for (const [id, step] of Object.entries(spec.steps)) {
    nodes.push({
      id,
      kind: step.kind,
      label: step.description ?? id,
      ...(WORK_KINDS.has(step.kind) ? { durable: durableOf(spec, id) } : {}),
    });
    for (const [to, via] of edgesOf(step)) {
      const label = via === "next" ? undefined : via.replace(/^routes\./, "");
      const loop = loops.get(`${id}>${to}`);
      edges.push({ from: id, to, ...(label ? { label } : {}), ...(loop ? { loop } : {}) });
    }
  }
  return { nodes, edges };
}
