/**
 * The few lines every service's `main` shares: load and print the configuration, connect
 * to NATS, ensure the topology, run, and on SIGTERM/SIGINT stop taking work, finish what
 * is in flight within the drain deadline and close the connection.
 *
 * @module
 */
import type { NatsConnection } from "@nats-io/nats-core";
import { jetstreamManager } from "@nats-io/jetstream";
import { type Config, describeConfig, loadConfig } from "./config.ts";
import { createLogger, type Logger } from "./log.ts";
import { connectNats } from "./nats.ts";
import { WeftMetrics } from "./metrics.ts";
import { registerMicroService } from "./micro.ts";
import { runStage } from "./runner.ts";
import type { Stage, StageInput } from "./stage.ts";
import { ensureTopology } from "./topology.ts";

/** Something a service runs until it is stopped. */
export interface Runnable {
  stop(): Promise<void>;
  readonly done: Promise<void>;
  /** Counters shown by the service's `status` endpoint and `nats micro stats`. */
  readonly stats?: Readonly<object>;
}

/** What a service's start function receives. */
export interface ServiceContext {
  config: Config;
  log: Logger;
  nc: NatsConnection;
  /** The service's Prometheus metrics (gathered by the gateway's GET /metrics). */
  metrics: WeftMetrics;
}

/**
 * Runs a service process: `start` builds what it runs from the context.
 *
 * @example
 * ```ts ignore
 * await runService("sentiment", async ({ nc, config, log }) => runStage({ nc, config, log, stage }));
 * ```
 */
export async function runService(
  name: string,
  start: (ctx: ServiceContext) => Promise<Runnable>,
  opts: { description?: string; answersMetrics?: boolean } = {},
): Promise<void> {
  let config: Config;
  try {
    config = loadConfig();
  } catch (err) {
    createLogger(`weft-${name}`).error("configuration refused", { err });
    Deno.exit(2);
  }
  const log = createLogger(`weft-${name}`, config.logLevel);
  log.info("starting", { pid: Deno.pid });
  log.debug("configuration", { config: describeConfig(config) });
  const nc = await connectNats(config.natsUrl, `weft-${name}`, {
    nkeySeedFile: config.natsNkey || undefined,
    identity: name,
    caFile: config.natsCa || undefined,
  });
  (async () => {
    for await (const s of nc.status()) {
      if (s.type === "disconnect" || s.type === "reconnect") log.warn("nats", { status: s.type });
    }
  })().catch(() => {});
  // Under the supervisor the topology exists already, and a service's identity may not
  // create streams or buckets anyway.
  if (config.ensureTopology) await ensureTopology(nc, await jetstreamManager(nc), config);
  const metrics = new WeftMetrics();
  const running = await start({ config, log, nc, metrics });
  const micro = await registerMicroService({
    nc,
    name,
    description: opts.description ?? `Weft ${name} service`,
    metrics,
    answersMetrics: opts.answersMetrics ?? true,
    status: () => ({ ...running.stats }),
    log,
  });
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    log.info("stopping");
    await micro.stop().catch(() => {});
    await running.stop();
    await nc.drain().catch(() => {});
    Deno.exit(0);
  };
  Deno.addSignalListener("SIGTERM", stop);
  Deno.addSignalListener("SIGINT", stop);
  if (config.parentWatch === "stdin") {
    // The supervisor holds the other end of stdin: it closes when the supervisor dies,
    // even by SIGKILL, and the service then drains and exits instead of living on.
    (async () => {
      for await (const _ of Deno.stdin.readable) { /* nothing is sent; wait for the end */ }
      log.warn("supervisor gone (stdin closed): stopping");
      await stop();
    })().catch(() => stop());
  }
  await running.done;
  if (!stopping) {
    log.error("stopped unexpectedly");
    await nc.close().catch(() => {});
    Deno.exit(1);
  }
}

/** Runs a stage as a service. */
export function runStageService<I extends StageInput>(
  name: string,
  makeStage: (ctx: ServiceContext) => Promise<Stage<I>> | Stage<I>,
): Promise<void> {
  return runService(name, async (ctx) => {
    const stage = await makeStage(ctx);
    return runStage({ ...ctx, stage });
  }, { description: `Weft pipeline stage ${name}` });
}

/**
 * Several runnables as one: stops them all together, and is done when any one stops
 * (a service whose consumer ended should exit and be restarted whole).
 *
 * @example
 * ```ts ignore
 * return combineRunnables([await runStage({ ...ctx, stage: a }), await runStage({ ...ctx, stage: b })]);
 * ```
 */
export function combineRunnables(parts: Runnable[]): Runnable {
  return {
    done: Promise.race(parts.map((p) => p.done)),
    async stop() {
      await Promise.all(parts.map((p) => p.stop()));
    },
  };
}
