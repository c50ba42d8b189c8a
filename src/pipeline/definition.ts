/**
 * The public shape of a pipeline definition: graph as data, handlers as plain typed
 * functions. {@link definePipeline} checks a definition ({@link validatePipeline}) and pins
 * it to a content hash. Pure: no NATS, no I/O.
 *
 * @module
 */
import type { FromSchema, JSONSchema } from "json-schema-to-ts";
import type { StageContext } from "../stage.ts";
import { DefinitionProblem, PipelineDefinitionError, validatePipeline } from "./validate.ts";

/**
 * The TypeScript type a JSON Schema describes, computed by the compiler from the schema's
 * literal type (`as const`, or written inline in a definition), with json-schema-to-ts.
 * `unknown` for a schema whose literal type is lost (e.g. read from a JSON file).
 *
 * @example
 * ```ts
 * import type { Infer } from "./definition.ts";
 * const ticket = {
 *   type: "object",
 *   required: ["customer", "text"],
 *   properties: { customer: { type: "string" }, text: { type: "string" } },
 * } as const;
 * type Ticket = Infer<typeof ticket>; // { customer: string; text: string; [x: string]: unknown }
 * const t: Ticket = { customer: "c1", text: "hello" };
 * ```
 */
export type Infer<S> = S extends JSONSchema ? FromSchema<S> : unknown;

/**
 * What a step's handler gets besides the value it is handed; `I` is the type of the item's
 * input document (`StepContext<Infer<typeof inputSchema>>`).
 */
// deno-lint-ignore no-explicit-any
export interface StepContext<I = any> extends StageContext {
  /** The item's id. */
  item: string;
  /** The item's input document. */
  input: I;
  /** Every completed step's result so far, by step id. */
  results: Readonly<Record<string, unknown>>;
  /** How many times each step completed (loop counters). */
  runs: Readonly<Record<string, number>>;
  /** The item's shared scratchpad (pipelines with agents; empty otherwise). */
  scratchpad: readonly ScratchEntry[];
}

/** A JSON Schema document (draft-07 subset that Ajv compiles). */
export type JsonSchema = Readonly<Record<string, unknown>>;

/** Flow control of one step: concurrency, rate and batching, global or per key. */
export interface FlowControl {
  /** At most this many handler calls at once. */
  concurrency?: { limit: number; key?: string };
  /** At most `limit` calls per `periodMs`. `key` is a dotted path into the item, e.g. `customer.id`. */
  rateLimit?: { limit: number; periodMs: number; key?: string };
  /** Hand the step up to `maxItems` items, or whatever arrived within `maxWaitMs`. */
  batch?: { maxItems: number; maxWaitMs: number };
}

/** What every step kind shares. */
interface StepBase {
  /** Human description, shown on the dashboard. */
  description?: string;
  /** Event type published when the step completes (`<pipeline>.<emits>.<item>`); defaults to the step id. */
  emits?: string;
  /** Flow control of a work step (task, llm, agent, router); see {@link FlowControl}. */
  flow?: FlowControl;
  /** Processes running a work step (task, llm, agent, router), sharing its consumer. Default 1. */
  replicas?: number;
  /**
   * A work step's durable consumer (also its dead-letter subject and metrics label), when it
   * predates the definition and must keep its name: a renamed consumer starts over from the
   * stream's first message (acking unhandled the events of items that ended or that the step
   * ran for already). Default `<pipeline>-<step>`. Not `redriven`: the dead-letter
   * stream keeps redrive markers under that name.
   */
  durable?: string;
}

/** Where an item goes after a step: one step, or several at once (fan-out). */
export type Next = string | readonly string[];

