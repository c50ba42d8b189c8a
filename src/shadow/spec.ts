/**
 * What a live shadow is: a candidate version of one step of a running pipeline, with its
 * own limits. Parsed and checked here, in one place, for every way a shadow is attached
 * (`WEFT_SHADOW`, `POST /shadows`, `nats req weft.shadow.attach`, `deno task shadow attach`).
 *
 * @module
 */
import type { AnalyzerKind } from "../config.ts";
import type { AnalyzerConfig } from "../ai/configured_analyzers.ts";
import { ErrorCode, ValidationError } from "../errors.ts";
import { SHIPPED_PIPELINES } from "../../pipelines/shipped.ts";

/** The analyzer families (config.ts's AnalyzerKind; repeated so config.ts can import this module). */
const KINDS: readonly AnalyzerKind[] = ["embedded", "rules", "llm"];

/** The shipped pipelines' steps a live shadow can follow, by pipeline (their wirings'). */
export const SHADOW_STEPS: Readonly<Record<string, readonly string[]>> = Object.fromEntries(
  SHIPPED_PIPELINES.flatMap((w) => w.shadowSteps ? [[w.name, w.shadowSteps]] : []),
);
/**
 * The shadowable steps of `pipeline` when it is a shipped one; undefined for any other
 * name (a definition's pipeline), an inherited property name such as `constructor` included.
 */
export function shippedShadowSteps(pipeline: string): readonly string[] | undefined {
  return Object.hasOwn(SHADOW_STEPS, pipeline) ? SHADOW_STEPS[pipeline] : undefined;
}
/** The pipeline of a shadow that names none: the first shipped one with shadowable steps. */
export const DEFAULT_SHADOW_PIPELINE: string | undefined = Object.keys(SHADOW_STEPS)[0];

/**
 * The candidate: how the step would decide instead. For a hand-wired step, other analyzers
 * (`analyzers`, `rules`, `model`, `prompt`); for a step of a definition's pipeline, another
 * version of the definition (`definition`, a file beside production's).
 */
export interface ShadowCandidate {
  /** The analyzer family: `embedded`, `rules` or `llm` (hand-wired steps). */
  analyzers?: AnalyzerKind;
  /**
   * A definition file (in a folder of a running definition) defining the same pipeline with
   * another version of the step (definitions' steps).
   */
  definition?: string;
  /** Ruleset file (routing table, keyword rules) under `rules/`; default production's. */
  rules?: string;
  /** LLM model (with `llm`); default `WEFT_LLM_MODEL`. */
  model?: string;
  /** Prompt version of the step's prompts (`prompts/<kind>.<version>.md`); default `v1`. */
  prompt?: string;
}

/** Limits of one shadow: it never takes more than these, whatever production does. */
export interface ShadowLimits {
  /** Items per second the candidate is given at most. Default 20. */
  rps: number;
  /** Items the candidate works on at once. Default 4. */
  concurrency: number;
  /** Share of items shadowed, in (0, 1], chosen by item id (stable). Default 1. */
  sample: number;
  /** LLM spend limit of the shadow, USD (0: none). Default 1. */
  budgetUsd: number;
}

/** One live shadow. */
export interface ShadowSpec {
  /** Its id: names its consumer (`shadow_<id>`) and its metrics. */
  id: string;
  /** The pipeline's name. */
  pipeline: string;
  /** The step it shadows (its id in the pipeline). */
  step: string;
  /** What decides instead. */
  candidate: ShadowCandidate;
  /** Its limits. */
  limits: ShadowLimits;
  /** Who attached it, when attached over the API. */
  attached_by?: string;
  /** When it was attached over the API (ISO 8601). */
  attached_at?: string;
}

/** A shadow's id: lower-case letters, digits, `-` and `_`, at most 32 characters. */
export const SHADOW_ID: RegExp = /^[a-z0-9][a-z0-9_-]{0,31}$/;
/** A candidate ruleset: a JSON file in `rules/`. */
const RULES_FILE = /^rules\/[A-Za-z0-9_.-]+\.json$/;
/** A definition file: a module path, no `..`. */
const DEFINITION_FILE = /^[A-Za-z0-9_.\/-]+\.(ts|js|mts|mjs)$/;
/** A definition's pipeline name and step id. */
const PIPELINE_NAME = /^[a-z][a-z0-9-]{0,40}$/;
const STEP_ID = /^[A-Za-z0-9_-]{1,64}$/;
/** A prompt version or model name. */
const TOKEN = /^[A-Za-z0-9_.:\/-]{1,100}$/;

