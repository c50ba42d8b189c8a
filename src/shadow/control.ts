/**
 * Attaching, detaching and promoting live shadows: one place behind `POST /shadows`,
 * `DELETE /shadows/:id`, `POST /shadows/:id/promote`, `GET /shadows` and the request
 * subjects `weft.shadow.<attach|detach|promote|list>` (src/gateway/shadows.ts), which
 * `deno task shadow attach|detach|promote|reset|list` sends.
 *
 * An attach is an entry in the `weft_shadows` bucket (the shadow service watches it); a
 * promotion is an entry in `weft_step_versions` (production's step follows it) and detaches
 * the shadow; a reset deletes that entry (the step runs its configured version again). Each
 * is recorded as an audit event on `shadow._audit.<action>.<pipeline>.<step>`.
 *
 * @module
 */
import { jetstream, type JetStreamClient } from "@nats-io/jetstream";
import { type KV, Kvm } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/nats-core";
import { ErrorCode, NotFoundError, ValidationError, WeftError } from "../errors.ts";
import type { FieldFigures } from "./live.ts";
import { stepFilterSubject } from "../pipeline/derive.ts";
import {
  candidateDefinitionFile,
  type LoadedPipeline,
  loadPipelines,
  withPromotedStep,
} from "../pipeline/runtime.ts";
import { statusSubject } from "../observability/micro.ts";
import {
  parseShadowSpec,
  parseStepVersion,
  SHADOW_ID,
  SHADOWS_MAX,
  type ShadowSpec,
  shippedShadowSteps,
  type StepVersion,
  stepVersionKey,
} from "./spec.ts";
import { SHADOW_AUDIT_PREFIX, SHADOW_BUCKET, STEP_VERSION_BUCKET } from "../subjects.ts";

/** A shadow as listed: where it was attached, and how it does. */
export type ListedShadow = ShadowSpec & {
  source: "config" | "api";
  /** Live figures from the shadow service, when it answered. */
  status?: Record<string, unknown>;
};

/**
 * A step's promoted version as listed; an entry that is no promotion (the steps ignore it)
 * is listed by its key with why (`invalid`), so it can be seen and reset.
 */
export type ListedVersion = StepVersion | { key: string; invalid: string };

/** Shadow control. */
export interface ShadowControl {
  /** Every shadow, and every step's promoted version. */
  list(): Promise<{ shadows: ListedShadow[]; versions: ListedVersion[] }>;
  /** Attaches a shadow; a conflict when its id is taken. */
  attach(value: unknown, by: string): Promise<ShadowSpec>;
  /** Detaches a shadow attached over the API. */
  detach(id: string, by: string): Promise<{ detached: string }>;
  /** Makes a shadow's candidate production for its step, and detaches it. */
  promote(id: string, by: string): Promise<StepVersion>;
  /** Rolls a step back to its configured version (`<pipeline>.<step>`). */
  reset(step: string, by: string): Promise<{ reset: string; was?: StepVersion }>;
}

const encoder = new TextEncoder();

/**
 * The shadow control over `nc`. `configured` are the shadows of `WEFT_SHADOW` (listed,
 * promotable, not detachable but by configuration).
 *
 * @example
 * ```ts ignore
 * const control = createShadowControl(nc, config.shadows);
 * await control.attach({ id: "r1", step: "sentiment", candidate: { analyzers: "rules" } }, "alice");
 * ```
 */
