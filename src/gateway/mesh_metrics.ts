/**
 * The whole mesh's metrics, gathered at scrape time by the gateway: its own registry,
 * every other service's (a request on each one's `weft.<service>.metrics`, which every
 * instance of it answers; see src/observability/micro.ts), and JetStream's view of every
 * durable consumer's backlog. Also reduced to a small per-stage snapshot for the dashboard.
 *
 * Who answered is known from the subject: only a service's own identity may subscribe to its
 * metrics subject, so only it sees the reply inbox of that request (a fresh random one per
 * request). An answer is still checked against what that service can report: one with
 * another service's stage, a negative counter, or a series only the gateway reports is
 * refused whole ({@link refusalOf}).
 *
 * @module
 */
import { Empty, headers, type Msg, type NatsConnection } from "@nats-io/nats-core";
import type { JetStreamManager } from "@nats-io/jetstream";
import * as client from "../observability/prom.ts";
import { aggregateMetrics, type MetricsJson, type WeftMetrics } from "../observability/metrics.ts";
import { usageOf } from "../capacity.ts";
import { DEADLETTER_STREAM, RUNTIME_STREAMS } from "../subjects.ts";
import { REDRIVEN_PREFIX } from "../redrive.ts";
import { INSTANCE_HEADER, metricsSubject } from "../observability/micro.ts";
import type { PipelineWiring } from "../wiring.ts";
import { type LoadedPipeline, pipelineServiceSpecs } from "../pipeline/runtime.ts";

/** One service the gateway asks for its metrics, and what is its own to report. */
export interface MetricsSource {
  /** The service's name: it answers on `weft.<service>.metrics`. */
  service: string;
  /** Its stages (durable consumers): the `stage` labels no other service may report. */
  stages: readonly string[];
  /** Prefixes of metric families only it reports (the shadow service's `weft_shadow_`). */
  families?: readonly string[];
}

/**
 * The runtime's services besides the gateway (the supervisor's, src/supervisor.ts): the
 * scheduler, and the shadow service, which alone reports the live shadows' families.
 */
const RUNTIME_SOURCES: readonly MetricsSource[] = [
  { service: "scheduler", stages: [] },
  { service: "shadow", stages: [], families: ["weft_shadow_"] },
];

/**
 * The services whose metrics the gateway gathers: the hand-wired pipelines' (`wirings`),
 * the definitions' (`pipelines`) and the runtime's, as the supervisor starts them (the same
 * registry); never the gateway itself, which adds its own.
 *
 * @example
 * ```ts
 * import { metricsSources } from "./mesh_metrics.ts";
 * const sources = metricsSources([], []);
 * console.assert(sources.some((s) => s.service === "scheduler"));
 * ```
 */
export function metricsSources(
  wirings: readonly PipelineWiring[],
  pipelines: readonly LoadedPipeline[],
): MetricsSource[] {
  const out = new Map<string, MetricsSource>();
  for (
    const spec of [...wirings.flatMap((w) => w.services), ...pipelineServiceSpecs(pipelines, "")]
  ) {
    if (spec.name === "gateway" || out.has(spec.name)) continue;
    out.set(spec.name, {
      service: spec.name,
      stages: (spec.access.consumes ?? []).map((c) => c.durable),
    });
  }
  for (const s of RUNTIME_SOURCES) if (!out.has(s.service)) out.set(s.service, s);
  return [...out.values()];
}

/**
 * Families only the gateway reports (computed at scrape time, or counted at its routes): a
 * service's answer with a series of one is refused.
 */
export const GATEWAY_FAMILIES: ReadonlySet<string> = new Set([
  "weft_consumer_pending",
  "weft_consumer_ack_pending",
  "weft_consumer_redelivered",
  "weft_deadletter_messages",
  "weft_deadletter_pending",
  "weft_stream_usage_ratio",
  "weft_metrics_sources",
  "weft_metrics_refused_total",
  "weft_http_requests_total",
  "weft_sse_clients",
  "weft_sse_waiting",
  "weft_items_accepted_total",
]);

