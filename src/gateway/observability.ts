/**
 * The gateway's observability routes: `GET /metrics` (the whole mesh in Prometheus text
 * format), the live dashboard at `GET /dashboard`, its metrics stream
 * `GET /dashboard/stream` (SSE, one `metrics` frame a second) and
 * `GET /dashboard/recent?pipeline=NAME` (a hand-wired pipeline's latest events, for its
 * recent-items panel).
 *
 * @module
 */
import type { Hono } from "hono";
import { streamSSE } from "hono/streaming";
import type { NatsConnection } from "@nats-io/nats-core";
import { DeliverPolicy, type JetStreamClient, type JetStreamManager } from "@nats-io/jetstream";
import * as client from "../observability/prom.ts";
import type { Config } from "../config.ts";
import { ErrorCode, ValidationError, WeftError } from "../errors.ts";
import type { Logger } from "../observability/log.ts";
import { PROMETHEUS_CONTENT_TYPE, type WeftMetrics } from "../observability/metrics.ts";
import { recentSiteEvents } from "../edge.ts";
import { dashboardHtml, type DashboardPanel } from "./dashboard_page.ts";
import { SHIPPED_PIPELINES } from "../../pipelines/shipped.ts";
import {
  meshMetrics,
  type MeshSnapshot,
  meshSnapshot,
  MetricsCache,
  type MetricsSource,
  metricsSources,
} from "./mesh_metrics.ts";
import type { LoadedPipeline } from "../pipeline/runtime.ts";
import { SSE_RECONNECT, type SseClients, stoppingError } from "./sse.ts";
import { intQuery, oneQuery, onlyQuery } from "./query.ts";

/** How long one gather of the mesh's metrics answers further scrapes, ms. */
export const METRICS_REUSE_MS = 1000;

/** Interval of the dashboard's metrics frames, ms. */
export const DASHBOARD_TICK_MS = 1000;
/** Most events `GET /dashboard/recent` returns. */
export const RECENT_EVENTS_MAX = 500;

/**
 * Adds the gateway's own metrics: SSE clients connected and HTTP requests by route.
 *
 * @example
 * ```ts ignore
 * instrumentGateway(app, metrics, clients);
 * ```
 */
export function instrumentGateway(app: Hono, metrics: WeftMetrics, clients: SseClients): void {
  const registers = [metrics.registry];
  new client.Gauge({
    name: "weft_sse_clients",
    help: "SSE clients connected to the gateway (event streams and dashboards)",
    registers,
    collect() {
      this.set(clients.open);
    },
  });
  new client.Gauge({
    name: "weft_sse_waiting",
    help: "SSE clients waiting for their stream's set-up turn (WEFT_SSE_OPENS_PER_S)",
    registers,
    collect() {
      this.set(clients.waiting);
    },
  });
  const requests = new client.Counter({
    name: "weft_http_requests_total",
    help: "HTTP requests the gateway answered, by method, route and status",
    labelNames: ["method", "route", "status"],
    registers,
  });
  app.use(async (c, next) => {
    await next();
    // The matched route pattern keeps cardinality bounded (no item ids in labels), and so does
    // the method: a caller may send any token as one, each of which was a series of its own.
    const route = c.req.routePath && c.req.routePath !== "/*" ? c.req.routePath : "unmatched";
    const method = HTTP_METHODS.has(c.req.method) ? c.req.method : "other";
    requests.inc({ method, route, status: String(c.res.status) });
  });
}

/** The methods counted by name on `weft_http_requests_total`; any other is `other`. */
const HTTP_METHODS: ReadonlySet<string> = new Set([
  "GET",
  "HEAD",
  "POST",
  "PUT",
  "PATCH",
  "DELETE",
  "OPTIONS",
]);

/** What the observability routes need. */
export interface ObservabilityDeps {
  /** Where services answer metrics requests. */
  nc: NatsConnection;
  /** JetStream access. */
  jetStream: { js: JetStreamClient; jsm: JetStreamManager };
  /** The gateway's configuration. */
  config: Config;
  /** The gateway's logger. */
  log: Logger;
  /** The gateway's own metrics. */
  metrics: WeftMetrics;
  /** The pipeline definitions: their services' metrics are gathered. */
  pipelines?: readonly LoadedPipeline[];
  /**
   * The services whose metrics are gathered (default: the shipped pipelines', the
   * definitions' and the runtime's, as the supervisor runs them; see metricsSources).
   */
  metricsSources?: readonly MetricsSource[];
  /** Streams of the pipelines (hand-wired and definitions'): their steps' backlogs are reported. */
  pipelineStreams?: readonly string[];
  /** Open SSE clients, counted against the maximum. */
  clients: SseClients;
  /** The hand-wired pipelines' own dashboard panels. */
  dashboardPanels?: readonly DashboardPanel[];
  /**
   * This gateway process's instance, as it answers the other gateway processes
   * (`servePeerMetrics`): when set, their counts of the items they accepted are added.
   */
  instance?: string;
}

