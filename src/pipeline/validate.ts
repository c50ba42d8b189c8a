/**
 * Validation of a pipeline definition: every problem is a typed
 * {@link PipelineDefinitionError} naming the pipeline, the step and the problem.
 *
 * @module
 */
import { Ajv } from "ajv";
import { ConfigError } from "../errors.ts";
import type { PipelineSpec, StepSpec } from "./definition.ts";
import { nextCronTime } from "../scheduler/cron.ts";
import { closest } from "../did_you_mean.ts";

/** What is wrong with a definition. */
export const DefinitionProblem = {
  UnknownStep: "unknown_step",
  Unreachable: "unreachable",
  UnboundedCycle: "unbounded_cycle",
  JoinCannotComplete: "join_cannot_complete",
  WaitWithoutTimeout: "wait_without_timeout",
  DuplicateName: "duplicate_name",
  InvalidToken: "invalid_token",
  InvalidSchema: "invalid_schema",
  InvalidValue: "invalid_value",
  DeadEnd: "dead_end",
  UnknownField: "unknown_field",
} as const;
/** One of {@link DefinitionProblem}. */
export type DefinitionProblem = typeof DefinitionProblem[keyof typeof DefinitionProblem];

/** A definition that cannot run; stops start-up. Code `invalid_config`. */
export class PipelineDefinitionError extends ConfigError {
  /** The pipeline's name. */
  readonly pipeline: string;
  /** The step at fault, when one is. */
  readonly step?: string;
  /** What is wrong. */
  readonly problem: DefinitionProblem;
  /** `pipeline <name>, step <id>: <message>`. */
  constructor(
    pipeline: string,
    step: string | undefined,
    problem: DefinitionProblem,
    message: string,
  ) {
    super(`pipeline ${pipeline}${step ? `, step ${step}` : ""}: ${message}`, {
      field: step ? `/steps/${step}` : undefined,
    });
    this.name = "PipelineDefinitionError";
    this.pipeline = pipeline;
    this.step = step;
    this.problem = problem;
  }
}

const TOKEN = /^[a-z0-9][a-z0-9_-]*$/;
/**
 * Longest pipeline name and step id: they name buckets, consumers, services and schedule ids
 * (`<name>.<step>-<item>-<run>`, at most 64 + 128 characters with 64-character item ids), and
 * a longer one would be cut there, so two timers could share an id.
 */
export const MAX_NAME = 32;
const MAX_STEP_ID = 48;
/**
 * One host of a step's `allowNet`, as Deno's `--allow-net` takes it: a DNS name or IPv4 address,
 * or a bracketed IPv6 one, with an optional port (no scheme, path, comma or wildcard).
 */
const NET_HOST =
  /^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::(?:[1-9][0-9]{0,4}))?$/;

/**
 * Why `name` cannot name a pipeline (not a subject token, or longer than {@link MAX_NAME}
 * characters), or undefined when it can: the rule {@link validatePipeline} applies, for
 * whoever names a pipeline before its definition exists (`deno task new`).
 *
 * @example
 * ```ts
 * import { pipelineNameProblem } from "./validate.ts";
 * console.assert(pipelineNameProblem("orders") === undefined);
 * console.assert(pipelineNameProblem("x".repeat(40))?.includes("longer than 32") === true);
 * ```
 */
export function pipelineNameProblem(name: string): string | undefined {
  if (!TOKEN.test(name)) return `name "${name}" is not a subject token (a-z 0-9 _ -)`;
  if (name.length > MAX_NAME) return `name "${name}" is longer than ${MAX_NAME} characters`;
  return undefined;
}

/** Every field of a step of kind `K`, as its type declares it (required or not). */
type FieldsOf<K extends StepSpec["kind"]> = {
  readonly [F in keyof Extract<StepSpec, { kind: K }>]-?: true;
};

/**
 * The fields each step kind has, derived from the step types (definition.ts): a field
 * added to a type and not here, or listed here and not in the type, does not compile.
 */
