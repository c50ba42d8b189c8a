/**
 * Prometheus metrics, on prom-client (the well-kept Node client; it runs under Deno with
 * no extra permissions). Every service keeps its own {@link WeftMetrics} registry; the
 * gateway's `GET /metrics` serves the whole mesh in one scrape: its own metrics, every
 * service's (gathered over NATS, each on its own `weft.<service>.metrics`, summed by label
 * set, so replicas of a stage add up) and the JetStream consumers' backlog read at scrape
 * time.
 *
 * Metric names and meanings are listed in docs/OBSERVABILITY.md.
 *
 * @module
 */
import * as client from "./prom.ts";
import type { LlmStats } from "../ai/llm/stats.ts";

/** Handler latency buckets, seconds: sub-millisecond rule stages to slow LLM calls. */
export const HANDLER_BUCKETS: readonly number[] = [
  0.0005,
  0.001,
  0.0025,
  0.005,
  0.01,
  0.025,
  0.05,
  0.1,
  0.25,
  0.5,
  1,
  2.5,
  5,
  10,
  30,
];
/** End-to-end latency buckets, seconds (ingested to final event). */
export const END_TO_END_BUCKETS: readonly number[] = [
  0.005,
  0.01,
  0.025,
  0.05,
  0.1,
  0.25,
  0.5,
  1,
  2.5,
  5,
  10,
  30,
  60,
  300,
];

/** Metrics serialised for aggregation (what prom-client's `getMetricsAsJSON` returns). */
export type MetricsJson = Awaited<ReturnType<client.Registry["getMetricsAsJSON"]>>;

/**
 * One service's metrics.
 *
 * @example
 * ```ts
 * import { WeftMetrics } from "./metrics.ts";
 * const m = new WeftMetrics();
 * m.processed.inc({ stage: "sentiment" });
 * const text = await m.registry.metrics();
 * console.assert(text.includes('weft_stage_processed_total{stage="sentiment"} 1'));
 * ```
 */
export class WeftMetrics {
  /** The registry holding this service's metrics. */
  readonly registry: client.Registry = new client.Registry();
  /** Messages a stage took from its consumer (redeliveries included). */
  readonly received: client.Counter<"stage">;
  /** Messages a stage handled and acked. */
  readonly processed: client.Counter<"stage">;
  /** Handling attempts that failed (each then retried or dead-lettered). */
  readonly failed: client.Counter<"stage" | "code">;
  /** Failed attempts handed back for a later retry. */
  readonly retried: client.Counter<"stage">;
  /** Messages given up on and kept in the DEADLETTER stream. */
  readonly deadLettered: client.Counter<"stage">;
  /**
   * Messages a stage holds because the DEADLETTER stream is full and refused their letter:
   * kept (leased, not redelivered) until it has room.
   */
  readonly lettersHeld: client.Gauge<"stage">;
  /** Events a stage published. */
  readonly published: client.Counter<"stage" | "type">;
  /** Handler run time. */
  readonly handlerSeconds: client.Histogram<"stage">;
  /** From an item's first event to its final one. */
  readonly endToEndSeconds: client.Histogram<"stage" | "outcome">;
  /** New items the gateway's intake accepted (HTTP and NATS requests). */
  readonly accepted: client.Counter<"pipeline">;

  constructor() {
    const registers = [this.registry];
    this.received = new client.Counter({
      name: "weft_stage_received_total",
      help: "Messages a stage took from its consumer, redeliveries included",
      labelNames: ["stage"],
      registers,
    });
    this.processed = new client.Counter({
      name: "weft_stage_processed_total",
      help: "Messages a stage handled successfully and acked",
      labelNames: ["stage"],
      registers,
    });
    this.failed = new client.Counter({
      name: "weft_stage_failed_total",
      help: "Handling attempts that failed (then retried or dead-lettered), by error code",
      labelNames: ["stage", "code"],
      registers,
    });
    this.retried = new client.Counter({
      name: "weft_stage_retried_total",
      help: "Failed attempts handed back to the server for a delayed retry",
      labelNames: ["stage"],
      registers,
    });
    this.deadLettered = new client.Counter({
      name: "weft_stage_dead_lettered_total",
      help: "Messages given up on and kept in the DEADLETTER stream",
      labelNames: ["stage"],
      registers,
    });
    this.lettersHeld = new client.Gauge({
      name: "weft_stage_letters_held",
      help: "Messages a stage holds because the DEADLETTER stream is full and refused their " +
        "dead letter (stored, and the message terminated, once it has room)",
      labelNames: ["stage"],
      registers,
    });
    this.published = new client.Counter({
      name: "weft_stage_published_total",
      help: "Events a stage published, by event type",
      labelNames: ["stage", "type"],
      registers,
    });
    this.handlerSeconds = new client.Histogram({
      name: "weft_stage_handler_seconds",
      help: "Time a stage's handler took per message, seconds",
      labelNames: ["stage"],
      buckets: [...HANDLER_BUCKETS],
      registers,
    });
    this.accepted = new client.Counter({
      name: "weft_items_accepted_total",
      help: "New items the gateway accepted at intake (HTTP and NATS requests), by pipeline",
      labelNames: ["pipeline"],
      registers,
    });
    this.endToEndSeconds = new client.Histogram({
      name: "weft_item_end_to_end_seconds",
      help: "Time from an item's ingested event to its final event (processed or failed)",
      labelNames: ["stage", "outcome"],
      buckets: [...END_TO_END_BUCKETS],
      registers,
    });
  }