/** The default limits. */
export const DEFAULT_SHADOW_LIMITS: Readonly<ShadowLimits> = {
  rps: 20,
  concurrency: 4,
  sample: 1,
  budgetUsd: 1,
};

/** The durable consumer of a shadow. */
export function shadowDurable(id: string): string {
  return `shadow_${id}`;
}

/** The subject a shadow publishes its decision about an item on. */
export function shadowSubject(pipeline: string, step: string, itemId: string): string {
  return `shadow.${pipeline}.${step}.${itemId}`;
}

/** A short name of a candidate, e.g. `rules:rules/reference.json` or `llm:gpt-4o-mini@v2`. */
export function candidateName(c: ShadowCandidate): string {
  if (c.definition) return `definition:${c.definition.split("/").pop()}`;
  if (c.analyzers === "llm") {
    return `llm:${c.model ?? "default"}@${c.prompt ?? "v1"}${c.rules ? ` ${c.rules}` : ""}`;
  }
  return `${c.analyzers}${c.rules ? `:${c.rules}` : ""}`;
}

const fail = (field: string, message: string): never => {
  throw new ValidationError(message, { field });
};

/**
 * Checks a shadow as given (JSON), filling defaults; a {@link ValidationError} naming the
 * first bad field otherwise. With `opts.running` (the definitions' pipelines that run), a
 * definition's pipeline not among them is refused naming `/pipeline`, before its step and
 * candidate are looked at: a shadow of it could never run, whatever its candidate.
 *
 * @example
 * ```ts
 * import { parseShadowSpec } from "./spec.ts";
 * const s = parseShadowSpec({
 *   id: "grade2",
 *   pipeline: "orders",
 *   step: "grade",
 *   candidate: { definition: "pipelines/orders/candidate.ts" },
 * });
 * console.assert(s.pipeline === "orders" && s.limits.rps === 20);
 * ```
 */
export function parseShadowSpec(
  value: unknown,
  opts: { running?: readonly string[] } = {},
): ShadowSpec {
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    fail("/", "a shadow is a JSON object");
  }
  const v = value as Record<string, unknown>;
  const known = new Set(["id", "pipeline", "step", "candidate", "limits"]);
  for (const k of Object.keys(v)) {
    if (!known.has(k) && k !== "attached_by" && k !== "attached_at") {
      fail(`/${k}`, `unknown field ${k}`);
    }
  }
  if (typeof v.id !== "string" || !SHADOW_ID.test(v.id)) {
    fail("/id", "id must be 1-32 of a-z, 0-9, - and _, starting with a letter or digit");
  }
  const pipeline = v.pipeline ?? DEFAULT_SHADOW_PIPELINE;
  if (
    typeof pipeline !== "string" ||
    !(shippedShadowSteps(pipeline) || PIPELINE_NAME.test(pipeline))
  ) {
    fail(
      "/pipeline",
      `pipeline must be ${[...Object.keys(SHADOW_STEPS), "a definition's pipeline"].join(" or ")}`,
    );
  }
  const builtIn = shippedShadowSteps(pipeline as string);
  if (!builtIn && opts.running && !opts.running.includes(pipeline as string)) {
    fail("/pipeline", `no running pipeline ${pipeline}`);
  }
  if (builtIn && (typeof v.step !== "string" || !builtIn.includes(v.step))) {
    fail("/step", `step must be one of ${builtIn.join(", ")}`);
  }
  if (!builtIn && (typeof v.step !== "string" || !STEP_ID.test(v.step))) {
    fail("/step", "step must be a step id of the definition");
  }
  const c = v.candidate as Record<string, unknown> | undefined;
  if (c === null || typeof c !== "object" || Array.isArray(c)) {
    fail("/candidate", "candidate must be an object: {analyzers, rules?, model?, prompt?}");
  }
  for (const k of Object.keys(c!)) {
    if (!["analyzers", "rules", "model", "prompt", "definition"].includes(k)) {
      fail(`/candidate/${k}`, `unknown field ${k}`);
    }
  }
  if (!builtIn) {
    // A definition's step: its candidate is another version of the definition.
    const file = c!.definition;
    if (typeof file !== "string" || !DEFINITION_FILE.test(file) || file.includes("..")) {
      fail(
        "/candidate/definition",
        "definition must be a definition file (.ts), e.g. pipelines/support/v2.ts",
      );
    }
    for (const k of ["analyzers", "rules", "model", "prompt"]) {
      if (c![k] !== undefined) {
        fail(`/candidate/${k}`, `${k} applies to the shipped pipelines' steps only`);
      }
    }
    return finish(v, pipeline as string, { definition: file as string });
  }
  if (c!.definition !== undefined) {
    fail("/candidate/definition", "definition applies to the steps of a definition's pipeline");
  }
  if (typeof c!.analyzers !== "string" || !(KINDS as string[]).includes(c!.analyzers)) {
    fail("/candidate/analyzers", `analyzers must be one of ${KINDS.join(", ")}`);
  }
  const candidate: ShadowCandidate = { analyzers: c!.analyzers as AnalyzerKind };
  if (c!.rules !== undefined) {
    if (typeof c!.rules !== "string" || !RULES_FILE.test(c!.rules) || c!.rules.includes("..")) {
      fail("/candidate/rules", "rules must be a JSON file in rules/, e.g. rules/reference.json");
    }
    candidate.rules = c!.rules as string;
  }
  for (const k of ["model", "prompt"] as const) {
    if (c![k] === undefined) continue;
    if (typeof c![k] !== "string" || !TOKEN.test(c![k] as string)) {
      fail(`/candidate/${k}`, `${k} must be a short name`);
    }
    if (candidate.analyzers !== "llm") {
      fail(`/candidate/${k}`, `${k} applies to llm candidates only`);
    }
    candidate[k] = c![k] as string;
  }
  if (candidate.prompt !== undefined && !/^[a-z0-9_-]+$/i.test(candidate.prompt)) {
    fail("/candidate/prompt", "prompt is a version such as v2");
  }
  return finish(v, pipeline as string, candidate);
}

