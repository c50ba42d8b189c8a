/**
 * Weft: an edge event mesh for AI pipelines on Deno and NATS JetStream. This module is the
 * runtime's public API, and knows no pipeline: the shipped ones are libraries of their own
 * (`pipelines/<name>/mod.ts`).
 *
 * A team writes its pipeline as one definition ({@link definePipeline}); `deno task start`
 * derives and runs its services, streams, consumers, permissions, HTTP routes and item state
 * (docs/PIPELINES.md). Underneath, a stage is a pure, typed handler from an event to the
 * events that follow, and {@link runStage} does everything else (durable consumer,
 * validation, publish with de-duplication, acks, retries, dead letters, trace context, drain).
 * Events are plain JSON on documented subjects, validated against JSON Schemas.
 *
 * @example A pipeline of your own: two steps, in pipelines/orders/pipeline.ts
 * ```ts
 * import { definePipeline } from "./mod.ts";
 *
 * export const orders = definePipeline({
 *   name: "orders",
 *   input: { schema: { type: "object", required: ["sku"], properties: { sku: { type: "string" } } } },
 *   start: "price",
 *   steps: {
 *     price: {
 *       kind: "task",
 *       output: { type: "object", properties: { cents: { type: "number" } } },
 *       handle: (order: { sku: string }) => ({ cents: order.sku.length * 100 }),
 *       next: "priced",
 *     },
 *     priced: { kind: "end", outcome: "priced" },
 *   },
 * });
 * console.assert(orders.steps.price.kind === "task");
 * ```
 *
 * @module
 */

// Stages and the runner
export { nextEvent } from "./src/stage.ts";
export type {
  InputOf,
  MessageInfo,
  OutputEvent,
  Stage,
  StageContext,
  StageInput,
} from "./src/stage.ts";
export { runStage } from "./src/runner.ts";
export type { RunStageOptions, StageRunner, StageStats } from "./src/runner.ts";
export type { FaultConfig } from "./src/faults.ts";

// Events and schemas
export { createEvent, deterministicId } from "./src/events.ts";
export type { NewEvent } from "./src/events.ts";
export {
  isEntryEvent,
  registeredSchemas,
  registerEvents,
  validateDocument,
  validateEvent,
} from "./src/schemas.ts";
export type {
  AnyEvent,
  DocumentMap,
  EventCatalog,
  EventEnvelope,
  EventMap,
} from "./src/schemas.ts";
export type * from "./src/events.gen.ts";
export * from "./src/subjects.ts";

// State
export { readState, runStateWriter } from "./src/state_writer.ts";
export type { StateSpec, StateWriter } from "./src/state_writer.ts";

// Analysis and routing
export type * from "./src/ai/analysis.ts";
export type { AnalyzerConfig } from "./src/ai/configured_analyzers.ts";
export type { LlmCounter, LlmStats, LlmStatsSnapshot } from "./src/ai/llm/stats.ts";
export type { LlmUsage } from "./src/ai/llm/errors.ts";
export { sentimentAnalyzer, topicsAnalyzer, toxicityAnalyzer } from "./src/ai/analyzers/mod.ts";
export type {
  EmbeddedSentimentAnalyzer,
  EmbeddedTopicsAnalyzer,
  EmbeddedToxicityAnalyzer,
  SentimentLexicon,
  SentimentOptions,
  Taxonomy,
  TaxonomyLabel,
  TaxonomyPattern,
  TopicsOptions,
  ToxicityOptions,
} from "./src/ai/analyzers/mod.ts";

// Gateway
export { createApp } from "./src/gateway/app.ts";
export type { GatewayContext, GatewayDeps, GatewayExtension } from "./src/gateway/app.ts";
export type { Auth, Principal } from "./src/gateway/auth.ts";
export type { ScheduleEntry, ScheduleStore } from "./src/scheduler/store.ts";

