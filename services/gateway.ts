/**
 * The gateway service: the HTTP API (src/gateway/app.ts) on Deno.serve, plus submission
 * and lookup over NATS request/reply (src/gateway/requests.ts).
 *
 * @module
 */
import { jetstreamManager } from "@nats-io/jetstream";
import { createCapacityGuard } from "../src/capacity.ts";
import { createApp } from "../src/gateway/app.ts";
import { createIngestLimiter } from "../src/gateway/ingest_limits.ts";
import { createIntake } from "../src/gateway/intake.ts";
import { serveRequests } from "../src/gateway/requests.ts";
import { createAuth } from "../src/gateway/auth.ts";
import { serveModerationRequests } from "../pipelines/moderation/requests.ts";
import { moderationRoutes } from "../pipelines/moderation/routes.ts";
import { createModerationApi } from "../pipelines/moderation/api.ts";
import { serveDeadLetterRequests } from "../src/redrive.ts";
import { defineService, runService, type ServiceDef } from "../src/service.ts";
import { servePipelineRequests } from "../src/gateway/pipelines.ts";
import { loadPipelines } from "../src/pipeline/runtime.ts";
import { createShadowControl } from "../src/shadow/control.ts";
import { serveShadowRequests } from "../src/gateway/shadows.ts";

const ROOT = new URL("../", import.meta.url).pathname;

/** The gateway service. */
export const service: ServiceDef = defineService(
  "gateway",
  async ({ nc, config, log, metrics }) => {
    const capacity = createCapacityGuard(await jetstreamManager(nc), {
      highWater: config.streamHighWater,
      alertAt: config.streamAlertAt,
      log,
    });
    const limiter = createIngestLimiter(config.ingestLimits);
    const intake = await createIntake(nc, "weft-gateway", {
      capacity,
      limiter,
      onAccepted: (n) => metrics.accepted.inc({ pipeline: "feedback" }, n),
    });
    const auth = createAuth(config.apiKeys);
    if (!auth.enabled) {
      log.warn("authentication is OFF: no WEFT_API_KEYS configured; every caller is admin");
    }
    const moderation = await createModerationApi({
      nc,
      config,
      log,
      authEnabled: auth.enabled,
      capacity,
      limiter,
    });
    const pipelines = await loadPipelines(config.pipelines, ROOT);
    const guards = { capacity, limiter };
    const shadows = createShadowControl(nc, config.shadows, { pipelines, root: ROOT });
    const app = createApp({
      nc,
      intake,
      config,
      log,
      auth,
      // Content moderation's own routes: /content, /reviews, /schedules.
      extensions: [moderationRoutes(moderation)],
      metrics,
      pipelines,
      guards,
      shadows,
    });
    const shadowRequests = serveShadowRequests(nc, shadows, log, auth);
    const pipelineRequests = servePipelineRequests(nc, pipelines, log, { auth, guards });
    const requests = serveRequests(nc, intake, log, auth);
    const moderationRequests = serveModerationRequests(nc, moderation, auth, log);
    const deadLetterRequests = serveDeadLetterRequests(nc, log, auth);
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
        requests.stop();
        pipelineRequests.stop();
        moderationRequests.stop();
        deadLetterRequests.stop();
        shadowRequests.stop();
        await server.shutdown();
      },
    };
  },
  {
    description: "Weft HTTP gateway: intake, state, SSE, /metrics, dashboard",
    answersMetrics: false,
  },
);

if (import.meta.main) await runService(service);
