/**
 * Runs definitions: each work step (task, llm, router) as a stage on the shared runner, and
 * per pipeline one control service that turns bus submissions into items, holds items at
 * joins, waits and delays (KV records, scheduler timers), checks that events still fit the
 * running definition, and keeps each item's state (the generic fold) in KV.
 *
 * The runtime knows no pipeline: everything here follows from a definition.
 *
 * @module
 */
import { headers, type NatsConnection } from "@nats-io/nats-core";
import { claimsBucketOf } from "./claims.ts";
import { jetstream, type JetStreamManager, jetstreamManager } from "@nats-io/jetstream";
import { type KV, type KvEntry, Kvm } from "@nats-io/kv";
import {
  ConfigError,
  ConflictError,
  ErrorCode,
  NotFoundError,
  ValidationError,
  WeftError,
} from "../errors.ts";
import { deterministicId, sha256Hex } from "../events.ts";
import { canonicalDigest, canonicalJson } from "../canonical_json.ts";
import type { Logger } from "../observability/log.ts";
import {
  depthWithin,
  itemFailedNow,
  MAX_DEPTH,
  messagesOn,
  publishEvent,
  runStage,
  storedMessage,
} from "../runner.ts";
import { shadowDurable } from "../shadow/spec.ts";
import type { AnyEvent } from "../schemas.ts";
import {
  combineRunnables,
  defineService,
  type Runnable,
  type ServiceContext,
  type ServiceDef,
} from "../service.ts";
import type { MessageInfo, OutputEvent, Stage, StageContext } from "../stage.ts";
import { decodeStateEvent, runStateWriter, type StateSpec } from "../state_writer.ts";
import { createScheduleStore } from "../scheduler/store.ts";
import { longestCronGap, nextCronTime } from "../scheduler/cron.ts";
import {
  DEADLETTER_STREAM,
  HANDOVER_HEADER,
  REDRIVEN_TOKEN,
  RUNTIME_ROOTS,
  SCHEDULE_BUCKET,
  STEP_VERSION_BUCKET,
} from "../subjects.ts";
import { SHIPPED_PIPELINES } from "../../pipelines/shipped.ts";
import { BACKLOG_SEQ_KEY, type ExtraTopology, OWES_MARK, STAGE_DESCRIPTION } from "../topology.ts";
import type { Access } from "../identities.ts";
import { edgesOf, endsApart, eventOf, WORK_KINDS } from "./validate.ts";
import type { PipelineDefinition, ScratchEntry, StepContext, StepSpec } from "./definition.ts";
import type { StageInputs } from "../failure_letter.ts";
import {
  CONTROL,
  CONTROL_KINDS,
  definedStageInputs,
  durableOf,
  endTypesOf,
  FLOW,
  INTAKE,
  onceTypesOf,
  PIPELINE_KEY,
  pipelineBucketOf,
  pipelineSubjects,
  STATE,
  STEP_KEY,
  stepConsumerMetadata,
  stepFilterSubject,
  stepFilterSubjects,
  stepPublishes,
} from "./derive.ts";
import {
  advance,
  awaitedEventId,
  branchSteps,
  checkAwaitedEvent,
  compileFlow,
  completion,
  decodeFlowEvent,
  endEventsAfter,
  entryData,
  entryEvent,
  FAILED,
  type Flow,
  type FlowData,
  type FlowEvent,
  flowEvent,
  schemaFailure,
  targetsOf,
  TIMER,
  type TimerData,
} from "./flow.ts";
import { applyPipelineEvent, type FoldEvent, type ItemState, refusal } from "./fold.ts";
import { createLlmStep, type LlmStepOptions } from "./llm_step.ts";
import { createBudget } from "../ai/llm/budget.ts";
import { batchedLimits, createBatcher, createStepLimiter } from "./flow_control.ts";
import { followVersion } from "../step_versions.ts";
import { type AgentRunner, createAgent, openScratchpad, scratchpadBucketOf } from "./agent_step.ts";
import { lazy } from "../retry.ts";
import { versionAtLeast } from "../nats_server.ts";

/** The repository root: relative definition paths (a promoted candidate's) start here. */
const ROOT_DIR = new URL("../../", import.meta.url).pathname;

/** A definition loaded from its file, ready to run. */
export interface LoadedPipeline {
  /** The module it was loaded from (absolute path). */
  file: string;
  def: PipelineDefinition;
  flow: Flow;
}

/** The KV bucket of a pipeline's item states (`nats kv get weft_<name>_state <item>`). */
export function stateBucketOf(name: string): string {
  return pipelineBucketOf(name, "state");
}
/** The KV bucket of a pipeline's held items (joins, waits). */
export function controlBucketOf(name: string): string {
  return pipelineBucketOf(name, "control");
}

/**
 * Names a definition's pipeline may not take: the first tokens of the subjects the mesh
 * already has, the runtime's own and each hand-wired pipeline's (its name and its streams').
 */
export function takenNames(): Set<string> {
  return new Set([
    ...RUNTIME_ROOTS,
    ...SHIPPED_PIPELINES.flatMap((w) => [
      w.name,
      ...w.streams.flatMap((s) => s.subjects.map((subject) => subject.split(".")[0]!)),
    ]),
  ]);
}

/** A definition's service names: `<pipeline>-flow` and `<pipeline>-<step>`. */
export function serviceNamesOf(def: PipelineDefinition): { control: string; steps: string[] } {
  return {
    control: `${def.name}-${FLOW}`,
    steps: workSteps(def).map((id) => `${def.name}-${id}`),
  };
}

/** Ids of the steps that run as services of their own, in definition order. */
export function workSteps(def: PipelineDefinition): string[] {
  return Object.keys(def.steps).filter((id) => stepFilterSubject(def, id) !== null);
}

/**
 * Loads the definitions exported by `files` (paths relative to `base`, or absolute): each
 * file's exports that are definitions (`definePipeline`'s results). Throws a ConfigError
 * naming the file on an import failure (a bad definition throws while it is defined), a
 * file without a definition, two pipelines of one name, or a name the mesh uses itself.
 */