/** A pure typed handler and its output schema; `In` is the type of the item's input document. */
export interface TaskStep<In = Untyped> extends StepBase {
  kind: "task";
  /** JSON Schema of the handler's result. */
  output: JsonSchema;
  /**
   * Pure: same input, same output. Delivery is at least once. `value` is what the step
   * before handed on (the input document for the first step); `ctx.input`, `ctx.results`.
   */
  // deno-lint-ignore no-explicit-any
  handle?: (value: any, ctx: StepContext<In>) => unknown | Promise<unknown>;
  /**
   * With `flow.batch`: one call for up to `maxItems` items, or whatever arrived within
   * `maxWaitMs`, returning one result per value, in order (e.g. a batched embedding call).
   * Each item's result and event are as if handled alone.
   */
  // deno-lint-ignore no-explicit-any
  handleBatch?: (values: any[], ctxs: StepContext[]) => unknown[] | Promise<unknown[]>;
  /** Further event types the handler publishes itself (e.g. a terminal one). */
  alsoEmits?: readonly string[];
  /** Hosts its handler may reach; see {@link NetHosts}. */
  allowNet?: NetHosts;
  next?: Next;
}

/**
 * The network hosts a step's handler (or an agent's tools) may reach, as Deno's
 * `--allow-net` takes them: `host` (every port) or `host:port`, e.g.
 * `["api.example.com:443"]`. A step's service may reach only NATS (and, for llm, agent and
 * prompted router steps, the LLM endpoint) besides these: a call elsewhere fails with
 * Deno's `NotCapable`.
 */
export type NetHosts = readonly string[];

/** An LLM call: a prompt file and an output schema, on the existing LLM client. */
export interface LlmStep extends StepBase {
  kind: "llm";
  /** Path of the prompt template, relative to the definition file. */
  prompt: string;
  output: JsonSchema;
  next?: Next;
}

/** One entry of an item's shared scratchpad (KV `weft_<pipeline>_scratchpad`, and its state). */
export interface ScratchEntry {
  /** Stable id: a redelivered step appends nothing twice. */
  id: string;
  /** The step that wrote it. */
  step: string;
  /** ISO time. */
  at: string;
  /** A tool call with its arguments and result, the agent's answer, or a note. */
  kind: "tool_call" | "answer" | "note";
  tool?: string;
  args?: unknown;
  result?: unknown;
  text?: string;
}

/** What a tool's implementation gets: the item, and read access to the buckets it declares. */
export interface ToolContext {
  item: string;
  // deno-lint-ignore no-explicit-any
  input: any;
  signal: AbortSignal;
  /** Reads `key` of a KV bucket the step lists in `reads` (JSON, or null when absent). */
  kv(bucket: string, key: string): Promise<unknown>;
}

/** A tool an agent may call, with JSON-Schema arguments. */
export interface ToolSpec {
  description: string;
  parameters: JsonSchema;
  /** Runs the call; arguments are checked against `parameters` first. Reads, no writes. */
  // deno-lint-ignore no-explicit-any
  run?: (args: any, ctx: ToolContext) => unknown | Promise<unknown>;
}

/** What an agent's offline policy sees at each turn. */
export interface AgentTurn {
  // deno-lint-ignore no-explicit-any
  value: any;
  // deno-lint-ignore no-explicit-any
  input: any;
  /** The item's scratchpad before this step. */
  scratchpad: readonly ScratchEntry[];
  /** This step's tool calls so far, with their results. */
  calls: readonly { tool: string; args: unknown; result: unknown }[];
  /** 1 on the first turn. */
  turn: number;
  /** How many times each step completed. */
  runs: Readonly<Record<string, number>>;
}

/** An agent's move: call a tool, or answer (the step's result). */
export type AgentAction = { call: string; args: unknown } | { final: unknown };

/**
 * An agent: calls tools, reads and appends to the item's shared scratchpad, bounded turns.
 * With an LLM endpoint configured the model chooses (real `tools` / `tool_calls` on the
 * wire); without one, `offline` does, deterministically.
 */
export interface AgentStep extends StepBase {
  kind: "agent";
  /** Instructions (prompt file, relative to the definition). */
  prompt: string;
  tools: Readonly<Record<string, ToolSpec>>;
  /** At most this many model/tool turns in this step. */
  maxTurns: number;
  output: JsonSchema;
  /** KV buckets its tools read (the pipeline's `buckets`). */
  reads?: readonly string[];
  /** The policy without an LLM: same inputs, same moves. */
  offline?: (turn: AgentTurn) => AgentAction | Promise<AgentAction>;
  /** Hosts its tools may reach; see {@link NetHosts}. */
  allowNet?: NetHosts;
  next?: Next;
}

