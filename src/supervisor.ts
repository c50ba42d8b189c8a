/**
 * `deno task start`: runs the whole mesh on one machine. Starts nats-server from
 * nats.conf (unless NATS_URL names a running server), ensures the streams and buckets,
 * starts every service as its own Deno process with the narrowest permissions that work,
 * restarts a crashed service with exponential backoff, and on Ctrl-C (SIGINT) or SIGTERM
 * drains the services first and stops NATS last.
 *
 * @module
 */
import { jetstreamManager } from "@nats-io/jetstream";
import { type Config, describeConfig, ENV_PERMISSION, loadConfig } from "./config.ts";
import { createLogger, type Logger } from "./log.ts";
import { connectNats } from "./nats.ts";
import {
  type NatsServer,
  NatsServerMissingError,
  portFree,
  serverVersion,
  startNatsServer,
  stopLeftover,
  tooOldMessage,
  versionAtLeast,
} from "./nats_server.ts";
import { ensureTopology } from "./topology.ts";

/** The repository root: service entries and nats.conf are relative to it. */
const ROOT = new URL("../", import.meta.url);

/** nats.conf's client port, used when WEFT_NATS_PORT does not override it. */
const DEFAULT_NATS_PORT = 4222;
/** Where the supervisor's nats-server writes its pid, relative to its working directory. */
const NATS_PID_FILE = "nats-server.pid";

/** A service the supervisor runs. */
export interface ServiceSpec {
  name: string;
  /** Entry module, relative to the repository root. */
  entry: string;
  /** Reads the ruleset file. */
  readsRules?: boolean;
  /** Runs analyzers: with `llm` ones it calls the LLM endpoint and reads prompts/. */
  analyzes?: boolean;
  /** Listens on the gateway's host:port. */
  listens?: boolean;
}

/** The services of the feedback mesh, in start order. */
export const SERVICES: readonly ServiceSpec[] = [
  { name: "state", entry: "services/state.ts" },
  { name: "ingest", entry: "services/ingest.ts" },
  { name: "sentiment", entry: "services/sentiment.ts", readsRules: true, analyzes: true },
  { name: "topics", entry: "services/topics.ts", readsRules: true, analyzes: true },
  { name: "dispatch", entry: "services/dispatch.ts", readsRules: true },
  { name: "gateway", entry: "services/gateway.ts", listens: true },
  { name: "content-state", entry: "services/content_state.ts" },
  { name: "moderation", entry: "services/moderation.ts", analyzes: true },
  { name: "review", entry: "services/review.ts" },
  { name: "storage", entry: "services/storage.ts" },
  { name: "scheduler", entry: "services/scheduler.ts" },
  { name: "digest", entry: "services/digest.ts" },
];

/** host:port of each server in a NATS URL list, for `--allow-net`. */
export function natsHosts(natsUrl: string): string[] {
  return natsUrl.split(",").map((u) => {
    const url = new URL(u.trim().includes("://") ? u.trim() : `nats://${u.trim()}`);
    return `${url.hostname}:${url.port || "4222"}`;
  });
}

/** The `deno run` arguments for a service: permissions narrowed to what it needs. */
export function serviceArgs(spec: ServiceSpec, config: Config): string[] {
  const net = [...natsHosts(config.natsUrl)];
  if (spec.listens) net.push(`${config.host}:${config.port}`);
  const llm = spec.analyzes && config.analyzers === "llm";
  if (llm) {
    const u = new URL(config.llmBaseUrl);
    net.push(`${u.hostname}:${u.port || (u.protocol === "https:" ? 443 : 80)}`);
  }
  const args = [
    "run",
    "--no-prompt",
    // Services print only JSON log lines: silence Deno's own progress notices (downloads,
    // "waiting for file lock"); errors still reach stderr.
    "--quiet",
    `--allow-net=${net.join(",")}`,
    `--allow-env=${ENV_PERMISSION}`,
  ];
  const read = [
    ...(spec.readsRules ? [config.rulesPath] : []),
    ...(spec.listens && config.tlsCert ? [config.tlsCert, config.tlsKey] : []),
    ...(llm ? ["prompts"] : []),
  ];
  if (read.length > 0) args.push(`--allow-read=${read.join(",")}`);
  args.push(spec.entry);
  return args;
}

/**
 * Extra environment of a service. With telemetry on (`OTEL_DENO=true`, inherited with the
 * other `OTEL_*` variables, which Deno's runtime reads itself: no `--allow-env` or
 * `--allow-net` is needed for them), each service is named `weft-<name>` in its spans.
 */
export function serviceEnv(
  spec: ServiceSpec,
  getEnv: (name: string) => string | undefined,
): Record<string, string> {
  const on = getEnv("OTEL_DENO");
  if (!on || on === "false" || on === "0") return {};
  return { OTEL_SERVICE_NAME: `weft-${spec.name}` };
}

function envOrUndefined(name: string): string | undefined {
  try {
    return Deno.env.get(name);
  } catch {
    return undefined; // not in --allow-env: telemetry stays as configured
  }
}

