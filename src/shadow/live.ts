/**
 * Live shadow: a candidate version of a running pipeline's step that sees the same input
 * as production, on its own durable consumer (`shadow_<id>`, starting at attach time), and
 * publishes only on `shadow.<pipeline>.<step>.<item_id>` (the SHADOW stream). For each item
 * it runs the candidate's version of the step's handler, then waits (bounded) for
 * production's own output for the item and compares them field by field: agreement, a
 * confusion matrix and Cohen's kappa per field, read by /metrics and the dashboard.
 *
 * It cannot starve production, and what it costs is bounded: it takes no message from
 * production's consumers, runs in its own process (services/shadow.ts) and NATS identity,
 * takes at most `limits.rps` items per second and `limits.concurrency` at once (the flow-control limiter of definitions' steps),
 * spends at most `limits.budgetUsd` on LLM calls (the LLM client's budget, no fallback:
 * over budget means no decision), never retries, never dead-letters and never fails an
 * item. Killed, it leaves only its consumer's backlog behind (event streams have limits
 * retention: an unread consumer holds nothing up).
 *
 * @module
 */
import {
  AckPolicy,
  type ConsumerMessages,
  DeliverPolicy,
  jetstream,
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamManager,
  jetstreamManager,
  type JsMsg,
} from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/nats-core";
import { type KV, Kvm } from "@nats-io/kv";
import * as client from "../observability/prom.ts";
import type { Config } from "../config.ts";
import { ConfigError, ErrorCode, errorCode, ValidationError, WeftError } from "../errors.ts";
import { pipelineStreamOf, stepFilterSubject } from "../pipeline/derive.ts";
import {
  candidateDefinitionFile,
  type LoadedPipeline,
  loadPipelines,
  workStage,
} from "../pipeline/runtime.ts";
import { eventOf } from "../pipeline/validate.ts";
import { LlmError } from "../ai/llm/errors.ts";
import {
  createLlmStats,
  type LlmCounter,
  type LlmStats,
  type LlmStatsSnapshot,
} from "../ai/llm/stats.ts";
import { createBudget } from "../ai/llm/budget.ts";
import type { AnalyzerConfig } from "../ai/configured_analyzers.ts";
import type { Logger } from "../observability/log.ts";
import { createStepLimiter } from "../pipeline/flow_control.ts";
import {
  assertMatchesSubject,
  decodeJson,
  messagesOn,
  storedMessage,
  validateInput,
} from "../runner.ts";
import {
  candidateConfig,
  candidateName,
  sampled,
  shadowDurable,
  type ShadowSpec,
  shadowSubject,
  shippedShadowSteps,
} from "./spec.ts";
import { agreementOf, type FieldAgreement } from "../ai/agreement.ts";
import { readStream } from "../stream_reader.ts";
import type { OutputEvent, Stage, StageInput } from "../stage.ts";
import { SHIPPED_SHADOW_STEPS } from "../../pipelines/shipped_shadows.ts";
import { eventSubject, SHADOW_STREAM, SHADOW_TALLY_BUCKET } from "../subjects.ts";

/** How a step is shadowed: what it consumes, what production emits, which fields compare. */
export interface ShadowStepDef {
  /** The stream production's step reads. */
  stream: string;
  /** Its consumer's filter: the shadow's too. */
  filterSubject: string;
  /** The event type production's step emits for an item (compared with the candidate's). */
  output: string;
  /**
   * The compared fields of an output event's `data`. `bounded` fields have a few labels
   * (a confusion matrix is exported per label pair); others only agree or not.
   */
  fields(data: Record<string, unknown>): Record<string, string>;
  /** Fields whose labels are few enough to export as a confusion matrix. */
  bounded: readonly string[];
  /**
   * The candidate's version of the step, built from the candidate's analyzer configuration
   * (production's with what the candidate changes), with its LLM counters when it calls one.
   */
  // deno-lint-ignore no-explicit-any
  candidate(config: AnalyzerConfig): Promise<{ stage: Stage<any>; llmStats?: LlmStats }>;
}

/** Whether `pipeline` is a shipped (hand-wired) pipeline with shadowable steps. */
function isShipped(pipeline: string): boolean {
  return shippedShadowSteps(pipeline) !== undefined;
}

/** The shadowable step of a shipped pipeline that `spec` names. */
export function shadowStep(spec: Pick<ShadowSpec, "pipeline" | "step">): ShadowStepDef {
  const def = isShipped(spec.pipeline)
    ? SHIPPED_SHADOW_STEPS[spec.pipeline]![spec.step]
    : undefined;
  if (!def) throw new Error(`no shadowable step ${spec.pipeline}.${spec.step}`);
  return def;
}

/** The stream a shadow's step reads: its shipped step's, or its definition's pipeline's. */
export function shadowStream(spec: Pick<ShadowSpec, "pipeline" | "step">): string {
  return isShipped(spec.pipeline) ? shadowStep(spec).stream : pipelineStreamOf(spec.pipeline);
}

/** Whether a field's labels are few enough for a confusion matrix in the metrics. */
export function boundedField(spec: Pick<ShadowSpec, "pipeline" | "step">, field: string): boolean {
  return isShipped(spec.pipeline)
    ? (SHIPPED_SHADOW_STEPS[spec.pipeline]![spec.step]?.bounded ?? []).includes(field)
    // A definition step's result: its top-level values, not the whole result.
    : field !== "result";
}

/** What a running shadow works with: its step resolved, its candidate built. */
export interface ShadowTarget {
  stream: string;
  filterSubject: string;
  /** The event type production's step emits for an item. */
  output: string;
  fields(data: Record<string, unknown>): Record<string, string>;
  /** How many values of an output `fields` left out (past {@link MAX_FIELDS}). */
  dropped?(data: Record<string, unknown>): number;
  // deno-lint-ignore no-explicit-any
  stage: Stage<any>;
  /** The candidate's name, as published and in the metrics. */
  candidate: string;
  llm?: LlmStats;
}

/** JSON with sorted keys: equal values, equal strings. */
function stableJson(v: unknown): string {
  if (v === null || typeof v !== "object") return JSON.stringify(v) ?? "null";
  if (Array.isArray(v)) return `[${v.map(stableJson).join(",")}]`;
  return `{${
    Object.keys(v).sort().map((k) =>
      `${JSON.stringify(k)}:${stableJson((v as Record<string, unknown>)[k])}`
    ).join(",")
  }}`;
}

/**
 * Most fields a shadow compares: the whole result and 15 top-level values of a definition's
 * step (by name); a shadow's tally keeps at most as many, counting the rest as dropped.
 */
export const MAX_FIELDS = 16;
/** A compared field's name is cut to this many characters (label values to 100). */
export const MAX_FIELD_NAME = 64;

/**
 * The compared fields of a definition step's result: the whole result (`result`), and each
 * of its top-level values that is a string, number or boolean (a router's `label`): the first
 * {@link MAX_FIELDS} - 1 by name, names cut to {@link MAX_FIELD_NAME} characters, values to 100.
 */
export function resultFields(result: unknown): Record<string, string> {
  return resultFieldsOf(result).fields;
}

/** {@link resultFields}, and how many further values it left out. */
function resultFieldsOf(result: unknown): { fields: Record<string, string>; dropped: number } {
  const fields: Record<string, string> = { result: stableJson(result).slice(0, 500) };
  let n = 1, dropped = 0;
  if (result !== null && typeof result === "object" && !Array.isArray(result)) {
    for (const k of Object.keys(result).sort()) {
      const v = (result as Record<string, unknown>)[k];
      const name = k.slice(0, MAX_FIELD_NAME);
      if (
        name !== "result" && !(name in fields) &&
        (typeof v === "string" || typeof v === "number" || typeof v === "boolean")
      ) {
        if (n >= MAX_FIELDS) {
          dropped++;
          continue;
        }
        fields[name] = String(v).slice(0, 100);
        n++;
      }
    }
  }
  return { fields, dropped };
}