/**
 * Families a gateway process counts that its peers add to their own: with
 * `WEFT_EVENTS_PORT` two gateway processes take items (HTTP and NATS requests each), and
 * each one's `/metrics` and dashboard count what both accepted. They ask each other on
 * `weft.gateway.metrics` (one identity: {@link servePeerMetrics}).
 */
export const PEER_FAMILIES: ReadonlySet<string> = new Set(["weft_items_accepted_total"]);

/** The gateway processes' service name, and their subject for answering each other. */
const PEER_SERVICE = "gateway";
const PEER_SUBJECT = metricsSubject(PEER_SERVICE);

/**
 * Answers the other gateway processes on `weft.gateway.metrics` with this one's
 * {@link PEER_FAMILIES}, its `instance` in the {@link INSTANCE_HEADER} (a gather skips its
 * own answer by it). Every gateway process answers each request (no queue group).
 *
 * @example
 * ```ts ignore
 * const peers = servePeerMetrics(nc, metrics, crypto.randomUUID());
 * peers.stop();
 * ```
 */
export function servePeerMetrics(
  nc: NatsConnection,
  metrics: WeftMetrics,
  instance: string,
): { stop(): void } {
  const sub = nc.subscribe(PEER_SUBJECT, {
    callback: (err, m) => {
      if (err || !m.reply) return;
      metrics.json().then((json) => {
        const h = headers();
        h.set(INSTANCE_HEADER, instance);
        m.respond(JSON.stringify(json.filter((f) => PEER_FAMILIES.has(f.name))), { headers: h });
      }).catch(() => {});
    },
  });
  return { stop: () => sub.unsubscribe() };
}

/**
 * Why a peer gateway's answer is refused, or undefined when it is taken: only counters of
 * {@link PEER_FAMILIES}, each series labelled by `pipeline` alone, with a count (finite, not
 * negative).
 *
 * @example
 * ```ts
 * import { peerRefusal } from "./mesh_metrics.ts";
 * const ok = [{ name: "weft_items_accepted_total", help: "", type: "counter", aggregator: "sum",
 *   values: [{ labels: { pipeline: "orders" }, value: 2 }] }];
 * console.assert(peerRefusal(ok) === undefined);
 * console.assert(peerRefusal([{ ...ok[0], name: "weft_stage_processed_total" }]) !== undefined);
 * ```
 */
export function peerRefusal(answer: unknown): string | undefined {
  if (!Array.isArray(answer)) return "not a list of metric families";
  for (const f of answer as unknown[]) {
    if (typeof f !== "object" || f === null) return "a family that is not an object";
    const { name, type, values } = f as Record<string, unknown>;
    if (typeof name !== "string" || !PEER_FAMILIES.has(name)) {
      return `${String(name)} is no gateway's count of items`;
    }
    if (type !== "counter") return `${name}: type ${String(type)}`;
    if (!Array.isArray(values)) return `${name}: no values`;
    for (const v of values as unknown[]) {
      if (typeof v !== "object" || v === null) return `${name}: a value that is not an object`;
      const { value, labels } = v as Record<string, unknown>;
      if (typeof value !== "number" || !Number.isFinite(value) || value < 0) {
        return `${name}: not a count`;
      }
      if (typeof labels !== "object" || labels === null) return `${name}: labels not an object`;
      const keys = Object.keys(labels);
      const pipeline = (labels as Record<string, unknown>).pipeline;
      if (keys.length !== 1 || typeof pipeline !== "string") {
        return `${name}: series labelled other than by pipeline`;
      }
    }
  }
  return undefined;
}

/** The family a service adds when its answer had to leave series out (not of a stage). */
const TRUNCATED = "weft_metrics_truncated";
const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const TYPES: ReadonlySet<string> = new Set(["counter", "gauge", "histogram"]);