const STEP_FIELDS: { readonly [K in StepSpec["kind"]]: FieldsOf<K> } = (() => {
  const base = {
    description: true,
    emits: true,
    flow: true,
    replicas: true,
    durable: true,
  } as const;
  return {
    task: {
      ...base,
      kind: true,
      output: true,
      handle: true,
      handleBatch: true,
      alsoEmits: true,
      allowNet: true,
      next: true,
    },
    llm: { ...base, kind: true, prompt: true, output: true, next: true },
    agent: {
      ...base,
      kind: true,
      prompt: true,
      tools: true,
      maxTurns: true,
      output: true,
      reads: true,
      offline: true,
      allowNet: true,
      next: true,
    },
    router: { ...base, kind: true, route: true, routes: true, prompt: true },
    join: { ...base, kind: true, after: true, deadlineMs: true, onDeadline: true, next: true },
    wait: {
      ...base,
      kind: true,
      event: true,
      schema: true,
      timeoutMs: true,
      onTimeout: true,
      timeoutEvent: true,
      next: true,
    },
    delay: { ...base, kind: true, ms: true, cron: true, next: true },
    end: { ...base, kind: true, outcome: true },
  };
})();

/**
 * A definition's own fields (and `hash`, which {@link definePipeline}'s result carries): a
 * field added to PipelineSpec and not here does not compile.
 */
const SPEC_FIELDS: { readonly [K in keyof PipelineSpec | "hash"]-?: true } = {
  name: true,
  description: true,
  input: true,
  start: true,
  steps: true,
  loops: true,
  buckets: true,
  hash: true,
};

/** The step kinds, in the order messages list them. */
const KINDS = Object.keys(STEP_FIELDS) as StepSpec["kind"][];

/** The steps an edge field names (one, several, or none when absent). */
function list(n: string | readonly string[] | undefined): string[] {
  return n === undefined ? [] : typeof n === "string" ? [n] : [...n];
}

/** Every edge leaving a step: `[target, via]` (via names the field, for messages). */
export function edgesOf(step: StepSpec): [string, string][] {
  const via = (n: string | readonly string[] | undefined, field: string): [string, string][] =>
    list(n).map((t) => [t, field]);
  switch (step.kind) {
    case "task":
    case "llm":
    case "agent":
    case "delay":
      return via(step.next, "next");
    case "router":
      return Object.entries(step.routes).map(([label, t]) => [t, `routes.${label}`]);
    case "join":
      return [...via(step.next, "next"), ...via(step.onDeadline, "onDeadline")];
    case "wait":
      return [...via(step.next, "next"), ...via(step.onTimeout, "onTimeout")];
    case "end":
      return [];
  }
}

/** The steps reached from step `from` over every edge, `from` included. */
function reachableFrom(spec: PipelineSpec, from: string): Set<string> {
  const seen = new Set([from]);
  const queue = [from];
  while (queue.length > 0) {
    const step = spec.steps[queue.shift()!];
    for (const [t] of step ? edgesOf(step) : []) {
      if (!seen.has(t)) (seen.add(t), queue.push(t));
    }
  }
  return seen;
}

/** Event tokens the runtime publishes itself (see flow.ts): no step may publish them. */
const RESERVED = new Set(["submit", "submitted", "failed"]);

/** The runtime's intake: bus submissions (`<name>.submit`) become entry events. */
export const INTAKE = "ingest";
/** The runtime's control steps (join, wait, delay) and version checks. */
export const CONTROL = "control";
/** The runtime's item state writer. */
export const STATE = "state";
/** The service of a pipeline's intake, control steps and state writer: `<name>-flow`. */
export const FLOW = "flow";

/**
 * What the runtime names `<pipeline>-<part>` itself: its intake, control and state writer
 * consumers and its `-flow` service. A step of that id would share one.
 */
const RUNTIME_PARTS = [INTAKE, CONTROL, STATE, FLOW];

/**
 * The steps reached from `spec.start` over every edge, breadth first (the order the
 * dashboard draws them in); a step missing from it is unreachable.
 */
export function flowOrder(spec: PipelineSpec): string[] {
  const order: string[] = [];
  const seen = new Set([spec.start]);
  const queue = [spec.start];
  while (queue.length > 0) {
    const id = queue.shift()!;
    order.push(id);
    for (const [t] of edgesOf(spec.steps[id]!)) {
      if (!seen.has(t) && t in spec.steps) (seen.add(t), queue.push(t));
    }
  }
  return order;
}

/** Step kinds run as their own service, with a durable consumer each: a handler per item. */
export const WORK_KINDS: ReadonlySet<StepSpec["kind"]> = new Set([
  "task",
  "llm",
  "agent",
  "router",
]);

