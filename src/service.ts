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
import { createLogger, type Logger } from "./observability/log.ts";
import { connectNats, permissionViolation, tlsCredentials, whileUnavailable } from "./nats.ts";
import { WeftMetrics } from "./observability/metrics.ts";
import { registerMicroService } from "./observability/micro.ts";
import { runStage } from "./runner.ts";
import type { Stage, StageInput } from "./stage.ts";
import { ensureTopology } from "./topology.ts";
import { ConfigError } from "./errors.ts";
import { SHIPPED_PIPELINES } from "../pipelines/shipped.ts";

/** How long a starting service waits for a busy or briefly unavailable NATS to answer. */
const START_PATIENCE_MS = 60_000;

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

/** A service: its name and how it starts from a {@link ServiceContext}. */
export interface ServiceDef {
  /** Short name (`sentiment`): its log name, NATS identity and `nats micro` name `weft-<name>`. */
  name: string;
  /** Builds what the service runs. */
  start(ctx: ServiceContext): Promise<Runnable>;
  /** Shown by `nats micro info`. */
  description?: string;
  /** Whether it answers metrics requests on `weft.<name>.metrics` (the gateway gathers instead). */
  answersMetrics?: boolean;
}

/**
 * A service definition (see {@link runService}, {@link runTogether}).
 *
 * @example
 * ```ts ignore
 * export const service = defineService("digest", async (ctx) => runStage({ ...ctx, stage }));
 * if (import.meta.main) await runService(service);
 * ```
 */
export function defineService(
  name: string,
  start: (ctx: ServiceContext) => Promise<Runnable>,
  opts: { description?: string; answersMetrics?: boolean } = {},
): ServiceDef {
  return { name, start, ...opts };
}

/** A service that runs one stage. */
export function stageService<I extends StageInput>(
  name: string,
  makeStage: (ctx: ServiceContext) => Promise<Stage<I>> | Stage<I>,
): ServiceDef {
  return defineService(name, async (ctx) => {
    const stage = await makeStage(ctx);
    return runStage({ ...ctx, stage });
  }, { description: `Weft pipeline stage ${name}` });
}

/** A started service: stop it, or learn when it ended. */
interface OpenService {
  readonly log: Logger;
  readonly done: Promise<void>;
  readonly stopping: boolean;
  stop(): Promise<void>;
}

/** Connects `def` to NATS as its own identity and starts it; no signals, no exit. */
async function openService(def: ServiceDef, config: Config): Promise<OpenService> {
  const log = createLogger(`weft-${def.name}`, config.logLevel);
  log.info("starting", { pid: Deno.pid });
  log.debug("configuration", { config: describeConfig(config) });
  const nkey = config.natsNkey ||
    (config.natsIdentityDir ? `${config.natsIdentityDir}/${def.name}.nk` : "");
  const nc = await connectNats(config.natsUrl, `weft-${def.name}`, {
    nkeySeedFile: nkey || undefined,
    identity: def.name,
    ...tlsCredentials(config),
  }, {
    // A handshake that times out on loaded cores is tried again, not a failed start.
    patienceMs: START_PATIENCE_MS,
  }).catch((err) => {
    if (err instanceof ConfigError) throw err;
    // One line saying what to do, not a stack trace (no server there, or none answering).
    throw new ConfigError(
      `cannot connect to NATS at ${describeConfig(config).natsUrl}: ${
        err instanceof Error ? err.message : String(err)
      }: start the server (deno task start runs its own) or set NATS_URL to one that runs`,
      { cause: err },
    );
  });
  (async () => {
    for await (const s of nc.status()) {
      if (s.type === "disconnect" || s.type === "reconnect") log.warn("nats", { status: s.type });
    }
  })().catch(() => {});
  // Under the supervisor the topology exists already, and a service's identity may not
  // create streams or buckets anyway.
  // A busy server may not answer a JetStream request in time: wait for it rather than exit.
  if (config.ensureTopology) {
    await whileUnavailable(
      "set up streams and buckets",
      () => ensureOwnTopology(nc, def.name, config, nkey),
      { patienceMs: START_PATIENCE_MS, log },
    );
  }
  const metrics = new WeftMetrics();
  let running: Runnable;
  let micro: Awaited<ReturnType<typeof registerMicroService>>;
  try {
    running = await def.start({ config, log, nc, metrics });
    micro = await registerMicroService({
      nc,
      name: def.name,
      description: def.description ?? `Weft ${def.name} service`,
      metrics,
      answersMetrics: def.answersMetrics ?? true,
      status: () => ({ ...running.stats }),
      log,
    });
  } catch (err) {
    // Another service's key (topics.nk for sentiment, ops.nk): refused at the first thing
    // the service does, a reply inbox of its own name it may not subscribe to.
    const refused = permissionViolation(err);
    if (!refused) throw err;
    await nc.close().catch(() => {});
    const own = `${config.natsIdentityDir || "data/identities"}/${def.name}.nk`;
    throw new ConfigError(
      `${nkey ? `the NATS key ${nkey}` : "this NATS identity"} may not do what ${def.name} ` +
        `does (${refused.message}): is it ${def.name}'s? Each service runs with its own key, ` +
        `data/identities/<service>.nk (here ${own})`,
      { cause: err },
    );
  }
  let stopping = false;
  return {
    log,
    done: running.done,
    get stopping() {
      return stopping;
    },
    async stop() {
      if (stopping) return;
      stopping = true;
      log.info("stopping");
      await micro.stop().catch(() => {});
      await running.stop();
      await nc.drain().catch(() => {});
    },
  };
}