/**
 * Resolves a shadow: its step (a shipped pipeline's, or a work step of a running definition)
 * and its candidate (analyzers, or the step of another version of the definition).
 */
export async function resolveShadowTarget(
  spec: ShadowSpec,
  config: Config,
  ctx: { nc: NatsConnection; pipelines?: readonly LoadedPipeline[]; root?: string },
): Promise<ShadowTarget> {
  if (isShipped(spec.pipeline)) {
    const step = shadowStep(spec);
    const candidate = await step.candidate(
      candidateConfig(config, spec, { fallback: false, budgetUsd: spec.limits.budgetUsd }),
    );
    return {
      stream: step.stream,
      filterSubject: step.filterSubject,
      output: step.output,
      fields: step.fields,
      stage: candidate.stage,
      // The model production's configuration gives, when the candidate names none.
      candidate: candidateName({
        ...spec.candidate,
        ...(spec.candidate.analyzers === "llm" && !spec.candidate.model && config.llmModel
          ? { model: config.llmModel }
          : {}),
      }),
      ...(candidate.llmStats ? { llm: candidate.llmStats } : {}),
    };
  }
  const pipelines = ctx.pipelines ?? [];
  const prod = pipelines.find((p) => p.def.name === spec.pipeline);
  if (!prod) throw new ConfigError(`no running pipeline ${spec.pipeline}`);
  // Work steps; an agent's copy reads its item's scratchpad as it was and appends nothing.
  const shadowable = (def: LoadedPipeline["def"]) =>
    def.steps[spec.step] !== undefined && stepFilterSubject(def, spec.step) !== null;
  if (!shadowable(prod.def)) {
    throw new ConfigError(`${spec.pipeline}.${spec.step} is not a task, llm, router or agent step`);
  }
  // Beside production's definition of the same pipeline, as the attach checked.
  const file = candidateDefinitionFile(
    spec.candidate.definition!,
    pipelines.filter((p) => p.def.name === spec.pipeline),
    ctx.root ?? "",
  );
  const cand = (await loadPipelines([file])).find((p) => p.def.name === spec.pipeline);
  if (!cand || !shadowable(cand.def)) {
    throw new ConfigError(`${file} defines no step ${spec.step} of pipeline ${spec.pipeline}`);
  }
  const id = spec.step;
  // A candidate step that calls the model (llm, agent, router with a prompt) spends its own
  // budget at the mesh's prices, counted in its figures, as an analyzers candidate does.
  const candStep = cand.def.steps[id]!;
  const callsModel = !!config.llmBaseUrl &&
    (candStep.kind === "llm" || candStep.kind === "agent" ||
      (candStep.kind === "router" && candStep.prompt !== undefined));
  const llmStats = callsModel ? createLlmStats() : undefined;
  return {
    stream: pipelineStreamOf(spec.pipeline),
    // Production's filter: the candidate sees what production's step sees.
    filterSubject: stepFilterSubject(prod.def, id)!,
    output: `${spec.pipeline}.${eventOf(id, prod.def.steps[id]!)}`,
    fields: (data) => resultFields((data as { results?: Record<string, unknown> }).results?.[id]),
    dropped: (data) =>
      resultFieldsOf((data as { results?: Record<string, unknown> }).results?.[id]).dropped,
    stage: workStage(cand, id, {
      nc: ctx.nc,
      shadow: true,
      ...(config.llmBaseUrl
        ? {
          llm: {
            baseUrl: config.llmBaseUrl,
            apiKey: config.llmApiKey,
            model: config.llmModel,
            timeoutMs: config.llmTimeoutMs,
            concurrency: spec.limits.concurrency,
            pricing: { inputPer1k: config.llmPriceInPer1k, outputPer1k: config.llmPriceOutPer1k },
            ...(spec.limits.budgetUsd > 0
              ? { budget: createBudget({ maxCostUsd: spec.limits.budgetUsd }) }
              : {}),
            ...(llmStats ? { stats: llmStats } : {}),
          },
        }
        : {}),
    }),
    candidate: candidateName(spec.candidate),
    ...(llmStats ? { llm: llmStats } : {}),
  };
}

/** One field's comparison so far. */
export interface FieldTally {
  /** Items compared. */
  n: number;
  /** Items on which candidate and production agree. */
  same: number;
  /** Rows: production's label; columns: the candidate's. */
  confusion: Map<string, Map<string, number>>;
}

/** The agreement figures of one field. */
export interface FieldFigures {
  compared: number;
  agreement: number;
  kappa: number;
}

/** Cohen's kappa of a confusion matrix (rows production, columns candidate). */
export function kappaOf(t: FieldTally): number {
  if (t.n === 0) return 0;
  const po = t.same / t.n;
  const cols = new Map<string, number>();
  for (const row of t.confusion.values()) {
    for (const [c, k] of row) cols.set(c, (cols.get(c) ?? 0) + k);
  }
  let pe = 0;
  for (const [r, row] of t.confusion) {
    let rowSum = 0;
    for (const k of row.values()) rowSum += k;
    pe += (rowSum / t.n) * ((cols.get(r) ?? 0) / t.n);
  }
  return pe === 1 ? (po === 1 ? 1 : 0) : (po - pe) / (1 - pe);
}

/** Distinct labels a field's confusion matrix keeps; further ones count as `other`. */
const MAX_LABELS = 32;

/** A running shadow's live counters. */
export class ShadowTally {
  /** Items decided, failed, over budget, sampled out, compared, never matched. */
  readonly counts: Record<
    "decided" | "failed" | "over_budget" | "skipped" | "compared" | "unmatched" | "publish_failed",
    number
  > = {
    decided: 0,
    failed: 0,
    over_budget: 0,
    skipped: 0,
    compared: 0,
    unmatched: 0,
    publish_failed: 0,
  };
  /** Per field (at most {@link MAX_FIELDS}). */
  readonly fields: Map<string, FieldTally> = new Map();
  /** Comparisons of fields past {@link MAX_FIELDS}, not kept. */
  fieldsDropped = 0;
  /** Whether the shadow runs (false: it failed to start; `error` says why). */
  up = false;
  /** Why it is not up. */
  error?: string;
  /** Sum of candidate handler seconds, and their count. */
  seconds = 0;
  /** LLM counters of the candidate, when it calls one. */
  llm?: LlmStats;

  /** The candidate's name (with its model once known: see {@link runShadow}). */
  candidate: string;

  constructor(readonly spec: ShadowSpec) {
    this.candidate = candidateName(spec.candidate);
  }

  /** Records one item's comparison. */
  record(production: Record<string, string>, candidate: Record<string, string>): void {
    this.counts.compared++;
    for (const [name, p] of Object.entries(production)) {
      const field = name.slice(0, MAX_FIELD_NAME);
      const c = candidate[name] ?? "none";
      let t = this.fields.get(field);
      if (!t) {
        // Bounded: a step whose results carry ever new keys would grow the tally, the
        // metrics and the status without end (and past NATS's max_payload).
        if (this.fields.size >= MAX_FIELDS) {
          this.fieldsDropped++;
          continue;
        }
        this.fields.set(field, t = { n: 0, same: 0, confusion: new Map() });
      }
      t.n++;
      if (p === c) t.same++;
      const rowKey = t.confusion.has(p) || t.confusion.size < MAX_LABELS ? p : "other";
      const row = t.confusion.get(rowKey) ??
        (t.confusion.set(rowKey, new Map()).get(rowKey)!);
      const colKey = row.has(c) || row.size < MAX_LABELS ? c : "other";
      row.set(colKey, (row.get(colKey) ?? 0) + 1);
    }
  }