/** The limits and the rest of a shadow, once its candidate is checked. */
function finish(
  v: Record<string, unknown>,
  pipeline: string,
  candidate: ShadowCandidate,
): ShadowSpec {
  const l = (v.limits ?? {}) as Record<string, unknown>;
  if (typeof l !== "object" || Array.isArray(l)) fail("/limits", "limits must be an object");
  const limits: ShadowLimits = { ...DEFAULT_SHADOW_LIMITS };
  const bounds: Record<keyof ShadowLimits, [number, number, boolean]> = {
    rps: [0.01, 10_000, false],
    concurrency: [1, 256, true],
    sample: [0.0001, 1, false],
    budgetUsd: [0, 1_000_000, false],
  };
  for (const k of Object.keys(l)) {
    if (!(k in bounds)) fail(`/limits/${k}`, `unknown limit ${k}`);
    const [min, max, integer] = bounds[k as keyof ShadowLimits];
    const n = l[k];
    if (
      typeof n !== "number" || !Number.isFinite(n) || n < min || n > max ||
      (integer && !Number.isInteger(n))
    ) {
      fail(
        `/limits/${k}`,
        `${k} must be ${integer ? "an integer" : "a number"} in [${min}, ${max}]`,
      );
    }
    limits[k as keyof ShadowLimits] = n as number;
  }
  const spec: ShadowSpec = {
    id: v.id as string,
    pipeline: pipeline as string,
    step: v.step as string,
    candidate,
    limits,
  };
  if (typeof v.attached_by === "string") spec.attached_by = v.attached_by;
  if (typeof v.attached_at === "string") spec.attached_at = v.attached_at;
  return spec;
}

/**
 * How many live shadows may be attached at once, by default (`WEFT_SHADOW` and the API's
 * together). Each reads every item of its step on its own consumer, whatever its rate limit,
 * so their cost grows with their number: found by probing, 60 shadows of the sentiment step
 * (60 requests) made 2,000 items take 18.7 s to process instead of 10.5.
 */
export const SHADOWS_MAX = 8;

/**
 * Parses `WEFT_SHADOW`: one shadow or a list, as JSON, of at most {@link SHADOWS_MAX}. A
 * {@link ValidationError} naming the first bad field otherwise, as {@link parseShadowSpec} does
 * (in a list, under the shadow's index: `/1/step`); the configuration reports it.
 *
 * @example
 * ```ts
 * import { parseShadowSpecs } from "./spec.ts";
 * const [s] = parseShadowSpecs('{"id":"a","step":"sentiment","candidate":{"analyzers":"rules"}}');
 * console.assert(s?.id === "a");
 * ```
 */