  /** The metrics in Prometheus text format. */
  text(): Promise<string> {
    return this.registry.metrics();
  }

  /** The metrics as JSON, for {@link aggregateMetrics}. */
  json(): Promise<MetricsJson> {
    return this.registry.getMetricsAsJSON();
  }
}

/**
 * A service's metrics cut to `budget` bytes of JSON (a NATS reply past the server's
 * max_payload is never sent, and the gateway's /metrics would lose every series of the
 * service): the largest families lose their series first, and `weft_metrics_truncated`
 * names each one cut, with how many series it had. Unchanged when it fits.
 *
 * @example
 * ```ts
 * import { fitMetrics, WeftMetrics } from "./metrics.ts";
 * const m = new WeftMetrics();
 * const fitted = fitMetrics(await m.json(), 1_000_000);
 * console.assert(fitted.every((f) => f.name !== "weft_metrics_truncated"));
 * ```
 */
export function fitMetrics(json: MetricsJson, budget: number): MetricsJson {
  const size = (v: unknown) => new TextEncoder().encode(JSON.stringify(v)).length;
  let total = size(json);
  if (total <= budget) return json;
  const sizes = json.map((f) => size(f));
  const order = json.map((_, i) => i).sort((a, b) => sizes[b]! - sizes[a]!);
  const out = [...json];
  const cut: { labels: { metric: string }; value: number }[] = [];
  // Room for the note itself (a family and one series per cut family).
  const room = () => 200 + cut.length * 120;
  for (const i of order) {
    if (total + room() <= budget) break;
    const f = out[i]!;
    const emptied = { ...f, values: [] };
    total -= sizes[i]! - size(emptied);
    out[i] = emptied as typeof f;
    cut.push({ labels: { metric: f.name.slice(0, 200) }, value: f.values.length });
  }
  out.push(
    {
      name: "weft_metrics_truncated",
      help: "Metric families whose series a service left out of its answer, which would " +
        "have passed NATS's max_payload: the value is how many series it had",
      type: "gauge",
      aggregator: "sum",
      values: cut,
    } as unknown as MetricsJson[number],
  );
  return out;
}

/**
 * Sums several registries' JSON (metrics with the same name and labels add up) into one
 * registry; how the gateway merges the services' metrics.
 *
 * @example
 * ```ts
 * import { aggregateMetrics, WeftMetrics } from "./metrics.ts";
 * const a = new WeftMetrics(), b = new WeftMetrics();
 * a.processed.inc({ stage: "topics" }); b.processed.inc({ stage: "topics" });
 * const merged = aggregateMetrics([await a.json(), await b.json()]);
 * console.assert((await merged.metrics()).includes('{stage="topics"} 2'));
 * ```
 */
export function aggregateMetrics(parts: MetricsJson[]): client.Registry {
  return client.AggregatorRegistry.aggregate(parts.filter((p) => p.length > 0));
}

/** The content type of the Prometheus text format. */
export const PROMETHEUS_CONTENT_TYPE: string = client.register.contentType;

/**
 * Exposes an LLM stats object (src/ai/llm/stats.ts) as metrics of `registry`, read at scrape
 * time: tokens by kind, estimated cost, calls, failures, fallbacks and cache hits.
 *
 * @example
 * ```ts
 * import { createLlmStats } from "../ai/llm/stats.ts";
 * import { registerLlmMetrics, WeftMetrics } from "./metrics.ts";
 * const m = new WeftMetrics();
 * registerLlmMetrics(m.registry, createLlmStats(), "sentiment");
 * ```
 */
export function registerLlmMetrics(
  registry: client.Registry,
  stats: LlmStats,
  stage: string,
): void {
  const registers = [registry];
  // Counters mirror the stats object's totals, read when scraped.
  new client.Counter({
    name: "weft_llm_tokens_total",
    help: "LLM tokens spent, by kind (prompt, completion)",
    labelNames: ["stage", "kind"],
    registers,
    collect() {
      const s = stats.snapshot();
      this.reset();
      this.inc({ stage, kind: "prompt" }, s.prompt_tokens);
      this.inc({ stage, kind: "completion" }, s.completion_tokens);
    },
  });
  new client.Counter({
    name: "weft_llm_cost_usd_total",
    help: "Estimated LLM cost, USD",
    labelNames: ["stage"],
    registers,
    collect() {
      this.reset();
      this.inc({ stage }, stats.snapshot().cost_usd);
    },
  });
  new client.Counter({
    name: "weft_llm_calls_total",
    help: "LLM analyze calls by outcome (sent, failed, fallback, cache_hit, over_budget)",
    labelNames: ["stage", "outcome"],
    registers,
    collect() {
      const s = stats.snapshot();
      this.reset();
      this.inc({ stage, outcome: "sent" }, s.calls);
      this.inc({ stage, outcome: "failed" }, s.failures);
      this.inc({ stage, outcome: "fallback" }, s.fallbacks);
      this.inc({ stage, outcome: "cache_hit" }, s.cache_hits);
      this.inc({ stage, outcome: "over_budget" }, s.over_budget);
    },
  });
}