export async function loadPipelines(
  files: readonly string[],
  base: string = Deno.cwd(),
): Promise<LoadedPipeline[]> {
  const taken = takenNames();
  // Everything a definition imports from Weft (mod.ts) is loaded first. A literal specifier
  // is part of this module's graph, so it needs no read permission, and reading a definition
  // then needs read permission on its own folder only. Loaded only when there is a
  // definition: a process without one never loads the whole library (analyzers, gateway).
  if (files.length > 0) await import("../../mod.ts");
  const out: LoadedPipeline[] = [];
  // A durable consumer's name is also its dead-letter subject and metrics label: one owner
  // in the whole mesh (a step's own `durable` could take another's).
  const durables = new Map<string, string>(
    SHIPPED_PIPELINES.flatMap((w) =>
      w.services.flatMap((s) => (s.access.consumes ?? []).map((c) => [c.durable, w.name]))
    ),
  );
  const listed = new Set<string>();
  for (const f of files) {
    const file = f.startsWith("/") ? f : `${base.replace(/\/$/, "")}/${f}`;
    const path = new URL(`file://${file}`).pathname; // "./" and "../" resolved
    if (listed.has(path)) {
      throw new ConfigError(
        `pipeline file ${f} is listed twice (WEFT_PIPELINES, --pipelines or pipelines/run.json): ` +
          "list each file once",
      );
    }
    listed.add(path);
    if (Deno.permissions.querySync({ name: "read", path: file }).state !== "granted") {
      // Deno's own advice ("run again with --allow-read") is not the user's to follow.
      throw new ConfigError(
        `pipeline file ${f}: outside the folders Weft may read (the repository's pipelines/ ` +
          `and data/); keep definitions under pipelines/, as deno task new NAME does`,
      );
    }
    let mod: Record<string, unknown>;
    try {
      mod = await import(new URL(`file://${file}`).href);
    } catch (err) {
      // Deno colours the import's place (`at file:...:1:8`) for a terminal: not for a log line.
      // deno-lint-ignore no-control-regex
      const message = (err as Error).message.replace(/\x1b\[[0-9;]*m/g, "");
      throw new ConfigError(`pipeline file ${f}: ${message}`, { cause: err });
    }
    const defs = Object.values(mod).filter((v): v is PipelineDefinition =>
      v !== null && typeof v === "object" && typeof (v as { hash?: unknown }).hash === "string" &&
      typeof (v as { steps?: unknown }).steps === "object"
    );
    if (defs.length === 0) {
      throw new ConfigError(`pipeline file ${f} exports no definition (definePipeline)`);
    }
    for (const def of defs) {
      if (taken.has(def.name)) {
        throw new ConfigError(`pipeline file ${f}: the name "${def.name}" is the mesh's own`);
      }
      const twin = out.find((p) => p.def.name === def.name);
      if (twin) {
        throw new ConfigError(
          `pipeline file ${f}: pipeline "${def.name}" is also defined in ${twin.file}`,
        );
      }
      // Bucket names cannot hold "-": `a-b` and `a_b` would share every bucket.
      const sharer = out.find((p) => stateBucketOf(p.def.name) === stateBucketOf(def.name));
      if (sharer) {
        throw new ConfigError(
          `pipeline file ${f}: pipeline "${def.name}" would share its buckets ` +
            `(${stateBucketOf(def.name)}) with pipeline "${sharer.def.name}" (${sharer.file})`,
        );
      }
      for (const [id, step] of Object.entries(def.steps)) {
        if (WORK_KINDS.has(step.kind)) {
          const durable = durableOf(def, id);
          if (durable === REDRIVEN_TOKEN) {
            throw new ConfigError(
              `pipeline file ${f}, step ${id}: durable consumer "${durable}" would put its dead ` +
                `letters on deadletter.${REDRIVEN_TOKEN}.*, where each redrive's marker is kept: ` +
                `choose another`,
            );
          }
          const owner = durables.get(durable);
          if (owner !== undefined) {
            throw new ConfigError(
              `pipeline file ${f}, step ${id}: durable consumer "${durable}" is also ${owner}'s`,
            );
          }
          durables.set(durable, `pipeline ${def.name}`);
        }
        const prompt = (step as { prompt?: unknown }).prompt;
        if (typeof prompt === "string") {
          // Found now, not on the first item (which would fail every item after retries).
          const path = new URL(prompt, `file://${file}`).pathname;
          try {
            if (!Deno.statSync(path).isFile) throw new Deno.errors.NotFound(path);
          } catch (err) {
            if (!(err instanceof Deno.errors.NotFound)) throw err;
            throw new ConfigError(
              `pipeline file ${f}, step ${id}: prompt file ${prompt} not found (${path}; ` +
                `a prompt's path is relative to its definition file)`,
            );
          }
        }
        if (step.kind === "task" && !step.handle && !step.handleBatch) {
          throw new ConfigError(
            `pipeline file ${f}, step ${id}: a task step needs its handle (in the step, or in ` +
              `definePipeline's second argument), or handleBatch with flow.batch`,
          );
        }
        if (step.kind === "router" && !step.route) {
          throw new ConfigError(
            `pipeline file ${f}, step ${id}: a router needs its route (the rules; a prompt only adds the LLM's choice)`,
          );
        }
      }
      const apart = endsApart(def);
      if (apart) {
        const [b1, b2] = apart.branches;
        throw new ConfigError(
          `pipeline file ${f}, step ${apart.step}: its branches ${b1} and ${b2} always end ` +
            `the item at two different ends (${apart.ends.join(" and ")}), and an item has one ` +
            `outcome; join the branches first, or end them at one end`,
        );
      }
      out.push({ file, def, flow: compileFlow(def) });
    }
  }
  return out;
}

function checkResult(flow: Flow, id: string, result: unknown): void {
  const check = flow.checkOutput.get(id);
  if (!check || check(result)) return;
  const e = check.errors?.[0];
  throw new ValidationError(
    `step ${id}'s result does not match its output schema: ${e?.instancePath || "/"} ${
      e?.message ?? ""
    }`,
    { field: e?.instancePath || "/", permanent: true },
  );
}

/** The event's own token: `tickets.triage` -> `triage`. */
function tokenOf(flow: Flow, type: string): string {
  return type.slice(flow.name.length + 1);
}

/** Options of the work steps' services. */
export interface WorkStepOptions {
  /** Where an llm step calls; required when the definition has one (agents: optional). */
  llm?: LlmStepOptions;
  /** The step's connection: agents' tools and the scratchpad read KV through it. */
  nc?: NatsConnection;
  /**
   * A shadow's copy of the step (src/shadow/live.ts): it reads the item's scratchpad as it was
   * when the input event was published, and an agent appends nothing to it.
   */
  shadow?: boolean;
}

/**
 * The scratchpad as it was when `e` was published: without the entries written later (by
 * this step's production run, from `e`, or by the steps after it).
 */
export function scratchpadAsOf(
  entries: readonly ScratchEntry[],
  e: { id: string; time: string },
): ScratchEntry[] {
  return entries.filter((x) => !x.id.startsWith(`${e.id}:`) && x.at <= e.time);
}

/** Whether items of `def` may wait for a person (or a callback): pipelines with wait steps. */
export function hasWaits(def: PipelineDefinition): boolean {
  return Object.values(def.steps).some((s) => s.kind === "wait");
}

/** Whether items of `def` have a shared scratchpad: pipelines with agent steps. */
export function hasScratchpad(def: PipelineDefinition): boolean {
  return Object.values(def.steps).some((s) => s.kind === "agent");
}

/** Where definitions may be loaded from: the folders of the running ones. */
export function candidateDefinitionFile(
  file: string,
  pipelines: readonly LoadedPipeline[],
  root: string,
): string {
  const abs = file.startsWith("/") ? file : `${root.replace(/\/$/, "")}/${file}`;
  const dir = abs.replace(/\/[^/]*$/, "");
  if (!pipelines.some((p) => p.file.replace(/\/[^/]*$/, "") === dir)) {
    throw new ValidationError(
      "a candidate definition must be in the folder of a running definition",
      { field: "/candidate/definition" },
    );
  }
  return abs;
}

/** What another version of step `id` must keep to run in its place: kind, event, output, edges. */
function stepContract(def: PipelineDefinition, id: string): string {
  const s = def.steps[id] as StepSpec | undefined;
  if (!s) return "";
  return JSON.stringify({
    kind: s.kind,
    emits: eventOf(id, s),
    output: "output" in s ? s.output : null,
    edges: edgesOf(s).map(([to, via]) => `${via}>${to}`).sort(),
  });
}

/**
 * Production's pipeline with step `id` run as `candidate` (another version of its definition)
 * has it: the promoted version of one step. Everything else, the definition's hash included,
 * stays production's, so items in flight go on unchanged. Throws a ValidationError when the
 * candidate's step does not keep the step's contract (its kind, emitted event, output schema
 * and edges): only how it decides may differ (handler, prompt, tools, flow control).
 */
export function withPromotedStep(
  prod: LoadedPipeline,
  candidate: LoadedPipeline,
  id: string,
): LoadedPipeline {
  if (candidate.def.name !== prod.def.name || !candidate.def.steps[id]) {
    throw new ValidationError(`the candidate has no step ${id} of pipeline ${prod.def.name}`, {
      field: "/candidate/definition",
    });
  }
  if (stepContract(candidate.def, id) !== stepContract(prod.def, id)) {
    throw new ValidationError(
      `the candidate's step ${id} changes its kind, event, output schema or edges; deploy the ` +
        `candidate definition instead (WEFT_PIPELINES or pipelines/run.json)`,
      { field: "/candidate/definition" },
    );
  }
  const def = Object.freeze({
    ...prod.def,
    steps: { ...prod.def.steps, [id]: candidate.def.steps[id]! },
  }) as PipelineDefinition;
  return { file: prod.file, def, flow: prod.flow };
}

/**
 * Refuses to start definitions whose model-driven steps have no model: an `llm` step, or an
 * agent without an offline policy, with no LLM endpoint configured (`WEFT_LLM_BASE_URL`).
 * Checked when `deno task start` loads the definitions, so the start stops with one line
 * instead of the step's service failing on every restart.
 *
 * @example
 * ```ts ignore
 * import { checkModelSteps, loadPipelines } from "./runtime.ts";
 * checkModelSteps(await loadPipelines(["pipelines/examples/documents.ts"]), "");
 * // ConfigError: pipeline documents, step extract: an llm step needs an LLM endpoint ...
 * ```
 */
export function checkModelSteps(loaded: readonly LoadedPipeline[], llmBaseUrl: string): void {
  if (llmBaseUrl) return;
  for (const { file, def } of loaded) {
    for (const [id, step] of Object.entries(def.steps)) {
      const needs = step.kind === "llm"
        ? "an llm step"
        : step.kind === "agent" && !step.offline
        ? "an agent without an offline policy"
        : undefined;
      if (needs) {
        throw new ConfigError(
          `pipeline file ${file.replace(ROOT_DIR, "")}, step ${id}: ${needs} needs an LLM ` +
            `endpoint: set WEFT_LLM_BASE_URL (an OpenAI-compatible server) and WEFT_LLM_MODEL, ` +
            `and WEFT_LLM_API_KEY only if the endpoint needs a key (docs/LLM.md), or leave the ` +
            `pipeline out (WEFT_PIPELINES)`,
        );
      }
    }
  }
}

/**
 * Refuses a definition whose items can be held longer than events are kept: a wait's
 * timeout, a join's deadline or a delay (its `ms`, or the longest gap between its cron's
 * next times) past `retentionMs` (`WEFT_RETENTION_MS`) would
 * let the item's history and state expire while it is held (its end would then come for an
 * item nothing remembers). Checked when `deno task start` loads the definitions.
 *
 * @example
 * ```ts ignore
 * import { checkHoldsWithinRetention, loadPipelines } from "./runtime.ts";
 * checkHoldsWithinRetention(await loadPipelines(["pipelines/examples/tickets.ts"]), 7 * 86_400_000);
 * ```
 */
export function checkHoldsWithinRetention(
  pipelines: readonly LoadedPipeline[],
  retentionMs: number,
): void {
  const days = (ms: number) => `${Math.round((ms / 86_400_000) * 10) / 10} days`;
  for (const { def, file } of pipelines) {
    for (const [id, step] of Object.entries(def.steps)) {
      const held = step.kind === "wait"
        ? ["waits up to", step.timeoutMs]
        : step.kind === "join"
        ? ["waits for its inputs up to", step.deadlineMs]
        : step.kind === "delay" && step.ms !== undefined
        ? ["holds items for", step.ms]
        : step.kind === "delay" && step.cron !== undefined
        ? [
          "holds items (between its cron's times) for up to",
          longestCronGap(step.cron, new Date()),
        ]
        : undefined;
      if (held && !(Number(held[1]) <= retentionMs)) {
        // Named as every other definition error names its file: from the repository root.
        const shown = file.startsWith(`${Deno.cwd()}/`) ? file.slice(Deno.cwd().length + 1) : file;
        throw new ConfigError(
          `pipeline file ${shown}: pipeline ${def.name}, step ${id} ${held[0]} ${
            days(Number(held[1]))
          }, longer than events are kept (WEFT_RETENTION_MS, ${days(retentionMs)}): an item's ` +
            `history and state would expire while it is held. Raise WEFT_RETENTION_MS or shorten ` +
            `the step's time.`,
        );
      }
    }
  }
}

/** A work step (task, router, llm) as a stage of the shared runner. */
export function workStage(
  p: LoadedPipeline,
  id: string,
  opts: WorkStepOptions = {},
  // deno-lint-ignore no-explicit-any
): Stage<any> {
  const { flow, def } = p;
  const step = def.steps[id]! as StepSpec;
  const filter = stepFilterSubject(def, id);
  if (filter === null) throw new ConfigError(`step ${id} of ${def.name} is not a work step`);
  let llm: ((value: unknown, data: FlowData, signal: AbortSignal) => Promise<unknown>) | undefined;
  if (step.kind === "llm") {
    if (!opts.llm) {
      throw new ConfigError(
        `pipeline ${def.name}, step ${id}: an llm step needs an LLM endpoint (WEFT_LLM_BASE_URL)`,
      );
    }
    llm = createLlmStep(p, id, step, opts.llm);
  }
  const flowOf = step.kind === "end" ? undefined : step.flow;
  const batching = step.kind === "task" && step.flow?.batch && step.handleBatch
    ? batchedLimits(step.flow)
    : undefined;
  // A batched step's limits without a key count its handleBatch calls, not items.
  const limiter = createStepLimiter(batching ? batching.perItem : flowOf);
  const callLimiter = batching ? createStepLimiter(batching.perCall) : undefined;
  const scratchpad = hasScratchpad(def) && opts.nc ? openScratchpad(opts.nc, def.name) : undefined;
  // A task with flow.batch: single calls gathered into handleBatch calls.
  const batched = step.kind === "task" && step.flow?.batch && step.handleBatch
    ? createBatcher(
      // In the order the stream holds them, whatever order their entry reads ended in.
      { ...step.flow.batch, order: (ctx: StepContext) => ctx.message.seq },
      async (values: unknown[], ctxs: StepContext[]) => {
        // Gives up waiting when any of its items' attempts does (the step stops, or an
        // item's handler time runs out): each is retried, alone.
        const release = await callLimiter!.acquire(
          undefined,
          AbortSignal.any(ctxs.map((c) => c.signal)),
        );
        try {
          return await step.handleBatch!(values, ctxs);
        } finally {
          release();
        }
      },
    )
    : undefined;
  // A router with a prompt and an LLM endpoint: the model picks the label.
  const labels = step.kind === "router" ? Object.keys(step.routes) : [];
  const routeLlm = step.kind === "router" && step.prompt && opts.llm
    ? createLlmStep(p, id, {
      kind: "llm",
      prompt: step.prompt,
      output: {
        type: "object",
        required: ["label"],
        properties: { label: { enum: labels } },
      },
    }, opts.llm)
    : undefined;
  let agent: AgentRunner | undefined;
  if (step.kind === "agent") {
    if (!opts.nc) throw new ConfigError(`step ${id} of ${def.name}: an agent needs a connection`);
    agent = createAgent(p, id, step, { nc: opts.nc, llm: opts.llm });
  }
  const inputs = stepFilterSubjects(def, id)!;
  const ends = endTypesOf(def);
  const stream = pipelineSubjects(def).stream;
  const jsm = opts.nc ? lazy(() => jetstreamManager(opts.nc!)) : undefined;
  const states = opts.nc ? lazy(() => new Kvm(opts.nc!).open(stateBucketOf(def.name))) : undefined;
  const stands = states && jsm ? storedStandsFrom(p, states, jsm) : undefined;
  // The joins that wait for this step (for a backlog event, wentPast).
  const joins = joinsAfter(def, id);
  const stageInputs = stageInputsOf(def);
  return {
    name: durableOf(def, id),
    filterSubject: filter,
    ...(inputs.length > 1 ? { filterSubjects: inputs } : {}),
    stream: pipelineSubjects(def).stream,
    failedType: `${def.name}.${FAILED}`,
    once: onceTypesOf(def),
    // An item ends once: a second end (another branch's) is refused as a conflict.
    outcomes: endTypesOf(def),
    finalTypes: endTypesOf(def),
    ...(states ? { outcomeOf: outcomeFrom(states) } : {}),
    ...(stands ? { storedStands: stands, holdsOutcome: holdsOutcomeFrom(stands, states!) } : {}),
    input: { kind: "event", types: [] },
    identify: (_raw, message) => message.subject.split(".")[2],
    // A wide filter (several events lead here) also brings the item's other events (a
    // human decision, a failure): only a step's completion or the entry can hand an item on,
    // and the others are not even read, so a garbled decision fails nothing here.
    accepts(message) {
      // A hand-over's copy is only for the steps it names.
      if (message.handoverTo && !message.handoverTo.includes(id)) return false;
      const role = flow.roles.get(message.subject.split(".")[1] ?? "")?.role;
      return role === "done" || role === "timeout" || role === "entry";
    },
    decode(raw, message) {
      const e = decodeFlowEvent(flow, raw, message.subject);
      return targetsOf(flow, tokenOf(flow, e.type), e.data).includes(id) ? e : undefined;
    },
    checkOutput: () => {}, // completion() builds them from the definition
    // A copy of an event this step ran for (a redrive of a letter of another step's, which
    // leads here too): its completion of it is stored.
    ...(jsm
      ? { tookAlready: async (e: FlowEvent) => stepTook(await jsm(), stream, flow, id, e) }
      : {}),
    // Where the item's entry is stored: what an output's subject holds from before it is not
    // the item's. (Whether the item entered is part of admit's check, below.)
    entrySubject: (item: string) => entrySubject(item),
    // Runs only for an item that entered, has not ended, and whose input the event carries.
    ...(opts.nc ? { admit: (e: FlowEvent, message: MessageInfo) => admit(e, message) } : {}),
    // An event of the backlog (a step new to the stream: renamed, added, its `durable`
    // changed) that the item went on from already: this step ran for it (under its earlier
    // durable), or the item passed it along another path (a renamed step's completion).
    ...(jsm
      ? {
        wentOn: async (e: FlowEvent) => {
          const j = await jsm();
          if (await stepTook(j, stream, flow, id, e)) return true;
          const events = await itemHistory(j, flow, e.item_id);
          // Too long a history to tell: run the step, as before.
          return events !== undefined &&
            (wentOnFrom(flow, events, e, targetsOf(flow, tokenOf(flow, e.type), e.data)) ||
              wentPast(flow, events, e, id, joins));
        },
      }
      : {}),
    // An item of the backlog that ended under an earlier version of the definition (an end
    // step this one lacks): its state says so.
    ...(opts.nc
      ? {
        ended: async (item: string) => {
          const s = await readItem(await states!(), item).catch(() => null);
          return s?.status === "done" || s?.status === "failed";
        },
      }
      : {}),
    async handle(e: FlowEvent, ctx: StageContext) {
      const data = e.data;
      const sctx: StepContext = {
        ...ctx,
        item: e.item_id,
        input: data.input,
        results: data.results,
        runs: data.runs,
        scratchpad: !scratchpad
          ? []
          : opts.shadow
          ? scratchpadAsOf(await scratchpad.read(e.item_id), e)
          : await scratchpad.read(e.item_id),
      };
      let next: FlowData;
      const release = await limiter.acquire(data.input, ctx.signal);
      try {
        if (agent) {
          const { result, notes } = await agent(data.value, { ...sctx, eventId: e.id });
          checkResult(flow, id, result);
          // The scratchpad first: the next step reads it. A shadow's notes stay on its event.
          // Entries an earlier attempt of this run left give way to these unless its event
          // is stored (a redelivery after its ack was lost: the stored event shows those).
          if (!opts.shadow) {
            await scratchpad!.append(e.item_id, notes, {
              prefix: `${e.id}:${id}:`,
              replaces: async () => !jsm || !(await stepTook(await jsm(), stream, flow, id, e)),
            });
          }
          next = { ...advance(data, id, result, result), notes };
        } else next = await run(data, sctx, ctx.signal);
      } finally {
        release();
      }
      const out = completion(flow, id, e, next, { source: ctx.source, now: ctx.now() });
      // A branch reaching an end while another branch's failure holds the item (a fan-out
      // with no join): its end would be an outcome after the failure. Kept as a dead letter
      // (a conflict, failing nothing): redriven once a redrive has resumed the item, or to
      // end the item there.
      if (
        opts.nc && out.some((o) => ends.has(o.type)) &&
        await itemFailedNow(await jsm!(), stream, def.name, e.item_id, undefined, stageInputs)
      ) {
        throw new ConflictError(
          `${def.name} item ${e.item_id} has failed: step ${id}'s end counts only once the ` +
            `item is resumed (redrive its failure, then this letter)`,
          { permanent: true },
        );
      }
      return out as unknown as OutputEvent[];
    },
  };

  /**
   * Refuses a message this step must not run: for an item that never entered (no entry event
   * stored before it: `not_found`), that has ended (done, or failed and not resumed:
   * `conflict`, redrivable), or whose `data.input` is not the input the item was submitted
   * with (its state's, else its entry event's: `subject_mismatch`, a forged or altered
   * event). One read: the item's state; the entry event from the stream only while the state
   * is not written yet, or for the entry event itself (its own input, unless a second one).
   */
  async function admit(e: FlowEvent, message: MessageInfo): Promise<void> {
    const item = e.item_id;
    const role = flow.roles.get(message.subject.split(".")[1] ?? "")?.role;
    const state = role === "entry" ? null : await readItem(await states!(), item).catch(() => null);
    let input: { value: unknown; from: string };
    if (state) {
      if (state.status === "done") {
        throw new ConflictError(
          `${def.name} item ${item} has ended (done, outcome ${state.outcome}): step ${id} ` +
            `does not run for it; nothing was run`,
          { permanent: true },
        );
      }
      const digest = state.status === "failed" && state.error?.event === e.id
        ? state.error.digest
        : undefined;
      if (digest !== undefined && canonicalDigest(e) !== digest) {
        // Its id, another body: no redrive (which stores the message it failed on byte for
        // byte), but a step's key writing its event again. It resumes nothing.
        throw new ConflictError(
          `${def.name} item ${item} has failed on event ${e.id}, and this ${e.type} carries ` +
            `its id with another body: only a redrive of its dead letter (the message as ` +
            `stored) resumes the item; step ${id} did not run`,
          { permanent: true },
        );
      }
      if (
        state.status === "failed" && state.error?.event !== e.id &&
        await itemFailedNow(await jsm!(), stream, def.name, item, undefined, stageInputs)
      ) {
        throw new ConflictError(
          `${def.name} item ${item} has failed: step ${id} runs for it only once the item is ` +
            `resumed (redrive its failure, then this letter)`,
          { permanent: true },
        );
      }
      if (
        (role === "done" || role === "timeout") &&
        (state.runs[id] ?? 0) > (e.data.runs?.[id] ?? 0) &&
        !(await stepTook(await jsm!(), stream, flow, id, e))
      ) {
        // This step ran for the item since the event was made (a loop's next turn carries its
        // count): a copy of an earlier completion (a step's key publishing its event again with
        // another id), not one this step has yet to run for. (Its own redelivery, once it ran
        // for it, runs as before: its completion's id follows from the event's.)
        throw new ConflictError(
          `${e.type} for ${def.name} item ${item} is from before step ${id}'s run ` +
            `${state.runs[id]} (it carries ${e.data.runs?.[id] ?? 0}): a copy of an earlier ` +
            `completion; step ${id} did not run`,
          { permanent: true },
        );
      }
      if (state.input === undefined) return; // (its entry expired: nothing to check against)
      input = { value: state.input, from: "its state" };
    } else {
      const entry = await storedMessage(await jsm!(), stream, {
        next_by_subj: entrySubject(item),
        seq: 0,
      } as unknown as { seq: number });
      if (!entry || entry.seq > message.seq) {
        throw new NotFoundError(
          `no item ${JSON.stringify(item)}: ${e.type} counts only for an item whose entry ` +
            `event (${entrySubject(item)}) was stored before it, and none was (stream ` +
            `sequence ${message.seq}); nothing was run`,
        );
      }
      if (entry.seq === message.seq) return; // the entry event itself: its input is the item's
      let stored: unknown;
      try {
        stored = entry.json<{ data?: { input?: unknown } }>().data?.input;
      } catch {
        stored = undefined;
      }
      input = { value: stored, from: `its entry event (stream sequence ${entry.seq})` };
    }
    if (canonicalJson(input.value) !== canonicalJson(e.data.input)) {
      throw new WeftError(
        ErrorCode.SubjectMismatch,
        `${e.type} for ${def.name} item ${item} carries a data.input other than the item's ` +
          `(as ${input.from} holds it): a forged or altered event; step ${id} did not run`,
      );
    }
    // A step's run the item's history does not lead to (a step's key publishing its event for
    // an item not at its step): its state refuses it, and nothing runs after it.
    if (
      role === "done" && !(await stands!(item, { type: e.type, seq: message.seq, raw: e }, state))
    ) {
      throw new ConflictError(
        `${e.type} for ${def.name} item ${item} is a run of a step the item has not reached ` +
          `(its state does not take it): step ${id} did not run`,
        { permanent: true },
      );
    }
  }

  function entrySubject(item: string): string {
    return `${def.name}.${entryEvent(def)}.${item}`;
  }

  async function run(data: FlowData, sctx: StepContext, signal: AbortSignal): Promise<FlowData> {
    let next: FlowData;
    {
      if (step.kind === "router") {
        let label: unknown;
        let by = "rules";
        if (routeLlm) {
          try {
            // The model sees what the rules see: the value, the item's input and its
            // scratchpad (who handed it back), not the value alone (after a hand-back, the
            // agent's answer, the same for many items and cached as such).
            const asked = {
              value: data.value,
              input: data.input,
              ...(scratchpad ? { scratchpad: sctx.scratchpad } : {}),
            };
            label = ((await routeLlm(asked, data, signal)) as { label: string }).label;
            by = "llm";
          } catch (err) {
            if (!step.route || signal.aborted) throw err;
            by = "rules (the LLM failed)";
          }
        }
        if (by !== "llm") label = await step.route!(data.value, sctx);
        if (typeof label !== "string" || !(label in step.routes)) {
          throw new WeftError(
            ErrorCode.Rejected,
            `router ${id} chose ${JSON.stringify(label)}, not one of ${
              Object.keys(step.routes).join(", ")
            }`,
          );
        }
        next = advance(data, id, { label, by }, data.value);
      } else {
        // A batched task's redelivery (its batch failed, or its process died) runs alone: a
        // failed batch is retried item by item, so one bad item cannot fail the others again.
        const result = step.kind === "llm"
          ? await llm!(data.value, data, signal)
          : batched
          ? await batched(data.value, sctx, { alone: sctx.message.deliveryCount > 1 })
          : await (step as { handle: (v: unknown, c: StepContext) => unknown }).handle(
            data.value,
            sctx,
          );
        checkResult(flow, id, result);
        next = advance(data, id, result, result);
      }
    }
    return next;
  }
}

/**
 * How much earlier than its deadline a timer may be handled (the scheduler's and this
 * process's clocks may differ a little); any earlier, it is refused.
 */
const TIMER_SKEW_MS = 5_000;

/** What a delay's record keeps of the data it holds an item with: its canonical digest. */
function carryDigest(data: FlowData): string {
  return sha256Hex(encoder.encode(canonicalJson(data) ?? ""));
}

/** A held item's record in the control bucket: one per (control step, item). */
interface Held {
  /** Loop iteration of the step this record is for. */
  iter: number;
  /** Join: what arrived from each input. */
  arrived?: Record<string, FlowData>;
  /** Join: the time of its first input's event (its deadline counts from then). */
  openedAt?: string;
  /** Delay: when it is due (ISO). */
  due?: string;
  /** Delay: the SHA-256 of the data it holds the item with (what its timer must carry). */
  carry?: string;
  /** Wait: the data it was armed with, the arming event, and its deadline (ISO). */
  armed?: { data: FlowData; cause: { id: string; trace_id: string }; due?: string };
  /** Wait: the awaited event's payload, when it came (possibly before the arming). */
  received?: unknown;
  /**
   * Join, wait: its deadline passed while the item had failed, so its timer was put off (the
   * next firing after a redrive decides): an input or decision stored after the deadline
   * still counts until then.
   */
  postponed?: boolean;
  /** How it ended: completed, or its deadline won. */
  closed?: "done" | "timed_out";
  /** The stream sequence of the message that closed it, and what it published. */
  closedBy?: number;
  emitted?: FlowEvent[];
}

type ControlInput =
  /** `ends`: a redriven event leading to end steps, whose end events it publishes. */
  | { kind: "arrive"; event: FlowEvent; steps: string[]; ends?: boolean; redriven?: boolean }
  | { kind: "awaited"; item: string; payload: unknown; waits: string[]; subject: string }
  | { kind: "timer"; event: FlowEvent & { data: FlowData & TimerData } };

const encoder = new TextEncoder();

/** The record a control-bucket entry holds; undefined for none (or a deleted one). */
function heldOf(e: KvEntry | null): Held | undefined {
  return e && e.operation === "PUT" && e.length > 0 ? e.json<Held>() : undefined;
}

/** Reads, changes (compare-and-set) and writes one record; returns what `change` returned. */
async function updateHeld<T>(
  kv: KV,
  key: string,
  change: (rec: Held | undefined) => { rec?: Held; out: T },
): Promise<T> {
  for (let attempt = 0; attempt < 20; attempt++) {
    const e = await kv.get(key);
    const current = heldOf(e);
    const { rec, out } = change(current);
    if (!rec) return out;
    try {
      const body = encoder.encode(JSON.stringify(rec));
      if (current) await kv.update(key, body, e!.revision);
      else await kv.create(key, body);
      return out;
    } catch {
      // someone else changed it first: read again
    }
  }
  throw new WeftError(ErrorCode.HandlerFailed, `record ${key} kept changing`);
}

/**
 * The control stage of a pipeline: joins, waits, delays and version checks. `retentionMs`:
 * how long the item's events are kept (a failed item's timers are dropped after it).
 */
export function controlStage(
  p: LoadedPipeline,
  nc: NatsConnection,
  opts: { retentionMs?: number; handover?: Handover; log?: Logger } = {},
  // deno-lint-ignore no-explicit-any
): Stage<any> {
  const { flow, def } = p;
  const n = def.name;
  const kvm = new Kvm(nc);
  // Opened at first use; one that failed (NATS away) is opened again at the next.
  const heldKv = lazy(() => kvm.open(controlBucketOf(n)));
  const states = lazy(() => kvm.open(stateBucketOf(n)));
  const schedules = lazy(() => kvm.open(SCHEDULE_BUCKET).then((kv) => createScheduleStore(kv)));
  // The pipeline's own schedules: `<name>.<...>`, which only its control service may write.
  const timerId = (step: string, item: string, iter: number) =>
    `${n}.${`${step}-${item}-${iter}`.slice(0, 128)}`;

  /**
   * Arms the timer of `step` for this item and iteration, once: the timer is built from the
   * event that armed it alone (a redelivery builds the same one), and when a timer of this
   * step, item and iteration exists already (armed by an earlier attempt, or by another of a
   * join's inputs) that one stands.
   */
  async function arm(
    step: string,
    item: string,
    iter: number,
    due: Date,
    cause: FlowEvent,
    carry: FlowData,
  ) {
    const data: TimerData = { step, due: due.toISOString(), carry };
    const timer = flowEvent(flow, TIMER, { ...cause, id: `${cause.id}:${step}:timer` }, data, {
      source: `weft-${n}-${FLOW}`,
      now: new Date(cause.time),
    });
    try {
      await (await schedules()).create({
        id: timerId(step, item, iter),
        subject: `${n}.${TIMER}.${item}`,
        payload: timer as unknown as Record<string, unknown>,
        at: due.toISOString(),
        description: `${n}: ${step} of ${item}`,
      });
    } catch (err) {
      if (!(err instanceof ConflictError)) throw err;
    }
  }
  const disarm = async (step: string, item: string, iter: number) => {
    await (await schedules()).cancel(timerId(step, item, iter)).catch(() => {});
  };

  const manager = lazy(() => jetstreamManager(nc));
  const stands = storedStandsFrom(p, states, manager);
  const stream = pipelineSubjects(def).stream;
  const handover = opts.handover ?? createHandover(p, nc, opts.log);
  /** Whether the item has failed and not been resumed since ({@link itemFailedNow}). */
  const inputs = stageInputsOf(def);
  const failedNow = async (item: string) =>
    await itemFailedNow(await manager(), stream, n, item, undefined, inputs);
  /**
   * Whether `item` was submitted before stream sequence `seq`: the first message on its entry
   * event's subject is stored there (the stream, not the state, which trails).
   */
  const submittedBefore = async (item: string, seq: number) => {
    const first = await storedMessage(await manager(), stream, {
      next_by_subj: `${n}.${entryEvent(def)}.${item}`,
      seq: 0,
    } as unknown as { seq: number });
    return first !== null && first.seq < seq;
  };

  /**
   * Fires this timer again later: its item has failed, so its join, wait or delay decides
   * nothing now (the item's other branches run on, and a deadline would take it to a second
   * outcome). If a redrive resumes the item, the next firing decides. Each postponement
   * doubles the wait (from the step's own period, at most a day), and once the item's events
   * are past retention the timer is dropped: a failed item costs a few firings, not one per
   * period forever.
   */
  async function postpone(
    e: FlowEvent & { data: FlowData & TimerData },
    periodMs: number,
    now: Date,
  ) {
    const data = e.data as unknown as TimerData;
    const times = typeof data.postponed === "number" ? data.postponed : 0;
    if (now.getTime() - Date.parse(data.due) > (opts.retentionMs ?? 7 * 24 * 3600_000)) return;
    const wait = Math.min(24 * 3600_000, Math.max(1000, periodMs) * 2 ** Math.min(times, 30));
    const due = new Date(now.getTime() + wait);
    const id = deterministicId(e.id, "postponed");
    const timer = flowEvent(flow, TIMER, { ...e, id }, { ...data, postponed: times + 1 }, {
      source: `weft-${n}-${FLOW}`,
      now,
    });
    try {
      await (await schedules()).create({
        id: `${n}.${`${data.step}-${e.item_id}-${id.slice(0, 12)}`.slice(0, 128)}`,
        subject: `${n}.${TIMER}.${e.item_id}`,
        payload: timer as unknown as Record<string, unknown>,
        at: due.toISOString(),
        description: `${n}: ${data.step} of ${e.item_id} (the item has failed)`,
      });
    } catch (err) {
      if (!(err instanceof ConflictError)) throw err;
    }
  }

  /**
   * The join's data: each input's results merged step by step, each step's result taken from
   * the input that ran that step most (inside a loop, every input carries every step's result,
   * the other branches' from an earlier round); its value, each input's value by step.
   */
  function joined(arrived: Record<string, FlowData>): FlowData {
    const all = Object.values(arrived);
    const results: Record<string, unknown> = {};
    const runs: Record<string, number> = {};
    const from = new Map<string, number>();
    for (const d of all) {
      for (const [k, v] of Object.entries(d.results)) {
        const n = d.runs[k] ?? 0;
        if (n >= (from.get(k) ?? -1)) {
          results[k] = v;
          from.set(k, n);
        }
      }
      for (const [k, v] of Object.entries(d.runs)) runs[k] = Math.max(runs[k] ?? 0, v);
    }
    const value = Object.fromEntries(Object.entries(arrived).map(([k, d]) => [k, d.value]));
    return { input: all[0]!.input, value, results, runs };
  }

  /** Per join and input: the steps of the branch to that input ({@link branchSteps}). */
  const branches = new Map<string, string[]>();
  /**
   * A timed-out join's data: each step on a branch it went on without counts this round's run
   * (no result), as if it had run. That branch's late run of this round (its run count, one
   * more than the round before's) is then a copy of a run the item holds, which changes
   * nothing, and the branch's run in the loop's next round counts one more again: before, both
   * carried one run count, so the next round's run was dead-lettered as a copy of the late
   * one (`conflict`), or, when it ran, the item's state kept the late result.
   */
  function wentOnWithout(t: string, after: readonly string[], data: FlowData): FlowData {
    const missed = after.filter((a) => !(a in (data.value as Record<string, unknown>)));
    if (missed.length === 0) return data;
    const runs = { ...data.runs };
    for (const a of missed) {
      const key = `${t}.${a}`;
      let steps = branches.get(key);
      if (!steps) branches.set(key, steps = branchSteps(def, t, a));
      for (const b of steps) runs[b] = (data.runs[b] ?? 0) + 1;
    }
    return { ...data, runs };
  }

  /**
   * A join's completion with every input in: the same event (its id from the item, step and
   * iteration) whichever arrival or firing completes it.
   */
  function completeJoin(
    t: string,
    iter: number,
    cause: FlowEvent,
    arrived: Record<string, FlowData>,
    emit: { source: string; now: Date },
  ): FlowEvent[] {
    const data = joined(arrived);
    return completion(
      flow,
      t,
      { ...cause, id: deterministicId(cause.item_id, t, String(iter), "joined") },
      advance(data, t, data.value, data.value),
      emit,
    );
  }

  /**
   * Refuses an arrival that would open a join, wait or delay for an item that has ended (its
   * state says done), as a work step refuses to run for one: found by probing, a step's key
   * publishing its event again for such an item, with another result (a router's other
   * label), armed a wait (its record and its timer) for an item that was over, and a decision
   * on the bus then stored the wait's completion after the item's end. An arrival at a step
   * that holds a record of this run already (a redelivery) goes on as before.
   */
  async function refuseEnded(e: FlowEvent, steps: string[], seq: number) {
    const kv = await heldKv();
    let opens = false;
    for (const t of steps) {
      const rec = heldOf(await kv.get(`${t}.${e.item_id}`));
      const iter = e.data.runs[t] ?? 0;
      // A join's input of an earlier round (a branch slower than that round's deadline) opens
      // nothing: it changes nothing, below, whether the item has ended since or not (it was
      // dead-lettered `conflict` when the item had ended).
      const earlier = rec !== undefined && def.steps[t]?.kind === "join" && iter < rec.iter;
      if (!earlier && (!rec || rec.iter !== iter)) opens = true;
    }
    if (!opens) return;
    const state = await readItem(await states(), e.item_id);
    if (state?.status === "done") {
      throw new ConflictError(
        `${n} item ${e.item_id} has ended (done, outcome ${state.outcome}): ${e.type} opens ` +
          `no ${steps.join(", ")} for it; nothing was armed`,
        { permanent: true },
      );
    }
    // Nor for a step's run the item's history does not lead to (a step's key publishing its
    // event for an item not at its step: a router's other label would arm its wait).
    const role = flow.roles.get(tokenOf(flow, e.type))?.role;
    if (role === "done" && !(await stands(e.item_id, { type: e.type, seq, raw: e }, state))) {
      throw new ConflictError(
        `${e.type} for ${n} item ${e.item_id} is a run of a step the item has not reached ` +
          `(its state does not take it): it opens no ${steps.join(", ")}; nothing was armed`,
        { permanent: true },
      );
    }
  }

  async function onArrive(e: FlowEvent, steps: string[], seq: number, ctx: StageContext) {
    await refuseEnded(e, steps, seq);
    const out: FlowEvent[] = [];
    const from = flow.roles.get(tokenOf(flow, e.type));
    const fromStep = from && "step" in from ? from.step : "$input";
    for (const t of steps) {
      const s = def.steps[t]!;
      const iter = e.data.runs[t] ?? 0;
      const emit = { source: ctx.source, now: ctx.now() };
      const kv = await heldKv();
      const key = `${t}.${e.item_id}`;
      if (s.kind === "delay") {
        const due = s.ms !== undefined
          ? new Date(Date.parse(e.time) + s.ms)
          : nextCronTime(s.cron!, new Date(e.time)) ?? new Date(e.time);
        // Recorded first, so its timer is checked against it (a redelivery keeps the first).
        await updateHeld(kv, key, (rec) =>
          rec && rec.iter === iter ? { out: null } : {
            rec: { iter, due: due.toISOString(), carry: carryDigest(e.data) },
            out: null,
          });
        await arm(t, e.item_id, iter, due, e, e.data);
        continue;
      }
      if (s.kind === "join") {
        // A failed item's join holds what arrives; its deadline's firing after a redrive
        // resumed the item completes it.
        const failed = await failedNow(e.item_id);
        // When the server stored this input; checked against the deadline for a branch's own
        // completion (a redrive's or hand-over's copy is stored again later, by design).
        const stored = ctx.message.storedAt;
        const timely = !failed && ctx.message.redriveOf === undefined &&
          ctx.message.handoverTo === undefined;
        const r = await updateHeld<
          { events: FlowEvent[]; openedAt?: string; ahead?: number }
        >(kv, key, (rec) => {
          if (rec && rec.iter === iter && rec.closed) {
            return {
              out: { events: rec.closedBy === seq ? rec.emitted! : [], openedAt: undefined },
            };
          }
          // Inside a loop, an input of an earlier round (a branch slower than that round's
          // deadline) changes nothing: the item went round since. Found by probing: it
          // replaced this round's record, whose inputs were lost and whose deadline, armed
          // already, was then judged stale: the item waited at the join for ever.
          if (rec && iter < rec.iter) return { out: { events: [], openedAt: undefined } };
          // A round opens once the one before it has closed (a join lets the item on only by
          // closing): an input for another round while one is open is no input of this item.
          if (rec && iter > rec.iter && !(rec.closed && iter === rec.iter + 1)) {
            return { out: { events: [], openedAt: undefined, ahead: rec.iter } };
          }
          const cur: Held = rec && rec.iter === iter ? structuredClone(rec) : { iter, arrived: {} };
          if (timely && cur.openedAt !== undefined && !cur.postponed) {
            // An input stored after the deadline changes nothing, whichever the control step
            // took first (found by probing: after a kill of the control step, the inputs and
            // the deadline's timer waited together, and a branch stored seconds after the
            // deadline completed the join). The deadline then times the join out.
            const opened = Math.min(Date.parse(cur.openedAt), Date.parse(e.time));
            if (stored > opened + s.deadlineMs) {
              return { out: { events: [], openedAt: cur.openedAt } };
            }
          }
          cur.openedAt ??= e.time;
          cur.arrived![fromStep] = e.data;
          let events: FlowEvent[] = [];
          if (!failed && s.after.every((a) => a in cur.arrived!)) {
            events = completeJoin(t, iter, e, cur.arrived!, emit);
            Object.assign(cur, { closed: "done", closedBy: seq, emitted: events });
          }
          return { rec: cur, out: { events, openedAt: cur.openedAt } };
        });
        if (r.ahead !== undefined) {
          throw new ConflictError(
            `${n} item ${e.item_id}: ${e.type} arrives at join ${t} for round ${iter + 1} ` +
              `while round ${r.ahead + 1} is open; nothing was recorded`,
            { permanent: true },
          );
        }
        // Still open: its deadline (from the first input) is armed, by whichever arrival
        // gets there first, so a kill between recording an input and arming loses nothing.
        if (r.openedAt !== undefined && r.events.length === 0) {
          await arm(t, e.item_id, iter, new Date(Date.parse(r.openedAt) + s.deadlineMs), e, e.data);
        }
        if (r.events.length > 0) await disarm(t, e.item_id, iter);
        out.push(...r.events);
      } else if (s.kind === "wait") {
        // A failed item's wait is armed but takes no decision that came before it: its
        // timer's firing after a redrive resumed the item takes it.
        const failed = await failedNow(e.item_id);
        const r = await updateHeld(kv, key, (rec) => {
          if (rec && rec.iter === iter && rec.armed) {
            return { out: rec.closedBy === seq ? rec.emitted! : null };
          }
          // A new arming; a decision that came before it (same iteration) counts.
          const cur: Held = rec && rec.iter === iter ? structuredClone(rec) : { iter };
          cur.armed = {
            data: e.data,
            cause: { id: e.id, trace_id: e.trace_id },
            due: new Date(Date.parse(e.time) + s.timeoutMs).toISOString(),
          };
          let events: FlowEvent[] | null = null;
          if (cur.received !== undefined && !failed) {
            events = resume(t, e.item_id, cur, emit);
            Object.assign(cur, { closed: "done", closedBy: seq, emitted: events });
          }
          return { rec: cur, out: events };
        });
        if (r === null) {
          await arm(t, e.item_id, iter, new Date(Date.parse(e.time) + s.timeoutMs), e, e.data);
        } else out.push(...r);
      }
    }
    return out;
  }

  function resume(
    t: string,
    item: string,
    rec: Held,
    emit: { source: string; now: Date },
  ): FlowEvent[] {
    const armed = rec.armed!;
    return completion(
      flow,
      t,
      {
        id: deterministicId(armed.cause.id, t, "resumed"),
        item_id: item,
        trace_id: armed.cause.trace_id,
      },
      advance(armed.data, t, rec.received, rec.received),
      emit,
    );
  }

  async function onAwaited(
    item: string,
    payload: unknown,
    waits: string[],
    seq: number,
    ctx: StageContext,
  ) {
    if (await failedNow(item)) {
      // Taking the decision would run the item's waiting branch on to an outcome after its
      // failure. Kept as a dead letter instead (the item stays failed): redrive it once a
      // redrive of the failure has resumed the item.
      throw new ConflictError(
        `${n} item ${item} has failed: a decision counts only once the item is resumed ` +
          `(redrive its failure, then this letter)`,
        { permanent: true },
      );
    }
    if (!(await submittedBefore(item, seq))) {
      // No item to decide: one never submitted (or expired), or submitted after this event.
      // Recording it would make up an item (its state, a held decision) for whoever names
      // an id first; kept as a dead letter instead, failing nothing.
      throw new NotFoundError(
        `no ${n} item ${JSON.stringify(item)}: an awaited event counts only for an item ` +
          `submitted before it (this one was stored at stream sequence ${seq}); nothing changed`,
      );
    }
    // Held at a wait the running definition no longer has (renamed or removed since the item
    // reached it): the decision would be recorded under the running definition's wait and
    // never taken, so it is kept as a letter instead (as HTTP answers 409), failing nothing:
    // redriven once the step is back, it decides the item.
    const s = await readItem(await states(), item).catch(() => null);
    const heldAt = s?.status === "waiting" ? s.waiting?.step : undefined;
    if (heldAt !== undefined && def.steps[heldAt]?.kind !== "wait") {
      throw new ConflictError(
        `${n} item ${item} waits at step ${heldAt}, which the running definition ` +
          `(${def.hash}) no longer has: its decision is kept as this letter (redrive it once ` +
          `the step is back)`,
        { permanent: true },
      );
    }
    const kv = await heldKv();
    const out: FlowEvent[] = [];
    for (const t of waits) {
      if (await timedOutBefore(t, item, seq, ctx.message.storedAt)) continue;
      const emit = { source: ctx.source, now: ctx.now() };
      const events = await updateHeld(kv, `${t}.${item}`, (rec) => {
        if (rec?.closed) return { out: rec.closedBy === seq ? rec.emitted! : [] };
        if (rec?.received !== undefined) return { out: [] as FlowEvent[] }; // the first one counts
        const cur: Held = rec ? structuredClone(rec) : { iter: 0 };
        cur.received = payload;
        let events: FlowEvent[] = [];
        if (cur.armed) {
          events = resume(t, item, cur, emit);
          Object.assign(cur, { closed: "done", closedBy: seq, emitted: events });
        }
        return { rec: cur, out: events };
      });
      if (events.length > 0) {
        const iter = events[0]!.data.runs[t]! - 1;
        await disarm(t, item, iter);
      }
      out.push(...events);
    }
    return out;
  }

  /**
   * Whether the decision stored at stream sequence `seq` (at `storedAt`, ms) for wait `t` of
   * `item` came after the wait's deadline and after its timer for the round waiting: then the
   * timer decides (the item times out) and the decision changes nothing, though the control
   * step, taking messages concurrently, takes it first (found by probing: after a kill -9 of
   * the `-flow` service, 122 of 300 items whose decisions the server stored after their
   * deadline's timer went on as those decisions said; 5 of 300 without the kill). The mirror
   * of {@link decidedInTime}: the order the server stored them in decides, not the order the
   * control step takes them in.
   */
  async function timedOutBefore(
    t: string,
    item: string,
    seq: number,
    storedAt: number,
  ): Promise<boolean> {
    const s = def.steps[t];
    if (s?.kind !== "wait") return false;
    const rec = heldOf(await (await heldKv()).get(`${t}.${item}`));
    if (!rec?.armed || rec.closed || rec.received !== undefined) return false;
    // Its deadline passed while the item had failed: the timer decided nothing then, and
    // the first firing after the item resumed takes a decision stored before it.
    if (rec.postponed) return false;
    const due = rec.armed.due ? Date.parse(rec.armed.due) : NaN;
    // A decision stored by the deadline wins (decidedInTime), whichever is taken first.
    if (Number.isNaN(due) || !(storedAt > due)) return false;
    for await (
      const m of messagesOn(await manager(), stream, `${n}._timer.${item}`, { before: seq })
    ) {
      try {
        const timer = m.json<
          { data?: { step?: unknown; carry?: { runs?: Record<string, number> } } }
        >();
        if (timer.data?.step === t && (timer.data.carry?.runs?.[t] ?? 0) === rec.iter) return true;
      } catch {
        continue; // not a timer at all: it decides nothing
      }
    }
    return false;
  }

  /**
   * The body of the first decision for wait `t` of `item` (round `iter`) that the server
   * stored by the wait's deadline and before its timer (stream sequence `before`), when the
   * control step has not taken one yet: it takes messages concurrently, so after a restart
   * with both waiting it may take the timer first (found by probing: a decision stored two
   * seconds before the deadline, answered 202, lost to the timer after a kill -9 of the
   * `-flow` service). A decision it would refuse (not an object, failing the wait's schema,
   * carrying a hand-over header) does not count; in a loop's later round, nor does one stored
   * before the round reached the wait (taken as a repeat of the round before).
   */
  async function decidedInTime(
    t: string,
    item: string,
    iter: number,
    before: number,
  ): Promise<unknown> {
    const s = def.steps[t]!;
    if (s.kind !== "wait") return undefined;
    const rec = heldOf(await (await heldKv()).get(`${t}.${item}`));
    if (!rec || rec.iter !== iter || rec.closed || rec.received !== undefined) return undefined;
    const due = rec.armed?.due ? Date.parse(rec.armed.due) : NaN;
    if (Number.isNaN(due)) return undefined;
    const subject = `${n}.${s.event}.${item}`;
    for await (const m of messagesOn(await manager(), stream, subject, { before })) {
      const at = m.time.getTime();
      if (at > due) break;
      if (iter > 0 && at < due - s.timeoutMs) continue;
      if (m.header?.get(HANDOVER_HEADER)) continue;
      let body: unknown;
      try {
        body = m.json();
        if (body === null || typeof body !== "object" || Array.isArray(body)) continue;
        checkAwaitedEvent(flow, [t], body);
      } catch {
        continue;
      }
      return body;
    }
    return undefined;
  }

  async function onTimer(
    e: FlowEvent & { data: FlowData & TimerData },
    seq: number,
    ctx: StageContext,
  ) {
    const t = (e.data as unknown as TimerData).step;
    const carry = (e.data as unknown as TimerData).carry;
    const s = def.steps[t];
    if (!s || !CONTROL_KINDS.has(s.kind)) {
      // For an item that has ended or failed, it could only be dead-lettered again at each
      // redrive (and fail the item again): there is nothing for it to time out.
      const state = await readItem(await states(), e.item_id).catch(() => null);
      if (state?.status === "done" || state?.status === "failed") {
        opts.log?.info(
          "acked a timer of a step the running definition lacks: its item is not running",
          { item_id: e.item_id, step: t, status: state.status, seq },
        );
        return [];
      }
      throw new WeftError(
        ErrorCode.DefinitionChanged,
        `a timer of step ${t}, which definition ${def.hash} of ${n} no longer has as a join, ` +
          `wait or delay`,
      );
    }
    const emit = { source: ctx.source, now: ctx.now() };
    if (await failedNow(e.item_id)) {
      if (s.kind === "join" || s.kind === "wait") {
        // Recorded first: the deadline did not decide, so what the item's resumed run stores
        // after it (the failed branch's completion, a decision sent again) counts.
        const round = carry.runs[t] ?? 0;
        await updateHeld(
          await heldKv(),
          `${t}.${e.item_id}`,
          (rec) =>
            rec && rec.iter === round && !rec.closed && !rec.postponed
              ? { rec: { ...rec, postponed: true }, out: null }
              : { out: null },
        );
      }
      await postpone(
        e,
        s.kind === "join"
          ? s.deadlineMs
          : s.kind === "wait"
          ? s.timeoutMs
          : (s.kind === "delay" && s.ms) || 60_000,
        ctx.now(),
      );
      return [];
    }
    const kv = await heldKv();
    const iter = carry.runs[t] ?? 0;
    const now = ctx.now().getTime();
    if (s.kind === "delay") {
      const rec = heldOf(await kv.get(`${t}.${e.item_id}`));
      if (rec && iter < rec.iter) return []; // a stale timer: the item went round since
      // The item resumes with the data the timer carries: only with what the control step
      // armed it with, for an arming it recorded (a forged timer could carry anything).
      if (!rec || rec.iter !== iter) {
        throw new WeftError(
          ErrorCode.InvalidAwaitedEvent,
          `a timer of step ${t} of ${n} item ${e.item_id} (run ${iter}) that its control ` +
            `step never armed`,
        );
      }
      if (rec.carry !== undefined && rec.carry !== carryDigest(carry)) {
        throw new WeftError(
          ErrorCode.InvalidAwaitedEvent,
          `a timer of step ${t} of ${n} item ${e.item_id} carries other data than the item ` +
            `was held with`,
        );
      }
      const due = rec.due ? Date.parse(rec.due) : undefined;
      if (due && now < due - TIMER_SKEW_MS) {
        throw new WeftError(
          ErrorCode.InvalidAwaitedEvent,
          `a timer of step ${t} of ${n} item ${e.item_id} came before its time ` +
            new Date(due).toISOString(),
        );
      }
      return completion(flow, t, e, advance(carry, t, { until: e.data.due }, carry.value), emit);
    }
    const pending = s.kind === "wait" ? await decidedInTime(t, e.item_id, iter, seq) : undefined;
    const r = await updateHeld<FlowEvent[] | { early: string }>(kv, `${t}.${e.item_id}`, (rec) => {
      if (!rec || rec.iter !== iter) return { out: [] as FlowEvent[] }; // a stale timer
      if (rec.closed) return { out: rec.closedBy === seq ? rec.emitted! : [] };
      // The deadline the control step armed, not the one the timer event claims: a timer
      // before it (forged, or a copy published early) decides nothing.
      const due = s.kind === "join"
        ? rec.openedAt && Date.parse(rec.openedAt) + s.deadlineMs
        : rec.armed?.due && Date.parse(rec.armed.due);
      if (due && now < due - TIMER_SKEW_MS) return { out: { early: new Date(due).toISOString() } };
      let events: FlowEvent[];
      if (s.kind === "join" && s.after.every((a) => a in (rec.arrived ?? {}))) {
        // Every input came while the item was failed (held): complete it now, as its last
        // input would have.
        events = completeJoin(t, iter, e, rec.arrived!, emit);
        return { rec: { ...rec, closed: "done", closedBy: seq, emitted: events }, out: events };
      }
      if (s.kind === "wait" && rec.armed && rec.received !== undefined) {
        // Its decision came while the item was failed (held): take it now, as its arming
        // would have.
        events = resume(t, e.item_id, rec, emit);
        return { rec: { ...rec, closed: "done", closedBy: seq, emitted: events }, out: events };
      }
      if (s.kind === "wait" && rec.armed && pending !== undefined) {
        // A decision stored in time, not yet taken: it wins, as it would have had the
        // control step taken it first; taken later, it changes nothing.
        const cur: Held = { ...rec, received: pending };
        events = resume(t, e.item_id, cur, emit);
        return { rec: { ...cur, closed: "done", closedBy: seq, emitted: events }, out: events };
      }
      if (s.kind === "join") {
        const data = wentOnWithout(t, s.after, joined(rec.arrived ?? {}));
        events = completion(flow, t, e, advance(data, t, { timed_out: true }, data.value), emit, {
          timedOut: true,
        });
      } else {
        const armed = rec.armed!.data;
        events = completion(flow, t, e, advance(armed, t, { timed_out: true }, armed.value), emit, {
          timedOut: true,
        });
      }
      return { rec: { ...rec, closed: "timed_out", closedBy: seq, emitted: events }, out: events };
    });
    if (!Array.isArray(r)) {
      // Kept as a dead letter; the item keeps waiting for its real deadline.
      throw new WeftError(
        ErrorCode.InvalidAwaitedEvent,
        `a timer of step ${t} of ${n} item ${e.item_id} came before its deadline ${r.early}`,
      );
    }
    return r;
  }

  /**
   * The end events a redriven completion leads to, as its step's completion would have
   * published them beside it (the same ids: a copy stored already counts, the item ends once).
   */
  async function endsOf(e: FlowEvent, ctx: StageContext): Promise<FlowEvent[]> {
    if (await failedNow(e.item_id)) {
      // Another failure of the item came after: it ends once that one is redriven.
      throw new ConflictError(
        `${n} item ${e.item_id} has failed: its end counts only once the item is resumed ` +
          `(redrive its failure, then this letter)`,
        { permanent: true },
      );
    }
    // Nor for a step's run the item's history does not lead to: found by probing, a step's
    // key publishing its event with a redrive's header (`Weft-Redrive-Of`, which anyone who
    // may publish the event can set) for an item not at its step had this step publish the
    // end the step leads to (refused by the state, but stored).
    const role = flow.roles.get(tokenOf(flow, e.type))?.role;
    if (
      role === "done" &&
      !(await stands(e.item_id, { type: e.type, seq: ctx.message.seq, raw: e }))
    ) {
      throw new ConflictError(
        `${e.type} for ${n} item ${e.item_id} is a run of a step the item has not reached ` +
          `(its state does not take it): it leads to no end; nothing was published`,
        { permanent: true },
      );
    }
    return endEventsAfter(flow, e, { source: ctx.source, now: ctx.now() });
  }

  return {
    name: durableOf(def, CONTROL),
    filterSubject: `${n}.*.*`,
    stream: pipelineSubjects(def).stream,
    failedType: `${n}.${FAILED}`,
    once: onceTypesOf(def),
    outcomes: endTypesOf(def),
    finalTypes: endTypesOf(def),
    outcomeOf: outcomeFrom(states),
    storedStands: stands,
    holdsOutcome: holdsOutcomeFrom(stands, states),
    input: { kind: "event", types: [] },
    identify: (_raw, message) => message.subject.split(".")[2],
    // A step's completion or a timer (not a decision: no item_id) is taken only for an item
    // that entered: one for an id with no entry event before it is dead-lettered `not_found`.
    entrySubject: (item: string) => `${n}.${entryEvent(def)}.${item}`,
    // A decision that cannot be read at all (not JSON, nested too deep, past its attempts)
    // is a bad decision like one its schema refuses: the item keeps waiting.
    failsItem: (message) => flow.roles.get(message.subject.split(".")[1] ?? "")?.role !== "awaited",
    decode(raw, message): ControlInput | undefined {
      const parts = message.subject.split(".");
      const token = parts[1]!;
      const role = flow.roles.get(token);
      if (message.handoverTo) {
        if (role?.role === "awaited") {
          // A hand-over copies no awaited event: such a header on a decision was set by its
          // sender. Acked unread, the decision was lost with no trace (found by probing); kept
          // as a letter instead, the item waiting still (a redrive stores it without it).
          throw new ValidationError(
            `the awaited event ${n}.${token} carries a ${HANDOVER_HEADER} header, which only ` +
              `the runtime's hand-over sets, and never on an awaited event: not taken (redrive ` +
              `this letter to send it without the header)`,
            { code: ErrorCode.InvalidAwaitedEvent, field: "/" },
          );
        }
        // A hand-over's copy: only for the joins, waits, delays and ends it names.
        if (role?.role !== "entry" && role?.role !== "done" && role?.role !== "timeout") {
          return undefined;
        }
        const e = decodeFlowEvent(flow, raw, message.subject);
        const targets = targetsOf(flow, token, e.data).filter((t) =>
          message.handoverTo!.includes(t)
        );
        const steps = targets.filter((t) => CONTROL_KINDS.has(def.steps[t]!.kind));
        const ends = targets.some((t) => def.steps[t]!.kind === "end");
        return steps.length > 0 || ends ? { kind: "arrive", event: e, steps, ends } : undefined;
      }
      if (!role) {
        throw new WeftError(
          ErrorCode.DefinitionChanged,
          `event ${n}.${token} is one the running definition of ${n} (${def.hash}) neither ` +
            `publishes nor awaits: the step it belonged to is gone`,
        );
      }
      if (role.role === "awaited") {
        // A bad decision is dead-lettered and the item keeps waiting for a good one.
        if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
          throw new ValidationError(`the awaited event ${n}.${token} must be a JSON object`, {
            code: ErrorCode.InvalidAwaitedEvent,
            field: "/",
          });
        }
        checkAwaitedEvent(flow, role.waits, raw);
        return {
          kind: "awaited",
          item: parts[2]!,
          payload: raw,
          waits: role.waits,
          subject: message.subject,
        };
      }
      const e = decodeFlowEvent(flow, raw, message.subject);
      if (role.role === "timer") {
        const d = e.data as unknown as Partial<TimerData>;
        if (typeof d?.step !== "string" || !d.carry || typeof d.due !== "string") {
          throw new ValidationError("a timer needs step, due and carry", {
            code: ErrorCode.InvalidEvent,
            field: "/data",
          });
        }
        return { kind: "timer", event: e as FlowEvent & { data: FlowData & TimerData } };
      }
      const targets = targetsOf(flow, token, e.data);
      const steps = targets.filter((t) => CONTROL_KINDS.has(def.steps[t]!.kind));
      // A redriven completion (its letter kept it from a step the running definition lacks,
      // or from an earlier failure) is taken forward under the running definition: a work
      // step's consumer gets it as a new message, a join, wait or delay here, and an end
      // step (which has no consumer: a completion publishes its end itself) here too.
      if (message.redriveOf !== undefined && (role.role === "done" || role.role === "timeout")) {
        if (targets.length === 0) {
          throw new WeftError(
            ErrorCode.DefinitionChanged,
            `event ${n}.${token}, redriven, leads to no step of the running definition of ` +
              `${n} (${def.hash})`,
          );
        }
        // Handled here whatever it leads to: the item's other events are handed over where
        // steps it passed under an earlier wiring stored theirs already.
        const ends = targets.some((t) => def.steps[t]!.kind === "end");
        return { kind: "arrive", event: e, steps, ...(ends ? { ends } : {}), redriven: true };
      }
      if (message.redriveOf !== undefined && role.role === "entry") {
        return { kind: "arrive", event: e, steps, redriven: true };
      }
      return steps.length > 0 ? { kind: "arrive", event: e, steps } : undefined;
    },
    checkOutput: () => {},
    async handle(input: ControlInput, ctx: StageContext) {
      const seq = ctx.message.seq;
      let out: FlowEvent[];
      if (input.kind === "arrive") {
        out = await onArrive(input.event, input.steps, seq, ctx);
        if (input.ends) out.push(...await endsOf(input.event, ctx));
        if (input.redriven) {
          // A redrive resumes the item from this event: the steps after it may have stored
          // their events under an earlier wiring, behind the consumers of the steps the
          // running definition sends them to.
          const r = await handover.settle(input.event.item_id, input.event.id);
          if (r.undecided) handover.later(input.event.item_id, input.event.id);
        }
      } else if (input.kind === "timer") out = await onTimer(input.event, seq, ctx);
      else out = await onAwaited(input.item, input.payload, input.waits, seq, ctx);
      return out as unknown as OutputEvent[];
    },
  };
}

