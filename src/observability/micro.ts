/**
 * Every Weft service registers with the NATS services protocol (@nats-io/services), so
 * `nats micro ls|info|stats` list it and `$SRV.PING` finds it. Each registers two
 * endpoints:
 *
 * - `metrics` on `weft.<service>.metrics` ({@link metricsSubject}), in a queue group of its
 *   own so every instance (replica) answers: its metrics as prom-client JSON
 *   (`nats req weft.sentiment.metrics '' --replies 0`). Only the service's own identity may
 *   subscribe there, so only it sees the requester's reply inbox: the gateway's
 *   `GET /metrics` asks each service of the mesh on its own subject and knows who answered.
 * - `status` on `weft.<service>.status`: the service's counters as JSON
 *   (`nats req weft.sentiment.status ''`).
 *
 * The `stats` of both endpoints carry the service's counters as `data`, so
 * `nats micro stats weft-sentiment` shows processed/retried/dead-lettered beside the
 * protocol's request counts and processing time.
 *
 * @module
 */
import { headers, type MsgHdrs, type NatsConnection } from "@nats-io/nats-core";
import { type Service, type ServiceMsg, Svcm } from "@nats-io/services";
import denoJson from "../../deno.json" with { type: "json" };
import type { Logger } from "./log.ts";
import { fitMetrics, type WeftMetrics } from "./metrics.ts";

/** Weft's version, as registered with the services protocol. */
export const WEFT_VERSION: string = denoJson.version;

/** The subject of a service's status endpoint. */
export function statusSubject(service: string): string {
  return `weft.${service}.status`;
}

/**
 * The subject of a service's metrics endpoint, which only the service's identity may
 * subscribe to (`*` for the pattern the gateway may request on).
 */
export function metricsSubject(service: string): string {
  return `weft.${service}.metrics`;
}

/** What {@link registerMicroService} needs. */
export interface MicroServiceOptions {
  /** The connection the service answers on. */
  nc: NatsConnection;
  /** The service's short name (`sentiment`); registered as `weft-<name>`. */
  name: string;
  /** Shown by `nats micro info`. */
  description: string;
  /** The service's metrics, answered on `weft.<name>.metrics`. */
  metrics: WeftMetrics;
  /** The service's counters, answered by `status` and shown in `stats` data. */
  status: () => Record<string, unknown>;
  /**
   * Answer on `weft.<name>.metrics` (default true). The gateway does not: its `GET /metrics`
   * adds its own registry to what the others answer.
   */
  answersMetrics?: boolean;
  /** Where endpoint failures are logged. */
  log: Logger;
}

const encoder = new TextEncoder();

/**
 * Registers a service with the NATS services protocol.
 *
 * @example
 * ```ts ignore
 * const svc = await registerMicroService({ nc, name: "sentiment", description: "...", metrics, status: () => runner.stats, log });
 * await svc.stop();
 * ```
 */
/** The header of a metrics answer naming the service instance that gave it. */
export const INSTANCE_HEADER = "Weft-Instance";

export async function registerMicroService(opts: MicroServiceOptions): Promise<Service> {
  const { nc, name, metrics, log } = opts;
  const service = await new Svcm(nc).add({
    name: `weft-${name}`,
    version: WEFT_VERSION,
    description: opts.description,
    metadata: { "weft.service": name },
    statsHandler: () => Promise.resolve(opts.status()),
  });
  const reply = (m: ServiceMsg, body: () => Promise<unknown> | unknown, h?: MsgHdrs) => {
    Promise.resolve()
      .then(body)
      .then((value) => m.respond(encoder.encode(JSON.stringify(value)), h ? { headers: h } : {}))
      .catch((err) => {
        log.warn("micro endpoint failed", { subject: m.subject, err });
        m.respondError(500, (err as Error).message);
      });
  };
  if (opts.answersMetrics ?? true) {
    service.addEndpoint("metrics", {
      subject: metricsSubject(name),
      // A queue group per instance: every instance answers a metrics request.
      queue: `weft-metrics-${service.info().id}`,
      metadata: { format: "prom-client-json" },
      handler: (err, m) => {
        if (err) return;
        // Which instance answers: a gather it answers too late reuses its last answer.
        const h = headers();
        h.set(INSTANCE_HEADER, service.info().id);
        // Cut to fit a reply (max_payload, less room for headers): never no answer.
        const budget = Math.max(16 * 1024, (nc.info?.max_payload ?? 1024 * 1024) - 8 * 1024);
        reply(m, async () => {
          const json = await metrics.json();
          const fitted = fitMetrics(json, budget);
          if (fitted !== json) {
            log.warn("metrics answer cut to fit max_payload", {
              cut: fitted.at(-1)?.values.map((v) => v.labels.metric),
            });
          }
          return fitted;
        }, h);
      },
    });
  }
  service.addEndpoint("status", {
    subject: statusSubject(name),
    handler: (err, m) => {
      if (err) return;
      reply(m, () => ({ service: `weft-${name}`, ...opts.status() }));
    },
  });
  return service;
}