/**
 * Branch: the handler returns one of the declared labels; each label names a step. `In` is the
 * type of the item's input document.
 */
export interface RouterStep<In = Untyped> extends StepBase {
  kind: "router";
  // deno-lint-ignore no-explicit-any
  route?: (value: any, ctx: StepContext<In>) => string | Promise<string>;
  routes: Readonly<Record<string, string>>;
  /**
   * A prompt file: with an LLM endpoint configured the model picks the label (structured
   * output), and `route` is the fallback when the call fails; without one, `route` decides.
   */
  prompt?: string;
}

/** Waits for all of `after`, or until `deadlineMs`, then `onDeadline`. */
export interface JoinStep extends StepBase {
  kind: "join";
  after: readonly string[];
  deadlineMs: number;
  /** Step taken when the deadline passes first. */
  onDeadline: string;
  next: Next;
}

/** Pauses the item until an event arrives or the timeout passes. */
export interface WaitStep extends StepBase {
  kind: "wait";
  /**
   * The awaited event type, `<pipeline>.<event>.<item>`, published over HTTP or NATS: the
   * item is the subject's last token (a callback names the item in the subject it publishes
   * on; nothing in its body is read for that).
   */
  event: string;
  /**
   * JSON Schema of the awaited event's body (e.g. a reviewer's decision). A body that fails
   * it is refused over HTTP (422 naming the field) and dead-lettered from the bus, and the
   * item keeps waiting; its type is the value the step after the wait is handed.
   */
  schema?: JsonSchema;
  /** Mandatory. */
  timeoutMs: number;
  /** Step taken on timeout: the default action. */
  onTimeout: string;
  /** Event type published on timeout; defaults to `<id>_timed_out`. */
  timeoutEvent?: string;
  next: Next;
}

/** Holds the item for `ms` (on the scheduler), or until the next `cron` firing. */
export interface DelayStep extends StepBase {
  kind: "delay";
  ms?: number;
  cron?: string;
  next: Next;
}

/** A terminal outcome; its event type defaults to the outcome. */
export interface EndStep extends StepBase {
  kind: "end";
  outcome: string;
}

/** Any step; `In` is the type of the item's input document, which handlers' `ctx.input` has. */
export type StepSpec<In = Untyped> =
  | TaskStep<In>
  | LlmStep
  | AgentStep
  | RouterStep<In>
  | JoinStep
  | WaitStep
  | DelayStep
  | EndStep;

/** A back-edge allowed to form a cycle, at most `maxIterations` times per item. */
export interface LoopSpec {
  from: string;
  to: string;
  maxIterations: number;
}

/** A pipeline definition: one literal; `In` is the type of its input document. */
export interface PipelineSpec<In = Untyped> {
  /** Subject token: subjects are `<name>.<event>.<item>`. */
  name: string;
  description?: string;
  /** The input document. Without `event`, submissions arrive on `<name>.submit`. */
  input: { schema: JsonSchema; event?: string };
  /** The first step. */
  start: string;
  /** Steps by stable id (ids name consumers and services: never reuse one for another step). */
  steps: Readonly<Record<string, StepSpec<In>>>;
  loops?: readonly LoopSpec[];
  /** KV buckets the runtime creates for the pipeline's tools: `weft_<name>_<something>`. */
  buckets?: readonly string[];
}

/** The steps an edge field (`next`: one or several) names. */
type Targets<T> = T extends string ? T : T extends readonly (infer X)[] ? X : never;

/** Every step a step's edges lead to: `next`, a router's `routes`, a timeout or deadline step. */
type EdgesOf<P> =
  | (P extends { next: infer N } ? Targets<N> : never)
  | (P extends { routes: infer R } ? R[keyof R] : never)
  | (P extends { onTimeout: infer T } ? T : never)
  | (P extends { onDeadline: infer T } ? T : never);

