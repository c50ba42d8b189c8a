/**
 * The whole mesh's metrics, gathered at scrape time by the gateway: its own registry,
 * every other service's (one request on `weft.metrics` that each instance answers; see
 * src/observability/micro.ts), and JetStream's view of every durable consumer's backlog. Also reduced
 * to a small per-stage snapshot for the dashboard.
 *
 * @module
 */
import { type NatsConnection, NoRespondersError } from "@nats-io/nats-core";
import type { JetStreamManager } from "@nats-io/jetstream";
import client from "prom-client";
import {
  aggregateMetrics,
  METRICS_SUBJECT,
  type MetricsJson,
  type WeftMetrics,
} from "../observability/metrics.ts";
import { usageOf } from "../capacity.ts";
import { DEADLETTER_STREAM, RUNTIME_STREAMS } from "../subjects.ts";
import { REDRIVEN_PREFIX } from "../redrive.ts";
import { INSTANCE_HEADER } from "../observability/micro.ts";

/** How long the gateway waits for services' metrics. */
export interface GatherOptions {
  /** Longest wait for the first answer, ms. */
  maxWaitMs?: number;
  /** The gather ends this long after the last answer, ms. */
  stallMs?: number;
  /**
   * The pipelines' streams: their durable consumers' backlogs and their usage are reported
   * (the runtime's own streams' usage always is).
   */
  pipelineStreams?: readonly string[];
  /**
   * The last answer of each service instance: an instance that answered a recent gather but
   * not this one (slow on a loaded machine) counts with its last answer instead of dropping
   * out, so the mesh's counters never seem to fall back for a moment.
   */
  cache?: MetricsCache;
}

/**
 * Each service instance's last metrics answer, kept `keepMs` (15 s by default) for the
 * gathers it misses. A restarted process is a new instance: its old answer counts until it
 * ages out, so the sum never falls below what was reported while the new one catches up.
 */
export class MetricsCache {
  #last = new Map<string, { at: number; value: MetricsJson }>();
  constructor(readonly keepMs = 15_000) {}

  /**
   * The answers of one gather (`instance` from each answer's header, when it has one), with
   * the recent answers of the instances missing from it; `now` in ms.
   */
  merge(answers: readonly { instance?: string; value: MetricsJson }[], now: number): MetricsJson[] {
    const out: MetricsJson[] = [];
    const seen = new Set<string>();
    for (const { instance, value } of answers) {
      out.push(value);
      if (instance === undefined) continue;
      seen.add(instance);
      this.#last.set(instance, { at: now, value });
    }
    for (const [instance, { at, value }] of this.#last) {
      if (now - at > this.keepMs) this.#last.delete(instance);
      else if (!seen.has(instance)) out.push(value);
    }
    return out;
  }
}

/** JetStream's counts for one durable consumer. */
export interface ConsumerBacklog {
  /** The stream the consumer reads. */
  stream: string;
  /** The durable consumer's name (the stage's). */
  consumer: string;
  /** Messages not yet delivered. */
  pending: number;
  /** Messages delivered and not yet acked. */
  ackPending: number;
  /** Messages being redelivered. */
  redelivered: number;
}

/** Every durable consumer's backlog, read from JetStream. */
export async function consumerBacklogs(
  jsm: JetStreamManager,
  streams: readonly string[] = [],
): Promise<ConsumerBacklog[]> {
  const out: ConsumerBacklog[] = [];
  for (const stream of streams) {
    for await (const ci of jsm.consumers.list(stream)) {
      // SSE's ordered consumers come and go: one deleted while the list is read comes back
      // without its config.
      if (!ci?.config?.durable_name) continue;
      out.push({
        stream,
        consumer: ci.name,
        pending: ci.num_pending,
        ackPending: ci.num_ack_pending,
        redelivered: ci.num_redelivered,
      });
    }
  }
  return out;
}

/** The metrics of every service that answers on `weft.metrics`. */
export async function gatherServiceMetrics(
  nc: NatsConnection,
  opts: GatherOptions = {},
): Promise<MetricsJson[]> {
  const parts: { instance?: string; value: MetricsJson }[] = [];
  try {
    const answers = await nc.requestMany(METRICS_SUBJECT, undefined, {
      strategy: "stall",
      stall: opts.stallMs ?? 250,
      maxWait: opts.maxWaitMs ?? 2000,
    });
    for await (const m of answers) {
      try {
        const value = m.json<MetricsJson>();
        const instance = m.headers?.get(INSTANCE_HEADER) || undefined;
        if (Array.isArray(value)) parts.push({ instance, value });
      } catch { /* an error reply or garbage: skip it */ }
    }
  } catch (err) {
    // No other service runs (the gateway alone): its own metrics are the answer.
    if (!(err instanceof NoRespondersError)) throw err;
  }
  return opts.cache ? opts.cache.merge(parts, Date.now()) : parts.map((p) => p.value);
}