/** The event type a step publishes on completion (a token); a wait's is its own, not the awaited one. */
export function eventOf(id: string, step: StepSpec): string {
  if (step.emits) return step.emits;
  if (step.kind === "end") return step.outcome;
  return id.replaceAll("-", "_");
}

/**
 * Throws a {@link PipelineDefinitionError} on the first problem of `spec`.
 *
 * @example
 * ```ts
 * import { validatePipeline } from "./validate.ts";
 * validatePipeline({
 *   name: "p", input: { schema: {} }, start: "a",
 *   steps: { a: { kind: "end", outcome: "done" } },
 * });
 * ```
 */
export function validatePipeline(spec: PipelineSpec): void {
  const name = spec.name;
  const fail = (step: string | undefined, p: DefinitionProblem, m: string): never => {
    throw new PipelineDefinitionError(name, step, p, m);
  };
  const badName = pipelineNameProblem(name);
  if (badName !== undefined) fail(undefined, "invalid_token", badName);
  // A misspelt field (`loop:` for `loops:`) would be ignored without a word.
  const specFields = Object.keys(SPEC_FIELDS);
  for (const field of Object.keys(spec)) {
    if (specFields.includes(field)) continue;
    const near = closest(field, specFields);
    fail(
      undefined,
      "unknown_field",
      `unknown field ${JSON.stringify(field)}${near ? ` (did you mean ${near}?)` : ""}; ` +
        `a definition has ${specFields.filter((f) => f !== "hash").join(", ")}`,
    );
  }
  const ids = Object.keys(spec.steps);
  for (const b of spec.buckets ?? []) {
    if (!b.startsWith(`weft_${name.replaceAll("-", "_")}_`) || !/^[A-Za-z0-9_-]+$/.test(b)) {
      fail(undefined, "invalid_token", `bucket "${b}" must be named weft_${name}_<something>`);
    }
  }
  if (ids.length === 0) fail(undefined, "invalid_value", "no steps");
  // Kinds and fields first: every later check reads a step by its kind.
  for (const id of ids) {
    const step = spec.steps[id] as unknown;
    if (step === null || typeof step !== "object" || Array.isArray(step)) {
      fail(id, "invalid_value", `a step is an object with a kind (${KINDS.join(", ")})`);
    }
    const kind = (step as { kind?: unknown }).kind;
    if (typeof kind !== "string" || !KINDS.includes(kind as StepSpec["kind"])) {
      const near = typeof kind === "string" ? closest(kind, KINDS) : undefined;
      fail(
        id,
        "invalid_value",
        `${kind === undefined ? "no kind" : `kind ${JSON.stringify(kind)} is not a step kind`}${
          near ? ` (did you mean ${near}?)` : ""
        }; a step's kind is one of ${KINDS.join(", ")}`,
      );
    }
    const fields = Object.keys(STEP_FIELDS[kind as StepSpec["kind"]]);
    for (const field of Object.keys(step as object)) {
      if (fields.includes(field)) continue;
      const near = closest(field, fields);
      fail(
        id,
        "unknown_field",
        `unknown field ${JSON.stringify(field)}${near ? ` (did you mean ${near}?)` : ""}; ` +
          `a ${kind} step has ${fields.filter((f) => f !== "kind").join(", ")}`,
      );
    }
  }
  if (!(spec.start in spec.steps)) {
    fail(undefined, "unknown_step", `start names unknown step "${spec.start}"`);
  }

  const ajv = new Ajv({ strict: false, allErrors: false });
  const compile = (step: string | undefined, what: string, schema: unknown) => {
    try {
      ajv.compile(schema as object);
    } catch (err) {
      // Ajv compiles a schema to one function: one with thousands of properties or deeply
      // nested overflows the stack, which says nothing of the schema by itself.
      const why = err instanceof RangeError
        ? `it is too large or too deeply nested for the validator (${err.message})`
        : (err as Error).message;
      fail(step, "invalid_schema", `${what} does not compile: ${why}`);
    }
  };
  compile(undefined, "input schema", spec.input.schema);
  if (spec.input.event !== undefined && !TOKEN.test(spec.input.event)) {
    fail(undefined, "invalid_token", `input event "${spec.input.event}" is not a subject token`);
  }

  const events = new Map<string, string>();
  if (spec.input.event) events.set(spec.input.event, "(input)");
  // Durable consumers: the runtime's own parts', then the steps' own names.
  const durables = new Map<string, string>(
    RUNTIME_PARTS.map((part) => [`${name}-${part}`, `the runtime's ${part}`]),
  );
  for (const id of ids) {
    if (spec.steps[id]!.durable === undefined && WORK_KINDS.has(spec.steps[id]!.kind)) {
      durables.set(`${name}-${id}`, id);
    }
  }
  for (const id of ids) {
    const step = spec.steps[id]!;
    if (!TOKEN.test(id)) fail(id, "invalid_token", `step id "${id}" is not a subject token`);
    if (id.length > MAX_STEP_ID) {
      fail(id, "invalid_token", `step id "${id}" is longer than ${MAX_STEP_ID} characters`);
    }
    if (RUNTIME_PARTS.includes(id)) {
      fail(
        id,
        "duplicate_name",
        `step id "${id}" is the runtime's own (its service or consumer <name>-${id}); name the step otherwise`,
      );
    }
    if (step.kind === "end" && !(typeof step.outcome === "string" && TOKEN.test(step.outcome))) {
      // The outcome is the item's result and, without emits, its end event.
      fail(
        id,
        "invalid_token",
        `an end step needs an outcome, a subject token (a-z 0-9 _ -); got ${
          JSON.stringify(step.outcome) ?? "none"
        }`,
      );
    }
    const ev = eventOf(id, step);
    if (!TOKEN.test(ev)) fail(id, "invalid_token", `event "${ev}" is not a subject token`);
    if (RESERVED.has(ev)) {
      fail(
        id,
        "duplicate_name",
        `event "${ev}" is the runtime's own; name the step's event otherwise`,
      );
    }
    const owner = events.get(ev);
    if (owner !== undefined && !(step.kind === "wait" && owner === "(input)")) {
      // A terminal event may be published directly by the steps that lead to its end step.
      const end = [owner, id].find((s) => spec.steps[s]?.kind === "end");
      const other = end === owner ? id : owner;
      const leads = end !== undefined && other !== end && spec.steps[other] !== undefined &&
        edgesOf(spec.steps[other]!).some(([t]) => t === end);
      if (!leads) fail(id, "duplicate_name", `event "${ev}" is also published by ${owner}`);
    }
    if (owner === undefined || spec.steps[owner]?.kind !== "end") events.set(ev, id);
    if (step.kind === "wait" || step.kind === "join") {
      const to = (step.kind === "wait" && step.timeoutEvent) ||
        `${id.replaceAll("-", "_")}_timed_out`;
      if (!TOKEN.test(to)) {
        fail(id, "invalid_token", `timeout event "${to}" is not a subject token`);
      }
      if (events.has(to)) {
        fail(id, "duplicate_name", `event "${to}" is also published by ${events.get(to)}`);
      }
      events.set(to, id);
    }
    if (step.kind === "router") {
      for (const [label, t] of Object.entries(step.routes as Record<string, unknown>)) {
        if (typeof t !== "string") {
          fail(
            id,
            "invalid_value",
            `routes.${label} must name one step; to fan out, route to a step whose next lists several`,
          );
        }
      }
    }
    for (const [t, via] of edgesOf(step)) {
      if (!(t in spec.steps)) fail(id, "unknown_step", `${via} names unknown step "${t}"`);
    }
    if (step.kind !== "end" && step.kind !== "router" && list(step.next).length === 0) {
      // The item would stay running at it for ever.
      fail(
        id,
        "dead_end",
        `a ${step.kind} step with no next leads nowhere (the item would never end); ` +
          `lead it to the next step or to an end step`,
      );
    }
    // A join, wait, delay or end runs no handler (the runtime's control service holds the
    // item there): limits, batching and processes would be silently ignored.
    for (const field of ["flow", "replicas"] as const) {
      if (step[field] !== undefined && !WORK_KINDS.has(step.kind)) {
        fail(
          id,
          "invalid_value",
          `a ${step.kind} step runs no handler: ${field} applies to task, llm, agent and ` +
            `router steps only`,
        );
      }
    }
    if (step.durable !== undefined) {
      if (!WORK_KINDS.has(step.kind)) {
        fail(id, "invalid_value", `a ${step.kind} step has no consumer of its own to name`);
      }
      if (!TOKEN.test(step.durable)) {
        fail(id, "invalid_token", `durable "${step.durable}" is not a subject token`);
      }
      const other = durables.get(step.durable);
      if (other !== undefined) {
        fail(id, "duplicate_name", `durable "${step.durable}" is also ${other}'s`);
      }
      durables.set(step.durable, id);
    }
    if ("output" in step) compile(id, "output schema", step.output);
    if (step.kind === "agent") {
      if (!(step.maxTurns >= 1)) fail(id, "invalid_value", "maxTurns must be at least 1");
      for (const b of step.reads ?? []) {
        if (!(spec.buckets ?? []).includes(b)) {
          fail(
            id,
            "invalid_value",
            `reads bucket "${b}", which the pipeline's buckets do not list`,
          );
        }
      }
      for (const [tool, t] of Object.entries(step.tools)) {
        compile(id, `tool ${tool}'s parameters`, t.parameters);
      }
    }
    if (step.kind === "wait") {
      if (step.schema !== undefined) compile(id, "awaited event's schema", step.schema);
      if (!(typeof step.timeoutMs === "number" && step.timeoutMs > 0)) {
        fail(id, "wait_without_timeout", "a wait needs timeoutMs > 0 and onTimeout");
      }
      if (!step.onTimeout) {
        fail(id, "wait_without_timeout", "a wait needs onTimeout (the default action)");
      }
    }
    if (step.kind === "join") {
      if (step.after.length < 2) {
        fail(id, "join_cannot_complete", "a join waits for at least two steps");
      }
      if (!(step.deadlineMs > 0)) fail(id, "invalid_value", "a join needs deadlineMs > 0");
      for (const a of step.after) {
        if (!(a in spec.steps)) fail(id, "unknown_step", `after names unknown step "${a}"`);
      }
      const twice = step.after.find((a, i) => step.after.indexOf(a) !== i);
      if (twice !== undefined) {
        fail(id, "join_cannot_complete", `after names "${twice}" twice; name each input once`);
      }
    }
    if (step.kind === "delay" && (step.ms === undefined) === (step.cron === undefined)) {
      fail(id, "invalid_value", "a delay has exactly one of ms and cron");
    }
    if (
      step.kind === "delay" && step.ms !== undefined && !(Number.isFinite(step.ms) && step.ms >= 0)
    ) {
      fail(id, "invalid_value", `a delay's ms must be a number >= 0 (got ${String(step.ms)})`);
    }
    if (step.kind === "delay" && step.cron !== undefined) {
      // Checked here, not when the first item reaches it: a cron that does not parse (or
      // never comes) would fail every item.
      let next: Date | null = null;
      try {
        next = nextCronTime(step.cron, new Date());
      } catch (err) {
        fail(id, "invalid_value", `cron ${JSON.stringify(step.cron)}: ${(err as Error).message}`);
      }
      if (next === null) {
        fail(id, "invalid_value", `cron ${JSON.stringify(step.cron)} never comes`);
      }
    }
    const positive = (v: unknown) => typeof v === "number" && Number.isFinite(v) && v > 0;
    if (
      step.flow?.concurrency && !(Number.isInteger(step.flow.concurrency.limit) &&
        step.flow.concurrency.limit >= 1)
    ) {
      // 0 would hold every call for ever (its messages kept alive, never handled).
      fail(id, "invalid_value", "flow.concurrency.limit must be an integer >= 1");
    }
    if (
      step.flow?.rateLimit &&
      !(positive(step.flow.rateLimit.limit) && positive(step.flow.rateLimit.periodMs))
    ) {
      // A limit of 0 would silently limit nothing.
      fail(id, "invalid_value", "flow.rateLimit needs limit > 0 and periodMs > 0");
    }
    if (step.kind === "router" && Object.keys(step.routes).length === 0) {
      fail(id, "invalid_value", "a router declares at least one label");
    }
    if (step.flow?.batch && !(step.flow.batch.maxItems >= 1 && step.flow.batch.maxWaitMs >= 0)) {
      fail(id, "invalid_value", "batch needs maxItems >= 1 and maxWaitMs >= 0");
    }
    if (step.flow?.batch && (step.kind !== "task" || !step.handleBatch)) {
      fail(id, "invalid_value", "flow.batch needs a task step with handleBatch");
    }
    if ((step.kind === "task" || step.kind === "agent") && step.allowNet !== undefined) {
      const bad = !Array.isArray(step.allowNet)
        ? "not a list"
        : (step.allowNet as unknown[]).find((h) =>
          typeof h !== "string" || !NET_HOST.test(h) ||
          Number(/:(\d+)$/.exec(h)?.[1] ?? 0) > 65535
        );
      if (bad !== undefined) {
        fail(
          id,
          "invalid_value",
          `allowNet lists hosts as Deno's --allow-net takes them, "host" or "host:port" ` +
            `(e.g. "api.example.com:443"), not ${JSON.stringify(bad)}`,
        );
      }
    }
    if (
      step.kind !== "end" && step.replicas !== undefined &&
      !(Number.isInteger(step.replicas) && step.replicas >= 1 && step.replicas <= 16)
    ) {
      fail(id, "invalid_value", "replicas must be an integer from 1 to 16");
    }
  }

  // A wait's awaited event comes from outside (a person, a callback): no step publishes it.
  for (const id of ids) {
    const step = spec.steps[id]!;
    if (step.kind !== "wait") continue;
    if (!TOKEN.test(step.event) || RESERVED.has(step.event)) {
      fail(id, "invalid_token", `awaited event "${step.event}" is not a subject token of its own`);
    }
    const by = events.get(step.event);
    if (by !== undefined) {
      fail(id, "duplicate_name", `awaited event "${step.event}" is also published by ${by}`);
    }
  }

  // Loops: each declared back-edge must exist and be bounded.
  const loopEdges = new Set<string>();
  for (const l of spec.loops ?? []) {
    if (!(l.from in spec.steps)) {
      fail(undefined, "unknown_step", `loop from unknown step "${l.from}"`);
    }
    if (!edgesOf(spec.steps[l.from]!).some(([t]) => t === l.to)) {
      fail(l.from, "unknown_step", `loop to "${l.to}" is not an edge of ${l.from}`);
    }
    if (!(Number.isInteger(l.maxIterations) && l.maxIterations >= 1)) {
      fail(l.from, "invalid_value", "loop maxIterations must be a positive integer");
    }
    if (!reachableFrom(spec, l.to).has(l.from)) {
      fail(
        l.from,
        "invalid_value",
        `loop ${l.from} -> ${l.to} is not part of a cycle (${l.to} never leads back to ` +
          `${l.from}); declare loops on the edges that close a cycle only`,
      );
    }
    loopEdges.add(`${l.from}>${l.to}`);
  }

  // Reachability from start, over every edge.
  const reached = new Set(flowOrder(spec));
  for (const id of ids) {
    if (!reached.has(id)) fail(id, "unreachable", "no path from start reaches it");
  }

  // Cycles without declared back-edges: DFS over forward edges only.
  const state = new Map<string, 1 | 2>();
  const visit = (id: string, path: string[]): void => {
    state.set(id, 1);
    for (const [t] of edgesOf(spec.steps[id]!)) {
      if (loopEdges.has(`${id}>${t}`)) continue;
      if (state.get(t) === 1) {
        fail(
          id,
          "unbounded_cycle",
          `cycle ${
            [...path.slice(path.indexOf(t)), id, t].join(" -> ")
          } has no loop with maxIterations`,
        );
      }
      if (!state.has(t)) visit(t, [...path, id]);
    }
    state.set(id, 2);
  };
  visit(spec.start, []);

  // Every step leads to an end: a cycle with no way out would hold its items for ever.
  const ends = ids.filter((id) => spec.steps[id]!.kind === "end");
  const leadsToEnd = new Set(ends);
  for (let grew = true; grew;) {
    grew = false;
    for (const id of ids) {
      if (leadsToEnd.has(id)) continue;
      if (edgesOf(spec.steps[id]!).some(([t]) => leadsToEnd.has(t))) {
        (leadsToEnd.add(id), grew = true);
      }
    }
  }
  for (const id of flowOrder(spec)) {
    if (!leadsToEnd.has(id)) {
      fail(id, "dead_end", "no path from it reaches an end step (the item would never end)");
    }
  }

  // Joins: each input must be a step that can precede the join (has an edge into it).
  for (const id of ids) {
    const step = spec.steps[id]!;
    if (step.kind !== "join") continue;
    for (const a of step.after) {
      if (!edgesOf(spec.steps[a]!).some(([t]) => t === id)) {
        fail(id, "join_cannot_complete", `input "${a}" has no edge to the join`);
      }
    }
    const into = ids.filter((s) => s !== id && edgesOf(spec.steps[s]!).some(([t]) => t === id));
    const extra = into.filter((s) => !step.after.includes(s));
    if (extra.length) {
      fail(
        id,
        "join_cannot_complete",
        `steps ${extra.join(", ")} lead to the join but are not in after`,
      );
    }
    // Inputs on exclusive router branches can never all arrive.
    for (const r of ids) {
      const rs = spec.steps[r]!;
      if (rs.kind !== "router") continue;
      const targets = Object.values(rs.routes);
      const hit = step.after.filter((a) => targets.includes(a));
      if (hit.length >= 2) {
        fail(
          id,
          "join_cannot_complete",
          `inputs ${hit.join(", ")} are exclusive branches of router ${r}`,
        );
      }
    }
  }
}