/** The steps with an edge (or a loop's back edge) to step `K`. */
type PredecessorsOf<S extends PipelineSpec, K> =
  | {
    [P in keyof S["steps"]]: K extends EdgesOf<S["steps"][P]> ? P : never;
  }[keyof S["steps"]]
  | (S["loops"] extends readonly (infer L)[] ? L extends { from: infer F; to: K } ? F : never
    : never);

/** A value the definition gives no schema for (an awaited event without one), or a loop's way back. */
// deno-lint-ignore no-explicit-any
type Untyped = any;

/** Whether step `K` is one of the steps an edge field (`next`, one or several) names. */
type Names<N, K> = [K] extends [Targets<N>] ? true : false;

/**
 * What step `P` hands to step `K` (`Seen`: the steps already on the way back, so a loop ends
 * in `any`): a task's, llm step's or agent's result; what a router or delay was handed; the
 * record `{ <step>: <its value> }` of a join's `after` steps (partial to its `onDeadline`
 * step); what a wait was handed, to its `onTimeout` step, and the awaited event's body (its
 * `schema`'s type; `any` without one) to its `next`.
 */
type HandedOn<S extends PipelineSpec, P extends keyof S["steps"], K, Seen> = S["steps"][P] extends
  { kind: "task" | "llm" | "agent"; output: infer O } ? Infer<O>
  : S["steps"][P] extends { kind: "router" | "delay" } ? ValueIn<S, P, Seen>
  : S["steps"][P] extends { kind: "join"; after: infer A extends readonly string[]; next: infer N }
    ?
      | (Names<N, K> extends true ? JoinRecord<S, P, A, Seen> : never)
      | (S["steps"][P] extends { onDeadline: K } ? Partial<JoinRecord<S, P, A, Seen>> : never)
  : S["steps"][P] extends { kind: "wait"; next: infer N } ?
      | (Names<N, K> extends true ? S["steps"][P] extends { schema: infer W } ? Infer<W> : Untyped
        : never)
      | (S["steps"][P] extends { onTimeout: K } ? ValueIn<S, P, Seen> : never)
  : Untyped;

/** What a join hands on: each `after` step's value, by step id. */
type JoinRecord<
  S extends PipelineSpec,
  P extends keyof S["steps"],
  A extends readonly string[],
  Seen,
> = { [X in A[number]]: X extends keyof S["steps"] ? HandedOn<S, X, P, Seen | P> : never };

/** The value step `K` is handed; `any` on a cycle back to a step in `Seen`. */
type ValueIn<S extends PipelineSpec, K, Seen> = [K] extends [Seen] ? Untyped
  :
    | (K extends S["start"] ? Infer<S["input"]["schema"]> : never)
    | {
      [P in PredecessorsOf<S, K> & keyof S["steps"]]: HandedOn<S, P, K, Seen | K>;
    }[PredecessorsOf<S, K> & keyof S["steps"]];

/**
 * The `value` step `K` is handed: the input document for the first step, else what each
 * step before it hands on, as a union (docs/PIPELINES.md, "How a handler is called"): a
 * task's, llm step's or agent's result; through a router or delay, what they were handed;
 * after a join, the record of its steps' values; after a wait that got its event, the type of
 * its `schema` (`any` without one).
 *
 * @example
 * ```ts
 * import { definePipeline, type ValueOf } from "./definition.ts";
 * const def = definePipeline({
 *   name: "chain",
 *   input: { schema: { type: "object" } },
 *   start: "a",
 *   steps: {
 *     a: {
 *       kind: "task",
 *       output: { type: "object", required: ["n"], properties: { n: { type: "number" } } },
 *       handle: () => ({ n: 1 }),
 *       next: "b",
 *     },
 *     b: { kind: "task", output: { type: "object" }, handle: (v: { n: number }) => v, next: "done" },
 *     done: { kind: "end", outcome: "done" },
 *   },
 * });
 * const handed: ValueOf<typeof def, "b"> = { n: 2 }; // what `a` returns
 * ```
 */