  /** Agreement and kappa per field. */
  figures(): Record<string, FieldFigures> {
    const out: Record<string, FieldFigures> = {};
    for (const [field, t] of this.fields) {
      out[field] = { compared: t.n, agreement: t.n ? t.same / t.n : 0, kappa: kappaOf(t) };
    }
    return out;
  }
}

/**
 * Exposes the shadows' tallies as metrics of `registry`, read when scraped (a detached
 * shadow's series disappear with it):
 * `weft_shadow_up`, `weft_shadow_items_total{outcome}`, `weft_shadow_agreement_ratio`,
 * `weft_shadow_kappa`, `weft_shadow_compared_total{production,candidate}` (the confusion
 * matrix of bounded fields), `weft_shadow_handler_seconds_total`, and the candidate's
 * LLM spend `weft_shadow_llm_cost_usd_total`, `weft_shadow_llm_tokens_total`.
 *
 * @example
 * ```ts
 * import { WeftMetrics } from "../observability/metrics.ts";
 * import { registerShadowMetrics } from "./live.ts";
 * registerShadowMetrics(new WeftMetrics().registry, () => []);
 * ```
 */
export function registerShadowMetrics(
  registry: client.Registry,
  tallies: () => Iterable<ShadowTally>,
): void {
  const registers = [registry];
  const base = (t: ShadowTally) => ({
    shadow: t.spec.id,
    pipeline: t.spec.pipeline,
    step: t.spec.step,
  });
  new client.Gauge({
    name: "weft_shadow_up",
    help: "1 while a live shadow runs, 0 when it failed to start (see the shadow's log)",
    labelNames: ["shadow", "pipeline", "step", "candidate"],
    registers,
    collect() {
      this.reset();
      for (const t of tallies()) this.set({ ...base(t), candidate: t.candidate }, t.up ? 1 : 0);
    },
  });
  new client.Counter({
    name: "weft_shadow_items_total",
    help: "Items a live shadow saw, by outcome (decided, compared, unmatched: production's " +
      "output never came; failed, over_budget, skipped: sampled out, publish_failed)",
    labelNames: ["shadow", "pipeline", "step", "outcome"],
    registers,
    collect() {
      this.reset();
      for (const t of tallies()) {
        for (const [outcome, n] of Object.entries(t.counts)) this.inc({ ...base(t), outcome }, n);
      }
    },
  });
  // Per-field figures: the share of items on which candidate and production agree, and kappa.
  for (
    const [name, help, figure] of [
      [
        "weft_shadow_agreement_ratio",
        "Share of compared items on which a live shadow's candidate agrees with production",
        "agreement",
      ],
      [
        "weft_shadow_kappa",
        "Cohen's kappa of a live shadow's candidate against production, per field",
        "kappa",
      ],
    ] as const
  ) {
    new client.Gauge({
      name,
      help,
      labelNames: ["shadow", "pipeline", "step", "field"],
      registers,
      collect() {
        this.reset();
        for (const t of tallies()) {
          for (const [field, f] of Object.entries(t.figures())) {
            this.set({ ...base(t), field }, f[figure]);
          }
        }
      },
    });
  }
  new client.Counter({
    name: "weft_shadow_compared_total",
    help: "Items compared, by production's label and the candidate's (the confusion matrix)",
    labelNames: ["shadow", "pipeline", "step", "field", "production", "candidate"],
    registers,
    collect() {
      this.reset();
      for (const t of tallies()) {
        for (const [field, ft] of t.fields) {
          if (!boundedField(t.spec, field)) continue;
          for (const [p, row] of ft.confusion) {
            for (const [c, n] of row) {
              this.inc({ ...base(t), field, production: p, candidate: c }, n);
            }
          }
        }
      }
    },
  });
  new client.Counter({
    name: "weft_shadow_handler_seconds_total",
    help: "Time a live shadow's candidate spent deciding, seconds",
    labelNames: ["shadow", "pipeline", "step"],
    registers,
    collect() {
      this.reset();
      for (const t of tallies()) this.inc(base(t), t.seconds);
    },
  });
  new client.Counter({
    name: "weft_shadow_llm_cost_usd_total",
    help: "Estimated LLM cost of a live shadow's candidate, USD",
    labelNames: ["shadow", "pipeline", "step"],
    registers,
    collect() {
      this.reset();
      for (const t of tallies()) if (t.llm) this.inc(base(t), t.llm.snapshot().cost_usd);
    },
  });
  new client.Counter({
    name: "weft_shadow_llm_tokens_total",
    help: "LLM tokens a live shadow's candidate spent",
    labelNames: ["shadow", "pipeline", "step"],
    registers,
    collect() {
      this.reset();
      for (const t of tallies()) if (t.llm) this.inc(base(t), t.llm.snapshot().total_tokens);
    },
  });
}

/** What a shadow publishes about each item, on `shadow.<pipeline>.<step>.<item_id>`. */
export interface ShadowDecision {
  shadow: string;
  /** When the shadow was attached over the API: an id attached again is another shadow. */
  attached_at?: string;
  pipeline: string;
  step: string;
  item_id: string;
  candidate: string;
  /** When the candidate decided (ISO 8601). */
  time: string;
  /** The input's sequence in production's stream. */
  input_seq: number;
  /** The candidate's handler time, ms. */
  ms: number;
  /** The candidate's compared fields. */
  decision: Record<string, string>;
  /** Production's, or null when its output did not come within the wait. */
  production: Record<string, string> | null;
  /** Per field, whether they agree (absent without production's). */
  agrees?: Record<string, boolean>;
  /** The event the candidate's step would have published. */
  event: OutputEvent;
}

/** A running shadow. */
export interface ShadowRunner {
  readonly tally: ShadowTally;
  /** Stops taking items, finishes (or abandons, past the drain deadline) what is in flight. */
  stop(): Promise<void>;
  /** Resolves when it has stopped. */
  readonly done: Promise<void>;
}

/** What {@link runShadow} needs. */
export interface RunShadowOptions {
  nc: NatsConnection;
  spec: ShadowSpec;
  /** Production's settings: the candidate differs only where its spec says. */
  config: Config;
  log: Logger;
  /** Where its counters go (created when absent). */
  tally?: ShadowTally;
  /** How long to wait for production's output of an item, ms. Default 30 s. */
  matchWaitMs?: number;
  /** The running definitions (to shadow one of their steps). */
  pipelines?: readonly LoadedPipeline[];
  /** Where relative definition paths start: the repository root. */
  root?: string;
}

/** The message id of a shadow's decision about the input at `seq`: published once. */
function decisionId(shadow: string, seq: number): string {
  return `${shadow}-${seq}`;
}

/**
 * Counts the decisions a shadow already published (the SHADOW stream keeps them for a
 * day) into its tally, so its figures go on across a restart of the shadow service. Only
 * this shadow's, since it was attached, by the same candidate.
 */
export async function restoreTally(
  js: ReturnType<typeof jetstream>,
  jsm: JetStreamManager,
  spec: ShadowSpec,
  tally: ShadowTally,
): Promise<number> {
  const filter = shadowSubject(spec.pipeline, spec.step, "*");
  const info = await jsm.streams.info(SHADOW_STREAM, { subjects_filter: filter });
  if (info.state.messages === 0) return 0;
  let restored = 0;
  // (readStream deletes its consumer when the read ends: nothing is left on the server.)
  for await (
    const m of readStream(js, SHADOW_STREAM, {
      filter,
      ...(spec.attached_at ? { startTime: new Date(spec.attached_at) } : {}),
    })
  ) {
    try {
      const d = m.json<ShadowDecision>();
      if (
        d.shadow === spec.id && d.candidate === tally.candidate &&
        (d.attached_at === undefined || d.attached_at === spec.attached_at)
      ) {
        tally.counts.decided++;
        if (d.production) tally.record(d.production, d.decision);
        else tally.counts.unmatched++;
        restored++;
      }
    } catch { /* not a decision: skip */ }
  }
  return restored;
}