export function createShadowControl(
  nc: NatsConnection,
  configured: readonly ShadowSpec[] = [],
  definitions: { pipelines: readonly LoadedPipeline[]; root: string } = { pipelines: [], root: "" },
  /**
   * Builds the candidate as the shadow service would (its analyzers, rules and prompts; its
   * definition), throwing what would keep it from starting: an attach of such a candidate is
   * a 422 instead of a shadow that never runs.
   */
  canRun?: (spec: ShadowSpec) => Promise<unknown>,
  opts: { maxShadows?: number } = {},
): ShadowControl {
  const maxShadows = opts.maxShadows ?? SHADOWS_MAX;
  /** A running definition's work step (task, llm, router or agent), if `step` is one. */
  const definitionStep = (pipeline: string, step: string): LoadedPipeline | undefined => {
    const p = definitions.pipelines.find((p) => p.def.name === pipeline);
    return p && p.def.steps[step] && stepFilterSubject(p.def, step) !== null ? p : undefined;
  };
  /** A definition's step must be a running work step; its candidate beside it. */
  const checkDefinitionStep = (spec: ShadowSpec) => {
    if (shippedShadowSteps(spec.pipeline)) return;
    if (!definitions.pipelines.some((p) => p.def.name === spec.pipeline)) {
      throw new ValidationError(`no running pipeline ${spec.pipeline}`, { field: "/pipeline" });
    }
    if (!definitionStep(spec.pipeline, spec.step)) {
      throw new ValidationError(
        `${spec.pipeline}.${spec.step} is not a task, llm, router or agent step of the definition`,
        { field: "/step" },
      );
    }
    candidateDefinitionFile(
      spec.candidate.definition!,
      definitions.pipelines.filter((p) => p.def.name === spec.pipeline),
      definitions.root,
    );
  };
  /**
   * A definition's candidate may take its step's place only when it keeps the step's contract
   * (kind, event, output schema, edges); a 409 says to deploy the definition otherwise.
   */
  const checkPromotable = async (spec: ShadowSpec) => {
    const prod = definitionStep(spec.pipeline, spec.step);
    if (!prod) throw new NotFoundError(`no running step ${spec.pipeline}.${spec.step}`);
    const file = candidateDefinitionFile(
      spec.candidate.definition!,
      definitions.pipelines,
      definitions.root,
    );
    const cand = (await loadPipelines([file])).find((c) => c.def.name === spec.pipeline);
    if (!cand) throw new NotFoundError(`${file} defines no pipeline ${spec.pipeline}`);
    try {
      withPromotedStep(prod, cand, spec.step);
    } catch (err) {
      throw new WeftError(ErrorCode.Conflict, (err as Error).message, { cause: err });
    }
  };
  const kvm = new Kvm(nc);
  let shadows: KV | undefined;
  let versions: KV | undefined;
  const open = async () => {
    try {
      shadows ??= await kvm.open(SHADOW_BUCKET);
      versions ??= await kvm.open(STEP_VERSION_BUCKET);
      return { shadows, versions };
    } catch (cause) {
      throw new WeftError(ErrorCode.Unavailable, "the shadow buckets are not available", {
        cause,
        retryAfterSeconds: 5,
      });
    }
  };
  const js: JetStreamClient = jetstream(nc);
  const audit = async (action: string, spec: { pipeline: string; step: string }, body: object) => {
    // The record is the bucket; the event is for whoever follows `shadow._audit.>`.
    await js.publish(
      `${SHADOW_AUDIT_PREFIX}.${action}.${spec.pipeline}.${spec.step}`,
      encoder.encode(JSON.stringify({ action, time: new Date().toISOString(), ...body })),
    ).catch(() => {});
  };
  /** The shadow service's live figures, if it answers within a second. */
  const status = async (): Promise<Record<string, Record<string, unknown>>> => {
    try {
      const m = await nc.request(statusSubject("shadow"), undefined, { timeout: 1000 });
      return (m.json<{ shadows?: Record<string, Record<string, unknown>> }>().shadows) ?? {};
    } catch {
      return {};
    }
  };
  const fromApi = async (id: string): Promise<ShadowSpec | undefined> => (await entryOf(id))?.spec;
  /** A shadow attached over the API, with the revision of its entry. */
  const entryOf = async (id: string) => {
    const { shadows } = await open();
    const e = await shadows.get(id);
    return e && e.operation === "PUT"
      ? { spec: parseShadowSpec(e.json()), revision: e.revision }
      : undefined;
  };
  const checkId = (id: string) => {
    if (!SHADOW_ID.test(id)) throw new NotFoundError(`no shadow ${JSON.stringify(id)}`);
  };

  return {
    async list() {
      const { shadows, versions } = await open();
      const live = await status();
      const out: ListedShadow[] = configured.map((s) => ({ ...s, source: "config" as const }));
      for await (const key of await shadows.keys()) {
        const spec = await fromApi(key).catch(() => undefined);
        if (spec && !configured.some((c) => c.id === spec.id)) out.push({ ...spec, source: "api" });
      }
      for (const s of out) if (live[s.id]) s.status = live[s.id];
      const promoted: ListedVersion[] = [];
      for await (const key of await versions.keys()) {
        const e = await versions.get(key);
        if (!e || e.operation !== "PUT") continue;
        try {
          promoted.push(parseStepVersion(e.string()));
        } catch (err) {
          promoted.push({ key, invalid: (err as Error).message });
        }
      }
      return { shadows: out.sort((a, b) => a.id.localeCompare(b.id)), versions: promoted };
    },

    async attach(value, by) {
      const spec = parseShadowSpec(value, {
        running: definitions.pipelines.map((p) => p.def.name),
      });
      checkDefinitionStep(spec);
      if (configured.some((c) => c.id === spec.id)) {
        throw new WeftError(ErrorCode.Conflict, `shadow ${spec.id} is attached by WEFT_SHADOW`);
      }
      try {
        await canRun?.(spec);
      } catch (cause) {
        throw new ValidationError(`the candidate cannot run: ${(cause as Error).message}`, {
          field: spec.candidate.definition ? "/candidate/definition" : "/candidate",
          cause,
        });
      }
      spec.attached_by = by;
      spec.attached_at = new Date().toISOString();
      const { shadows } = await open();
      let revision: number;
      try {
        revision = await shadows.create(spec.id, JSON.stringify(spec));
      } catch (cause) {
        throw new WeftError(
          ErrorCode.Conflict,
          `a shadow ${spec.id} is attached already: detach it first`,
          { cause },
        );
      }
      // Counted once stored, so that attaches at once cannot all pass.
      const ids = new Set(configured.map((c) => c.id));
      for await (const key of await shadows.keys()) ids.add(key);
      if (ids.size > maxShadows) {
        await shadows.delete(spec.id, { previousSeq: revision }).catch(() => {});
        throw new WeftError(
          ErrorCode.Conflict,
          `${maxShadows} live shadows are attached already: detach one first`,
          { field: "/id" },
        );
      }
      await audit("attached", spec, { shadow: spec.id, by, spec });
      return spec;
    },

    async detach(id, by) {
      checkId(id);
      if (configured.some((c) => c.id === id)) {
        throw new WeftError(
          ErrorCode.Conflict,
          `shadow ${id} is attached by WEFT_SHADOW: remove it there and restart the shadow service`,
        );
      }
      const spec = await fromApi(id);
      if (!spec) throw new NotFoundError(`no shadow ${JSON.stringify(id)}`);
      await (await open()).shadows.delete(id);
      await audit("detached", spec, { shadow: id, by });
      return { detached: id };
    },

    async promote(id, by) {
      checkId(id);
      const fromConfig = configured.find((c) => c.id === id);
      const attached = fromConfig ? undefined : await entryOf(id);
      const spec = fromConfig ?? attached?.spec;
      if (!spec) throw new NotFoundError(`no shadow ${JSON.stringify(id)}`);
      const key = stepVersionKey(spec.pipeline, spec.step);
      // What the step's entry was when this promotion began: one promotion per reading.
      const before = fromConfig ? await (await open()).versions.get(key) : null;
      if (!shippedShadowSteps(spec.pipeline)) await checkPromotable(spec);
      // Promoted on what it has shown: a shadow that never ran, or compared nothing, would
      // record a version no one has seen decide (and, not starting, no step could run).
      const live = (await status())[id];
      if (!live) {
        throw new WeftError(
          ErrorCode.Conflict,
          `shadow ${id} is not running (the shadow service does not report it): promote a ` +
            `shadow once it has compared items with production`,
        );
      }
      if (live.up === false) {
        throw new WeftError(
          ErrorCode.Conflict,
          `shadow ${id} is not running${live.error ? `: ${live.error}` : ""}`,
        );
      }
      if (!((live.compared as number | undefined) ?? 0)) {
        throw new WeftError(
          ErrorCode.Conflict,
          `shadow ${id} has compared no item with production yet: nothing says what ` +
            `promoting it would change`,
        );
      }
      const figures = live.fields as Record<string, FieldFigures> | undefined;
      const version: StepVersion = {
        pipeline: spec.pipeline,
        step: spec.step,
        candidate: spec.candidate,
        promoted_from: id,
        ...(figures && Object.keys(figures).length > 0
          ? {
            agreement: Object.fromEntries(
              Object.entries(figures).map(([f, v]) => [f, v.agreement]),
            ),
          }
          : {}),
        promoted_at: new Date().toISOString(),
        promoted_by: by,
      };
      const { shadows, versions } = await open();
      // Compare-and-set: of two promotions at once, the second finds the shadow gone (an
      // attached one: its entry is deleted only at the revision read) or the step's entry
      // changed (one of WEFT_SHADOW), as a promotion after the first would.
      if (attached) {
        // Shadowing production with itself measures nothing: the shadow goes.
        try {
          await shadows.delete(id, { previousSeq: attached.revision });
        } catch (cause) {
          throw new NotFoundError(
            `no shadow ${JSON.stringify(id)} (promoted or detached meanwhile)`,
            { cause },
          );
        }
        await versions.put(key, JSON.stringify(version));
      } else {
        try {
          if (before) await versions.update(key, JSON.stringify(version), before.revision);
          else await versions.create(key, JSON.stringify(version));
        } catch (cause) {
          throw new WeftError(
            ErrorCode.Conflict,
            `${key} was promoted or reset meanwhile: look again (deno task shadow list)`,
            { cause },
          );
        }
      }
      await audit("promoted", spec, { shadow: id, by, version });
      return version;
    },

    async reset(step, by) {
      const parts = step.split(".");
      // An entry no step reads, under a key that names no step (`nats kv put weft_step_versions
      // zzz ...`): GET /shadows lists it as invalid, and a reset removes it.
      if (/^[-\w=]+(\.[-\w=]+)*$/.test(step) && step.length <= 256) {
        const { versions } = await open();
        const e = await versions.get(step).catch(() => null);
        if (e && e.operation === "PUT") {
          let valid = true;
          try {
            parseStepVersion(e.string());
          } catch {
            valid = false;
          }
          if (!valid) {
            await versions.delete(step);
            await audit("reset", { pipeline: "_", step: "_" }, { by, key: step, invalid: true });
            return { reset: step };
          }
        }
      }
      if (parts.length !== 2) {
        // Exactly `<pipeline>.<step>`: `a.b.c.d` reset a.b before.
        throw new ValidationError(
          `step must be <pipeline>.<step> (e.g. orders.price), not ${JSON.stringify(step)}`,
          { field: "/step" },
        );
      }
      const [pipeline, name] = parts;
      if (
        !pipeline || !name ||
        !(shippedShadowSteps(pipeline)?.includes(name) || definitionStep(pipeline, name))
      ) {
        throw new NotFoundError(
          `no shadowable step ${JSON.stringify(step)} (a step is named <pipeline>.<step>, ` +
            `e.g. orders.price)`,
        );
      }
      const { versions } = await open();
      const key = stepVersionKey(pipeline, name);
      const e = await versions.get(key);
      if (!e || e.operation !== "PUT") {
        throw new NotFoundError(`${key} runs its configured version already`);
      }
      // An entry that is no promotion (the step ignores it) is reset all the same.
      let was: StepVersion | undefined;
      try {
        was = parseStepVersion(e.string());
      } catch { /* reset without it */ }
      await versions.delete(key);
      await audit("reset", { pipeline, step: name }, {
        by,
        ...(was ? { was } : { invalid: true }),
      });
      return { reset: key, ...(was ? { was } : {}) };
    },
  };
}