export type ValueOf<S extends PipelineSpec, K> = ValueIn<S, K, never>;

/**
 * The compile-time checks of a definition's handlers against its schemas: each task step's
 * `handle` returns (or resolves to) what its `output` schema describes, takes as `value`
 * what the steps before it hand on ({@link ValueOf}), and takes a context whose `input` is
 * what the pipeline's input schema describes; each router's `route` returns one of its
 * `routes`' labels. A handler that returns another shape or label, or annotates `value` or
 * `ctx` with a type the schemas do not give, does not compile.
 */
export type TypedSteps<S extends PipelineSpec> = {
  steps: {
    [K in keyof S["steps"]]: S["steps"][K] extends { kind: "task"; output: infer O } ? {
        handle?: (
          value: ValueOf<S, K>,
          ctx: StepContext<Infer<S["input"]["schema"]>>,
        ) => Infer<O> | Promise<Infer<O>>;
      }
      : S["steps"][K] extends { kind: "router"; routes: infer R } ? {
          route?: (
            value: ValueOf<S, K>,
            ctx: StepContext<Infer<S["input"]["schema"]>>,
          ) => (keyof R & string) | Promise<keyof R & string>;
        }
      : unknown;
  };
};

/**
 * Handlers given apart from the graph, {@link definePipeline}'s second argument, by step id:
 * a task step's `handle`, a router's `route`. Given there, `value` and `ctx` are typed from
 * the definition without annotations: TypeScript types a function written inside the literal
 * it is still inferring only from what it is annotated with, so inside the literal an
 * unannotated `value` is `any` (checked when annotated, by {@link TypedSteps}). Both styles
 * mix: handlers given apart beside handlers in the literal, annotated or not.
 *
 * @example
 * ```ts
 * import { definePipeline } from "./definition.ts";
 * const n = { type: "object", required: ["n"], properties: { n: { type: "number" } } } as const;
 * const p = definePipeline({
 *   name: "double",
 *   input: { schema: n },
 *   start: "double",
 *   steps: {
 *     double: { kind: "task", output: n, next: "size" },
 *     size: { kind: "router", routes: { big: "done", small: "done" } },
 *     done: { kind: "end", outcome: "done" },
 *   },
 * }, {
 *   double: (v) => ({ n: v.n * 2 }), // v: the input document, { n: number }
 *   size: (v) => (v.n > 10 ? "big" : "small"), // v: what double returned
 * });
 * ```
 */
export type Handlers<S extends PipelineSpec> = {
  [K in keyof S["steps"]]?: S["steps"][K] extends { kind: "task"; output: infer O } ? (
      value: ValueOf<S, K>,
      ctx: StepContext<Infer<S["input"]["schema"]>>,
    ) => Infer<O> | Promise<Infer<O>>
    : S["steps"][K] extends { kind: "router"; routes: infer R } ? (
        value: ValueOf<S, K>,
        ctx: StepContext<Infer<S["input"]["schema"]>>,
      ) => (keyof R & string) | Promise<keyof R & string>
    : string extends keyof S["steps"] ? LooseHandler
    : never;
};

/**
 * A handler given apart while the definition's own type is not known yet. When the literal
 * holds a handler whose parameters are left to inference (`(_v, ctx) => ...`), TypeScript
 * infers in two passes: the first skips that handler, so it learns nothing of the literal (a
 * literal with a skipped function is not inferred from) and takes the bare `PipelineSpec`,
 * whose steps are any string; the handlers given apart that it checks then (those with no
 * parameter left to inference: `() => ...`, or declared apart with annotations) must pass that
 * pass, or the call fails before the second pass. The second pass infers the literal and
 * checks every handler against its step. Its result keeps literal types (`"a"`, not `string`):
 * a function the first pass types is not typed again.
 */
type LooseHandler = (value: Untyped, ctx: StepContext) => LooseResult | Promise<LooseResult>;

/** Any value, as a contextual type that keeps a literal's type (`""` and `0` make it so). */
type LooseResult =
  | NonNullable<unknown>
  | null
  | undefined
  | ""
  | 0
  | boolean
  | { readonly [key: string]: LooseResult }
  | readonly LooseResult[];