/**
 * Turns bus submissions (`nats pub <name>.submit '<input>'`) into items, each named by its
 * stream position (`<name>-<seq>`). A redriven submission (its `Weft-Redrive-Item` header,
 * set by a redrive, names `<name>-<S>` for an earlier S) is that item again, once checked
 * against the stream: the item failed at this intake, on the submission stored at S (the same
 * input, while the stream keeps it). One that does not check out is dead-lettered `conflict`,
 * failing nothing; one whose item has entered since (a second redrive) publishes nothing.
 * `nc`: the connection the checks read the stream on; without it no redrive names an item.
 */
// deno-lint-ignore no-explicit-any
export function intakeStage(p: LoadedPipeline, nc?: NatsConnection): Stage<any> {
  const { flow, def } = p;
  const n = def.name;
  const entry = `${n}.${entryEvent(def)}`;
  const stream = pipelineSubjects(def).stream;
  const durable = durableOf(def, INTAKE);
  const idOf = (seq: number) => `${n}-${seq}`;
  const manager = nc ? lazy(() => jetstreamManager(nc)) : undefined;
  /** The earlier submission a redrive names, `<name>-<S>` with S before this message. */
  const redriven = (message: MessageInfo): { id: string; seq: number } | undefined => {
    const id = message.redriveItem;
    if (!manager || message.redriveOf === undefined || id === undefined) return undefined;
    if (!id.startsWith(`${n}-`) || !/^[1-9][0-9]{0,15}$/.test(id.slice(n.length + 1))) {
      return undefined;
    }
    const seq = Number(id.slice(n.length + 1));
    return seq < message.seq ? { id, seq } : undefined;
  };
  /**
   * Whether the redriven submission `x` may be item `was.id` again: it failed at this intake
   * on the submission stored at `was.seq`, with this input. Throws a conflict saying why not;
   * false when the item has entered since (nothing to do).
   */
  const resumes = async (was: { id: string; seq: number }, raw: unknown): Promise<boolean> => {
    const jsm = await manager!();
    const refuse = (why: string) =>
      new ConflictError(`a redrive names item ${was.id}, but ${why}: nothing was submitted`, {
        permanent: true,
      });
    if (await storedMessage(jsm, stream, { last_by_subj: `${entry}.${was.id}` })) return false;
    const failed = await storedMessage(jsm, stream, { last_by_subj: `${n}.${FAILED}.${was.id}` });
    const data = failed
      ? (failed.json() as { data?: { stage?: unknown; subject?: unknown } }).data
      : undefined;
    if (data?.stage !== durable || data?.subject !== `${n}.submit`) {
      throw refuse(`it did not fail at ${durable}`);
    }
    const original = await storedMessage(jsm, stream, { seq: was.seq });
    if (original) {
      let same = false;
      try {
        same = original.subject === `${n}.submit` &&
          canonicalJson(original.json()) === canonicalJson(raw);
      } catch { /* not JSON: not this submission */ }
      if (!same) throw refuse(`message ${was.seq} of ${stream} is another submission`);
    }
    return true;
  };
  return {
    name: durable,
    filterSubject: `${n}.submit`,
    stream,
    failedType: `${n}.${FAILED}`,
    input: { kind: "event", types: [] },
    entryTypes: new Set([entry]),
    identify: (_raw, message) => redriven(message)?.id ?? idOf(message.seq),
    decode: (raw, message) => ({
      raw,
      seq: message.seq,
      traceId: message.traceId,
      was: redriven(message),
    }),
    checkOutput: () => {},
    async handle(
      x: { raw: unknown; seq: number; traceId?: string; was?: { id: string; seq: number } },
      ctx: StageContext,
    ) {
      const input = checkInput(flow, x.raw);
      if (x.was && !await resumes(x.was, x.raw)) return [];
      const id = x.was?.id ?? idOf(x.seq);
      return [
        flowEvent(
          flow,
          entryEvent(def),
          {
            // (the entry's own id is then intakeEntryId(def, id))
            id: deterministicId(id, entry),
            item_id: id,
            trace_id: x.traceId ?? deterministicId(id, "trace"),
          },
          entryData(input),
          { source: ctx.source, now: ctx.now() },
        ),
      ] as unknown as OutputEvent[];
    },
  };
}