/**
 * What a shadow's decisions do not hold, kept in the tally bucket as it goes: failures,
 * items over budget, sampled out or not published, handler time, and the candidate's LLM
 * counters (its spend, which its budget goes on from after a restart).
 */
export interface TallyCheckpoint {
  /** Which attachment it counts (see {@link tallyMark}): another one starts from zero. */
  mark: string;
  counts: Pick<ShadowTally["counts"], "failed" | "over_budget" | "skipped" | "publish_failed">;
  seconds: number;
  llm?: LlmStatsSnapshot;
}

/** The attachment a checkpoint belongs to: when attached, the candidate, its limits. */
export function tallyMark(spec: ShadowSpec): string {
  return JSON.stringify([spec.attached_at ?? null, spec.candidate, spec.limits]);
}

/** Adds a checkpoint's counters into `tally` (its LLM counters into `tally.llm`). */
function restoreCheckpoint(tally: ShadowTally, saved: TallyCheckpoint): void {
  for (const [k, v] of Object.entries(saved.counts)) {
    tally.counts[k as keyof TallyCheckpoint["counts"]] += Number(v) || 0;
  }
  tally.seconds += saved.seconds || 0;
  if (tally.llm && saved.llm) {
    const { prompt_tokens, completion_tokens, total_tokens, cost_usd, ...counters } = saved.llm;
    for (const [k, v] of Object.entries(counters)) tally.llm.count(k as LlmCounter, v);
    tally.llm.addUsage({ prompt_tokens, completion_tokens, total_tokens, cost_usd });
  }
}

/** A candidate call's deadline when the configuration names none (`WEFT_HANDLER_TIMEOUT_MS`). */
const DEFAULT_CALL_TIMEOUT_MS = 300_000;
/** How long after deciding a shadow first looks for production's output, ms. */
const FIRST_LOOK_MS = 100;
/** How long a shadow waits for production's output of an item, ms. */
export const MATCH_WAIT_MS = 30_000;
/** A shadow's ack wait beyond its rate wait, ms; it sends in-progress acks at a third of it. */
const ACK_WAIT_MS = 6_000;

/**
 * Creates the shadow's durable consumer unless it exists: new messages only, from now, or from
 * stream sequence `fromSeq` (a consumer made again after it was deleted under a running
 * shadow, from just after the last message it was given). True when it made one.
 */
export async function ensureShadowConsumer(
  jsm: JetStreamManager,
  spec: ShadowSpec,
  step: Pick<ShadowTarget, "stream" | "filterSubject">,
  fromSeq?: number,
): Promise<boolean> {
  const durable = shadowDurable(spec.id);
  // The attachment it belongs to: a shadow attached again under the same id (detached while
  // the shadow service was down) starts from zero, not from the earlier one's backlog.
  const attachment = spec.attached_at ? `, attached ${spec.attached_at}` : "";
  const description = `Weft live shadow ${spec.id} of ${spec.pipeline}.${spec.step}${attachment}`;
  try {
    const info = await jsm.consumers.info(step.stream, durable);
    const was = /, attached (\S+)$/.exec(info.config.description ?? "")?.[1];
    // (One made before consumers named their attachment is taken as this one's.)
    const same = was === undefined || was === spec.attached_at;
    if (info.config.filter_subject === step.filterSubject && same) return false;
    // Another step or another attachment under the same id: start over.
    await jsm.consumers.delete(step.stream, durable);
  } catch (err) {
    if (!(err instanceof JetStreamApiError && err.code === JetStreamApiCodes.ConsumerNotFound)) {
      throw err;
    }
  }
  // An item waits at most `concurrency / rps` seconds for a rate token; while it then waits
  // for production's output, the shadow keeps its lease with in-progress acks. A short ack
  // wait: a killed shadow's items come back soon after it restarts.
  const waitMs = Math.ceil((2 * spec.limits.concurrency / spec.limits.rps) * 1000);
  await jsm.consumers.add(step.stream, {
    durable_name: durable,
    description,
    filter_subject: step.filterSubject,
    ack_policy: AckPolicy.Explicit,
    ...(fromSeq === undefined
      ? { deliver_policy: DeliverPolicy.New }
      : { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: fromSeq }),
    ack_wait: (waitMs + ACK_WAIT_MS) * 1_000_000,
    max_deliver: 3,
    max_ack_pending: Math.max(2 * spec.limits.concurrency, 16),
  });
  return true;
}

/** Deletes a shadow's consumer; true if there was one. */
export async function deleteShadowConsumer(
  jsm: JetStreamManager,
  spec: Pick<ShadowSpec, "id" | "pipeline" | "step">,
): Promise<boolean> {
  try {
    return await jsm.consumers.delete(shadowStream(spec), shadowDurable(spec.id));
  } catch (err) {
    if (err instanceof JetStreamApiError && err.code === JetStreamApiCodes.ConsumerNotFound) {
      return false;
    }
    throw err;
  }
}

const encoder = new TextEncoder();
const delay = (ms: number, signal: AbortSignal) =>
  new Promise<void>((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done, { once: true });
  });

/** An input message of the step, decoded: what the candidate's step is handed. */
interface ShadowInput {
  m: JsMsg;
  input: { id: string; type: string; item_id: string };
  message: { subject: string; seq: number; storedAt: number; deliveryCount: number };
}

/**
 * Decodes one message of the step's filter as the candidate's step would: undefined when the
 * message is not for the step (a definition's own decoding skips it, e.g. a join's other
 * inputs, a router's events that are not its input), so it is neither sampled, nor rate
 * limited, nor counted. Throws on input the step would refuse.
 */
function inputOf(step: ShadowTarget, m: JsMsg): ShadowInput | undefined {
  const stage = step.stage as Stage<StageInput>;
  const raw = decodeJson(m.data);
  const message = {
    subject: m.subject,
    seq: m.seq,
    storedAt: m.time.getTime(),
    deliveryCount: m.info.deliveryCount,
  };
  if (stage.decode) {
    const decoded = stage.decode(raw, message) as ShadowInput["input"] | undefined;
    return decoded === undefined ? undefined : { m, input: decoded, message };
  }
  const input = validateInput(stage.input, raw) as ShadowInput["input"];
  assertMatchesSubject(input, m.subject);
  return { m, input, message };
}

/** A candidate's call that did not answer within its deadline (`WEFT_HANDLER_TIMEOUT_MS`). */
export class CandidateTimeoutError extends WeftError {
  /** The deadline it passed, ms. */
  readonly timeoutMs: number;

  constructor(timeoutMs: number) {
    super(
      ErrorCode.HandlerFailed,
      `the candidate did not answer within ${timeoutMs} ms (WEFT_HANDLER_TIMEOUT_MS)`,
    );
    this.name = "CandidateTimeoutError";
    this.timeoutMs = timeoutMs;
  }
}

/**
 * The candidate's decision on one input of its step: the item, the event the candidate's
 * step would publish, and its handler time (ms). Throws what the handler throws, and when
 * it emits no event of production's type. The call is bounded: past `timeoutMs` its signal
 * aborts and it fails with {@link CandidateTimeoutError}; `signal` aborting (the shadow
 * stopping) fails it at once. Either way the handler's promise is left behind, so a handler
 * that never answers (and ignores its signal) holds neither the shadow nor its stop.
 */