// Errors, configuration, logging, infrastructure
export {
  ConfigError,
  ErrorCode,
  NotFoundError,
  PermanentError,
  toDeadLetterReason,
  toProblem,
  ValidationError,
  WeftError,
} from "./src/errors.ts";
export type { Problem } from "./src/errors.ts";
export {
  AnalyzerKind,
  describeConfig,
  ENV_PERMISSION,
  envNames,
  loadConfig,
} from "./src/config.ts";
export type { ApiKey, Config, ConfigSource, LogLevel, LogLevelName, Role } from "./src/config.ts";
export { createLogger } from "./src/observability/log.ts";
export type { LogFields, Logger, LogSink } from "./src/observability/log.ts";
export { connectNats } from "./src/nats.ts";
export { ensureTopology } from "./src/topology.ts";
export type { TopologyConfig } from "./src/topology.ts";
export { WeftMetrics } from "./src/observability/metrics.ts";
export type { MetricsJson } from "./src/observability/metrics.ts";
export { freePort, NatsServerMissingError, startNatsServer } from "./src/nats_server.ts";
export type { NatsServer, NatsServerOptions } from "./src/nats_server.ts";
export { childContext, formatTraceparent, parseTraceparent } from "./src/observability/trace.ts";
export type { TraceContext } from "./src/observability/trace.ts";
export { retryDelay } from "./src/retry.ts";

/**
 * Pipelines as code: {@link definePipeline} checks a definition and pins it to a hash; list
 * its file in pipelines/run.json and `deno task start` runs it (docs/PIPELINES.md). The
 * derivations give its subjects, consumers, permissions and graph;
 * {@link foldPipelineEvents} folds an item's events into its state; {@link compileFlow}
 * and {@link completion} are how a run moves, as pure functions. Types follow from the
 * schemas: `Infer<typeof schema>` is the type a schema describes, and a task's handler that
 * returns what its `output` schema does not describe does not compile ({@link TypedSteps}).
 * Handlers given apart, as `definePipeline`'s second argument ({@link Handlers}), are typed
 * without annotations, and mix with handlers in the literal, annotated or not.
 *
 * @example
 * ```ts
 * import { definePipeline, stepConsumers } from "./mod.ts";
 * const p = definePipeline({
 *   name: "echo",
 *   input: { schema: { type: "object" } },
 *   start: "echo",
 *   steps: {
 *     echo: { kind: "task", output: { type: "object" }, handle: (x) => x, next: "done" },
 *     done: { kind: "end", outcome: "done" },
 *   },
 * });
 * console.log(stepConsumers(p, { ackWaitMs: 30_000, maxAttempts: 5 })[0]?.filter_subject);
 * // "echo.submitted.*"
 * ```
 */
export { canonicalSpec, definePipeline, definitionHash } from "./src/pipeline/definition.ts";
export type {
  AgentAction,
  AgentStep,
  AgentTurn,
  DelayStep,
  EndStep,
  FlowControl,
  Handlers,
  Infer,
  JoinStep,
  JsonSchema,
  LlmStep,
  LoopSpec,
  NetHosts,
  Next,
  PipelineDefinition,
  PipelineSpec,
  RouterStep,
  ScratchEntry,
  StepContext,
  StepSpec,
  TaskStep,
  ToolContext,
  ToolSpec,
  TypedSteps,
  ValueOf,
  WaitStep,
} from "./src/pipeline/definition.ts";
export {
  DefinitionProblem,
  PipelineDefinitionError,
  validatePipeline,
} from "./src/pipeline/validate.ts";
export {
  durableOf,
  pipelineGraph,
  pipelineSubjects,
  stepConsumers,
  stepFilterSubject,
  stepInput,
  stepPermissions,
  stepPublishes,
} from "./src/pipeline/derive.ts";
export type {
  ConsumerSettings,
  DerivedConsumer,
  PipelineGraph,
  PipelineSubjects,
  StepInput,
  StepPermissions,
} from "./src/pipeline/derive.ts";
export { applyPipelineEvent, foldPipelineEvents } from "./src/pipeline/fold.ts";
export type { FoldEvent, ItemState } from "./src/pipeline/fold.ts";
export {
  advance,
  compileFlow,
  completion,
  entryData,
  flowEvent,
  targetsOf,
} from "./src/pipeline/flow.ts";
export type { Flow, FlowData, FlowEvent } from "./src/pipeline/flow.ts";

// Live shadows (docs/SHADOW.md): a candidate version of a step beside production.
export { parseShadowSpec } from "./src/shadow/spec.ts";
export type { ShadowCandidate, ShadowLimits, ShadowSpec, StepVersion } from "./src/shadow/spec.ts";
export { createShadowControl } from "./src/shadow/control.ts";
export type { ListedShadow, ShadowControl } from "./src/shadow/control.ts";