/**
 * How deep an item's input may nest: its entry event holds it two levels down (`data.input`),
 * and no consumer takes an event nesting deeper than {@link MAX_DEPTH} levels, so a deeper
 * input is refused at intake (422 naming it) rather than accepted and then failed.
 */
export const MAX_INPUT_DEPTH: number = MAX_DEPTH - 2;

/**
 * Checks an input document against the definition's input schema; a 4xx naming the field.
 * `at`: where the input is in the request (`/items/3` in a batch), before the field.
 */
export function checkInput(flow: Flow, value: unknown, at = ""): unknown {
  if (!depthWithin(value, MAX_INPUT_DEPTH)) {
    throw new ValidationError(`${at || "the input"} nests deeper than ${MAX_INPUT_DEPTH} levels`, {
      field: at || "/",
    });
  }
  if (flow.checkInput(value)) return value;
  const { field, message } = schemaFailure(flow.checkInput, at);
  throw new ValidationError(message, { field });
}

/** Marks a decoded hand-over copy (a symbol: never serialised with the event). */
const HANDED_OVER = Symbol("handed over");

/** The state writer's spec for a pipeline: the generic fold, into its state bucket. */
export function pipelineStateSpec(p: LoadedPipeline): StateSpec<ItemState> {
  const { flow, def } = p;
  const n = def.name;
  const foldEvent = (event: AnyEvent, seq: number): FoldEvent => ({
    seq,
    id: event.id,
    type: event.type,
    time: event.time,
    item_id: event.item_id,
    definition: (event as unknown as { definition?: string }).definition,
    data: event.data,
    // The message as stored: an awaited event's is its plain JSON (decode wraps it).
    body: flow.roles.get(event.type.slice(n.length + 1))?.role === "awaited" ? event.data : event,
    ...((event as { [HANDED_OVER]?: true })[HANDED_OVER] ? { handover: true } : {}),
  });
  const spec: StateSpec<ItemState> = {
    durable: durableOf(def, STATE),
    stream: pipelineSubjects(def).stream,
    filter: `${n}.*.*`,
    bucket: stateBucketOf(n),
    eventTypes: [],
    failedType: `${n}.${FAILED}`,
    stageInputs: stageInputsOf(def),
    source: `weft-${n}-${FLOW}`,
    decode(raw, subject, storedAt, headers) {
      const token = subject.split(".")[1]!;
      // Awaited events are a person's or a callback's plain JSON: the wait's own event
      // records what came; here they are only folded as "seen", at the time the stream
      // stored them (a rebuild folds the same time as the live writer did).
      if (flow.roles.get(token)?.role === "awaited") {
        return {
          id: awaitedEventId(subject),
          type: `${n}.${token}`,
          item_id: subject.split(".")[2]!,
          time: new Date(storedAt).toISOString(),
          data: raw,
        } as unknown as AnyEvent;
      }
      const e = decodeFlowEvent(flow, raw, subject);
      // A hand-over's copy: the fold takes it for no run of its step (below).
      if (headers?.get(HANDOVER_HEADER)) (e as { [HANDED_OVER]?: true })[HANDED_OVER] = true;
      return e as unknown as AnyEvent;
    },
    // An awaited event is judged by the control step, which dead-letters a bad one (not
    // JSON, too deep, against its schema) with the reason: the fold takes the rest as seen.
    // So is an event the running definition has no role for (a removed wait's decision):
    // the control step dead-letters it `definition_changed`, one letter, not two.
    lettersElsewhere: (subject) => {
      const role = flow.roles.get(subject.split(".")[1]!);
      return role === undefined || role.role === "awaited";
    },
    // An item starts at its entry event, or the failure its intake published for it: any
    // other event for an id with no state, stored before its entry, is dead-lettered
    // `not_found` by the writer and folds nothing (no item is made from a step's event).
    starts: (e) =>
      e.type === `${n}.${entryEvent(def)}` ||
      (e.type === `${n}.${FAILED}` &&
        (e.data as { stage?: unknown } | undefined)?.stage === durableOf(def, INTAKE)),
    entrySubject: (item) => `${n}.${entryEvent(def)}.${item}`,
    // No state for an item that has none from an event that makes none (an awaited event, a
    // timer): a stray decision for an id never submitted makes up no item (the control step
    // dead-letters it `not_found`).
    apply: (state, event, seq) => applyPipelineEvent(def, state, foldEvent(event, seq)) ?? state,
    // A step's event, or an end, that the item's history does not lead to (a step's key
    // publishing it for an item that is not at its step): dead-lettered `conflict`.
    refuses: (state, event, seq) => refusal(def, state, foldEvent(event, seq)),
    // (The fold refuses those itself: the writer folds the events its state lacks first.)
    lastSeq: (state) => state.last_seq,
    isFinal: (s) => s.status === "done" || s.status === "failed",
  };
  return spec;
}