async function decideOnce(
  step: ShadowTarget,
  { input, message }: ShadowInput,
  source: string,
  signal: AbortSignal,
  timeoutMs: number,
): Promise<{ itemId: string; event: OutputEvent; ms: number }> {
  const stage = step.stage as Stage<StageInput>;
  const started = performance.now();
  const call = new AbortController();
  const { promise: given, reject } = Promise.withResolvers<never>();
  const stop = () => {
    call.abort(signal.reason);
    reject(signal.reason ?? new Error("the shadow stopped"));
  };
  const timer = setTimeout(() => {
    const err = new CandidateTimeoutError(timeoutMs);
    call.abort(err);
    reject(err);
  }, timeoutMs);
  if (signal.aborted) stop();
  else signal.addEventListener("abort", stop, { once: true });
  let outputs: OutputEvent[];
  try {
    outputs = await Promise.race([
      Promise.resolve().then(() =>
        stage.handle(input as never, {
          source,
          message,
          now: () => new Date(),
          signal: call.signal,
        })
      ),
      given,
    ]);
  } finally {
    clearTimeout(timer);
    signal.removeEventListener("abort", stop);
  }
  const ms = performance.now() - started;
  const event = outputs.find((e) => e.type === step.output);
  if (!event) throw new Error(`the candidate emitted no ${step.output}`);
  return { itemId: input.item_id, event, ms };
}

/**
 * Production's stored output event for the input the candidate decided (its data), or null
 * when it has none yet. Output ids follow from the input event's, so the candidate's event
 * has the id of production's for the same input: a step that ran more than once for the
 * item (a loop, a router after an agent's hand-back) is compared run by run, not every run
 * with production's last.
 */
async function storedOutput(
  jsm: JetStreamManager,
  step: Pick<ShadowTarget, "stream" | "output">,
  itemId: string,
  eventId: string,
): Promise<Record<string, unknown> | null> {
  const subject = eventSubject(step.output, itemId);
  type Stored = { id?: string; data: Record<string, unknown> };
  const last = await storedMessage(jsm, step.stream, { last_by_subj: subject });
  if (!last) return null;
  if (last.json<Stored>().id === eventId) return last.json<Stored>().data;
  for await (
    const m of messagesOn(jsm, step.stream, subject, { before: last.seq, max: Infinity })
  ) {
    if (m.json<Stored>().id === eventId) return m.json<Stored>().data;
  }
  return null;
}

/** A decision as published (live) or reported (replay), compared with production's. */
function decisionOf(
  spec: Pick<ShadowSpec, "id" | "pipeline" | "step" | "attached_at">,
  candidate: string,
  input: { itemId: string; seq: number; time: Date; ms: number },
  decision: Record<string, string>,
  production: Record<string, string> | null,
  event: OutputEvent,
): ShadowDecision {
  return {
    shadow: spec.id,
    ...(spec.attached_at ? { attached_at: spec.attached_at } : {}),
    pipeline: spec.pipeline,
    step: spec.step,
    item_id: input.itemId,
    candidate,
    time: input.time.toISOString(),
    input_seq: input.seq,
    ms: Math.round(input.ms * 1000) / 1000,
    decision,
    production,
    ...(production
      ? {
        agrees: Object.fromEntries(
          Object.keys(production).map((f) => [f, production[f] === decision[f]]),
        ),
      }
      : {}),
    event,
  };
}

/**
 * Runs one live shadow until stopped.
 *
 * @example
 * ```ts ignore
 * const runner = await runShadow({ nc, spec: parseShadowSpec(json), config, log });
 * await runner.stop();
 * ```
 */
