/**
 * Promoted step versions: a live shadow's candidate made production. The promotion is a
 * record in the `weft_step_versions` bucket (key `<pipeline>.<step>`, with history, so
 * `nats kv history weft_step_versions <pipeline>.<step>` lists every promotion) plus an
 * audit event on the SHADOW stream. A production step follows its key: at start it runs
 * the promoted version if there is one, and while running it switches when a promotion
 * (or a reset: the key deleted) arrives, from the next message on. A version that cannot
 * be built (a ruleset it may not read), or an entry that is no promotion (malformed), is
 * logged and the step keeps what it runs, following its key on.
 *
 * @module
 */
import { type KvEntry, Kvm, KvWatchInclude } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/nats-core";
import type { Config } from "./config.ts";
import type { AnalyzerConfig } from "./ai/configured_analyzers.ts";
import type { Logger } from "./observability/log.ts";
import {
  candidateConfig,
  parseStepVersion,
  type StepVersion,
  stepVersionKey,
} from "./shadow/spec.ts";
import { STEP_VERSION_BUCKET } from "./subjects.ts";

/** What a step runs now, switched by promotions. */
export interface LiveVersion<T> {
  /** The version to use for the next message. */
  current(): T;
  /** The promotion it runs, or null for the configured version. */
  promoted(): StepVersion | null;
}

/**
 * Builds what a step runs from its configuration, then follows its promoted version.
 *
 * @example
 * ```ts ignore
 * const live = await followStepVersion({ nc, config, log }, "orders", "price", priceAnalyzers);
 * const stage = sentimentStage({ name: "live", analyze: (t, o) => live.current().sentiment.analyze(t, o) });
 * ```
 */
export async function followStepVersion<T>(
  ctx: { nc: NatsConnection; config: Config; log: Logger },
  pipeline: string,
  step: string,
  build: (config: AnalyzerConfig) => Promise<T>,
): Promise<LiveVersion<T>> {
  return await followVersion(
    ctx,
    pipeline,
    step,
    await build(ctx.config),
    (v) => build(candidateConfig(ctx.config, { candidate: v.candidate, step })),
  );
}

/**
 * Runs `configured`, or what `build` makes of the step's promoted version while there is
 * one (`weft_step_versions`, key `<pipeline>.<step>`). A promotion `build` refuses is logged
 * and the current version kept.
 */
export async function followVersion<T>(
  ctx: { nc: NatsConnection; log: Logger },
  pipeline: string,
  step: string,
  configured: T,
  build: (version: StepVersion) => Promise<T>,
): Promise<LiveVersion<T>> {
  const { nc, log } = ctx;
  let current = configured;
  let promoted: StepVersion | null = null;
  const key = stepVersionKey(pipeline, step);
  const apply = async (value: StepVersion | null) => {
    if (value === null) {
      if (promoted === null) return;
      current = configured;
      promoted = null;
      log.info("step version reset to the configured one", { step: key });
      return;
    }
    try {
      current = await build(value);
      promoted = value;
      log.info("promoted step version applied", {
        step: key,
        from_shadow: value.promoted_from,
        candidate: value.candidate,
      });
    } catch (err) {
      log.error("promoted step version could not be applied; keeping the current one", {
        step: key,
        err,
      });
    }
  };
  /**
   * What an entry says to run: its promotion, null for none (deleted), or undefined for an
   * entry that is no promotion (logged: the step keeps what it runs, and goes on watching).
   */
  const versionOf = (e: KvEntry | null): StepVersion | null | undefined => {
    if (!e || e.operation !== "PUT") return null;
    try {
      return parseStepVersion(e.string());
    } catch (err) {
      log.error("invalid step version ignored; keeping the current one", {
        step: key,
        revision: e.revision,
        err: String(err),
      });
      return undefined;
    }
  };
  try {
    const kv = await new Kvm(nc).open(STEP_VERSION_BUCKET);
    const entry = versionOf(await kv.get(key));
    if (entry) await apply(entry);
    const watch = await kv.watch({ key, include: KvWatchInclude.UpdatesOnly });
    (async () => {
      for await (const _ of watch) {
        try {
          // What the bucket holds, not what the watch delivered: any reader able to create a
          // push consumer can have the server deliver another stream's message onto this
          // watch's inbox (a forged promotion reached a step that way).
          const now = versionOf(await kv.get(key));
          if (now !== undefined) await apply(now);
        } catch (err) {
          // A read that failed (NATS away a moment): the next change reads again.
          log.warn("step version not read; keeping the current one", { step: key, err });
        }
      }
    })().catch((err) => log.warn("step version watch ended", { step: key, err }));
  } catch (err) {
    // No bucket (an older topology): the configured version runs, as before.
    log.warn("step versions unavailable: running the configured version", {
      step: key,
      err: String(err),
    });
  }
  return { current: () => current, promoted: () => promoted };
}