/**
 * Ensures the streams and buckets a service uses: those of the shipped pipeline it is a step
 * of (and the mesh's own), or every pipeline's for a service of none (the gateway, the
 * scheduler). An identity that may not set them up, such as a step's own key run alone
 * without `WEFT_ENSURE_TOPOLOGY=false`, is a {@link ConfigError} saying so.
 */
async function ensureOwnTopology(
  nc: NatsConnection,
  name: string,
  config: Config,
  nkey: string,
): Promise<void> {
  const own = SHIPPED_PIPELINES.filter((w) => w.services.some((s) => s.name === name));
  try {
    await ensureTopology(
      nc,
      await jetstreamManager(nc),
      config,
      {},
      own.length > 0 ? own : SHIPPED_PIPELINES,
    );
  } catch (err) {
    const refused = permissionViolation(err);
    if (!refused) throw err;
    throw new ConfigError(
      `this identity${nkey ? ` (${nkey})` : ""} may not set up streams or buckets ` +
        `(${refused.message}): run it with WEFT_ENSURE_TOPOLOGY=false; the supervisor ` +
        "(deno task start), or a run with the admin key (data/identities/admin.nk), sets the " +
        "topology up",
      { cause: err },
    );
  }
}

function configOrExit(name: string): Config {
  try {
    return loadConfig();
  } catch (err) {
    createLogger(`weft-${name}`).error("configuration refused", { err });
    Deno.exit(2);
  }
}

/**
 * Runs services in this process until SIGTERM/SIGINT (or, with `WEFT_PARENT_WATCH=stdin`,
 * until the supervisor holding stdin dies): then each stops taking work, finishes what is
 * in flight within the drain deadline and closes its connection. One that ends on its own
 * takes the process down (exit 1), for its supervisor to restart it whole.
 */
async function runServices(defs: ServiceDef[], name: string): Promise<void> {
  const config = configOrExit(name);
  const open: OpenService[] = [];
  for (const def of defs) {
    try {
      open.push(await openService(def, config));
    } catch (err) {
      // A start the configuration cannot make (an identity that may not set the topology
      // up, a stream that would shrink): one line saying what to do, not a stack trace.
      if (!(err instanceof ConfigError)) throw err;
      createLogger(`weft-${def.name}`, config.logLevel).error("start refused", { err });
      Deno.exit(1);
    }
  }
  const log = open.length === 1 ? open[0]!.log : createLogger(`weft-${name}`, config.logLevel);
  if (open.length > 1) log.info("services together", { services: defs.map((d) => d.name) });
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    await Promise.all(open.map((s) => s.stop()));
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
  const ended = await Promise.race(open.map((s, i) => s.done.then(() => i)));
  if (!stopping) {
    open[ended]!.log.error("stopped unexpectedly");
    stopping = true;
    await Promise.all(open.map((s) => s.stop().catch(() => {})));
    Deno.exit(1);
  }
}

/**
 * Runs a service as its own process (what every `services/*.ts` does).
 *
 * @example
 * ```ts ignore
 * await runService(stageService("sentiment", () => sentimentStage(analyzer)));
 * ```
 */
export function runService(def: ServiceDef): Promise<void> {
  return runServices([def], def.name);
}

/**
 * Runs several services in one process (`deno task start --together`): the same
 * runner, consumers, acks, retries and state as apart, each with its own NATS connection
 * and identity; a fraction of the memory.
 */
export function runTogether(defs: ServiceDef[]): Promise<void> {
  return runServices(defs, "together");
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