/** Mounts /metrics and the dashboard routes. */
export function mountObservability(app: Hono, deps: ObservabilityDeps): void {
  const { nc, jetStream, metrics, clients, log } = deps;
  // An answer on a service's metrics subject that it cannot have given (another's stage, a
  // negative count, a series of the gateway's): counted, logged, and left out.
  const refused = new client.Counter({
    name: "weft_metrics_refused_total",
    help: "Metrics answers the gateway refused, by the service whose subject they came on",
    labelNames: ["service"],
    registers: [metrics.registry],
  });
  // One cache for /metrics and the dashboard: a service slow to answer one gather counts
  // with its last answer.
  const gather = {
    sources: deps.metricsSources ?? metricsSources(SHIPPED_PIPELINES, deps.pipelines ?? []),
    pipelineStreams: deps.pipelineStreams ?? [],
    cache: new MetricsCache(),
    ...(deps.instance === undefined ? {} : { instance: deps.instance }),
    onRefused: (service: string, reason: string) => {
      refused.inc({ service });
      // `service` is the logger's own (weft-gateway): the answering one goes in `source`.
      log.warn("metrics answer refused", { source: service, reason });
    },
  };
  const intakeStages = Object.fromEntries(
    SHIPPED_PIPELINES.flatMap((w) => w.intakeStage ? [[w.name, w.intakeStage]] : []),
  );
  // One gather serves every dashboard open within the same tick.
  let cached: { at: number; snapshot: Promise<MeshSnapshot> } | undefined;
  const snapshot = () => {
    const now = Date.now();
    if (!cached || now - cached.at >= DASHBOARD_TICK_MS / 2) {
      const p = meshMetrics(nc, jetStream.jsm, metrics, gather).then((r) =>
        meshSnapshot(r, intakeStages)
      );
      cached = { at: now, snapshot: p };
      p.catch(() => (cached = undefined));
    }
    return cached.snapshot;
  };

  // Scrapes within a second of each other (several Prometheus servers, a client in a loop)
  // share one gather across the mesh: its cost is bounded whoever asks, however often.
  let scraped: { at: number; text: Promise<string> } | undefined;
  app.get("/metrics", async (c) => {
    const now = Date.now();
    if (!scraped || now - scraped.at >= METRICS_REUSE_MS) {
      const text = meshMetrics(nc, jetStream.jsm, metrics, gather).then((r) => r.metrics());
      scraped = { at: now, text };
      text.catch(() => (scraped = undefined));
    }
    return c.body(await scraped.text, 200, { "content-type": PROMETHEUS_CONTENT_TYPE });
  });

  const page = dashboardHtml(
    SHIPPED_PIPELINES.flatMap((w) => w.dashboard ? [{ name: w.name, ...w.dashboard }] : []),
    deps.dashboardPanels,
  );
  app.get("/dashboard", (c) => c.html(page));
  // Browsers ask for it on every page: an empty answer, not a 404 in their console.
  app.get("/favicon.ico", (c) => c.body(null, 204));
  app.get("/", (c) => c.redirect("/dashboard"));

  app.get("/dashboard/stream", (c) => {
    // It takes none: a parameter it would ignore (replay=true) is refused, as /events does.
    onlyQuery(c.req.query(), []);
    if (clients.closing.aborted) throw stoppingError();
    if (!clients.tryOpen()) {
      const cap = clients.capReached() ?? "too many event streams open";
      throw new WeftError(ErrorCode.Unavailable, `${cap}; retry later`, {
        retryAfterSeconds: 5,
        shown: true,
      });
    }
    return streamSSE(c, async (stream) => {
      // The gateway stops: the stream ends at once (a snapshot or a tick's wait is not
      // waited for), its client told to reconnect.
      const closing = clients.closing;
      let wake = () => {};
      const stopping = () => wake();
      closing.addEventListener("abort", stopping);
      /** Resolves at the gateway's stop: what a wait races. */
      const stopped = new Promise<"stopped">((r) => (wake = () => r("stopped")));
      if (closing.aborted) wake();
      let timer: ReturnType<typeof setTimeout> | undefined;
      try {
        let id = 0;
        while (!stream.aborted && !closing.aborted) {
          const started = Date.now();
          try {
            const snap = await Promise.race([snapshot(), stopped]);
            if (snap === "stopped") break;
            await stream.writeSSE({
              id: String(++id),
              event: "metrics",
              data: JSON.stringify(snap),
            });
          } catch (err) {
            log.warn("dashboard metrics failed", { err });
          }
          const ms = Math.max(50, DASHBOARD_TICK_MS - (Date.now() - started));
          await Promise.race([new Promise((r) => (timer = setTimeout(r, ms))), stopped]);
          clearTimeout(timer);
        }
        if (closing.aborted && !stream.aborted) await stream.write(SSE_RECONNECT);
      } finally {
        clearTimeout(timer);
        closing.removeEventListener("abort", stopping);
        clients.close();
      }
    });
  });

  app.get("/dashboard/recent", async (c) => {
    onlyQuery(c.req.query(), ["limit", "pipeline"]);
    const limit =
      intQuery(oneQuery(c.req.queries("limit"), "limit"), "limit", 1, RECENT_EVENTS_MAX) ??
        200;
    const pipeline = recentPipeline(oneQuery(c.req.queries("pipeline"), "pipeline"));
    const sites = deps.config.hub;
    const recent = await recentEvents(jetStream.js, jetStream.jsm, limit, pipeline);
    return c.json({
      events: recent.events,
      // The stream's last sequence when the snapshot was taken: a client follows the live
      // events from there (Last-Event-ID), so none falls between the snapshot and the feed.
      last_seq: recent.lastSeq,
      // A hub's edge sites: their latest events too, each with its site.
      ...(sites.length > 0
        ? {
          site_events: await recentSiteEvents(
            jetStream.js,
            jetStream.jsm,
            sites,
            limit,
            pipeline.name,
          ),
        }
        : {}),
    });
  });
}