/**
 * The mesh's metrics as one registry: `local` plus the services' plus JetStream's
 * backlog gauges.
 *
 * @example
 * ```ts ignore
 * const registry = await meshMetrics(nc, jsm, metrics);
 * const text = await registry.metrics();
 * ```
 */
export async function meshMetrics(
  nc: NatsConnection,
  jsm: JetStreamManager,
  local: WeftMetrics,
  opts: GatherOptions = {},
): Promise<client.Registry> {
  const [remote, backlogs, streams] = await Promise.all([
    gatherServiceMetrics(nc, opts),
    consumerBacklogs(jsm, opts.pipelineStreams),
    Promise.all(
      [...opts.pipelineStreams ?? [], ...RUNTIME_STREAMS].map((name) =>
        jsm.streams.info(
          name,
          // DEADLETTER's info also counts its redrive markers, per letter redriven.
          name === DEADLETTER_STREAM ? { subjects_filter: `${REDRIVEN_PREFIX}.*` } : undefined,
        ).catch(() => undefined)
      ),
    ),
  ]);
  const dl = streams.find((i) => i?.config.name === DEADLETTER_STREAM)?.state;
  const deadLetters = dl?.messages;
  const registry = aggregateMetrics([await local.json(), ...remote]);
  const registers = [registry];
  const pending = new client.Gauge({
    name: "weft_consumer_pending",
    help: "Messages not yet delivered to a durable consumer (JetStream num_pending)",
    labelNames: ["stream", "consumer"],
    registers,
  });
  const ackPending = new client.Gauge({
    name: "weft_consumer_ack_pending",
    help: "Messages delivered but not yet acked (JetStream num_ack_pending)",
    labelNames: ["stream", "consumer"],
    registers,
  });
  const redelivered = new client.Gauge({
    name: "weft_consumer_redelivered",
    help: "Messages being redelivered (JetStream num_redelivered)",
    labelNames: ["stream", "consumer"],
    registers,
  });
  for (const b of backlogs) {
    const labels = { stream: b.stream, consumer: b.consumer };
    pending.set(labels, b.pending);
    ackPending.set(labels, b.ackPending);
    redelivered.set(labels, b.redelivered);
  }
  if (deadLetters !== undefined) {
    new client.Gauge({
      name: "weft_deadletter_messages",
      help: "Messages in the DEADLETTER stream (letters and redrive markers)",
      registers,
    }).set(deadLetters);
    // Each redrive leaves a marker `deadletter.redriven.<seq>`: a letter with one is done.
    const markers = Object.values(dl?.subjects ?? {});
    new client.Gauge({
      name: "weft_deadletter_pending",
      help: "Dead letters not yet redriven",
      registers,
    }).set(Math.max(0, deadLetters - markers.reduce((a, b) => a + b, 0) - markers.length));
  }
  // Alert on these well before 1: intake refuses new items from WEFT_STREAM_HIGH_WATER
  // (0.9 by default), and a full stream refuses every publish.
  const usage = new client.Gauge({
    name: "weft_stream_usage_ratio",
    help: "Share of a stream's limit in use (resource: bytes or messages; 0 when unlimited)",
    labelNames: ["stream", "resource"],
    registers,
  });
  for (const info of streams) {
    if (!info) continue;
    const u = usageOf(info);
    usage.set({ stream: u.stream, resource: "bytes" }, u.bytes);
    usage.set({ stream: u.stream, resource: "messages" }, u.messages);
  }
  new client.Gauge({
    name: "weft_metrics_sources",
    help: "Services whose metrics this scrape gathered over NATS (the gateway excluded)",
    registers,
  }).set(remote.length);
  return registry;
}

/** One stage's figures on the dashboard. */
export interface StageFigures {
  /** Messages taken from the consumer. */
  received: number;
  /** Messages handled and acked. */
  processed: number;
  /** Failed attempts. */
  failed: number;
  /** Attempts retried later. */
  retried: number;
  /** Messages dead-lettered. */
  deadLettered: number;
  /** Sum of handler seconds and the number of observations. */
  handlerSeconds: number;
  /** Handler observations. */
  handlerCount: number;
  /** The consumer's backlog. */
  pending: number;
  /** The consumer's unacked deliveries. */
  ackPending: number;
}

/** One live shadow's figures on the dashboard. */
export interface ShadowFigures {
  pipeline: string;
  step: string;
  candidate: string;
  /** False when it failed to start. */
  up: boolean;
  /** Items by outcome: decided, compared, unmatched, failed, over_budget, skipped... */
  items: Record<string, number>;
  /** Agreement with production and Cohen's kappa, per compared field. */
  fields: Record<string, { agreement: number; kappa: number }>;
}