export async function runShadow(opts: RunShadowOptions): Promise<ShadowRunner> {
  const { nc, spec, config } = opts;
  const log = opts.log.with({ shadow: spec.id, step: `${spec.pipeline}.${spec.step}` });
  const tally = opts.tally ?? new ShadowTally(spec);
  const matchWaitMs = opts.matchWaitMs ?? MATCH_WAIT_MS;
  const callTimeoutMs = config.handlerTimeoutMs ?? DEFAULT_CALL_TIMEOUT_MS;
  // What it counted before a restart (of this attachment): its budget goes on from there.
  const mark = tallyMark(spec);
  const tallies: KV | undefined = await new Kvm(nc).open(SHADOW_TALLY_BUCKET).catch((err) => {
    log.warn("shadow tally bucket unavailable: figures restart from the decisions", { err });
    return undefined;
  });
  const saved = await tallies?.get(spec.id).then((e) => {
    const c = e?.operation === "PUT" ? e.json<TallyCheckpoint>() : undefined;
    return c?.mark === mark ? c : undefined;
  }).catch(() => undefined);
  const budget = spec.limits.budgetUsd;
  const spent = saved?.llm?.cost_usd ?? 0;
  const spentOut = budget > 0 && spent >= budget;
  const step = await resolveShadowTarget(
    budget > 0 && spent > 0 && !spentOut
      ? { ...spec, limits: { ...spec.limits, budgetUsd: budget - spent } }
      : spec,
    config,
    { nc, pipelines: opts.pipelines, root: opts.root },
  );
  if (step.llm) tally.llm = step.llm;
  if (saved) restoreCheckpoint(tally, saved);
  let lastSaved = "";
  const save = async () => {
    if (!tallies) return;
    const { failed, over_budget, skipped, publish_failed } = tally.counts;
    const body = JSON.stringify(
      {
        mark,
        counts: { failed, over_budget, skipped, publish_failed },
        seconds: tally.seconds,
        ...(tally.llm ? { llm: tally.llm.snapshot() } : {}),
      } satisfies TallyCheckpoint,
    );
    if (body === lastSaved) return;
    lastSaved = body;
    await tallies.put(spec.id, body).catch((err) =>
      log.debug("shadow tally not saved", { err: String(err) })
    );
  };
  tally.candidate = step.candidate;
  const js = jetstream(nc);
  const jsm = await jetstreamManager(nc);
  await restoreTally(js, jsm, spec, tally).catch((err) =>
    log.warn("shadow figures not restored", { err: String(err) })
  );
  await ensureShadowConsumer(jsm, spec, step);
  const consumer = await js.consumers.get(step.stream, shadowDurable(spec.id));
  const limiter = createStepLimiter({
    concurrency: { limit: spec.limits.concurrency },
    rateLimit: {
      limit: Math.max(1, spec.limits.rps),
      periodMs: 1000 * Math.max(1, spec.limits.rps) / spec.limits.rps,
    },
  });
  const abort = new AbortController();
  const inFlight = new Set<Promise<void>>();
  let messages: ConsumerMessages | undefined;
  let stopping = false;
  let stopped: Promise<void> | undefined;
  const source = `weft-shadow-${spec.id}`;

  /**
   * Production's output event for an item, waiting for it up to the deadline. Production
   * decides the item at the same time: the first look waits a moment, so it usually finds
   * it at once (one request per item on production's server, not several).
   */
  async function production(
    itemId: string,
    eventId: string,
  ): Promise<Record<string, unknown> | null> {
    const until = Date.now() + matchWaitMs;
    await delay(FIRST_LOOK_MS, abort.signal);
    for (let wait = 50; !abort.signal.aborted; wait = Math.min(1000, wait * 2)) {
      try {
        const found = await storedOutput(jsm, step, itemId, eventId);
        if (found) return found;
      } catch (err) {
        log.debug("production lookup failed", { err: String(err) });
      }
      if (Date.now() + wait > until) return null;
      await delay(wait, abort.signal);
    }
    return null;
  }

  /** Compares with production and publishes; false when stopped before it could. */
  async function compareAndPublish(
    m: JsMsg,
    itemId: string,
    event: OutputEvent,
    ms: number,
  ): Promise<boolean> {
    const decision = step.fields(event.data as Record<string, unknown>);
    const lease = setInterval(() => m.working(), ACK_WAIT_MS / 3);
    let prod: Record<string, unknown> | null;
    try {
      prod = await production(itemId, event.id);
    } finally {
      clearInterval(lease);
    }
    if (abort.signal.aborted && !prod) return false;
    const body = decisionOf(
      spec,
      tally.candidate,
      { itemId, seq: m.seq, time: new Date(), ms },
      decision,
      prod ? step.fields(prod) : null,
      event,
    );
    let duplicate = false;
    try {
      const ack = await js.publish(
        shadowSubject(spec.pipeline, spec.step, itemId),
        encoder.encode(JSON.stringify(body)),
        { msgID: decisionId(spec.id, m.seq) },
      );
      // Stored already: the item came again after a restart, and was counted (restored).
      duplicate = ack.duplicate;
    } catch (err) {
      tally.counts.publish_failed++;
      log.debug("shadow publish failed", { item_id: itemId, err: String(err) });
    }
    if (!duplicate) {
      if (prod) tally.fieldsDropped += step.dropped?.(prod) ?? 0;
      if (body.production) tally.record(body.production, decision);
      else tally.counts.unmatched++;
    }
    return true;
  }

  /** Counts a candidate's failure on `m` and terminates it (never retried). */
  function failed(m: JsMsg, err: unknown): void {
    const overBudget = err instanceof LlmError && err.code === "over_budget";
    if (overBudget) tally.counts.over_budget++;
    else tally.counts.failed++;
    // Never retried: a shadow's failure costs production nothing, and retrying costs it
    // the candidate's budget.
    m.term();
    log[overBudget ? "debug" : "warn"]("shadow decision failed", {
      // (The subject's last token: the item, as the input event itself says.)
      item_id: m.subject.split(".").pop(),
      code: errorCode(err),
      err: String(err),
    });
  }

  async function handle(given: ShadowInput, release: () => void): Promise<void> {
    try {
      await decide(given, release);
    } finally {
      // An LLM candidate's spend is saved as soon as it changes, before the next call: a
      // restart right after cannot spend its budget twice.
      if (step.llm) await save();
    }
  }

  async function decide(given: ShadowInput, release: () => void): Promise<void> {
    const { m } = given;
    if (spentOut && step.llm) {
      // Its budget was spent before a restart: nothing more is asked of the model.
      release();
      tally.counts.over_budget++;
      m.term();
      return;
    }
    // Its lease kept while the candidate decides (up to its deadline, past the ack wait).
    const lease = setInterval(() => m.working(), ACK_WAIT_MS / 3);
    try {
      let decided;
      try {
        decided = await decideOnce(step, given, source, abort.signal, callTimeoutMs);
      } finally {
        clearInterval(lease);
      }
      release();
      tally.seconds += decided.ms / 1000;
      tally.counts.decided++;
      // Acked once compared and published: a shadow killed meanwhile is given the item
      // again (its decision is published once: the message id is the input's sequence).
      // (Stopped while waiting for production: left unacked, for the next run.)
      if (await compareAndPublish(m, decided.itemId, decided.event, decided.ms)) m.ack();
    } catch (err) {
      release();
      if (abort.signal.aborted) return; // stopping: redelivered to the next run
      failed(m, err);
    }
  }

  // The last stream sequence it was given: a consumer deleted under it (another identity that
  // may delete consumers on the stream, given the shadow's id) is made again from just after.
  let lastSeq = 0;
  const done = (async () => {
    while (!stopping) {
      try {
        // A consumer deleted meanwhile ends the loop with an error (by default nats.js would
        // keep asking it for messages, silently, until the process restarts).
        messages = await consumer.consume({
          max_messages: spec.limits.concurrency,
          abort_on_missing_resource: true,
        });
        for await (const m of messages) {
          if (stopping) break;
          lastSeq = Math.max(lastSeq, m.seq);
          // Only the step's inputs are sampled, rate limited and counted: the filter of a
          // definition's step also carries events that are not for it.
          let given: ShadowInput | undefined;
          try {
            given = inputOf(step, m);
          } catch (err) {
            failed(m, err);
            continue;
          }
          if (!given) {
            m.ack();
            continue;
          }
          if (!sampled(given.input.item_id, spec.limits.sample)) {
            tally.counts.skipped++;
            m.ack();
            continue;
          }
          let release: () => void;
          try {
            release = await limiter.acquire(undefined, abort.signal);
          } catch {
            break; // stopping
          }
          const p: Promise<void> = handle(given, release).finally(() => inFlight.delete(p));
          inFlight.add(p);
        }
        // Ended without being stopped (its consumer gone): made again below, after a pause.
        if (!stopping) throw new Error("the shadow's consumer stopped delivering");
      } catch (err) {
        if (stopping) break;
        log.warn("shadow consumer failed; retrying", { err: String(err) });
        await delay(1000, abort.signal);
        const from = lastSeq > 0 ? lastSeq + 1 : undefined;
        if (await ensureShadowConsumer(jsm, spec, step, from).catch(() => false)) {
          log.warn("shadow consumer was missing: made again", {
            consumer: shadowDurable(spec.id),
            ...(from === undefined ? { from: "new messages" } : { from_seq: from }),
          });
        }
      }
    }
    await Promise.all(inFlight);
  })();
  // Saved as it goes (at most a second behind), and when it stops.
  const saver = setInterval(save, 1000);
  tally.up = true;
  delete tally.error;
  log.info("shadow started", {
    candidate: tally.candidate,
    filter: step.filterSubject,
    limits: spec.limits,
  });
  return {
    tally,
    done,
    stop() {
      return stopped ??= (async () => {
        stopping = true;
        messages?.stop();
        let timer: ReturnType<typeof setTimeout> | undefined;
        await Promise.race([done, new Promise((r) => (timer = setTimeout(r, config.drainMs)))]);
        clearTimeout(timer);
        abort.abort();
        // Its calls fail once aborted; what else is in flight (a publish, a lookup) is bounded
        // by its own timeout. Past a second deadline it is abandoned, logged: a stop never
        // waits for ever (the host's next change of this shadow waits for it).
        const abandonMs = Math.max(config.drainMs, 1000);
        const gone = await Promise.race([
          done.then(() => true),
          new Promise<false>((r) => (timer = setTimeout(() => r(false), abandonMs))),
        ]);
        clearTimeout(timer);
        if (!gone) {
          log.warn("shadow stop abandoned what it had in flight", {
            in_flight: inFlight.size,
            after_ms: abandonMs,
          });
        }
        clearInterval(saver);
        await save();
        tally.up = false;
        log.info("shadow stopped", { ...tally.counts });
      })();
    },
  };
}

/** What {@link replayShadow} found: the candidate's decisions on stored history. */
export interface ShadowReplay {
  /** One per input replayed (compared with production's stored output when there is one). */
  decisions: ShadowDecision[];
  /** Inputs the candidate failed on (its handler threw, or emitted no output, or timed out). */
  failed: number;
  /** Of which calls that passed their deadline (`WEFT_HANDLER_TIMEOUT_MS`). */
  timedOut: number;
  /** The candidate's handler time in all, s, and the replay's wall time, s. */
  handlerSeconds: number;
  wallSeconds: number;
  /** The candidate's LLM use (llm steps): calls, tokens, estimated cost. */
  llm?: { calls: number; total_tokens: number; cost_usd: number };
}

