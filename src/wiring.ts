/**
 * How a hand-wired pipeline plugs into the mesh: its streams, buckets and object stores, its
 * services, and what the mesh's shared services (the gateway, the shadow service, the
 * operators) need for it. The runtime (topology, supervisor, identities) reads these and
 * names no pipeline of its own.
 *
 * The shipped pipelines are wired this way, each in its own folder
 * (`pipelines/<name>/wiring.ts`, listed in pipelines/shipped.ts), until they run as
 * definitions; a definition's pipeline derives the same from its definition instead
 * (src/pipeline/runtime.ts). A wiring is data, loaded by every service (topology and
 * identities follow from it): the code it names is listed apart, in
 * pipelines/shipped_gateways.ts (each pipeline's part of the gateway, loaded only by the
 * gateway) and pipelines/shipped_services.ts (each service's definition, loaded only where
 * several run in one process), so no process loads another's code.
 *
 * @module
 */
import type { NatsConnection } from "@nats-io/nats-core";
import type { Access } from "./identities.ts";
import type { Config } from "./config.ts";
import type { Logger } from "./observability/log.ts";
import type { WeftMetrics } from "./observability/metrics.ts";
import type { Auth } from "./gateway/auth.ts";
import type { GatewayExtension } from "./gateway/app.ts";
import type { DashboardPanel } from "./gateway/dashboard_page.ts";
import type { CapacityGuard } from "./capacity.ts";
import type { IngestLimiter } from "./gateway/ingest_limits.ts";
import type { StateSpec } from "./state_writer.ts";
import { DEADLETTER_STREAM, TIMER_SUBJECTS } from "./subjects.ts";
import { ConfigError } from "./errors.ts";
import type { PipelineSpec } from "./pipeline/definition.ts";
import {
  durableOf,
  type PipelineGraph,
  pipelineGraph,
  pipelineSubjects,
  stepPublishes,
  WORK_KINDS,
} from "./pipeline/derive.ts";
import { eventOf, flowOrder } from "./pipeline/validate.ts";
import { entryEvent, FAILED, timeoutEventOf } from "./pipeline/flow.ts";

/** A service the supervisor runs. */
export interface ServiceSpec {
  name: string;
  /** Entry module, relative to the repository root. */
  entry: string;
  /** Reads the ruleset file. */
  readsRules?: boolean;
  /** Runs analyzers: with `llm` ones it calls the LLM endpoint and reads prompts/. */
  analyzes?: boolean;
  /** Listens on the gateway's host:port. */
  listens?: boolean;
  /** The port it listens on instead of the gateway's (a second gateway for event streams). */
  port?: number;
  /** What it does on the bus: its NATS identity's permissions follow from it. */
  access: Access;
  /** Arguments after the entry module. */
  args?: readonly string[];
  /** Files and folders it reads (a pipeline definition's folder). */
  reads?: readonly string[];
  /** Calls the LLM endpoint whatever the analyzers (a definition's llm step). */
  llm?: boolean;
  /** Further hosts it may reach (`host` or `host:port`): a definition's step's `allowNet`. */
  net?: readonly string[];
  /**
   * Runs in a process of its own even under `--together` (all): the shadow service, so
   * killing or crashing it never takes a production step with it.
   */
  apart?: boolean;
  /**
   * Background work off every item's path (timers, digests, shadows): its process runs with
   * V8's `--optimize-for-size`, about 12 MiB smaller idle for code about half as fast
   * (docs/BENCH.md), which such work never notices.
   */
  background?: boolean;
  /** Processes running it, sharing its consumer (a pipeline step's `replicas`). Default 1. */
  replicas?: number;
  /** Which of them this is (0-based), when it has several. */
  replica?: number;
}

/** A stream of a hand-wired pipeline. */
export interface WiredStream {
  name: string;
  description: string;
  subjects: string[];
  /**
   * Accepts atomic batch publishes where the server has them (nats-server 2.14+), so a
   * batch submission is all or nothing on the bus too (src/atomic_batch.ts).
   */
  atomicBatch?: boolean;
}

/** A KV bucket of a hand-wired pipeline. */
export interface WiredBucket {
  name: string;
  description: string;
  /** How long an entry lives, ms; `"retention"`: as long as events (`WEFT_RETENTION_MS`). */
  ttl?: number | "retention";
}