export function parseShadowSpecs(raw: string): ShadowSpec[] {
  let value: unknown;
  try {
    value = JSON.parse(raw);
  } catch (err) {
    throw new ValidationError(`not JSON: ${(err as Error).message}`, {
      code: ErrorCode.MalformedJson,
      cause: err,
    });
  }
  if (!Array.isArray(value)) return [parseShadowSpec(value)];
  if (value.length > SHADOWS_MAX) {
    fail(
      `/${SHADOWS_MAX}`,
      `at most ${SHADOWS_MAX} live shadows run at once (got ${value.length})`,
    );
  }
  const ids = new Set<string>();
  return value.map((v, i) => {
    let spec: ShadowSpec;
    try {
      spec = parseShadowSpec(v);
    } catch (err) {
      if (!(err instanceof ValidationError)) throw err;
      throw new ValidationError(err.message, {
        code: err.code,
        field: `/${i}${err.field === "/" ? "" : err.field ?? ""}`,
        cause: err,
      });
    }
    if (ids.has(spec.id)) fail(`/${i}/id`, `id ${spec.id} is given twice`);
    ids.add(spec.id);
    return spec;
  });
}

/** Where a step's promoted version is recorded in the step-version bucket. */
export function stepVersionKey(pipeline: string, step: string): string {
  return `${pipeline}.${step}`;
}

/** A promotion: the candidate that is now production for a step. */
export interface StepVersion {
  /** The pipeline's name. */
  pipeline: string;
  /** The step that runs the candidate. */
  step: string;
  /** What the step runs. */
  candidate: ShadowCandidate;
  /** The shadow it was promoted from. */
  promoted_from: string;
  /** Its agreement with production when promoted, per field, if measured. */
  agreement?: Record<string, number>;
  /** When (ISO 8601). */
  promoted_at: string;
  /** Who promoted it (the API key's holder). */
  promoted_by: string;
}

/**
 * Checks a `weft_step_versions` entry as stored (JSON text): a {@link ValidationError}
 * naming the field when it is not a promotion (not JSON, not an object, no pipeline, step
 * or candidate), which a step ignores, keeping what it runs.
 *
 * @example
 * ```ts
 * import { parseStepVersion } from "./spec.ts";
 * const v = parseStepVersion('{"pipeline":"o","step":"p","candidate":{"analyzers":"rules"}}');
 * console.assert(v.step === "p");
 * ```
 */
export function parseStepVersion(text: string): StepVersion {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new ValidationError(`not JSON: ${(err as Error).message}`, {
      code: ErrorCode.MalformedJson,
      cause: err,
    });
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    fail("/", "a step version is a JSON object");
  }
  const v = value as Record<string, unknown>;
  for (const k of ["pipeline", "step"]) {
    if (typeof v[k] !== "string") fail(`/${k}`, `${k} must be a string`);
  }
  const c = v.candidate;
  if (c === null || typeof c !== "object" || Array.isArray(c)) {
    fail("/candidate", "candidate must be an object");
  }
  return value as StepVersion;
}

/**
 * Whether an item is in a `sample` share of items: by a 32-bit FNV-1a hash of its id, so
 * the same items in every process and run, mixed by murmur3's fmix32 (FNV-1a alone put
 * ids that differ in their last characters, `SM0`..`SM39`, close together: a 0.5 sample of
 * them took 25%).
 */
export function sampled(itemId: string, sample: number): boolean {
  if (sample >= 1) return true;
  let h = 0x811c9dc5;
  for (let i = 0; i < itemId.length; i++) {
    h ^= itemId.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return (h >>> 0) / 0x1_0000_0000 < sample;
}

/** The analyzer settings of a candidate: production's, with the candidate's choices. */
export function candidateConfig(
  base: AnalyzerConfig,
  spec: Pick<ShadowSpec, "candidate" | "step">,
  opts: { fallback?: boolean; budgetUsd?: number } = {},
): AnalyzerConfig {
  const c = spec.candidate;
  const prompt = c.prompt;
  return {
    ...base,
    analyzers: c.analyzers ?? base.analyzers,
    rulesPath: c.rules ?? base.rulesPath,
    llmModel: c.model ?? base.llmModel,
    ...(opts.budgetUsd !== undefined ? { llmBudgetUsd: opts.budgetUsd } : {}),
    ...(prompt
      ? {
        llmPromptVersions: spec.step === "topics"
          ? { topics: prompt }
          : spec.step === "sentiment"
          ? { sentiment: prompt }
          : {},
      }
      : {}),
    llmFallback: opts.fallback ?? true,
  };
}