/**
 * Why an answer on `source`'s metrics subject is refused, or undefined when it is taken:
 * not prom-client JSON of counters, gauges and histograms summed by label set; a family only
 * the gateway reports, or only another service does; a series with another service's
 * `stage`; a value that is not a finite number, or a negative one on a counter or histogram
 * (counts only grow); or a family whose type differs from the one `types` has for it
 * (which it then learns).
 *
 * @example
 * ```ts
 * import { refusalOf } from "./mesh_metrics.ts";
 * const owners = new Map([["dispatch", "dispatch"], ["topics", "topics"]]);
 * const forged = [{
 *   name: "weft_stage_processed_total", help: "", type: "counter", aggregator: "sum",
 *   values: [{ labels: { stage: "dispatch" }, value: 5 }],
 * }];
 * const why = refusalOf(forged, { service: "topics", stages: ["topics"] }, owners, [], new Map());
 * console.assert(why === "weft_stage_processed_total: stage dispatch is dispatch's");
 * ```
 */
export function refusalOf(
  answer: unknown,
  source: MetricsSource,
  owners: ReadonlyMap<string, string>,
  others: readonly MetricsSource[],
  types: Map<string, string>,
): string | undefined {
  if (!Array.isArray(answer)) return "not a list of metric families";
  const seen = new Map<string, string>();
  for (const f of answer as unknown[]) {
    if (typeof f !== "object" || f === null) return "a family that is not an object";
    const { name, type, help, aggregator, values } = f as Record<string, unknown>;
    if (typeof name !== "string" || !METRIC_NAME.test(name)) return "a family with a bad name";
    if (typeof type !== "string" || !TYPES.has(type)) return `${name}: type ${String(type)}`;
    if (help !== undefined && typeof help !== "string") return `${name}: bad help`;
    if (aggregator !== undefined && aggregator !== "sum") {
      return `${name}: aggregator ${String(aggregator)}`;
    }
    if (!Array.isArray(values)) return `${name}: no values`;
    if (values.length === 0) continue;
    if (GATEWAY_FAMILIES.has(name)) return `${name} is the gateway's`;
    const owner = others.find((o) =>
      o.service !== source.service && (o.families ?? []).some((p) => name.startsWith(p))
    );
    if (owner) return `${name} is ${owner.service}'s`;
    const ownsFamily = (source.families ?? []).some((p) => name.startsWith(p));
    const known = types.get(name) ?? seen.get(name);
    if (known !== undefined && known !== type) return `${name}: ${type}, not ${known}`;
    seen.set(name, type);
    const suffixes = type === "histogram" ? ["_bucket", "_sum", "_count"] : [""];
    for (const v of values as unknown[]) {
      if (typeof v !== "object" || v === null) return `${name}: a value that is not an object`;
      const { value, labels, metricName } = v as Record<string, unknown>;
      if (typeof value !== "number" || !Number.isFinite(value)) return `${name}: not a number`;
      if (type !== "gauge" && value < 0) return `${name}: negative ${type} value ${value}`;
      if (metricName !== undefined && !suffixes.some((x) => metricName === name + x)) {
        return `${name}: series named ${String(metricName)}`;
      }
      if (typeof labels !== "object" || labels === null) return `${name}: labels not an object`;
      for (const [k, l] of Object.entries(labels)) {
        if (!LABEL_NAME.test(k)) return `${name}: a bad label name`;
        if (typeof l !== "string" && typeof l !== "number") {
          return `${name}: label ${k} not a value`;
        }
      }
      // Every series a service reports is of one of its own stages (its own families and
      // its truncation note aside): not another's, nor one nobody has, nor none at all.
      if (ownsFamily || name === TRUNCATED) continue;
      const stage = (labels as Record<string, unknown>).stage;
      const stageOwner = typeof stage === "string" ? owners.get(stage) : undefined;
      if (stageOwner !== undefined && stageOwner !== source.service) {
        return `${name}: stage ${String(stage)} is ${stageOwner}'s`;
      }
      if (typeof stage !== "string" || !source.stages.includes(stage)) {
        return `${name}: ${
          typeof stage === "string" ? `stage ${stage} is no stage` : "a series of no stage"
        } of ${source.service}'s`;
      }
    }
  }
  for (const [name, type] of seen) types.set(name, type);
  return undefined;
}

