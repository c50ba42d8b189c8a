/**
 * The gateway service: the HTTP API (src/gateway/app.ts) on Deno.serve, with each shipped
 * pipeline's part (its routes and NATS request subjects, from its wiring), the definitions'
 * routes and requests, dead letters and live shadows.
 *
 * @module
 */
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { createCapacityGuard } from "../src/capacity.ts";
import { createApp } from "../src/gateway/app.ts";
import { createIngestLimiter } from "../src/gateway/ingest_limits.ts";
import { createAuth } from "../src/gateway/auth.ts";
import { SHIPPED_PIPELINES } from "../pipelines/shipped.ts";
import { SHIPPED_GATEWAYS } from "../pipelines/shipped_gateways.ts";
import { type GatewayPart, wiredStreams } from "../src/wiring.ts";
import { serveDeadLetterRequests } from "../src/redrive.ts";
import { maxPayloadOf } from "../src/gateway/requests.ts";
import { defineService, runService, type ServiceDef } from "../src/service.ts";
import {
  definitionRedriveCheck,
  redriveEntrySubjects,
  servePipelineRequests,
  trackItems,
} from "../src/gateway/pipelines.ts";
import { loadPipelines } from "../src/pipeline/runtime.ts";
import { createShadowControl } from "../src/shadow/control.ts";
import { serveShadowRequests } from "../src/gateway/shadows.ts";
import { SseClients } from "../src/gateway/sse.ts";
import { servePeerMetrics } from "../src/gateway/mesh_metrics.ts";
import { trackSiteContacts } from "../src/edge.ts";
import {
  lazyScheduleStore,
  scheduleTargets,
  serveScheduleRequests,
} from "../src/gateway/schedules.ts";

const ROOT = new URL("../", import.meta.url).pathname;

/** The gateway service. */
export const service: ServiceDef = defineService(
  "gateway",
  async ({ nc, config, log, metrics }) => {
    const jsm = await jetstreamManager(nc);
    const capacity = createCapacityGuard(jsm, {
      highWater: config.streamHighWater,
      alertAt: config.streamAlertAt,
      log,
    });
    const limiter = createIngestLimiter(config.ingestLimits);
    const auth = createAuth(config.apiKeys);
    if (!auth.enabled) {
      log.warn("authentication is OFF: no WEFT_API_KEYS configured; every caller is admin");
    }
    // Each shipped pipeline's routes and request subjects.
    const parts: GatewayPart[] = [];
    for (const start of SHIPPED_GATEWAYS) {
      parts.push(await start({ nc, config, log, metrics, auth, capacity, limiter }));
    }
    const pipelines = await loadPipelines(config.pipelines, ROOT);
    // Each definition's stream keeps room for the later events of the items in flight.
    await trackItems(capacity, pipelines, nc).catch((err) =>
      log.error("items in flight not followed: intake keeps no room for them", { err })
    );
    const guards = {
      capacity,
      limiter,
      onAccepted: (pipeline: string, n: number) => metrics.accepted.inc({ pipeline }, n),
    };
    // A candidate is built at attach as the shadow service builds it (its analyzers are
    // loaded into the gateway then, not before).
    const shadows = createShadowControl(
      nc,
      config.shadows,
      { pipelines, root: ROOT },
      async (spec) =>
        (await import("../src/shadow/live.ts")).resolveShadowTarget(spec, config, {
          nc,
          pipelines,
          root: ROOT,
        }),
    );
    // Every event stream's slot, here so that stop() can end the streams.
    const sseClients = new SseClients(
      config.sseMaxClients,
      config.sseMaxPerKey,
      config.sseOpensPerSecond,
      undefined,
      config.sseReplayBytes,
    );
    const schedules = lazyScheduleStore(nc);
    // With WEFT_EVENTS_PORT two gateway processes take items: each answers the other with
    // what it accepted, so both count every item on /metrics and the dashboard.
    const instance = crypto.randomUUID();
    const peerMetrics = servePeerMetrics(nc, metrics, instance);
    // A hub: when each edge site was last heard from, noted continuously (a source restarted
    // after an outage forgets it), so GET /sites says since when honestly.
    const siteContacts = config.hub.length > 0
      ? trackSiteContacts(jsm, config.hub, {
        onError: (site, err) =>
          log.debug("edge site contact read failed", { site, err: String(err) }),
      })
      : undefined;
    const app = createApp({
      sseClients,
      nc,
      jetStream: { js: jetstream(nc), jsm },
      streams: wiredStreams(SHIPPED_PIPELINES),
      config,
      log,
      auth,
      extensions: parts.map((p) => p.routes),
      openApi: parts.flatMap((p) => p.openApi ? [p.openApi] : []),
      dashboardPanels: parts.flatMap((p) => p.dashboard ? [p.dashboard] : []),
      metrics,
      pipelines,
      guards,
      shadows,
      schedules,
      instance,
      ...(siteContacts ? { siteContacts: siteContacts.contacts } : {}),
    });
    const shadowRequests = serveShadowRequests(nc, shadows, log, auth);
    const pipelineRequests = servePipelineRequests(nc, pipelines, log, {
      auth,
      guards,
      claimTtlMs: config.claimTtlMs,
      bodyLimit: config.bodyLimit,
    });
    const scheduleRequests = serveScheduleRequests(
      nc,
      schedules,
      scheduleTargets(pipelines),
      log,
      auth,
      config.bodyLimit,
    );
    const deadLetterRequests = serveDeadLetterRequests(nc, log, auth, {
      check: definitionRedriveCheck(pipelines, () => maxPayloadOf(nc)),
      entrySubject: redriveEntrySubjects(pipelines),
    });
    // The server has every request subscription above before the gateway says it listens:
    // a `nats req` sent on that word, from another connection, finds its responder.
    await nc.flush();
    // HTTPS when given a certificate and its key (PEM files, read once at start).
    const tls = config.tlsCert
      ? {
        cert: await Deno.readTextFile(config.tlsCert),
        key: await Deno.readTextFile(config.tlsKey),
      }
      : undefined;
    const scheme = tls ? "https" : "http";
    const server = Deno.serve({
      hostname: config.host,
      port: config.port,
      ...tls,
      onListen: ({ hostname, port }) =>
        log.info("gateway listening", { url: `${scheme}://${hostname}:${port}` }),
    }, app.fetch);
    return {
      done: server.finished,
      async stop() {
        for (const p of parts) p.stop();
        peerMetrics.stop();
        pipelineRequests.stop();
        deadLetterRequests.stop();
        scheduleRequests.stop();
        shadowRequests.stop();
        await siteContacts?.stop();
        // Stop accepting, then end every event stream (each client told to reconnect): the
        // server's shutdown waits for every open response, and an event stream never ends
        // on its own. Requests in flight (intake above all) finish.
        const shutdown = server.shutdown();
        sseClients.closeAll();
        // A client that stopped reading can still hold its response open: the gateway waits
        // for it no longer than the drain deadline, then exits with it.
        let timer: ReturnType<typeof setTimeout> | undefined;
        const late = await Promise.race([
          shutdown.then(() => false),
          new Promise<boolean>((r) => (timer = setTimeout(() => r(true), config.drainMs))),
        ]);
        clearTimeout(timer);
        capacity.close();
        if (late) {
          log.warn("gateway: connections still open after the drain deadline; stopping anyway", {
            drain_ms: config.drainMs,
            sse_clients: sseClients.open,
          });
        }
      },
    };
  },
  {
    description: "Weft HTTP gateway: intake, state, SSE, /metrics, dashboard",
    answersMetrics: false,
  },
);

if (import.meta.main) await runService(service);