/**
 * The hand-wired pipeline `GET /dashboard/recent?pipeline=` names (by default the first one
 * listed with items): its name and the stream its events are in. A 422 naming `pipeline` for
 * any other name.
 */
function recentPipeline(name: string | undefined): { name: string; stream: string } {
  const wired = SHIPPED_PIPELINES.filter((w) => w.items && w.streams.length > 0);
  const w = name === undefined ? wired[0] : wired.find((w) => w.name === name);
  if (!w) {
    throw new ValidationError(
      `pipeline must be one of ${wired.map((w) => w.name).join(", ")} (got ${
        JSON.stringify(name).slice(0, 100)
      })`,
      { field: "pipeline" },
    );
  }
  return { name: w.name, stream: w.streams[0]!.name };
}

/**
 * The latest `limit` events of `pipeline` (oldest first: `<name>.<type>.<item>` in its
 * stream) with their stream sequences.
 */
export async function recentEvents(
  js: JetStreamClient,
  jsm: JetStreamManager,
  limit: number,
  pipeline: { name: string; stream: string },
): Promise<{ events: { seq: number; event: unknown }[]; lastSeq: number }> {
  const state = (await jsm.streams.info(pipeline.stream)).state;
  if (state.messages === 0) return { events: [], lastSeq: state.last_seq };
  const start = Math.max(state.first_seq, state.last_seq - limit * 2 + 1);
  const consumer = await js.consumers.get(pipeline.stream, {
    filter_subjects: `${pipeline.name}.*.*`,
    deliver_policy: DeliverPolicy.StartSequence,
    opt_start_seq: start,
  });
  const out: { seq: number; event: unknown }[] = [];
  const messages = await consumer.consume({ max_messages: 256 });
  // Nothing in range may match the filter: do not wait for messages that never come.
  const guard = setTimeout(() => messages.stop(), 1000);
  try {
    for await (const m of messages) {
      if (m.seq <= state.last_seq) {
        try {
          out.push({ seq: m.seq, event: m.json() });
        } catch { /* not JSON: skip */ }
      }
      if (m.info.pending === 0 || m.seq >= state.last_seq) break;
    }
  } finally {
    clearTimeout(guard);
    messages.stop();
    await consumer.delete().catch(() => {}); // or it would stay on the server for 5 minutes
  }
  return { events: out.slice(-limit), lastSeq: state.last_seq };
}