/** How long the gateway waits for services' metrics. */
export interface GatherOptions {
  /** The services to ask (see {@link metricsSources}); none when absent. */
  sources?: readonly MetricsSource[];
  /** Longest wait for a service's first answer, ms. */
  maxWaitMs?: number;
  /** A service's gather ends this long after its last answer, ms. */
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
  /** Told of each answer refused (see {@link refusalOf}): the service and why. */
  onRefused?: (service: string, reason: string) => void;
  /** Families' types as the gateway's own registry has them: an answer must agree. */
  local?: MetricsJson;
  /**
   * This gateway process's instance (as {@link servePeerMetrics} answers with it): when set,
   * the other gateway processes are asked too, and their {@link PEER_FAMILIES} added.
   */
  instance?: string;
}

/**
 * Families a restarted process reports whole again, not from 0: the live shadows' counts,
 * kept in the `weft_shadow_tallies` bucket (retiring a dead instance's would count them twice,
 * and keep a detached shadow's series).
 */
const RESTORED = ["weft_shadow_"];

/**
 * Each service instance's last metrics answer, kept `keepMs` (15 s by default) for the
 * gathers it misses (an instance: the service's name and the id its answer's header gives),
 * and the counters of the instances gone longer than that, so the mesh's counters never fall.
 *
 * A restarted process is a new instance, counting from 0: its old answer counts until it
 * ages out, then the old answer's counters and histograms (never its gauges) are retired
 * into a total that every later gather adds, so the sum stays what was reported. Prometheus
 * would read any fall as a counter reset. An instance that answers again after it was retired
 * (it was only slow) is taken out of the retired total, its own answer counting instead; one
 * retired longer than `reviveMs` (an hour by default) is folded into the total for good.
 * (Families a restarted process restores, {@link RESTORED}, are never retired.)
 */
export class MetricsCache {
  #last = new Map<string, { at: number; value: MetricsJson }>();
  #retired = new Map<string, { at: number; value: MetricsJson }>();
  #folded: MetricsJson = [];
  constructor(readonly keepMs = 15_000, readonly reviveMs = 3_600_000) {}