/** A durable consumer that a step of a pipeline made and the running definition lacks. */
export interface RetiredConsumer {
  durable: string;
  /** The step that made it. */
  step: string;
  /**
   * The step is still in the running definition, under another `durable`: its new consumer
   * takes the stream's history (acking what ended), so this one's messages are only acked.
   */
  replaced?: boolean;
}

/**
 * The durable consumers of `def`'s stream that a step of its pipeline made (their metadata
 * says so; made before metadata, or on nats-server 2.9: named `<pipeline>-<step>`) and that
 * the running definition does not use: a step it no longer has, or one it renamed. Never
 * one of its steps', its control service's, a live shadow's or an ephemeral consumer.
 */
export async function retiredConsumers(
  jsm: JetStreamManager,
  def: PipelineDefinition,
  opts: { byName?: boolean } = {},
): Promise<RetiredConsumer[]> {
  const live = new Set([
    ...workSteps(def).map((id) => durableOf(def, id)),
    ...[INTAKE, CONTROL, STATE].map((part) => durableOf(def, part)),
  ]);
  const out: RetiredConsumer[] = [];
  for await (const ci of jsm.consumers.list(pipelineSubjects(def).stream)) {
    const durable = ci.config.durable_name;
    if (!durable || live.has(durable) || durable.startsWith(shadowDurable(""))) continue;
    const meta = ci.config.metadata ?? {};
    // By name only where the server keeps no metadata (2.9), and only one a Weft stage made
    // (its description says so): on 2.10+ a consumer without Weft's metadata, and on 2.9 one
    // without that description, is someone else's (an operator's `<name>-audit`), never swept.
    const step = meta[PIPELINE_KEY] !== undefined
      ? meta[PIPELINE_KEY] === def.name ? meta[STEP_KEY] : undefined
      : opts.byName && durable.startsWith(`${def.name}-`) &&
          ci.config.description?.startsWith(STAGE_DESCRIPTION)
      ? durable.slice(def.name.length + 1)
      : undefined;
    if (step) out.push({ durable, step, ...(step in def.steps ? { replaced: true } : {}) });
  }
  return out;
}

/**
 * The stage draining a retired step's consumer (`retired`): each message the earlier
 * definition's control step judged (at or below `judgedUpTo`, its consumer's position when
 * this control service started) for an item still at that step is dead-lettered
 * `definition_changed`, its item failed, under the control step's name (whose consumer takes
 * every subject, so a redrive republishes the letter's original where it was); the others
 * (the item ended or went elsewhere, or the message came after: the running definition's
 * control step judges it) are acked. So is one that each step the running definition sends it
 * to took already or, a work step whose consumer is new to it (a renamed step's), takes from
 * its backlog: the item goes on there. And one that every step it is sent to took already, for
 * an item that goes on from its other events (`handover`: a fan-out's other branch, handed over
 * where its steps are past it): the gone step's branch is dropped.
 */