/** Two branches of one fan-out that each end the item, at different end steps. */
export interface EndsApart {
  /** The step whose `next` fans out. */
  step: string;
  /** The two branches (steps of its `next`). */
  branches: [string, string];
  /** The end each of them always reaches. */
  ends: [string, string];
}

/**
 * The first fan-out two of whose branches each always reach an end, and not the same one,
 * without a join between: every item would end twice, at two outcomes (the runtime stores
 * the first and refuses the second as a `conflict`). Always reach: on every path, whatever a
 * router or a wait decides; an end after a join, or one reached only on some paths (a
 * router's route, a loop), does not count, so graphs that may still be right pass. Steps run
 * by hand-written stages (a hand-wired pipeline's `next: ["rejected", "accepted"]`, one of which
 * its stage emits) may declare such a fan-out; the definition runtime refuses it when it loads
 * (`loadPipelines`).
 *
 * @example
 * ```ts
 * import { endsApart } from "./validate.ts";
 * const obj = { type: "object" } as const;
 * const found = endsApart({
 *   name: "p", input: { schema: obj }, start: "a",
 *   steps: {
 *     a: { kind: "task", output: obj, handle: (x: unknown) => x, next: ["x", "y"] },
 *     x: { kind: "end", outcome: "x" },
 *     y: { kind: "end", outcome: "y" },
 *   },
 * });
 * console.assert(found?.step === "a");
 * ```
 */