  /**
   * The answers of one gather (`instance` from each answer's header, when it has one), with
   * the recent answers of the instances missing from it, and the retired instances' counters
   * as one more part; `now` in ms.
   */
  merge(answers: readonly { instance?: string; value: MetricsJson }[], now: number): MetricsJson[] {
    const out: MetricsJson[] = [];
    const seen = new Set<string>();
    for (const { instance, value } of answers) {
      out.push(value);
      if (instance === undefined) continue;
      seen.add(instance);
      this.#retired.delete(instance); // back after all: its own answer carries its counts
      this.#last.set(instance, { at: now, value });
    }
    for (const [instance, { at, value }] of this.#last) {
      if (now - at > this.keepMs) {
        this.#last.delete(instance);
        const kept = value.filter((f) => !RESTORED.some((p) => f.name.startsWith(p)));
        this.#retired.set(instance, { at: now, value: sumCounters([kept]) });
      } else if (!seen.has(instance)) out.push(value);
    }
    for (const [instance, { at, value }] of this.#retired) {
      if (now - at > this.reviveMs) {
        this.#folded = sumCounters([this.#folded, value]);
        this.#retired.delete(instance);
      }
    }
    const retired = sumCounters([this.#folded, ...[...this.#retired.values()].map((r) => r.value)]);
    if (retired.length > 0) out.push(retired);
    return out;
  }

  /** The services with an instance whose answer is kept (`<service>/<id>` instances). */
  services(): Set<string> {
    return new Set([...this.#last.keys()].map((i) => i.slice(0, i.lastIndexOf("/"))));
  }
}

/**
 * The counters and histograms of `parts` (never gauges: a gone process's gauge is gone),
 * summed series by series.
 */
function sumCounters(parts: readonly MetricsJson[]): MetricsJson {
  type Family = MetricsJson[number];
  type Value = Family["values"][number];
  const families = new Map<string, { family: Family; values: Map<string, Value> }>();
  for (const part of parts) {
    for (const f of part) {
      if (String(f.type) !== "counter" && String(f.type) !== "histogram") continue;
      let acc = families.get(f.name);
      if (!acc) {
        families.set(
          f.name,
          acc = { family: { ...f, aggregator: "sum", values: [] }, values: new Map() },
        );
      }
      for (const v of f.values) {
        const metricName = (v as { metricName?: string }).metricName ?? "";
        const labels = Object.entries(v.labels ?? {}).sort(([a], [b]) => a < b ? -1 : 1);
        const key = JSON.stringify([metricName, labels]);
        const had = acc.values.get(key);
        if (had) had.value += v.value;
        else acc.values.set(key, { ...v, labels: { ...v.labels } });
      }
    }
  }
  return [...families.values()].flatMap(({ family, values }) =>
    values.size > 0 ? [{ ...family, values: [...values.values()] }] : []
  ) as MetricsJson;
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

/** Most answers taken from one service in one gather (its replicas). */
const MAX_ANSWERS = 256;

/** The connection's reply inbox prefix (`_INBOX_<identity>`, src/nats.ts). */
function inboxPrefixOf(nc: NatsConnection): string {
  return (nc as { options?: { inboxPrefix?: string } }).options?.inboxPrefix || "_INBOX";
}

/** 128 random bits, hex: a reply inbox no one who saw another can guess. */
function randomToken(): string {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)))
    .map((b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * The answers to one request on `subject`: until `maxWaitMs` pass without a first one, or
 * `stallMs` after the last one (at most twice `maxWaitMs` in all), or no responder. The reply
 * inbox is a fresh random one (not nats.js's shared one, whose next tokens a responder
 * could guess from its own).
 */
function requestAll(
  nc: NatsConnection,
  subject: string,
  maxWaitMs: number,
  stallMs: number,
): Promise<Msg[]> {
  const inbox = `${inboxPrefixOf(nc)}.${randomToken()}`;
  const out: Msg[] = [];
  return new Promise((resolve) => {
    let done = false;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const finish = () => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      clearTimeout(cap);
      sub.unsubscribe();
      resolve(out);
    };
    const sub = nc.subscribe(inbox, {
      callback: (err, m) => {
        // No responder (status 503): the service does not run.
        if (err || (m.data.length === 0 && m.headers?.code === 503)) return finish();
        out.push(m);
        if (out.length >= MAX_ANSWERS) return finish();
        clearTimeout(timer);
        timer = setTimeout(finish, stallMs);
      },
    });
    timer = setTimeout(finish, maxWaitMs);
    const cap = setTimeout(finish, 2 * maxWaitMs);
    try {
      nc.publish(subject, Empty, { reply: inbox });
    } catch {
      finish();
    }
  });
}

/**
 * The metrics of every service of `opts.sources`, each asked on its own subject; an answer
 * {@link refusalOf} refuses is left out (and told to `opts.onRefused`).
 */
export async function gatherServiceMetrics(
  nc: NatsConnection,
  opts: GatherOptions = {},
): Promise<MetricsJson[]> {
  return (await gather(nc, opts)).values;
}

/** {@link gatherServiceMetrics}, and how many services the values come from. */
async function gather(
  nc: NatsConnection,
  opts: GatherOptions,
): Promise<{ values: MetricsJson[]; services: number }> {
  const sources = opts.sources ?? [];
  const owners = new Map<string, string>();
  for (const s of sources) for (const stage of s.stages) owners.set(stage, s.service);
  const types = new Map<string, string>();
  for (const f of opts.local ?? []) types.set(f.name, String(f.type));
  const ask = (subject: string) =>
    requestAll(nc, subject, opts.maxWaitMs ?? 2000, opts.stallMs ?? 250);
  const [answers, peers] = await Promise.all([
    Promise.all(sources.map((s) => ask(metricsSubject(s.service)))),
    opts.instance === undefined ? [] : ask(PEER_SUBJECT),
  ]);
  const parts: { instance?: string; value: MetricsJson }[] = [];
  const answered = new Set<string>();
  // The other gateway processes' counts of the items they accepted (not this one's own: its
  // registry is added whole). Kept like a service's: a peer that died counts with what it
  // last answered.
  for (const m of peers) {
    const id = m.headers?.get(INSTANCE_HEADER);
    if (!id || id === opts.instance || m.data.length === 0) continue;
    let value: unknown;
    try {
      value = m.json<unknown>();
    } catch {
      value = undefined;
    }
    const refused = peerRefusal(value);
    if (refused !== undefined) {
      opts.onRefused?.("gateway", refused);
      continue;
    }
    parts.push({
      instance: `${PEER_SERVICE}/${id}`,
      value: (value as MetricsJson).map((f) => ({ ...f, aggregator: "sum" })) as MetricsJson,
    });
  }
  sources.forEach((source, i) => {
    for (const m of answers[i]!) {
      // An error reply (the service's endpoint failed: src/observability/micro.ts) is none.
      if (m.data.length === 0 || m.headers?.get("Nats-Service-Error")) continue;
      let value: unknown;
      try {
        value = m.json<unknown>();
      } catch {
        value = undefined;
      }
      const refused = refusalOf(value, source, owners, sources, types);
      if (refused !== undefined) {
        opts.onRefused?.(source.service, refused);
        continue;
      }
      const id = m.headers?.get(INSTANCE_HEADER);
      answered.add(source.service);
      parts.push({
        instance: id ? `${source.service}/${id}` : undefined,
        value: (value as MetricsJson).map((f) => ({ ...f, aggregator: "sum" })) as MetricsJson,
      });
    }
  });
  if (!opts.cache) return { values: parts.map((p) => p.value), services: answered.size };
  const values = opts.cache.merge(parts, Date.now());
  for (const service of opts.cache.services()) {
    if (service !== PEER_SERVICE) answered.add(service);
  }
  return { values, services: answered.size };
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
  const own = await local.json();
  const [remote, backlogs, streams] = await Promise.all([
    gather(nc, { ...opts, local: own }),
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
  const registry = aggregateMetrics([own, ...remote.values]);
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
    help: "Services whose metrics this scrape gathered over NATS (the gateway excluded; a " +
      "service counts once however many instances it has)",
    registers,
  }).set(remote.services);
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

/**
 * Reduces the mesh's registry to per-stage figures; `intakeStages` names, by pipeline, the
 * stage whose figures the items the gateway accepted for it add to (see
 * `PipelineWiring.intakeStage`).
 */
export async function meshSnapshot(
  registry: client.Registry,
  intakeStages: Readonly<Record<string, string>> = {},
): Promise<MeshSnapshot> {
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
        // Items the gateway accepted entered the pipeline as its intake stage's do.
        const stage = Object.hasOwn(intakeStages, String(labels.pipeline))
          ? intakeStages[String(labels.pipeline)]
          : undefined;
        if (stage !== undefined) {
          stageOf(stage).received += v.value;
          stageOf(stage).processed += v.value;
        }
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