/** What the gateway service shares with each pipeline's part of it. */
export interface GatewayPartContext {
  nc: NatsConnection;
  config: Config;
  log: Logger;
  /** The gateway's metrics (e.g. items accepted, per pipeline). */
  metrics: WeftMetrics;
  auth: Auth;
  /** Refuses new items (507) when a stream is past its high-water mark. */
  capacity: CapacityGuard;
  /** Refuses callers over their ingest rate or quota (429). */
  limiter: IngestLimiter;
}

/** Starts a pipeline's part of the gateway. */
export type GatewayPartStarter = (ctx: GatewayPartContext) => Promise<GatewayPart>;

/** A pipeline's part of the gateway: its HTTP routes and its NATS request handlers. */
export interface GatewayPart {
  /** Its routes, mounted on the gateway app. */
  routes: GatewayExtension;
  /** Its routes' OpenAPI paths, in the gateway's `GET /openapi.json`. */
  openApi?: Record<string, unknown>;
  /** Its own panels on the dashboard. */
  dashboard?: DashboardPanel;
  /** Stops answering its request subjects. */
  stop(): void;
}

/** A hand-wired pipeline's items: how the runtime names, counts, folds and ends them. */
export interface WiredItems {
  /** What one is called in messages, e.g. `order`. */
  what: string;
  /** The event type that starts one, e.g. `orders.placed`. */
  entryType: string;
  /** Event types after which nothing more happens to one. */
  finalTypes: ReadonlySet<string>;
  /** Its state writer's spec: the pure fold of its events into its state. */
  // deno-lint-ignore no-explicit-any
  state: StateSpec<any>;
  /** The field of a hub's site status that counts them, e.g. `items`. */
  statusField: string;
}

/** What a hand-wired pipeline adds to the mesh. */
export interface PipelineWiring {
  /** The pipeline's name: the first token of its event subjects. */
  name: string;
  /** Its event streams, kept with the configured retention and byte limits. */
  streams: readonly WiredStream[];
  /** Its KV buckets. */
  buckets?: readonly WiredBucket[];
  /** Its object stores. */
  objectStores?: readonly { name: string; description: string }[];
  /** Its services, in start order. */
  services: readonly ServiceSpec[];
  /** Its items (edge sites' items at a hub are folded and counted with this). */
  items?: WiredItems;
  /** What the gateway needs to serve it: its routes, request subjects and reads. */
  gateway?: Access;
  /** What the shadow service needs to shadow its steps. */
  shadow?: Access;
  /**
   * Its steps a live shadow can follow (how: pipelines/shipped_shadows.ts); the first
   * pipeline with some is the default of a shadow that names none.
   */
  shadowSteps?: readonly string[];
  /**
   * Its bus inputs a caller may schedule (`POST /schedules`, `weft.schedules.create`), e.g.
   * `orders.submit`: subjects whose consumer validates what it reads like any submission.
   */
  schedulable?: readonly string[];
  /** Subjects its own services set timers on (the scheduler fires them), e.g. `orders.sla.*`. */
  timers?: readonly string[];
  /**
   * Schedules it kept under ids it no longer uses (before schedules had owners): the
   * scheduler removes each when it starts, if it still publishes on that subject (a caller's
   * schedule that took the id meanwhile stays).
   */
  retiredSchedules?: readonly { id: string; subject: string }[];
  /** How the dashboard draws it (a graph of its consumers, fed by their metrics). */
  dashboard?: WiredGraph;
  /**
   * The stage the gateway's intake stands in for (it publishes what that stage would): the
   * dashboard adds the items the gateway accepted for this pipeline to its figures.
   */
  intakeStage?: string;
}

/**
 * A hand-wired pipeline's graph on the dashboard: its title and its stages in flow order, each
 * a durable consumer's name (as the metrics label it) and what the box says. A stage whose
 * name ends in `state` is drawn after a dashed arrow (it follows every event, off the path).
 */
export interface WiredGraph {
  /** The section's heading, e.g. `Orders pipeline`. */
  title: string;
  /** `[durable, label]` in flow order: every box with live figures. */
  stages: readonly (readonly [string, string])[];
  /**
   * Its definition's graph, when it has one: the page draws the definition's steps (waits and
   * ends too) in columns, with an arrow for each of its edges and no other, where the first of
   * them is in `stages`, and lists its edges below.
   */
  graph?: PipelineGraph;
}