/** What the dashboard's stream sends every tick. */
export interface MeshSnapshot {
  /** When the snapshot was taken (ISO 8601). */
  time: string;
  /** Figures by stage (and consumer) name. */
  stages: Record<string, StageFigures>;
  /** SSE clients connected. */
  sseClients: number;
  /** Dead letters waiting for redrive. */
  deadLetters: number;
  /**
   * Sum and count of end-to-end latencies, and the histogram's cumulative bucket counts
   * (upper bound in seconds, `Infinity` last), for percentiles over any recent window.
   */
  endToEnd: { seconds: number; count: number; buckets: [number, number][] };
  /** Live shadows, by id. */
  shadows: Record<string, ShadowFigures>;
}

/** Reduces the mesh's registry to per-stage figures. */
export async function meshSnapshot(registry: client.Registry): Promise<MeshSnapshot> {
  const json = await registry.getMetricsAsJSON();
  const stages: Record<string, StageFigures> = {};
  const stageOf = (name: string) =>
    stages[name] ??= {
      received: 0,
      processed: 0,
      failed: 0,
      retried: 0,
      deadLettered: 0,
      handlerSeconds: 0,
      handlerCount: 0,
      pending: 0,
      ackPending: 0,
    };
  const snapshot: MeshSnapshot = {
    time: new Date().toISOString(),
    stages,
    sseClients: 0,
    deadLetters: 0,
    endToEnd: { seconds: 0, count: 0, buckets: [] },
    shadows: {},
  };
  const shadowOf = (labels: Record<string, string | number | undefined>) =>
    snapshot.shadows[String(labels.shadow)] ??= {
      pipeline: String(labels.pipeline ?? ""),
      step: String(labels.step ?? ""),
      candidate: "",
      up: false,
      items: {},
      fields: {},
    };
  const buckets = new Map<number, number>();
  let pendingLetters: number | undefined;
  const simple: Record<string, keyof StageFigures> = {
    weft_stage_received_total: "received",
    weft_stage_processed_total: "processed",
    weft_stage_failed_total: "failed",
    weft_stage_retried_total: "retried",
    weft_stage_dead_lettered_total: "deadLettered",
  };
  for (const metric of json) {
    for (const v of metric.values) {
      const labels = v.labels as Record<string, string | number | undefined>;
      const field = simple[metric.name];
      if (field && typeof labels.stage === "string") stageOf(labels.stage)[field] += v.value;
      else if (metric.name === "weft_stage_handler_seconds" && typeof labels.stage === "string") {
        const name = (v as { metricName?: string }).metricName;
        if (name?.endsWith("_sum")) stageOf(labels.stage).handlerSeconds += v.value;
        if (name?.endsWith("_count")) stageOf(labels.stage).handlerCount += v.value;
      } else if (metric.name === "weft_consumer_pending" && typeof labels.consumer === "string") {
        stageOf(labels.consumer).pending = v.value;
      } else if (
        metric.name === "weft_consumer_ack_pending" && typeof labels.consumer === "string"
      ) {
        stageOf(labels.consumer).ackPending = v.value;
      } else if (metric.name.startsWith("weft_shadow_") && typeof labels.shadow === "string") {
        const sh = shadowOf(labels);
        const field = typeof labels.field === "string" ? labels.field : "";
        if (metric.name === "weft_shadow_up") {
          sh.up = v.value > 0;
          sh.candidate = String(labels.candidate ?? "");
        } else if (metric.name === "weft_shadow_items_total") {
          sh.items[String(labels.outcome)] = v.value;
        } else if (metric.name === "weft_shadow_agreement_ratio" && field) {
          (sh.fields[field] ??= { agreement: 0, kappa: 0 }).agreement = v.value;
        } else if (metric.name === "weft_shadow_kappa" && field) {
          (sh.fields[field] ??= { agreement: 0, kappa: 0 }).kappa = v.value;
        }
      } else if (metric.name === "weft_sse_clients") snapshot.sseClients += v.value;
      else if (metric.name === "weft_deadletter_messages") snapshot.deadLetters = v.value;
      else if (metric.name === "weft_deadletter_pending") pendingLetters = v.value;
      else if (metric.name === "weft_items_accepted_total") {
        // Items the gateway accepted entered the pipeline as the ingest stage's do.
        stageOf("ingest").received += v.value;
        stageOf("ingest").processed += v.value;
      } else if (metric.name === "weft_item_end_to_end_seconds") {
        const name = (v as { metricName?: string }).metricName;
        if (name?.endsWith("_sum")) snapshot.endToEnd.seconds += v.value;
        if (name?.endsWith("_count")) snapshot.endToEnd.count += v.value;
        if (name?.endsWith("_bucket")) {
          const le = labels.le === "+Inf" ? Infinity : Number(labels.le);
          buckets.set(le, (buckets.get(le) ?? 0) + v.value);
        }
      }
    }
  }
  if (pendingLetters !== undefined) snapshot.deadLetters = pendingLetters;
  snapshot.endToEnd.buckets = [...buckets].sort((a, b) => a[0] - b[0]);
  return snapshot;
}
