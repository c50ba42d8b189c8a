/**
 * The shadow service's work: runs every live shadow attached by configuration
 * (`WEFT_SHADOW`) or over the API (the `weft_shadows` bucket, watched: an attach starts a
 * shadow within moments, a detach stops it and deletes its consumer). A shadow that cannot
 * start (a missing ruleset, an LLM not configured) is reported (`weft_shadow_up 0`, the
 * log) and the others run on.
 *
 * @module
 */
import { jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/nats-core";
import type { Config } from "../config.ts";
import {
  deleteShadowConsumer,
  MAX_FIELDS,
  registerShadowMetrics,
  runShadow,
  type ShadowRunner,
  ShadowTally,
} from "./live.ts";
import { pipelineStreamOf } from "../pipeline/derive.ts";
import { loadPipelines } from "../pipeline/runtime.ts";
import type { Logger } from "../observability/log.ts";
import type { WeftMetrics } from "../observability/metrics.ts";
import type { Runnable } from "../service.ts";
import { parseShadowSpec, type ShadowSpec } from "./spec.ts";
import { SHADOW_BUCKET, SHADOW_TALLY_BUCKET } from "../subjects.ts";
import { SHIPPED_PIPELINES } from "../../pipelines/shipped.ts";

interface Hosted {
  json: string;
  source: "config" | "api";
  tally: ShadowTally;
  runner?: ShadowRunner;
}

/**
 * Hosts the live shadows until stopped.
 *
 * @example
 * ```ts ignore
 * const host = await hostShadows({ nc, config, log, metrics });
 * await host.stop();
 * ```
 */
export async function hostShadows(
  ctx: { nc: NatsConnection; config: Config; log: Logger; metrics: WeftMetrics },
): Promise<Runnable> {
  const { nc, config, log } = ctx;
  const jsm = await jetstreamManager(nc);
  // The running definitions, whose work steps may be shadowed too.
  const root = new URL("../../", import.meta.url).pathname;
  const pipelines = await loadPipelines(config.pipelines, root);
  const hosted = new Map<string, Hosted>();
  registerShadowMetrics(ctx.metrics.registry, () => [...hosted.values()].map((h) => h.tally));
  // One change at a time per shadow, in order; shadows apart from each other, so one slow
  // to stop (its stop is bounded anyway) holds no other's start or detach.
  const chains = new Map<string, Promise<void>>();
  const serial = (id: string, work: () => Promise<void>) => {
    const next: Promise<void> = (chains.get(id) ?? Promise.resolve()).then(work)
      .catch((err) => log.error("shadow change failed", { shadow: id, err }))
      .finally(() => {
        if (chains.get(id) === next) chains.delete(id);
      });
    chains.set(id, next);
  };

  const start = async (spec: ShadowSpec, source: Hosted["source"]) => {
    const json = JSON.stringify({ ...spec, attached_by: undefined, attached_at: undefined });
    const have = hosted.get(spec.id);
    if (have && have.json === json) return;
    if (have?.source === "config" && source === "api") {
      log.warn("shadow attached over the API ignored: WEFT_SHADOW has one with the same id", {
        shadow: spec.id,
      });
      return;
    }
    await have?.runner?.stop();
    const h: Hosted = { json, source, tally: new ShadowTally(spec) };
    hosted.set(spec.id, h);
    try {
      h.runner = await runShadow({ nc, spec, config, log, tally: h.tally, pipelines, root });
    } catch (err) {
      h.tally.up = false;
      h.tally.error = (err as Error).message;
      log.error("shadow did not start", { shadow: spec.id, err });
    }
  };
  const remove = async (id: string, source: Hosted["source"]) => {
    const h = hosted.get(id);
    if (!h || h.source !== source) return;
    await h.runner?.stop();
    hosted.delete(id);
    await deleteShadowConsumer(jsm, h.tally.spec).catch((err) =>
      log.warn("shadow consumer not deleted", { shadow: id, err })
    );
    // Its counters go with it (an attachment under the same id starts from zero anyway).
    await new Kvm(nc).open(SHADOW_TALLY_BUCKET).then((kv) => kv.delete(id)).catch(() => {});
    log.info("shadow detached", { shadow: id });
  };

  for (const spec of config.shadows) serial(spec.id, () => start(spec, "config"));

  // Shadows attached over the API, and their changes.
  let stopped = false;
  let watcher: Awaited<ReturnType<Awaited<ReturnType<Kvm["open"]>>["watch"]>> | undefined;
  let resolveDone!: () => void;
  const done = new Promise<void>((r) => (resolveDone = r));
  try {
    const kv = await new Kvm(nc).open(SHADOW_BUCKET);
    // Consumers of shadows detached while this service was down.
    const wanted = new Set([
      ...config.shadows.map((s) => s.id),
      ...await kv.keys().then(
        async (it) => {
          const ids: string[] = [];
          for await (const k of it) ids.push(k);
          return ids;
        },
      ),
    ]);
    const streams = [
      ...SHIPPED_PIPELINES.filter((w) => w.shadowSteps).flatMap((w) =>
        w.streams.map((s) => s.name)
      ),
      ...pipelines.map((p) => pipelineStreamOf(p.def.name)),
    ];
    for (const stream of streams) {
      for await (const ci of jsm.consumers.list(stream)) {
        const name = ci?.config?.durable_name ?? "";
        if (name.startsWith("shadow_") && !wanted.has(name.slice(7))) {
          await jsm.consumers.delete(stream, name).catch(() => {});
          log.info("deleted the consumer of a detached shadow", { stream, consumer: name });
        }
      }
    }
    watcher = await kv.watch({ key: ">" });
    (async () => {
      for await (const e of watcher!) {
        if (e.operation === "PUT") {
          let spec: ShadowSpec;
          try {
            spec = parseShadowSpec(e.json());
          } catch (err) {
            log.error("invalid shadow in the bucket; ignored", { key: e.key, err });
            continue;
          }
          serial(spec.id, () => start(spec, "api"));
        } else serial(e.key, () => remove(e.key, "api"));
      }
    })().catch((err) => log.error("shadow watch failed", { err })).finally(() => {
      // The watch ended on its own: end the service, so it is restarted whole.
      if (!stopped) resolveDone();
    });
  } catch (err) {
    // No bucket (an older topology): configured shadows still run.
    log.warn("shadows bucket unavailable: only WEFT_SHADOW shadows run", { err: String(err) });
  }
  log.info("shadow host started", { configured: config.shadows.map((s) => s.id) });

  return {
    done,
    get stats() {
      const shadows = Object.fromEntries(
        [...hosted].map(([id, h]) => [id, {
          source: h.source,
          up: h.tally.up,
          ...(h.tally.error ? { error: h.tally.error } : {}),
          candidate: h.tally.candidate.slice(0, 200),
          step: `${h.tally.spec.pipeline}.${h.tally.spec.step}`,
          ...h.tally.counts,
          ...(h.tally.fieldsDropped
            ? {
              fields_dropped: h.tally.fieldsDropped,
              note: `compares its first ${MAX_FIELDS} fields only`,
            }
            : {}),
          fields: h.tally.figures(),
        } as Record<string, unknown>]),
      );
      return { pid: Deno.pid, shadows: fitStatus(shadows, statusBudget(nc)) };
    },
    async stop() {
      stopped = true;
      watcher?.stop();
      await Promise.all(chains.values());
      await Promise.all([...hosted.values()].map((h) => h.runner?.stop()));
      resolveDone();
    },
  };
}

/** Bytes a status reply may take: the server's max_payload, less room for the envelope. */
function statusBudget(nc: NatsConnection): number {
  return Math.max(16 * 1024, (nc.info?.max_payload ?? 1024 * 1024) - 8 * 1024);
}

/**
 * The shadows' status cut to `budget` bytes of JSON: the largest shadows' per-field figures
 * go first (`fields_truncated: true`), then, if that is not enough, every shadow past those
 * that fit is listed by its counters only. Every shadow stays listed with its `up` and
 * `compared` (what a promotion checks): one shadow's size never hides the others.
 */
export function fitStatus(
  shadows: Record<string, Record<string, unknown>>,
  budget: number,
): Record<string, Record<string, unknown>> {
  const size = (v: unknown) => new TextEncoder().encode(JSON.stringify(v)).length;
  if (size(shadows) <= budget) return shadows;
  const out = { ...shadows };
  const sizes = new Map(Object.entries(out).map(([id, v]) => [id, size(v)]));
  const bySize = [...sizes.keys()].sort((a, b) => sizes.get(b)! - sizes.get(a)!);
  for (const id of bySize) {
    const { fields: _, note: __, ...rest } = out[id]!;
    out[id] = { ...rest, fields_truncated: true };
    if (size(out) <= budget) return out;
  }
  // Thousands of shadows: what a promotion and a listing need, nothing else.
  for (const id of Object.keys(out)) {
    const s = out[id]!;
    out[id] = {
      up: s.up,
      compared: s.compared,
      ...(s.error ? { error: String(s.error).slice(0, 200) } : {}),
      fields_truncated: true,
    };
  }
  return out;
}