export function retiredStage(
  p: LoadedPipeline,
  retired: RetiredConsumer,
  judgedUpTo: number,
  nc: NatsConnection,
  handover?: Handover,
  // deno-lint-ignore no-explicit-any
): Stage<any> {
  const { flow, def } = p;
  const n = def.name;
  const states = lazy(() => new Kvm(nc).open(stateBucketOf(n)));
  return {
    name: durableOf(def, CONTROL),
    durable: retired.durable,
    filterSubject: `${n}.*.*`,
    stream: pipelineSubjects(def).stream,
    failedType: `${n}.${FAILED}`,
    finalTypes: endTypesOf(def),
    outcomeOf: outcomeFrom(states),
    input: { kind: "event", types: [] },
    identify: (_raw, message) => message.subject.split(".")[2],
    decode: (raw, message) =>
      message.seq > judgedUpTo ? undefined : decodeFlowEvent(flow, raw, message.subject),
    checkOutput: () => {},
    async handle(e: FlowEvent, ctx: StageContext) {
      // The step runs on under its new consumer, which takes these from the stream's history.
      if (retired.replaced) return [];
      const s = await readItem(await states(), e.item_id);
      // Ended; or its state, past this event, has it elsewhere (a router's other route).
      if (s?.status === "done") return [];
      if (s && s.last_seq >= ctx.message.seq && !s.current.includes(retired.step)) return [];
      // The step is renamed: its new name's consumer, new to the stream, takes this event from
      // its backlog (and each other step it leads to took it), so the item goes on there.
      if (handover && await handover.newStepsTake(e, ctx.message.seq, ctx.message.storedAt)) {
        return [];
      }
      // Every step the running definition sends it to ran for it already (a fan-out's other
      // branch), and the item goes on from its other events (handed over where their steps
      // are past them): the gone step's branch is not in the running definition.
      if (handover && await handover.tookAll(e)) {
        const r = await handover.settle(e.item_id, e.id);
        if (r.undecided) handover.later(e.item_id);
        if (r.ended || r.open > 0) return [];
      }
      throw new WeftError(
        ErrorCode.DefinitionChanged,
        `step ${retired.step} of ${n} is gone from the running definition (${def.hash}): ` +
          `redrive this letter to continue the item under it`,
      );
    },
  };
}

/** How often a sweep asks whether a retired consumer has anything left for it. */
const SWEEP_POLL_MS = 1_000;

/**
 * Drains each retired consumer of `p`'s stream ({@link retiredStage}) and deletes it once
 * nothing it holds was judged by the earlier definition. Runs beside the control service's
 * stages; a sweep cut short (a stop, NATS away) is taken up at the next start.
 */
function sweepRetired(
  ctx: ServiceContext,
  p: LoadedPipeline,
  retired: readonly RetiredConsumer[],
  judgedUpTo: number,
  handover: Handover,
): Runnable {
  const stream = pipelineSubjects(p.def).stream;
  const log = ctx.log.with({ stage: durableOf(p.def, CONTROL) });
  let stopping = false;
  const wakes = new Set<() => void>();
  const one = async (r: RetiredConsumer) => {
    const jsm = await jetstreamManager(ctx.nc);
    const runner = await runStage({
      ...ctx,
      stage: retiredStage(p, r, judgedUpTo, ctx.nc, handover),
      source: `weft-${serviceNamesOf(p.def).control}`,
    });
    try {
      while (!stopping) {
        // Done once everything up to `judgedUpTo` is acked or dead-lettered: what comes after
        // is the running definition's (acked unread meanwhile).
        const ci = await jsm.consumers.info(stream, r.durable);
        if (
          ci.ack_floor.stream_seq >= judgedUpTo ||
          (ci.num_ack_pending === 0 &&
            (ci.num_pending === 0 || ci.delivered.stream_seq >= judgedUpTo))
        ) break;
        await new Promise<void>((res) => {
          const wake = () => (clearTimeout(t), wakes.delete(wake), res());
          const t = setTimeout(wake, SWEEP_POLL_MS);
          wakes.add(wake);
        });
      }
    } finally {
      await runner.stop();
    }
    if (stopping) return;
    await jsm.consumers.delete(stream, r.durable);
    log.info("swept a retired step's consumer", {
      consumer: r.durable,
      step: r.step,
      dead_lettered: runner.stats.deadLettered,
      acked: runner.stats.processed,
    });
  };
  const done = Promise.all(retired.map((r) =>
    one(r).catch((err) => {
      log.warn("sweeping a retired step's consumer failed: taken up at the next start", {
        consumer: r.durable,
        err,
      });
    })
  ));
  let stopped: () => void;
  return {
    // Ends with the service, not with the sweep.
    done: new Promise<void>((res) => (stopped = res)),
    async stop() {
      stopping = true;
      for (const wake of [...wakes]) wake();
      await done;
      stopped();
    },
  };
}

/** The most messages of one item's history a hand-over reads (past it, it leaves the item). */
const ITEM_HISTORY_MAX = 4096;

/** The control-bucket key recording the definition the last hand-over ran for. */
const HANDED_OVER_KEY = "handed_over";

/** An event of an item's history, as stored. */
interface StoredEvent {
  seq: number;
  subject: string;
  /**
   * Its id and type, when it is a Weft event: one of the type its subject names, on any subject
   * but an awaited event's (whose plain JSON is no Weft event, whatever it holds).
   */
  id?: string;
  type?: string;
  /** Its data's step run counts, when it carries them (a step's completion, an end). */
  runs?: Record<string, number>;
  data: Uint8Array;
  traceparent?: string;
}

/**
 * An item's history as `flow`'s stream holds it, oldest first; undefined past
 * {@link ITEM_HISTORY_MAX} events.
 */
async function itemHistory(
  jsm: JetStreamManager,
  flow: Flow,
  item: string,
): Promise<StoredEvent[] | undefined> {
  const n = flow.name;
  const stream = pipelineSubjects(flow.def).stream;
  const out: StoredEvent[] = [];
  for await (
    const m of messagesOn(jsm, stream, `${n}.*.${item}`, { max: ITEM_HISTORY_MAX + 1 })
  ) {
    const e: StoredEvent = { seq: m.seq, subject: m.subject, data: m.data };
    // A Weft event only of the type its subject names, and never on an awaited event's subject:
    // its body is whatever its publisher (a person with the ops key, an outside callback)
    // wrote, and one shaped as the item's end or a step's completion is neither. (A subject
    // the running definition has no role for holds an earlier definition's events.)
    const token = m.subject.split(".")[1] ?? "";
    if (flow.roles.get(token)?.role !== "awaited") {
      try {
        const b = m.json<{ id?: unknown; type?: unknown; data?: { runs?: unknown } }>();
        if (b?.type === `${n}.${token}`) {
          e.type = b.type;
          if (typeof b.id === "string") e.id = b.id;
          const runs = b.data?.runs;
          if (runs && typeof runs === "object" && !Array.isArray(runs)) {
            e.runs = runs as Record<string, number>;
          }
        }
      } catch {
        // not JSON: no Weft event
      }
    }
    const tp = m.header?.get("traceparent");
    if (tp) e.traceparent = tp;
    out.push(e);
  }
  return out.length > ITEM_HISTORY_MAX ? undefined : out;
}

/**
 * Whether the item went on from its event `e` (of `events`, its history) along a path that
 * `targets` (the steps the running definition sends `e` to) do not take: a later event
 * descends from it (it carries at least as many runs of `e`'s step) through none of those
 * steps (not their completion, no more runs of theirs than `e` carries), such as the
 * completion of a step an earlier definition had there (renamed, or removed). The item passed
 * `e` under the earlier wiring: none of `targets` is to run for it.
 */
function wentOnFrom(
  flow: Flow,
  events: readonly StoredEvent[],
  e: FlowEvent,
  targets: readonly string[],
): boolean {
  const stepOf = (type: string) => {
    const r = flow.roles.get(type.slice(flow.name.length + 1));
    return r && "step" in r ? r.step : undefined;
  };
  const role = flow.roles.get(e.type.slice(flow.name.length + 1))?.role;
  const from = role === "entry" ? undefined : stepOf(e.type);
  const k = from === undefined ? 0 : e.data.runs[from] ?? 0;
  return events.some((x) =>
    x.runs !== undefined && x.id !== e.id && x.type !== undefined &&
    (from === undefined || (x.runs[from] ?? 0) >= k) &&
    !targets.some((t) => t === stepOf(x.type!) || (x.runs![t] ?? 0) > (e.data.runs[t] ?? 0))
  );
}

/**
 * Whether the item went past step `step` from its event `e` (of `events`, its history) without
 * it: a later event descends from `e` through a join that in the running definition waits for
 * `step` (`joins`, {@link joinsAfter}: its completion, or one carrying more of its runs than
 * `e`), with no more runs of `step` than `e` carries. Under an earlier definition, without
 * `step` there (added to a fan-out), the join let the item on: running `step` now would feed
 * a join that has fired.
 */
function wentPast(
  flow: Flow,
  events: readonly StoredEvent[],
  e: FlowEvent,
  step: string,
  joins: readonly string[],
): boolean {
  if (joins.length === 0) return false;
  const role = flow.roles.get(e.type.slice(flow.name.length + 1))?.role;
  const r = role === "entry" ? undefined : flow.roles.get(e.type.slice(flow.name.length + 1));
  const from = r && "step" in r ? r.step : undefined;
  const k = from === undefined ? 0 : e.data.runs[from] ?? 0;
  return events.some((x) =>
    x.runs !== undefined && x.id !== e.id && x.type !== undefined &&
    (from === undefined || (x.runs[from] ?? 0) >= k) &&
    (x.runs[step] ?? 0) <= (e.data.runs[step] ?? 0) &&
    joins.some((j) => (x.runs![j] ?? 0) > (e.data.runs[j] ?? 0))
  );
}

/** The joins of `def` that wait for step `step` (`after` names it). */
function joinsAfter(def: PipelineDefinition, step: string): string[] {
  return Object.entries(def.steps).filter(([, s]) =>
    s.kind === "join" && (s.after as readonly string[]).includes(step)
  ).map(([j]) => j);
}

/** Hands an item's events over ({@link createHandover}). */
export interface Handover {
  /** Hands over what of `item`'s history needs it, leaving out event `except`. */
  settle(item: string, except?: string): Promise<HandoverResult>;
  /** Whether every step the running definition sends `e` to has taken it (none: false). */
  tookAll(e: FlowEvent): Promise<boolean>;
  /**
   * Whether every step the running definition sends `e` (stored at `seq`, `storedAt` ms) to
   * has taken it or is a work step whose consumer is new to it (none yet, or `e` is in its
   * backlog), so it will: a renamed step's (none: false).
   */
  newStepsTake(e: FlowEvent, seq: number, storedAt: number): Promise<boolean>;
  /** Items to settle again (a step may still hold one of their events), with `except`. */
  readonly queued: Map<string, string | undefined>;
  /** Settles `item` again later (the control service's hand-over runs it). */
  later(item: string, except?: string): void;
  /** Called when an item is queued. */
  onQueued: (() => void) | undefined;
}

/** What a hand-over found for one item. */
export interface HandoverResult {
  /** The events stored again, each with the steps it was for. */
  handed: { seq: number; subject: string; steps: string[] }[];
  /** A step may still hold one of its events (not acked): asked again later. */
  undecided: boolean;
  /**
   * How many of its events the running definition has yet to run a step for (read still,
   * handed over, undecided), or holds at a join, wait or delay: none, and nothing goes on
   * with the item.
   */
  open: number;
  /** It has ended: nothing was looked at. */
  ended?: boolean;
  /** Its history is longer than a hand-over reads (`ITEM_HISTORY_MAX`): nothing was handed. */
  tooLong?: boolean;
}

/**
 * What each stage of `def` consumes ({@link StageInputs}): its steps' inputs, its intake's
 * submissions, and its control step's every event of the pipeline.
 */
export function stageInputsOf(def: PipelineDefinition): StageInputs {
  const n = def.name;
  return definedStageInputs(def, {
    [durableOf(def, INTAKE)]: [`${n}.submit`],
    [durableOf(def, CONTROL)]: [`${n}.*.*`],
  });
}

/**
 * Hands an item's events over to the steps the running definition sends them to, where
 * those steps will not read them: a changed definition re-wires steps that stay, and a
 * step's durable consumer reads on from where it is, so an event stored before the change
 * that now leads to another step (a router's routes changed, a step's `next`) is behind that
 * step's consumer. Such an event is stored again, with a `Weft-Handover-To` header naming
 * the steps it is for (every other consumer acks it unread).
 *
 * An event is handed to a step only when the item is running (no end, not failed), the step
 * has not taken it (a work step's completion of it, whose id follows from the event's, is not
 * stored; a join, wait or delay holds no record of it), its consumer is past it with nothing
 * handed out before it still unacked, and the item did not go on from it elsewhere under the
 * earlier wiring (a step this definition does not send it to ran for it): so no step runs
 * twice for one event, nor for an item that passed it or ended.
 */