/** Delay before restart number `n` of a crashed service, ms. */
export function restartDelay(n: number): number {
  return Math.min(30_000, 500 * 2 ** Math.max(0, n - 1));
}

interface Running {
  spec: ServiceSpec;
  child: Deno.ChildProcess;
  startedAt: number;
  restarts: number;
}

/** Runs the mesh until SIGINT/SIGTERM. */
export async function supervise(config: Config, log: Logger): Promise<void> {
  let nats: NatsServer | undefined;
  let env: Record<string, string> = {};
  if (Deno.env.get("NATS_URL")) {
    log.info("using the NATS server in NATS_URL", { nats: describeConfig(config).natsUrl });
  } else {
    const version = await serverVersion();
    if (version !== null && !versionAtLeast(version)) {
      log.error(tooOldMessage(version));
      Deno.exit(1);
    }
    const cwd = config.natsDir || ROOT.pathname;
    const port = config.natsPort || DEFAULT_NATS_PORT;
    // A supervisor killed outright (SIGKILL, OOM) leaves its nats-server running: stop it
    // through the pid file it wrote, or say plainly who holds the port.
    if (!portFree(port)) {
      log.warn("port taken: stopping a nats-server an earlier start left running", { port });
      if (!(await stopLeftover({ port, pidFile: NATS_PID_FILE, cwd }))) {
        log.error(
          `port ${port} is taken by a process this start did not leave behind; stop it, or ` +
            `set WEFT_NATS_PORT (or NATS_URL to use that server)`,
        );
        Deno.exit(1);
      }
    }
    try {
      nats = await startNatsServer({
        configFile: new URL(config.natsConf, ROOT).pathname,
        port: config.natsPort || undefined,
        monitorPort: config.natsMonitorPort || undefined,
        cwd,
        detached: true,
        pidFile: NATS_PID_FILE,
      });
    } catch (err) {
      if (err instanceof NatsServerMissingError) {
        log.error(err.message);
        Deno.exit(1);
      }
      throw err;
    }
    config = { ...config, natsUrl: nats.url };
    env = { NATS_URL: nats.url };
  }

  const nc = await connectNats(config.natsUrl, "weft-supervisor");
  const serverAt = nc.info?.version;
  if (serverAt !== undefined && !versionAtLeast(serverAt)) {
    log.error(tooOldMessage(serverAt));
    await nc.close();
    Deno.exit(1);
  }
  await ensureTopology(nc, await jetstreamManager(nc), config);
  await nc.close();

  let stopping = false;
  const running = new Map<string, Running>();

  const start = (spec: ServiceSpec, restarts: number) => {
    const child = new Deno.Command("deno", {
      args: serviceArgs(spec, config),
      // The service exits when this pipe closes: when the supervisor dies, however it dies.
      env: { ...env, ...serviceEnv(spec, envOrUndefined), WEFT_PARENT_WATCH: "stdin" },
      stdin: "piped",
      stdout: "inherit",
      stderr: "inherit",
      cwd: ROOT,
      detached: true,
    }).spawn();
    const r: Running = { spec, child, startedAt: Date.now(), restarts };
    running.set(spec.name, r);
    child.status.then(async (status) => {
      if (stopping) return;
      const ranFor = Date.now() - r.startedAt;
      const n = ranFor > 30_000 ? 1 : r.restarts + 1; // a long run resets the backoff
      const delay = restartDelay(n);
      log.warn("service exited; restarting", {
        service: spec.name,
        code: status.code,
        signal: status.signal,
        restart_in_ms: delay,
      });
      await new Promise((res) => setTimeout(res, delay));
      if (!stopping) start(spec, n);
    });
  };
  for (const spec of SERVICES) start(spec, 0);

  log.info("weft is running", {
    gateway: `${config.tlsCert ? "https" : "http"}://${config.host}:${config.port}`,
    nats: config.natsUrl,
    nats_monitoring: nats ? `http://127.0.0.1:${config.natsMonitorPort || 8222}` : undefined,
    services: SERVICES.map((s) => s.name),
  });

  await new Promise<void>((resolve) => {
    const onSignal = () => resolve();
    Deno.addSignalListener("SIGINT", onSignal);
    Deno.addSignalListener("SIGTERM", onSignal);
  });
  stopping = true;
  log.info("stopping: draining services");
  await Promise.all([...running.values()].map(async ({ spec, child }) => {
    try {
      child.kill("SIGTERM");
    } catch { /* already gone */ }
    const timer = setTimeout(() => {
      log.warn("service did not stop in time; killing", { service: spec.name });
      try {
        child.kill("SIGKILL");
      } catch { /* gone */ }
    }, config.drainMs + 5_000);
    await child.status;
    clearTimeout(timer);
  }));
  if (nats) {
    log.info("stopping nats-server");
    await nats.stop("SIGTERM");
  }
  log.info("stopped");
}

if (import.meta.main) {
  const log = createLogger("weft-supervisor");
  let config: Config;
  try {
    config = loadConfig();
  } catch (err) {
    log.error("configuration refused", { err });
    Deno.exit(2);
  }
  await supervise(config, createLogger("weft-supervisor", config.logLevel));
  Deno.exit(0);
}