/**
 * The subjects a caller may schedule: the pipelines' bus inputs, which validate what they
 * consume like any submission. Never an event subject of a step, a JetStream API, KV or
 * object-store subject, or a request subject.
 */
export function callerSchedulableSubjects(wirings: readonly PipelineWiring[]): string[] {
  return [...new Set(wirings.flatMap((w) => w.schedulable ?? []))];
}

/**
 * What the scheduler fires on at all: what callers may schedule, the timers the pipelines'
 * services set themselves, and definitions' timers. A schedule on anything else (e.g. written
 * straight into the bucket) is refused when fired.
 */
export function schedulableSubjects(wirings: readonly PipelineWiring[]): string[] {
  return [
    ...callerSchedulableSubjects(wirings),
    ...new Set(wirings.flatMap((w) => w.timers ?? [])),
    ...TIMER_SUBJECTS,
  ];
}

/**
 * What a pipeline's own schedules (ids `<owner>.<id>`, written only by its services) may fire
 * on: a wiring's timers and bus inputs, or else a definition's timers (`<owner>._timer.*`).
 *
 * @example
 * ```ts
 * import { ownedSubjects } from "./wiring.ts";
 * console.assert(ownedSubjects([], "orders")[0] === "orders._timer.*");
 * ```
 */
export function ownedSubjects(wirings: readonly PipelineWiring[], owner: string): string[] {
  const w = wirings.find((w) => w.name === owner);
  return w ? [...w.timers ?? [], ...w.schedulable ?? []] : [`${owner}._timer.*`];
}

/**
 * A service of a hand-wired pipeline that runs steps of the pipeline's definition with a stage
 * module of its own (`entry`), e.g. an analyzer step.
 */
export interface StepServiceSpec extends Omit<ServiceSpec, "access"> {
  /** The definition's work steps it runs. */
  steps: readonly string[];
  /** What it needs besides its steps' consumers and events (buckets it reads, objects). */
  access?: Access;
}

/**
 * The services running `def`'s work steps, their access derived from the definition: each
 * consumes its steps' durable consumers, and publishes their events (with the end events
 * they lead to), the pipeline's failure event and its steps' dead letters. Every work step
 * must be run by exactly one of `services`.
 *
 * @example
 * ```ts
 * import { definePipeline } from "./pipeline/definition.ts";
 * import { stepServices } from "./wiring.ts";
 * const orders = definePipeline({
 *   name: "orders",
 *   input: { schema: { type: "object" } },
 *   start: "price",
 *   steps: {
 *     price: { kind: "task", output: { type: "object" }, durable: "price", next: "done" },
 *     done: { kind: "end", outcome: "done" },
 *   },
 * });
 * const [svc] = stepServices(orders, [{ name: "price", entry: "price.ts", steps: ["price"] }]);
 * console.assert(svc!.access.publishes!.includes("orders.done.*"));
 * ```
 */
export function stepServices(
  def: PipelineSpec,
  services: readonly StepServiceSpec[],
): ServiceSpec[] {
  const runBy = new Map<string, string>();
  for (const svc of services) {
    for (const id of svc.steps) {
      const step = def.steps[id];
      if (!step || !WORK_KINDS.has(step.kind)) {
        throw new ConfigError(
          `pipeline ${def.name}: service ${svc.name} runs ${id}, not a work step of its definition`,
        );
      }
      const other = runBy.get(id);
      if (other !== undefined) {
        throw new ConfigError(
          `pipeline ${def.name}: step ${id} is run by both ${other} and ${svc.name}`,
        );
      }
      runBy.set(id, svc.name);
    }
  }
  for (const [id, step] of Object.entries(def.steps)) {
    if (WORK_KINDS.has(step.kind) && !runBy.has(id)) {
      throw new ConfigError(`pipeline ${def.name}: no service runs step ${id}`);
    }
  }
  const stream = pipelineSubjects(def).stream;
  return services.map(({ steps, access = {}, ...svc }) => {
    const durables = steps.map((id) => durableOf(def, id));
    return {
      ...svc,
      access: {
        ...access,
        consumes: [...durables.map((durable) => ({ stream, durable })), ...access.consumes ?? []],
        // Whether an item's failure is a runner's (its letter stored): failure_letter.ts.
        readsStreams: [DEADLETTER_STREAM, ...access.readsStreams ?? []],
        publishes: [
          ...stepPublishes(def, steps),
          `${def.name}.${FAILED}.*`,
          ...durables.map((d) => `deadletter.${d}.*`),
          ...access.publishes ?? [],
        ],
      },
    };
  });
}