export function createHandover(p: LoadedPipeline, nc: NatsConnection, log?: Logger): Handover {
  const { flow, def } = p;
  const n = def.name;
  const stream = pipelineSubjects(def).stream;
  const manager = lazy(() => jetstreamManager(nc));
  const js = jetstream(nc);
  const heldKv = lazy(() => new Kvm(nc).open(controlBucketOf(n)));
  const ends = endTypesOf(def);
  const inputs = stageInputsOf(def);
  const stepOf = (type: string) => {
    const r = flow.roles.get(type.slice(n.length + 1));
    return r && "step" in r ? r.step : undefined;
  };

  const history = async (item: string) => itemHistory(await manager(), flow, item);

  /** Whether work step `step` ran for `e`: its completion of it is stored. */
  async function workTook(step: string, e: FlowEvent): Promise<boolean> {
    return await stepTook(await manager(), stream, flow, step, e);
  }

  /**
   * Whether control step `step` holds `e` ("open": and has not completed), or "done" (it
   * completed, or the item went round past it since); false when it has no record of it.
   */
  async function controlTook(step: string, e: FlowEvent): Promise<false | "open" | "done"> {
    const rec = heldOf(await (await heldKv()).get(`${step}.${e.item_id}`));
    const iter = e.data.runs[step] ?? 0;
    if (!rec || rec.iter < iter) return false;
    if (rec.iter > iter) return "done";
    const s = def.steps[step]!;
    const holds = s.kind === "join"
      ? (stepOf(e.type) ?? "$input") in (rec.arrived ?? {})
      : s.kind === "wait"
      ? rec.armed !== undefined
      : true;
    return !holds ? false : rec.closed ? "done" : "open";
  }

  async function tookAll(e: FlowEvent): Promise<boolean> {
    const targets = targetsOf(flow, e.type.slice(n.length + 1), e.data);
    if (targets.length === 0) return false;
    for (const t of targets) {
      const kind = def.steps[t]!.kind;
      if (kind === "end") return false;
      const took = CONTROL_KINDS.has(kind) ? await controlTook(t, e) : await workTook(t, e);
      if (!took) return false;
    }
    return true;
  }

  async function newStepsTake(e: FlowEvent, seq: number, storedAt: number): Promise<boolean> {
    const targets = targetsOf(flow, e.type.slice(n.length + 1), e.data);
    if (targets.length === 0) return false;
    let some = false;
    for (const t of targets) {
      const kind = def.steps[t]!.kind;
      if (kind === "end") return false;
      if (CONTROL_KINDS.has(kind)) {
        if (!(await controlTook(t, e))) return false;
        continue;
      }
      if (await workTook(t, e)) continue;
      const ci = await (await manager()).consumers.info(stream, durableOf(def, t))
        .catch(() => null);
      // None yet: it is created behind the stream's whole history. Otherwise `e` must be in
      // its backlog (what it was created behind, as the runner reckons it).
      if (ci) {
        const mark = Number(ci.config.metadata?.[BACKLOG_SEQ_KEY] ?? 0);
        const created = Date.parse(ci.created);
        if (!(seq <= mark || (mark === 0 && storedAt < created))) return false;
      }
      some = true;
    }
    return some;
  }

  /**
   * Whether the end `end` that `e` (stored at `seq`) leads to may still come from the step
   * that published `e` ("pending": its consumer holds an input before `seq` unacked, a work
   * step's, or the control step's for a join's or wait's event), is stored since the item's
   * history was read ("stored"), or neither ("none": the end is the hand-over's to make).
   */
  async function endMayFollow(
    jsm: JetStreamManager,
    e: FlowEvent,
    seq: number,
    end: string,
  ): Promise<"pending" | "stored" | "none"> {
    const role = flow.roles.get(tokenOf(flow, e.type));
    const step = role && "step" in role ? role.step : undefined;
    if (step !== undefined && def.steps[step]) {
      const durable = durableOf(def, CONTROL_KINDS.has(def.steps[step]!.kind) ? CONTROL : step);
      const ci = await jsm.consumers.info(stream, durable).catch(() => null);
      if (ci && ci.num_ack_pending > 0 && ci.ack_floor.stream_seq < seq) return "pending";
    }
    const subject = `${n}.${eventOf(end, def.steps[end]!)}.${e.item_id}`;
    return await storedMessage(jsm, stream, { last_by_subj: subject }) ? "stored" : "none";
  }

  /**
   * Hands over what of `item`'s history the running definition sends to steps that will not
   * read it; `except`: the id of an event being handled now (a redriven one), left out.
   */
  async function settle(item: string, except?: string): Promise<HandoverResult> {
    const result: HandoverResult = { handed: [], undecided: false, open: 0 };
    const events = await history(item);
    if (!events) {
      // Too long a history to read: nothing is handed over, and nothing fails. Thrown before,
      // it dead-lettered a redriven event of such an item at the control step (found by
      // probing a loop of 2,100 rounds, 4,205 events: `handler_failed`, "has more than 4096
      // events"), which fails an item still running, though the redrive had resumed it.
      log?.warn("not handed over: the item's history is too long to read", {
        item_id: item,
        max: ITEM_HISTORY_MAX,
      });
      return { ...result, tooLong: true };
    }
    if (events.some((e) => e.type !== undefined && ends.has(e.type))) {
      return { ...result, ended: true };
    }
    const jsm = await manager();
    if (await itemFailedNow(jsm, stream, n, item, undefined, inputs)) return result;
    // Each event once, where it was stored last (a redrive or a hand-over stores it again).
    const latest = new Map<string, StoredEvent>();
    for (const e of events) if (e.id !== undefined) latest.set(e.id, e);
    for (const e of latest.values()) {
      if (e.id === except || e.type === undefined || !e.type.startsWith(`${n}.`)) continue;
      const token = e.type.slice(n.length + 1);
      const role = flow.roles.get(token)?.role;
      if (role !== "entry" && role !== "done" && role !== "timeout") continue;
      let fe: FlowEvent;
      try {
        fe = decodeFlowEvent(flow, JSON.parse(new TextDecoder().decode(e.data)), e.subject);
      } catch {
        continue;
      }
      const targets = targetsOf(flow, token, fe.data);
      if (targets.length === 0) continue;
      if (wentOnFrom(flow, events, fe, targets)) continue;
      const steps: string[] = [];
      for (const t of targets) {
        const kind = def.steps[t]!.kind;
        // An end no event of the item holds: its step's completion did not lead there then,
        // or its step is publishing it now (the end follows the completion, before the ack
        // of the step's input). Found by probing: a redrive's hand-over stored a copy of the
        // last step's completion for the end as the item ended, shown twice in its stream.
        if (kind === "end") {
          const end = await endMayFollow(jsm, fe, e.seq, t);
          if (end === "pending") result.undecided = true;
          else if (end === "none") steps.push(t);
          continue;
        }
        // The item went through a join that waits for `t` without it (`t` added beside a
        // step it joins): `t` is past.
        if (wentPast(flow, events, fe, t, joinsAfter(def, t))) continue;
        const control = CONTROL_KINDS.has(kind);
        const took = () => control ? controlTook(t, fe) : workTook(t, fe);
        const first = await took();
        if (first) {
          if (first === "open") result.open++; // a join, wait or delay holds the item
          continue;
        }
        result.open++;
        const ci = await jsm.consumers.info(stream, durableOf(def, control ? CONTROL : t))
          .catch(() => null);
        // None yet: a step new to the stream gets its whole history. Or not past it yet.
        if (!ci || e.seq > ci.delivered.stream_seq) continue;
        if (ci.num_ack_pending > 0 && ci.ack_floor.stream_seq < e.seq) {
          result.undecided = true; // it may hold it still (handed out before a restart)
          continue;
        }
        if (await took()) continue; // taken between the two reads
        steps.push(t);
      }
      if (steps.length === 0) continue;
      const h = headers();
      h.set(HANDOVER_HEADER, steps.join(","));
      if (e.traceparent) h.set("traceparent", e.traceparent);
      await js.publish(e.subject, e.data, {
        msgID: deterministicId("handover", String(e.seq), steps.join(",")),
        headers: h,
      });
      result.handed.push({ seq: e.seq, subject: e.subject, steps });
      log?.info("handed an event over to the steps the running definition sends it to", {
        item_id: item,
        seq: e.seq,
        subject: e.subject,
        steps,
      });
    }
    return result;
  }

  const queued = new Map<string, string | undefined>();
  let notify: (() => void) | undefined;
  return {
    settle,
    tookAll,
    newStepsTake,
    queued,
    later(item, except) {
      queued.set(item, except);
      notify?.();
    },
    set onQueued(f: (() => void) | undefined) {
      notify = f;
    },
  };
}

/**
 * Whether work step `step` of `flow` ran for event `e`: its completion of `e` (its id follows
 * from `e`'s) is stored on the item's subject of the step's event, an event of the flow that
 * counts a run of the step. Not anything under that id: junk a step's key stored there (the
 * id is predictable) had a redrive of the item's letter skip the step as done, and the item
 * stayed where it was, its letter gone (reproduced 2026-12-07, tests/forged_items_test.ts).
 */
async function stepTook(
  jsm: JetStreamManager,
  stream: string,
  flow: Flow,
  step: string,
  e: { id: string; item_id: string },
): Promise<boolean> {
  const type = `${flow.name}.${eventOf(step, flow.def.steps[step]!)}`;
  const want = deterministicId(e.id, type);
  for await (const m of messagesOn(jsm, stream, `${type}.${e.item_id}`, { max: 1024 })) {
    try {
      const done = decodeFlowEvent(flow, m.json(), m.subject);
      if (done.id === want && (done.data.runs?.[step] ?? 0) > 0) return true;
    } catch {
      // not an event of the flow: not its completion
    }
  }
  return false;
}

/** How often a hand-over asks again about an item a step may still hold an event of. */
const HANDOVER_POLL_MS = 1_000;

/**
 * The control service's hand-overs ({@link createHandover}). After a change of definition
 * (the control bucket records the definition the last full hand-over ran for), every running
 * item's; then those the control step queues (a redriven event's item, while a step may
 * still hold one of its events), asked again every second until decided. An item at a step
 * the definition no longer has is left out of the full one: the sweep of that step's
 * consumer hands it over when the step's branch is dropped ({@link retiredStage}), and
 * otherwise dead-letters it there (so does its timer), and the letter's redrive hands it
 * over. Recorded once every item is decided; a stop before that leaves the record out, so
 * the next start hands over again.
 */
function runHandover(ctx: ServiceContext, p: LoadedPipeline, handover: Handover): Runnable {
  const { def } = p;
  const n = def.name;
  const log = ctx.log.with({ stage: durableOf(def, CONTROL) });
  let stopping = false;
  let wake: (() => void) | undefined;
  handover.onQueued = () => wake?.();
  const pause = (ms: number) =>
    new Promise<void>((res) => {
      const t = setTimeout(() => (wake = undefined, res()), ms);
      wake = () => (clearTimeout(t), wake = undefined, res());
    });
  let handed = 0;
  const settle = async (id: string, except: string | undefined) => {
    try {
      const r = await handover.settle(id, except);
      handed += r.handed.length;
      // (Unless queued again meanwhile, for another redriven event.)
      if (!r.undecided && handover.queued.get(id) === except) handover.queued.delete(id);
    } catch (err) {
      log.warn("could not hand an item's events over", { item_id: id, err });
      if (err instanceof WeftError && err.permanent) handover.queued.delete(id);
    }
  };
  const run = async () => {
    const kvm = new Kvm(ctx.nc);
    const held = await kvm.open(controlBucketOf(n));
    const last = await held.get(HANDED_OVER_KEY);
    let recorded = last?.operation === "PUT" && last.string() === def.hash;
    if (!recorded) {
      const states = await kvm.open(stateBucketOf(n));
      for await (const id of await states.keys()) {
        const s = await readItem(states, id).catch(() => null);
        if (!s || (s.status !== "running" && s.status !== "waiting")) continue;
        if (s.current.some((c) => !(c in def.steps))) continue; // at a step that is gone
        if (!handover.queued.has(id)) handover.queued.set(id, undefined);
      }
    }
    while (!stopping) {
      for (const [id, except] of [...handover.queued]) {
        if (stopping) break;
        await settle(id, except);
      }
      if (stopping) break;
      if (!recorded && handover.queued.size === 0) {
        await held.put(HANDED_OVER_KEY, def.hash);
        recorded = true;
        log.info("handed over what the changed definition sends elsewhere", {
          definition: def.hash,
          handed,
        });
      }
      await pause(handover.queued.size > 0 ? HANDOVER_POLL_MS : 3_600_000);
    }
    // Items left undecided: the next start hands every running item over again.
    if (handover.queued.size > 0) await held.delete(HANDED_OVER_KEY).catch(() => {});
  };
  const done = run().catch((err) => {
    log.warn("handing over after a change of definition failed: taken up at the next start", {
      err,
    });
  });
  let stopped: () => void;
  return {
    done: new Promise<void>((res) => (stopped = res)),
    async stop() {
      stopping = true;
      wake?.();
      await done;
      stopped();
    },
  };
}

/** The control service of a pipeline: intake, control steps and item state. */
export function controlService(p: LoadedPipeline): ServiceDef {
  const name = serviceNamesOf(p.def).control;
  return defineService(name, async (ctx) => {
    const source = `weft-${name}`;
    // Consumers the steps of an earlier definition left: what they hold was judged by the
    // control step of that definition (up to where its consumer is now), which took it to
    // a step that is gone. Found before this control step judges anything.
    const jsm = await jetstreamManager(ctx.nc);
    const stream = pipelineSubjects(p.def).stream;
    const byName = !versionAtLeast(ctx.nc.info?.version ?? "0.0.0", "2.10.0");
    const retired = await retiredConsumers(jsm, p.def, { byName }).catch((err) => {
      ctx.log.warn("could not list the consumers of retired steps", { err });
      return [];
    });
    const judgedUpTo = retired.length === 0 ? 0 : await jsm.consumers
      .info(stream, durableOf(p.def, CONTROL))
      .then((ci) => ci.delivered.stream_seq, () => 0);
    const intake = await runStage({ ...ctx, stage: intakeStage(p, ctx.nc), source });
    const handover = createHandover(p, ctx.nc, ctx.log.with({ stage: durableOf(p.def, CONTROL) }));
    const control = await runStage({
      ...ctx,
      stage: controlStage(p, ctx.nc, {
        retentionMs: ctx.config.retentionMs,
        handover,
        log: ctx.log.with({ stage: durableOf(p.def, CONTROL) }),
      }),
      source,
    });
    const state = await runStateWriter({
      ...ctx,
      spec: pipelineStateSpec(p),
      metrics: ctx.metrics,
    });
    return combineRunnables([
      intake,
      control,
      state,
      ...(retired.length > 0 ? [sweepRetired(ctx, p, retired, judgedUpTo, handover)] : []),
      runHandover(ctx, p, handover),
    ]);
  }, { description: `Weft pipeline ${p.def.name}: intake, joins, waits, delays, item state` });
}

/** The service running one work step of a pipeline. */
export function stepService(p: LoadedPipeline, id: string): ServiceDef {
  const name = `${p.def.name}-${id}`;
  return defineService(name, async (ctx) => {
    const c = ctx.config;
    const llm: LlmStepOptions | undefined = c.llmBaseUrl
      ? {
        baseUrl: c.llmBaseUrl,
        apiKey: c.llmApiKey,
        model: c.llmModel,
        timeoutMs: c.llmTimeoutMs,
        concurrency: c.llmConcurrency,
        // WEFT_LLM_RPS, per step's service as per analyzer stage
        ...(c.llmRps > 0 ? { rateLimit: { requestsPerSecond: c.llmRps } } : {}),
        pricing: { inputPer1k: c.llmPriceInPer1k, outputPer1k: c.llmPriceOutPer1k },
        // one budget for the step's service, shared by a promoted version run in its place
        ...(c.llmBudgetUsd > 0 ? { budget: createBudget({ maxCostUsd: c.llmBudgetUsd }) } : {}),
      }
      : undefined;
    const opts = { llm, nc: ctx.nc };
    const configured = workStage(p, id, opts);
    // A promoted version (from a live shadow): the candidate definition's step, run in place.
    const live = await followVersion(ctx, p.def.name, id, configured, async (v) => {
      if (!v.candidate.definition) {
        throw new ConfigError(`a promoted version of ${p.def.name}.${id} names no definition`);
      }
      const file = candidateDefinitionFile(v.candidate.definition, [p], ROOT_DIR);
      const cand = (await loadPipelines([file])).find((c) => c.def.name === p.def.name);
      if (!cand) throw new ConfigError(`${file} defines no pipeline ${p.def.name}`);
      return workStage(withPromotedStep(p, cand, id), id, opts);
    });
    // deno-lint-ignore no-explicit-any
    const stage: Stage<any> = {
      ...configured,
      // Says whose it is: a later definition without the step finds it (retiredConsumers).
      metadata: stepConsumerMetadata(p.def, id),
      handle: (e, sctx) => live.current().handle(e, sctx),
    };
    return await withOwed(ctx, p, id, stage, `weft-${name}`);
  }, { description: `Weft pipeline ${p.def.name}, step ${id}` });
}

/**
 * The event types whose messages work step `id`'s consumer may still owe (stored above its
 * ack floor) though the running definition has no such event: an earlier definition sent them
 * to the step (a step before it renamed, `a` to `a2`: its filter was `a`'s event). (An event
 * the running definition still has but sends elsewhere is the hand-over's, {@link
 * createHandover}.) Told
 * from the filters it has beyond the running definition's, and those it records it still
 * owes ({@link OWES_MARK}, kept while it takes them). Updating its filter in place to the
 * running definition's would leave them unread for good, their items running at the step
 * with nothing to take them on. None when the consumer is new or owes nothing. (A consumer
 * filtering on every event of the pipeline, `<name>.*.*`, a step with several inputs on
 * nats-server 2.9, names no event: what it owes cannot be told.)
 */
async function owedTypes(
  jsm: JetStreamManager,
  { def, flow }: LoadedPipeline,
  id: string,
): Promise<string[]> {
  const n = def.name;
  const stream = pipelineSubjects(def).stream;
  const ci = await jsm.consumers.info(stream, durableOf(def, id)).catch(() => null);
  if (!ci) return [];
  const have = ci.config.filter_subjects?.length
    ? ci.config.filter_subjects
    : ci.config.filter_subject
    ? [ci.config.filter_subject]
    : [];
  const want = new Set(stepFilterSubjects(def, id) ?? []);
  const noted = ci.config.description?.split(OWES_MARK)[1]?.split(",") ?? [];
  const candidates = new Set([
    ...have.filter((f) => !want.has(f) && /^[^.*>]+\.[^.*>]+\.\*$/.test(f)).map((f) =>
      f.slice(0, -2)
    ),
    ...noted.filter((t) => /^[^.*>]+\.[^.*>]+$/.test(t)),
  ]);
  const out: string[] = [];
  for (const t of candidates) {
    if (!t.startsWith(`${n}.`) || want.has(`${t}.*`)) continue;
    // An event the running definition still has (re-wired elsewhere): the hand-over's.
    if (flow.roles.has(t.slice(n.length + 1))) continue;
    const above = await storedMessage(jsm, stream, {
      next_by_subj: `${t}.*`,
      seq: ci.ack_floor.stream_seq + 1,
    } as unknown as { seq: number });
    if (above) out.push(t);
  }
  return out.sort();
}

/**
 * Runs work step `id`'s stage, its consumer still reading what it owes under an earlier
 * definition's filter ({@link owedTypes}) beside the running definition's events: on
 * nats-server 2.10+ among its filters, on 2.9 under the pipeline's every event (one filter
 * only). Each such event is the step's input (the earlier definition sent it here), so the
 * step runs for it once and its completion, under the running definition, takes the item on.
 * Its consumer's description records what it owes: a later start keeps those filters while
 * any of their messages is stored above its ack floor, and drops them once none is.
 */