/** `spec` with each of `handlers` set as its step's `handle` (task) or `route` (router). */
function withHandlers(spec: PipelineSpec, handlers: Record<string, unknown>): PipelineSpec {
  const steps: Record<string, StepSpec> = { ...spec.steps };
  for (const [id, fn] of Object.entries(handlers)) {
    const step = steps[id];
    const fail = (message: string) => {
      throw new PipelineDefinitionError(spec.name, id, DefinitionProblem.InvalidValue, message);
    };
    if (fn === undefined) continue;
    if (!step) fail(`a handler is given for a step the definition does not have`);
    if (typeof fn !== "function") fail(`its handler is not a function`);
    const field = step!.kind === "task" ? "handle" : step!.kind === "router" ? "route" : undefined;
    if (!field) fail(`a ${step!.kind} step takes no handler (only task and router steps do)`);
    if ((step as unknown as Record<string, unknown>)[field!] !== undefined) {
      fail(`its ${field} is given twice: in the step and in the handlers`);
    }
    steps[id] = { ...step!, [field!]: fn } as StepSpec;
  }
  return { ...spec, steps };
}

/** A validated definition pinned to its hash. */
export type PipelineDefinition<S extends PipelineSpec = PipelineSpec> = S & {
  /** FNV-1a 64-bit hash (16 hex digits) of the definition's data (handlers excluded); carried on every event of a run. */
  readonly hash: string;
};

/** Canonical JSON of the data part of a spec: sorted keys, functions left out. */
export function canonicalSpec(spec: PipelineSpec): string {
  const walk = (v: unknown): unknown => {
    if (typeof v === "function") return undefined;
    if (Array.isArray(v)) return v.map(walk);
    if (v && typeof v === "object") {
      const out: Record<string, unknown> = {};
      for (const k of Object.keys(v).sort()) {
        if (k === "hash") continue;
        const w = walk((v as Record<string, unknown>)[k]);
        if (w !== undefined) out[k] = w;
      }
      return out;
    }
    return v;
  };
  return JSON.stringify(walk(spec));
}

/** FNV-1a 64-bit as hex: synchronous, so definePipeline stays synchronous. */
export function definitionHash(spec: PipelineSpec): string {
  let h = 0xcbf29ce484222325n;
  const bytes = new TextEncoder().encode(canonicalSpec(spec));
  for (const b of bytes) {
    h ^= BigInt(b);
    h = (h * 0x100000001b3n) & 0xffffffffffffffffn;
  }
  return h.toString(16).padStart(16, "0");
}

/**
 * Checks a definition and pins it to its hash. Throws {@link PipelineDefinitionError}
 * (a ConfigError) naming the pipeline and step on the first problem. `I` is inferred from
 * `input.schema` first, so every handler's `ctx.input` is typed without an annotation; `S`
 * is the whole literal, which {@link TypedSteps} checks handlers against. Handlers may also
 * be given apart, as `handlers` ({@link Handlers}), where their `value` is typed too.
 *
 * @example
 * ```ts
 * import { definePipeline } from "./definition.ts";
 * const p = definePipeline({
 *   name: "echo",
 *   input: { schema: { type: "object" } },
 *   start: "echo",
 *   steps: {
 *     echo: { kind: "task", output: { type: "object" }, handle: (x) => x, next: "done" },
 *     done: { kind: "end", outcome: "done" },
 *   },
 * } as const);
 * console.log(p.hash.length); // 16
 * ```
 */
export function definePipeline<
  const I extends JsonSchema,
  const S extends PipelineSpec<Infer<I>>,
>(
  spec: S & { input: { schema: I } } & TypedSteps<S>,
  handlers?: Handlers<S>,
): PipelineDefinition<S> {
  const full = (handlers ? withHandlers(spec, handlers as Record<string, unknown>) : spec) as S;
  validatePipeline(full);
  return Object.freeze({ ...full, hash: definitionHash(full) });
}