/**
 * `def`'s stream as a hand-wired pipeline declares it: named and bound to `<name>.>` as the
 * definition derives.
 */
export function definedStream(
  def: PipelineSpec,
  description: string,
  opts: { atomicBatch?: boolean } = {},
): WiredStream {
  const s = pipelineSubjects(def);
  return { name: s.stream, description, subjects: s.streamSubjects, ...opts };
}

/**
 * The dashboard's drawing of `def`: its graph, and as boxes with live figures its work steps
 * from the input onwards (breadth first), each its durable consumer labelled with the step's
 * description, between the pipeline's own services `before` and `after` (e.g. its intake and
 * its state writer).
 */
export function definedGraph(
  def: PipelineSpec,
  title: string,
  extra: {
    before?: readonly (readonly [string, string])[];
    after?: readonly (readonly [string, string])[];
  } = {},
): WiredGraph {
  const steps = flowOrder(def)
    .filter((id) => WORK_KINDS.has(def.steps[id]!.kind))
    .map((id) => [durableOf(def, id), def.steps[id]!.description ?? id] as const);
  return {
    title,
    stages: [...extra.before ?? [], ...steps, ...extra.after ?? []],
    graph: pipelineGraph(def),
  };
}

/**
 * A hand-wired pipeline's items as `def` has them: started by its entry event, over after an
 * end step's event or its failure event.
 */
export function definedItems(
  def: PipelineSpec,
  parts: Omit<WiredItems, "entryType" | "finalTypes">,
): WiredItems {
  const ends = Object.entries(def.steps).filter(([, step]) => step.kind === "end");
  return {
    ...parts,
    entryType: `${def.name}.${entryEvent(def)}`,
    finalTypes: new Set([
      ...ends.map(([id, step]) => `${def.name}.${eventOf(id, step)}`),
      `${def.name}.${FAILED}`,
    ]),
  };
}

/** The subjects `def`'s waits and joins time out on (`<name>.<timeout event>.*`): its timers. */
export function definedTimers(def: PipelineSpec): string[] {
  return Object.entries(def.steps)
    .filter(([, step]) => step.kind === "wait" || step.kind === "join")
    .map(([id, step]) => `${def.name}.${timeoutEventOf(id, step)}.*`);
}

/** Two accesses as one: every list joined. */
export function mergeAccess(a: Access, b: Access): Access {
  const out: Record<string, unknown> = { ...a };
  for (const [k, v] of Object.entries(b)) {
    const have = (a as Record<string, unknown>)[k];
    out[k] = Array.isArray(v) ? [...new Set([...(have as unknown[] ?? []), ...v])] : v ?? have;
  }
  return out as Access;
}

/**
 * The access of a pipeline step: it consumes its own durables, publishes its output event
 * types, its pipeline's failure event (`failed`; undefined for a stage that fails no item,
 * such as a digest's) and its dead letters, plus whatever `extra` grants.
 *
 * @example
 * ```ts
 * import { stepAccess } from "./wiring.ts";
 * const a = stepAccess("ORDERS", ["price"], ["orders.priced"], "orders.failed");
 * console.assert(a.publishes!.includes("deadletter.price.*"));
 * ```
 */
export function stepAccess(
  stream: string,
  durables: readonly string[],
  outputs: readonly string[],
  failed: string | undefined,
  extra: Access = {},
): Access {
  return {
    ...extra,
    consumes: durables.map((durable) => ({ stream, durable })),
    publishes: [
      ...outputs.map((t) => `${t}.*`),
      ...failed === undefined ? [] : [`${failed}.*`],
      ...durables.map((d) => `deadletter.${d}.*`),
      ...extra.publishes ?? [],
    ],
  };
}

/** Every stream of `wirings`. */
export function wiredStreams(wirings: readonly PipelineWiring[]): string[] {
  return wirings.flatMap((w) => w.streams.map((s) => s.name));
}

/**
 * What operators read of `wirings`: every stream, bucket and object store.
 */
export function wiredReads(wirings: readonly PipelineWiring[]): Access {
  return {
    readsStreams: wiredStreams(wirings),
    readsBuckets: wirings.flatMap((w) => (w.buckets ?? []).map((b) => b.name)),
    readsObjects: wirings.flatMap((w) => (w.objectStores ?? []).map((o) => o.name)),
  };
}