/**
 * Replays a step's stored history through a candidate (`spec`: a hand-wired step with other
 * analyzers, or a definition's step from another version of its definition file): every
 * input the step consumed (by production's filter; from `since`, at most `count`, sampled),
 * handed to the candidate's handler, and compared field by field with the output production
 * stored for the item. Publishes nothing and changes no item: a read-only consumer of the
 * stream, decisions kept in memory. {@link liveShadowReport} and
 * {@link formatLiveShadowReport} turn the decisions into the report.
 *
 * @example
 * ```ts ignore
 * const r = await replayShadow({ nc, spec, config, log, pipelines, count: 500 });
 * console.log(formatLiveShadowReport(liveShadowReport(spec.id, r.decisions)));
 * ```
 */
export async function replayShadow(opts: {
  nc: NatsConnection;
  spec: ShadowSpec;
  config: Config;
  log: Logger;
  pipelines?: readonly LoadedPipeline[];
  root?: string;
  since?: Date;
  until?: Date;
  count?: number;
}): Promise<ShadowReplay> {
  const { nc, spec } = opts;
  const step = await resolveShadowTarget(spec, opts.config, {
    nc,
    pipelines: opts.pipelines,
    root: opts.root,
  });
  const js = jetstream(nc);
  const jsm = await jetstreamManager(nc);
  const abort = new AbortController();
  const decisions: ShadowDecision[] = [];
  let failed = 0;
  let timedOut = 0;
  let handlerSeconds = 0;
  const timeoutMs = opts.config.handlerTimeoutMs ?? DEFAULT_CALL_TIMEOUT_MS;
  const started = performance.now();
  const max = opts.count ?? Infinity;
  for await (const m of readStream(js, step.stream, { filter: step.filterSubject })) {
    if (decisions.length + failed >= max) break;
    if (opts.since && m.time < opts.since) continue;
    if (opts.until && m.time > opts.until) break;
    const itemId = m.subject.split(".").pop() ?? "";
    try {
      const given = inputOf(step, m);
      if (!given) continue; // not for this step (a join's other inputs)
      if (!sampled(given.input.item_id, spec.limits.sample)) continue;
      const decided = await decideOnce(
        step,
        given,
        `weft-shadow-${spec.id}`,
        abort.signal,
        timeoutMs,
      );
      handlerSeconds += decided.ms / 1000;
      const prod = await storedOutput(jsm, step, decided.itemId, decided.event.id);
      decisions.push(decisionOf(
        spec,
        step.candidate,
        { itemId: decided.itemId, seq: m.seq, time: m.time, ms: decided.ms },
        step.fields(decided.event.data as Record<string, unknown>),
        prod ? step.fields(prod) : null,
        decided.event,
      ));
    } catch (err) {
      failed++;
      if (err instanceof CandidateTimeoutError) timedOut++;
      opts.log.warn("replayed decision failed", {
        item_id: itemId,
        code: errorCode(err),
        err: String(err),
      });
    }
  }
  const stats = step.llm?.snapshot();
  return {
    decisions,
    failed,
    timedOut,
    handlerSeconds,
    wallSeconds: (performance.now() - started) / 1000,
    ...(stats
      ? { llm: { calls: stats.calls, total_tokens: stats.total_tokens, cost_usd: stats.cost_usd } }
      : {}),
  };
}

/** A live shadow's report, from its decisions on the SHADOW stream. */
export interface LiveShadowReport {
  shadow: string;
  pipeline: string;
  step: string;
  candidate: string;
  /** Decisions read. */
  items: number;
  /** Of which without production's output to compare with. */
  unmatched: number;
  /** Per compared field: agreement, kappa and the confusion matrix (production rows). */
  fields: Record<string, FieldAgreement>;
  /**
   * With labels (`--labels`), per labelled field: how many items had a label and production's
   * output, and the share of them production and the candidate got right.
   */
  labelled?: Record<string, LabelledAccuracy>;
  /** Items on which the candidate decided otherwise, latest first. */
  disagreements: {
    item: string;
    time: string;
    field: string;
    production: string;
    candidate: string;
    text?: string;
  }[];
}

/**
 * Builds a live shadow's report from its decisions (what {@link ShadowDecision}s say), as
 * `deno task shadow report ID` prints it.
 *
 * @example
 * ```ts
 * import { liveShadowReport } from "./live.ts";
 * const r = liveShadowReport("s", []);
 * console.assert(r.items === 0);
 * ```
 */
export function liveShadowReport(
  shadow: string,
  decisions: readonly ShadowDecision[],
  maxExamples = 10,
): LiveShadowReport {
  // The latest attachment's: a shadow detached and attached again under its id (another
  // candidate, perhaps) starts a report of its own, as its live figures do.
  const latest = decisions.findLast((d) => d.shadow === shadow);
  const mine = decisions.filter((d) =>
    d.shadow === shadow && d.attached_at === latest?.attached_at &&
    d.candidate === latest?.candidate
  );
  const last = mine.at(-1);
  const compared = mine.filter((d) => d.production);
  const fields: Record<string, FieldAgreement> = {};
  const names = [...new Set(compared.flatMap((d) => Object.keys(d.production!)))];
  for (const f of names) {
    const rows = compared.filter((d) => d.production![f] !== undefined);
    fields[f] = agreementOf(
      rows.map((d) => d.production![f]!),
      rows.map((d) => d.decision[f] ?? "none"),
    );
  }
  const disagreements: LiveShadowReport["disagreements"] = [];
  for (const d of [...compared].reverse()) {
    for (const f of names) {
      const p = d.production![f], c = d.decision[f];
      if (p === undefined || p === c || f === "result" && names.length > 1) continue;
      const text = (d.event?.data as { text?: unknown } | undefined)?.text;
      disagreements.push({
        item: d.item_id,
        time: d.time,
        field: f,
        production: p,
        candidate: c ?? "none",
        ...(typeof text === "string" ? { text: text.slice(0, 200) } : {}),
      });
    }
    if (disagreements.length >= maxExamples) break;
  }
  return {
    shadow,
    pipeline: last?.pipeline ?? "",
    step: last?.step ?? "",
    candidate: last?.candidate ?? "",
    items: mine.length,
    unmatched: mine.length - compared.length,
    fields,
    disagreements: disagreements.slice(0, maxExamples),
  };
}

/** Production's and the candidate's accuracy on one labelled field. */
export interface LabelledAccuracy {
  /** Items with a label for the field and production's output to compare. */
  items: number;
  production_accuracy: number;
  candidate_accuracy: number;
}

/**
 * Reads labels for a definition step's items: JSON Lines, one object per item with its id
 * (`item_id`) and the expected value of any compared fields, e.g.
 * `{"item_id": "t-17", "label": "pos"}`. Values are compared as the report shows them
 * (strings; a number or boolean as its JSON). Throws naming the line of a bad row.
 *
 * @example
 * ```ts
 * import { parseItemLabels } from "./live.ts";
 * const labels = parseItemLabels('{"item_id":"a","label":"pos"}\n');
 * console.assert(labels.get("a")?.label === "pos");
 * ```
 */
export function parseItemLabels(text: string): Map<string, Record<string, string>> {
  const out = new Map<string, Record<string, string>>();
  text.split("\n").forEach((line, i) => {
    if (line.trim() === "") return;
    let row: unknown;
    try {
      row = JSON.parse(line);
    } catch {
      throw new ValidationError(`labels line ${i + 1} is not JSON`, { field: `/${i + 1}` });
    }
    const { item_id, ...fields } = (row ?? {}) as Record<string, unknown>;
    if (typeof row !== "object" || Array.isArray(row) || typeof item_id !== "string") {
      throw new ValidationError(`labels line ${i + 1} needs an "item_id" string`, {
        field: `/${i + 1}/item_id`,
      });
    }
    const labels: Record<string, string> = {};
    for (const [k, v] of Object.entries(fields)) {
      labels[k] = typeof v === "string" ? v : JSON.stringify(v);
    }
    out.set(item_id, labels);
  });
  return out;
}