async function withOwed(
  ctx: ServiceContext,
  p: LoadedPipeline,
  id: string,
  // deno-lint-ignore no-explicit-any
  stage: Stage<any>,
  source: string,
): Promise<Runnable> {
  const { def } = p;
  const n = def.name;
  const jsm = await jetstreamManager(ctx.nc);
  const owed = new Set(await owedTypes(jsm, p, id));
  if (owed.size === 0) return await runStage({ ...ctx, stage, source });
  ctx.log.with({ stage: stage.name }).info(
    "reading what the step's consumer owes under an earlier definition beside its own events",
    { events: [...owed] },
  );
  const multi = versionAtLeast(ctx.nc.info?.version ?? "0.0.0", "2.10.0");
  const inputs = stepFilterSubjects(def, id) ?? [];
  const isOwed = (message: MessageInfo) => owed.has(`${n}.${message.subject.split(".")[1]}`);
  return await runStage({
    ...ctx,
    stage: {
      ...stage,
      filterSubject: `${n}.*.*`,
      ...(multi ? { filterSubjects: [...inputs, ...[...owed].map((t) => `${t}.*`)] } : {}),
      owes: [...owed],
      accepts: (message) =>
        isOwed(message)
          ? !message.handoverTo || message.handoverTo.includes(id)
          : stage.accepts?.(message) ?? true,
      decode: (raw, message) =>
        isOwed(message)
          ? decodeFlowEvent(p.flow, raw, message.subject)
          : stage.decode!(raw, message),
    },
    source,
  });
}

/** Every service of the loaded pipelines, by name. */
export function pipelineServices(loaded: readonly LoadedPipeline[]): Map<string, ServiceDef> {
  const out = new Map<string, ServiceDef>();
  for (const p of loaded) {
    out.set(serviceNamesOf(p.def).control, controlService(p));
    for (const id of workSteps(p.def)) out.set(`${p.def.name}-${id}`, stepService(p, id));
  }
  return out;
}

/**
 * Publishes an item's entry event (HTTP and request/reply submissions). `stored` is false when
 * the stream already had the item (its entry event is stored once per item, the first wins).
 */
export async function submitItem(
  nc: NatsConnection,
  p: LoadedPipeline,
  id: string,
  input: unknown,
  opts: { source: string; traceId: string },
): Promise<{ event: FlowEvent; stored: boolean }> {
  const event = itemEntryEvent(p, id, input, opts);
  const stored = await publishEvent(jetstream(nc), event as unknown as OutputEvent, null, true);
  return { event, stored };
}

/** An item's entry event: what {@link submitItem} publishes (a batch publishes several). */
export function itemEntryEvent(
  p: LoadedPipeline,
  id: string,
  input: unknown,
  opts: { source: string; traceId: string },
): FlowEvent {
  const { flow, def } = p;
  const type = `${def.name}.${entryEvent(def)}`;
  return flowEvent(
    flow,
    entryEvent(def),
    { id: deterministicId(id, type), item_id: id, trace_id: opts.traceId },
    entryData(checkInput(flow, input)),
    { source: opts.source, now: new Date() },
  );
}

/**
 * Reads `Stage.outcomeOf` from a pipeline's state bucket (`states`): the outcome of an item
 * whose state says it has ended (`done`), at an end of any definition.
 */
function outcomeFrom(
  states: () => Promise<KV>,
): (item: string) => Promise<string | undefined> {
  return async (item) => {
    const s = await readItem(await states(), item);
    return s?.status === "done" ? s.outcome ?? "done" : undefined;
  };
}

/**
 * `Stage.holdsOutcome` from `stands` (`Stage.storedStands`): an end stored for the item is its
 * outcome when the item's state takes it, or, whichever it is, once the item has ended.
 */
function holdsOutcomeFrom(
  stands: ReturnType<typeof storedStandsFrom>,
  states: () => Promise<KV>,
): (item: string, held: { type: string; seq: number }) => Promise<boolean> {
  const ended = outcomeFrom(states);
  return async (item, held) =>
    await stands(item, { ...held, raw: undefined }) || (await ended(item)) !== undefined;
}

/**
 * `Stage.storedStands` for pipeline `p`: whether the event stored for an item at `stored.seq`
 * (an end, or a step's event an item has once) is one its state takes. The state as written,
 * then the item's events after it up to that one, folded as the state writer folds them in
 * order (the state trails its events): it stands unless the fold refuses it (a step's run or
 * an end that no completion of the item leads to). Once the state is past it: an end stands
 * when the item has ended, a step's run when the state counts that many runs of the step;
 * otherwise (the state may not have folded it yet: delivered to the writer after later ones)
 * the item's events up to it decide, read and folded in order. An item that has ended or
 * failed keeps whatever it holds.
 */
function storedStandsFrom(
  p: LoadedPipeline,
  states: () => Promise<KV>,
  jsm: () => Promise<JetStreamManager>,
): (
  item: string,
  stored: { type: string; seq: number; raw: unknown },
  known?: ItemState | null,
) => Promise<boolean> {
  const spec = pipelineStateSpec(p);
  const n = p.def.name;
  const stepOf = new Map(
    Object.entries(p.def.steps).filter(([, v]) => v.kind !== "end").map((
      [k, v],
    ) => [`${n}.${eventOf(k, v)}`, k]),
  );
  const ends = endTypesOf(p.def);
  const ended = (x: ItemState | undefined) => x?.status === "done" || x?.status === "failed";
  return async (item, stored, known) => {
    let s: ItemState | undefined =
      (known === undefined ? await readItem(await states(), item) : known) ?? undefined;
    const step = stepOf.get(stored.type);
    const data = (stored.raw as { data?: FlowData } | undefined)?.data;
    const run = step === undefined ? 0 : data?.runs?.[step] ?? 0;
    /**
     * A run the state counts (`x`, past it): an earlier one, or this one with its result (not
     * a copy of it with another result, which the fold takes for nothing).
     */
    const counted = (x: ItemState) =>
      step === undefined || run < (x.runs[step] ?? 0) ||
      (run === (x.runs[step] ?? 0) &&
        canonicalJson(data?.results?.[step]) === canonicalJson(x.results[step]));
    if (s && s.last_seq >= stored.seq) {
      if (ended(s) || ends.has(stored.type) ? ended(s) : counted(s)) return true;
      // The state may lack it yet: the writer folds what it is delivered, and an event it
      // held when it restarted comes back after later ones it folded meanwhile. Judged on
      // the item's events up to it, read in order, as a rebuild folds them.
      s = undefined;
    }
    const j = await jsm();
    for await (
      const m of messagesOn(j, spec.stream, `${n}.*.${item}`, {
        from: (s?.last_seq ?? 0) + 1,
        before: stored.seq + 1,
        max: ITEM_HISTORY_MAX,
      })
    ) {
      let event: AnyEvent;
      try {
        event = decodeStateEvent(spec, m.data, m.subject, m.time.getTime(), m.header);
      } catch {
        continue; // the state writer folds nothing from what it cannot read
      }
      const why = s === undefined ? undefined : spec.refuses!(s, event, m.seq);
      if (m.seq === stored.seq) {
        if (s === undefined || ended(s)) return s !== undefined;
        if (why !== undefined) return false;
        // A copy of a run the state holds (no new run): only with the run's own result.
        return run > (s.runs[step ?? ""] ?? 0) || counted(s);
      }
      if (why === undefined) s = spec.apply(s, event, m.seq) ?? s;
    }
    return true; // not found as read: taken, as before this check
  };
}

/** Reads an item's state; null when there is none. */
export async function readItem(kv: KV, id: string): Promise<ItemState | null> {
  const e = await kv.get(id);
  return e && e.operation === "PUT" && e.length > 0 ? e.json<ItemState>() : null;
}

/** For logs: what was loaded. */
export function describePipelines(loaded: readonly LoadedPipeline[], log: Logger): void {
  for (const p of loaded) {
    log.info("pipeline loaded", {
      pipeline: p.def.name,
      definition: p.def.hash,
      file: p.file,
      steps: Object.keys(p.def.steps).length,
    });
  }
}

/** The streams and buckets of the loaded pipelines, for ensureTopology. */
export function pipelineTopology(
  loaded: readonly LoadedPipeline[],
  retentionMs: number,
): ExtraTopology {
  return {
    streams: loaded.map((p) => ({
      name: pipelineSubjects(p.def).stream,
      description: `Weft pipeline ${p.def.name}: submissions and every event`,
      subjects: pipelineSubjects(p.def).streamSubjects,
      atomicBatch: true, // a batch submission is all or nothing on the bus
    })),
    buckets: loaded.flatMap((p) => [
      {
        name: stateBucketOf(p.def.name),
        description: `Weft: current state of each ${p.def.name} item`,
        ttl: retentionMs,
      },
      {
        name: controlBucketOf(p.def.name),
        description: `Weft: ${p.def.name} items held at joins and waits`,
        ttl: retentionMs,
      },
      ...(hasWaits(p.def)
        ? [{
          name: claimsBucketOf(p.def.name),
          description: `Weft: reviewers' claims on ${p.def.name} items waiting for a person`,
          ttl: retentionMs,
        }]
        : []),
      ...(hasScratchpad(p.def)
        ? [{
          name: scratchpadBucketOf(p.def.name),
          description: `Weft: the shared scratchpad of each ${p.def.name} item`,
          ttl: retentionMs,
        }]
        : []),
      ...(p.def.buckets ?? []).map((name) => ({
        name,
        description: `Weft: data of the ${p.def.name} pipeline's tools`,
      })),
    ]),
  };
}

/** A pipeline service as the supervisor runs it: entry, what it reads, its bus access. */
export interface PipelineServiceSpec {
  name: string;
  /** Processes running it (a step's `replicas`). */
  replicas?: number;
  /** `services/pipeline.ts`, with the definition files and the service's name. */
  entry: string;
  args: string[];
  /** Files and folders it reads: its definition's folder (prompts, rules). */
  reads: string[];
  /** Calls the LLM endpoint (an llm step). */
  llm: boolean;
  /** Further hosts it may reach: the step's `allowNet` (task and agent steps). */
  net: string[];
  access: Access;
}

/**
 * The hosts step `id` of `def` may reach besides NATS and the LLM endpoint: its `allowNet`
 * (task and agent steps), none for the rest.
 *
 * @example
 * ```ts ignore
 * stepNet(def, "notify"); // ["hooks.example.com:443"]
 * ```
 */
export function stepNet(def: PipelineDefinition, id: string): string[] {
  const step = def.steps[id];
  return step && (step.kind === "task" || step.kind === "agent") ? [...step.allowNet ?? []] : [];
}

/**
 * Each pipeline service's least-privilege access, from its definition: a step publishes
 * only its own events (and the end events it leads to), its pipeline's failure event and
 * its dead letters, and pulls only its own durable consumer; the control service also
 * turns submissions into entry events, owns the state and control buckets, publishes the
 * ends a redriven completion leads to, and drains and deletes the consumers of steps its
 * definition no longer has (never a running step's).
 */
export function pipelineServiceSpecs(
  loaded: readonly LoadedPipeline[],
  root: string,
): PipelineServiceSpec[] {
  const out: PipelineServiceSpec[] = [];
  const files = [...new Set(loaded.map((p) => p.file))];
  const rel = (f: string) => (f.startsWith(root) ? f.slice(root.length).replace(/^\//, "") : f);
  for (const p of loaded) {
    const { def } = p;
    const n = def.name;
    const stream = pipelineSubjects(def).stream;
    const dir = rel(p.file.replace(/\/[^/]*$/, ""));
    const controlSteps = Object.keys(def.steps).filter((id) =>
      CONTROL_KINDS.has(def.steps[id]!.kind)
    );
    out.push({
      name: serviceNamesOf(def).control,
      entry: PIPELINE_ENTRY,
      args: [...files.map(rel), serviceNamesOf(def).control],
      reads: [...new Set(files.map((f) => rel(f.replace(/\/[^/]*$/, ""))))],
      llm: false,
      net: [],
      access: {
        consumes: [INTAKE, CONTROL, STATE].map((part) => ({
          stream,
          durable: durableOf(def, part),
        })),
        // The consumers of steps the definition no longer has, to sweep them (never one a
        // running step owns: those stay denied).
        retiresConsumers: [stream],
        publishes: [
          ...new Set([
            `${n}.${entryEvent(def)}.*`,
            `${n}.${FAILED}.*`,
            ...stepPublishes(def, controlSteps),
            // The end a redriven completion leads to (a step's completion publishes its own).
            ...[...endTypesOf(def)].map((t) => `${t}.*`),
            // An event handed over after a change of definition (stored again, as it was).
            ...pipelineSubjects(def).eventTypes.map((t) => `${t}.*`),
            ...[INTAKE, CONTROL, STATE].map((part) => `deadletter.${durableOf(def, part)}.*`),
          ]),
        ],
        writesBuckets: [stateBucketOf(n), controlBucketOf(n)],
        // Its state writer folds a failure only when its runner's letter is stored.
        readsStreams: [DEADLETTER_STREAM],
        // Its timers only: `<name>.<...>` (another pipeline's deadlines are not its to set).
        writesKeys: [{ bucket: SCHEDULE_BUCKET, keys: `${n}.>` }],
      },
    });
    for (const id of workSteps(def)) {
      out.push({
        name: `${n}-${id}`,
        replicas: (def.steps[id] as { replicas?: number }).replicas ?? 1,
        entry: PIPELINE_ENTRY,
        args: [...files.map(rel), `${n}-${id}`],
        reads: [...new Set([...files.map((f) => rel(f.replace(/\/[^/]*$/, ""))), dir])],
        llm: def.steps[id]!.kind === "llm" || def.steps[id]!.kind === "agent" ||
          (def.steps[id]!.kind === "router" && !!(def.steps[id] as { prompt?: string }).prompt),
        net: stepNet(def, id),
        access: {
          consumes: [{ stream, durable: durableOf(def, id) }],
          // Its promoted version, if any (weft_step_versions); agents: the scratchpad and
          // what their tools read.
          ...(hasScratchpad(def) && def.steps[id]!.kind === "agent"
            ? {
              writesBuckets: [scratchpadBucketOf(n)],
              readsBuckets: [
                STEP_VERSION_BUCKET,
                stateBucketOf(n),
                ...(def.steps[id] as { reads?: string[] }).reads ?? [],
              ],
            }
            : {
              readsBuckets: [
                STEP_VERSION_BUCKET,
                // Whether a backlog event's item has ended (under an earlier definition).
                stateBucketOf(n),
                ...(hasScratchpad(def) ? [scratchpadBucketOf(n)] : []),
              ],
            }),
          publishes: [
            ...stepPublishes(def, [id]),
            `${n}.${FAILED}.*`,
            `deadletter.${durableOf(def, id)}.*`,
          ],
          // Whether an item's failure is a runner's (its letter stored): failure_letter.ts.
          readsStreams: [DEADLETTER_STREAM],
        },
      });
    }
  }
  return out;
}

/** The folders of the loaded definitions, relative to `root` when under it. */
export function definitionDirs(loaded: readonly LoadedPipeline[], root: string): string[] {
  const rel = (f: string) => (f.startsWith(root) ? f.slice(root.length).replace(/^\//, "") : f);
  return [...new Set(loaded.map((p) => rel(p.file.replace(/\/[^/]*$/, ""))))];
}

/** What the gateway and the ops identity need for the loaded pipelines. */
export function pipelineGatewayAccess(loaded: readonly LoadedPipeline[]): {
  gateway: Access;
  ops: Access;
} {
  const streams = loaded.map((p) => pipelineSubjects(p.def).stream);
  const states = loaded.map((p) => stateBucketOf(p.def.name));
  const awaited = loaded.flatMap((p) =>
    Object.values(p.def.steps).flatMap((s) =>
      s.kind === "wait" ? [`${p.def.name}.${s.event}.*`] : []
    )
  );
  return {
    gateway: {
      // Entry events, awaited events (decisions) and redrives onto any of its subjects.
      publishes: loaded.map((p) => `${p.def.name}.>`),
      serves: loaded.map((p) => `weft.${p.def.name}.>`),
      readsStreams: streams,
      // Each step's backlog on /metrics.
      listsConsumers: streams,
      // States, and the held items (GET /pipelines/<name>/waiting).
      readsBuckets: [...states, ...loaded.map((p) => controlBucketOf(p.def.name))],
      // Reviewers' claims on waiting items.
      writesBuckets: loaded.filter((p) => hasWaits(p.def)).map((p) => claimsBucketOf(p.def.name)),
    },
    ops: {
      publishes: [...loaded.map((p) => `${p.def.name}.submit`), ...awaited],
      subscribes: loaded.map((p) => `${p.def.name}.>`),
      readsStreams: streams,
      readsBuckets: [
        ...states,
        ...loaded.map((p) => controlBucketOf(p.def.name)),
        ...loaded.filter((p) => hasWaits(p.def)).map((p) => claimsBucketOf(p.def.name)),
        ...loaded.filter((p) => hasScratchpad(p.def)).map((p) => scratchpadBucketOf(p.def.name)),
        ...loaded.flatMap((p) => p.def.buckets ?? []),
      ],
    },
  };
}

/** The module running pipeline services: `deno run services/pipeline.ts <files...> <service>`. */
export const PIPELINE_ENTRY = "services/pipeline.ts";