export function endsApart(spec: PipelineSpec): EndsApart | undefined {
  const steps = spec.steps as Readonly<Record<string, StepSpec>>;
  const memo = new Map<string, ReadonlySet<string>>();
  const visiting = new Set<string>();
  const nextOf = (s: StepSpec) => edgesOf(s).filter(([, via]) => via === "next").map(([t]) => t);
  /** The end steps every run from `id` reaches before any join (a cycle: none certain). */
  const sure = (id: string): ReadonlySet<string> => {
    const s = steps[id];
    if (!s || s.kind === "join" || visiting.has(id)) return new Set();
    if (s.kind === "end") return new Set([id]);
    const known = memo.get(id);
    if (known) return known;
    visiting.add(id);
    // A fan-out runs every branch: each one's ends are reached. Of a router's routes, or a
    // wait's decision and timeout, one is taken: only the ends all of them reach.
    const all = (ids: readonly string[]) => new Set(ids.flatMap((t) => [...sure(t)]));
    const common = (sets: ReadonlySet<string>[]) =>
      new Set([...sets[0] ?? []].filter((e) => sets.every((x) => x.has(e))));
    const out = s.kind === "router"
      ? common(Object.values(s.routes).map((t) => sure(t)))
      : s.kind === "wait"
      ? common([all(nextOf(s)), sure(s.onTimeout)])
      : all(nextOf(s));
    visiting.delete(id);
    memo.set(id, out);
    return out;
  };
  for (const [id, s] of Object.entries(steps)) {
    const branches = [...new Set(nextOf(s))];
    for (let i = 0; i < branches.length; i++) {
      for (let j = i + 1; j < branches.length; j++) {
        const a = [...sure(branches[i]!)];
        const b = [...sure(branches[j]!)];
        for (const ea of a) {
          const eb = b.find((e) => e !== ea);
          if (eb !== undefined) {
            return { step: id, branches: [branches[i]!, branches[j]!], ends: [ea, eb] };
          }
        }
      }
    }
  }
  return undefined;
}