/**
 * Production's and the candidate's accuracy against `labels` (by item id, then field), side
 * by side, over the same items: those with a label for the field and production's output.
 *
 * @example
 * ```ts
 * import { labelledAccuracy } from "./live.ts";
 * const d = { item_id: "a", decision: { label: "pos" }, production: { label: "neg" } };
 * const r = labelledAccuracy([d], new Map([["a", { label: "pos" }]]));
 * console.assert(r.label?.candidate_accuracy === 1 && r.label?.production_accuracy === 0);
 * ```
 */
export function labelledAccuracy(
  decisions: readonly Pick<ShadowDecision, "item_id" | "decision" | "production">[],
  labels: ReadonlyMap<string, Readonly<Record<string, string>>>,
): Record<string, LabelledAccuracy> {
  const counts: Record<string, { n: number; prod: number; cand: number }> = {};
  for (const d of decisions) {
    const want = labels.get(d.item_id);
    if (!want || !d.production) continue;
    for (const [field, label] of Object.entries(want)) {
      if (d.production[field] === undefined) continue;
      const c = counts[field] ??= { n: 0, prod: 0, cand: 0 };
      c.n++;
      if (d.production[field] === label) c.prod++;
      if (d.decision[field] === label) c.cand++;
    }
  }
  return Object.fromEntries(
    Object.entries(counts).map(([f, c]) => [f, {
      items: c.n,
      production_accuracy: c.prod / c.n,
      candidate_accuracy: c.cand / c.n,
    }]),
  );
}

/** The decisions of shadow `id` on the SHADOW stream (at most `max`, the latest). */
export async function readShadowDecisions(
  nc: NatsConnection,
  id: string,
  max = 100_000,
): Promise<ShadowDecision[]> {
  const js = jetstream(nc);
  const jsm = await jetstreamManager(nc);
  const state = (await jsm.streams.info(SHADOW_STREAM)).state;
  if (state.messages === 0) return [];
  const out: ShadowDecision[] = [];
  for await (const m of readStream(js, SHADOW_STREAM, { filter: "shadow.*.*.*" })) {
    try {
      const d = m.json<ShadowDecision>();
      if (d.shadow === id) {
        out.push(d);
        if (out.length > max) out.shift();
      }
    } catch { /* not a decision */ }
  }
  return out;
}

const pct = (x: number) => `${(x * 100).toFixed(1)}%`;

const escapeHtml = (v: string) =>
  v.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]!);

/**
 * A shadow report as a standalone HTML page (no script, no outside resources): agreement
 * and kappa per field, each field's confusion matrix, and the disagreements.
 */
export function liveShadowReportHtml(r: LiveShadowReport, title = "live shadow"): string {
  const rows = Object.entries(r.fields).map(([f, a]) =>
    `<tr><td>${escapeHtml(f)}</td><td>${pct(a.agreement)}</td><td>${a.kappa.toFixed(3)}</td></tr>`
  ).join("");
  const matrices = Object.entries(r.fields).map(([f, a]) => {
    const cols = [...new Set(Object.values(a.confusion).flatMap((row) => Object.keys(row)))].sort();
    const body = Object.keys(a.confusion).sort().map((row) =>
      `<tr><th>${escapeHtml(row)}</th>${
        cols.map((c) => `<td>${a.confusion[row]![c] ?? 0}</td>`).join("")
      }</tr>`
    ).join("");
    return `<h3>${escapeHtml(f)} (rows: production, columns: candidate)</h3><table><tr><th></th>${
      cols.map((c) => `<th>${escapeHtml(c)}</th>`).join("")
    }</tr>${body}</table>`;
  }).join("");
  const dis = r.disagreements.map((d) =>
    `<li><code>${escapeHtml(d.item)}</code> ${escapeHtml(d.field)}: ${
      escapeHtml(d.production)
    } &rarr; ${escapeHtml(d.candidate)}${d.text ? ` <q>${escapeHtml(d.text)}</q>` : ""}</li>`
  ).join("");
  return `<!doctype html><meta charset="utf-8"><title>Weft ${escapeHtml(title)} ${
    escapeHtml(r.shadow)
  }</title><style>body{font:14px system-ui;margin:2em}td,th{border:1px solid #ccc;padding:2px 8px}table{border-collapse:collapse}</style>` +
    `<h1>${escapeHtml(title)} ${escapeHtml(r.shadow)}: ${escapeHtml(r.candidate)} on ${
      escapeHtml(`${r.pipeline}.${r.step}`)
    }</h1><p>${r.items} items, ${r.unmatched} without production's output</p>` +
    `<table><tr><th>field</th><th>agreement</th><th>kappa</th></tr>${rows}</table>` +
    (r.labelled
      ? `<h2>Against the labels</h2><table><tr><th>field</th><th>items</th><th>production</th><th>candidate</th></tr>${
        Object.entries(r.labelled).map(([f, a]) =>
          `<tr><td>${escapeHtml(f)}</td><td>${a.items}</td><td>${
            pct(a.production_accuracy)
          }</td><td>${pct(a.candidate_accuracy)}</td></tr>`
        ).join("")
      }</table>`
      : "") +
    matrices +
    `<h2>Disagreements</h2><ul>${dis}</ul>\n`;
}

/**
 * The live report as text, for the terminal, under `heading` (`live shadow <id>`; "replay" for
 * a replayed history, whose shadow has no id of its own).
 */
export function formatLiveShadowReport(
  r: LiveShadowReport,
  heading = `live shadow ${r.shadow}`,
): string {
  const lines = [
    `== ${heading}: ${r.candidate} on ${r.pipeline}.${r.step}, ${r.items} items` +
    ` (${r.unmatched} without production's output)`,
    ...Object.entries(r.fields).map(([f, a]) =>
      `${f.padEnd(10)} agreement ${pct(a.agreement)}  kappa ${a.kappa.toFixed(3)}`
    ),
  ];
  for (const [f, a] of Object.entries(r.labelled ?? {})) {
    lines.push(
      `${f.padEnd(10)} against the labels (${a.items} items): production ` +
        `${pct(a.production_accuracy)}, candidate ${pct(a.candidate_accuracy)}`,
    );
  }
  for (const [f, a] of Object.entries(r.fields)) {
    const cols = [...new Set(Object.values(a.confusion).flatMap((row) => Object.keys(row)))].sort();
    if (cols.length > 12 || Object.keys(a.confusion).length > 12) continue;
    lines.push("", `${f} confusion (rows: production, columns: candidate)`);
    // Labels whole, however long (a router's result is JSON): cut, two could read the same.
    const rows = Object.keys(a.confusion).sort();
    const rowWidth = Math.max(13, ...rows.map((r) => r.length)) + 1;
    const colWidth = Math.max(13, ...cols.map((c) => c.length)) + 1;
    lines.push(["".padEnd(rowWidth), ...cols.map((c) => c.padStart(colWidth))].join(""));
    for (const row of rows) {
      lines.push(
        [
          row.padEnd(rowWidth),
          ...cols.map((c) => String(a.confusion[row]![c] ?? 0).padStart(colWidth)),
        ].join(""),
      );
    }
  }
  lines.push("", `disagreements (latest ${r.disagreements.length}):`);
  for (const d of r.disagreements) {
    lines.push(
      `  ${d.item}: ${d.field} ${d.production} -> ${d.candidate}${d.text ? `  "${d.text}"` : ""}`,
    );
  }
  return lines.join("\n");
}
