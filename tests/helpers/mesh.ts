/**
 * Every harness that runs Weft as real processes, nothing mocked:
 *
 * - {@link spawnService} / {@link startService}: one service as a `deno run` process with the
 *   arguments, narrow permissions and environment the supervisor gives it (`serviceArgs`,
 *   `serviceEnv`), its JSON log lines collected so a test can wait for "started" instead of
 *   sleeping.
 * - {@link startServices}: a set of services, each its own process, on a nats-server of its
 *   own (a file store in a temp dir, so it can be killed and restarted on the same port and
 *   store) or on one the test gives; services can be killed, restarted and replicated.
 *   {@link FEEDBACK_SERVICES} (the default), {@link MODERATION_SERVICES} and
 *   {@link ALL_SERVICES} name the usual sets, {@link WHOLE_MESH} the whole mesh as the
 *   end-to-end tests run it.
 * - {@link startMesh}: the supervisor of `deno task start`, the same command line read from
 *   deno.json, with its own nats-server on free ports and a temporary store.
 *
 * And, for a mesh's gateway, {@link submit} and {@link waitFinal}.
 *
 * @module
 */
import {
  jetstream,
  type JetStreamClient,
  type JetStreamManager,
  jetstreamManager,
} from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/nats-core";
import { type Config, loadConfig } from "../../src/config.ts";
import type { NatsCredentials } from "../../src/nats.ts";
import { connectClient } from "./nats.ts";
import { freePort, type NatsServer, portFree, startNatsServer } from "../../src/nats_server.ts";
import {
  IDENTITY_DIR,
  processArgs,
  serviceArgs,
  serviceEnv,
  SERVICES,
  type ServiceSpec,
  TOGETHER_ENTRY,
} from "../../src/supervisor.ts";
import { ensureTopology } from "../../src/topology.ts";

/**
 * How long a mesh or service may take to start before a test fails: a deadline, not a wait.
 * A whole mesh is a dozen Deno processes starting at once; beside another test file's mesh on
 * two loaded cores, with the page cache reclaimed, that took more than 30 s.
 */
const START_DEADLINE_MS = 90_000;

const ROOT = new URL("../../", import.meta.url);

// ---------------------------------------------------------------------------------------------
// Output: lines of a process's streams, and waiting for a log line.

type LogLine = Record<string, unknown>;

/** Calls `onLine` with each line of `stream` (without its newline). */
async function eachLine(stream: ReadableStream<Uint8Array>, onLine: (text: string) => void) {
  let buf = "";
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    buf += chunk;
    let i: number;
    while ((i = buf.indexOf("\n")) >= 0) {
      const text = buf.slice(0, i);
      buf = buf.slice(i + 1);
      onLine(text);
    }
  }
}

/** Parsed log lines, and waiters for the first line (past or future) matching a predicate. */
class LogBook {
  readonly lines: LogLine[] = [];
  #waiters = new Set<(line: LogLine) => void>();

  add(line: LogLine): void {
    this.lines.push(line);
    for (const w of [...this.#waiters]) w(line);
  }

  /**
   * Resolves with the first matching line; rejects with `timeoutError()` after `ms`, or
   * when `signal` aborts (the wait then leaves no timer behind).
   */
  wait(
    pred: (line: LogLine) => boolean,
    ms: number,
    timeoutError: () => Error,
    signal?: AbortSignal,
  ): Promise<LogLine> {
    const found = this.lines.find(pred);
    if (found) return Promise.resolve(found);
    return new Promise<LogLine>((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        this.#waiters.delete(check);
        signal?.removeEventListener("abort", abort);
      };
      const check = (line: LogLine) => {
        if (!pred(line)) return;
        done();
        resolve(line);
      };
      const abort = () => {
        done();
        reject(signal!.reason);
      };
      const timer = setTimeout(() => {
        done();
        reject(timeoutError());
      }, ms);
      this.#waiters.add(check);
      signal?.addEventListener("abort", abort);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// One service.

/** A running service process. */
export interface ServiceProcess extends AsyncDisposable {
  /** The service's name, or the key it was started under (e.g. `topics#2`). */
  readonly name: string;
  /** Its JSON log lines so far (stdout), parsed. */
  readonly lines: Record<string, unknown>[];
  /** Output that is not a JSON log line: stderr, and stdout lines that do not parse. */
  readonly stray: string[];
  /** Resolves with the exit status once the process has exited and its output is read. */
  readonly exited: Promise<Deno.CommandStatus>;
  /** True once the process has exited. */
  readonly gone: boolean;
  /** Resolves with the first log line matching `pred` (past or future). */
  waitForLog(
    pred: (line: Record<string, unknown>) => boolean,
    timeoutMs?: number,
  ): Promise<Record<string, unknown>>;
  /** Sends `signal` and waits for the process to exit. */
  stop(signal?: Deno.Signal): Promise<Deno.CommandStatus>;
}

/** How {@link spawnService} reports output, besides keeping it. */
export interface SpawnOptions {
  /** Shown as the process's name (default: the service's name). */
  key?: string;
  /**
   * Run these services in the one process instead (`services/together.ts`, with the
   * supervisor's arguments for the group), as `deno task start --together` does.
   */
  together?: readonly string[];
  /** Called with each JSON log line. */
  onLine?: (line: Record<string, unknown>) => void;
  /** Called with each line that is not a JSON log line. */
  onStray?: (text: string) => void;
}

const READY = /^(stage started|state writer started|scheduler started|gateway listening)$/;

/**
 * Starts one service as the supervisor would, without waiting for it to be ready.
 *
 * @example
 * ```ts ignore
 * const proc = spawnService("topics", { NATS_URL: server.url });
 * await proc.waitForLog((l) => l.msg === "stage started");
 * ```
 */
export function spawnService(
  name: string,
  env: Record<string, string>,
  opts: SpawnOptions = {},
): ServiceProcess {
  const names = opts.together ?? [name];
  const specs = names.map((n) => {
    const spec: ServiceSpec | undefined = SERVICES.find((s) => s.name === n);
    if (!spec) throw new Error(`no service ${n}`);
    return spec;
  });
  const key = opts.key ?? name;
  const config = loadConfig({ env: (k) => env[k], args: [] });
  const child = new Deno.Command("deno", {
    args: opts.together
      ? processArgs(specs, config, [TOGETHER_ENTRY, ...names], [])
      : serviceArgs(specs[0]!, config),
    cwd: ROOT,
    env: { ...env, ...(opts.together ? {} : serviceEnv(specs[0]!, (k) => env[k])) },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const book = new LogBook();
  const stray: string[] = [];
  const addStray = (text: string) => {
    stray.push(text);
    opts.onStray?.(text);
  };
  const read = (json: boolean) => (text: string) => {
    if (!text.trim()) return;
    let line: LogLine;
    try {
      if (!json) throw new Error("stderr");
      line = JSON.parse(text);
    } catch {
      addStray(text);
      return;
    }
    book.add(line);
    opts.onLine?.(line);
  };
  const pumps = Promise.all([
    eachLine(child.stdout, read(true)),
    eachLine(child.stderr, read(false)),
  ]).catch(() => {});
  let gone = false;
  const exited = child.status.then(async (s) => {
    await pumps;
    gone = true;
    return s;
  });

  const waitForLog = (pred: (l: LogLine) => boolean, timeoutMs = 15_000) =>
    book.wait(pred, timeoutMs, () =>
      new Error(
        `${key}: no matching log line within ${timeoutMs} ms; other output: ${
          stray.join("\n").slice(-2000)
        }`,
      ));

  const stop = async (signal: Deno.Signal = "SIGTERM") => {
    if (!gone) {
      try {
        child.kill(signal);
      } catch { /* already gone */ }
    }
    return await exited;
  };

  return {
    name: key,
    lines: book.lines,
    stray,
    exited,
    get gone() {
      return gone;
    },
    waitForLog,
    stop,
    async [Symbol.asyncDispose]() {
      await stop("SIGKILL");
    },
  };
}

/** How {@link startService} waits, besides what {@link spawnService} takes. */
export interface StartOptions extends SpawnOptions {
  /** How long it may take to be ready (default 30 s). */
  readyTimeoutMs?: number;
  /** How many "started" lines make it ready (default 1: a stage; 2 for review and storage). */
  readyCount?: number;
}

/**
 * Starts one service and waits until it says it is running (`readyCount` "started"
 * lines); fails at once if it exits first.
 *
 * @example
 * ```ts ignore
 * await using moderation = await startService("moderation", { NATS_URL: server.url });
 * ```
 */
export async function startService(
  name: string,
  env: Record<string, string>,
  opts: StartOptions = {},
): Promise<ServiceProcess> {
  const proc = spawnService(name, env, opts);
  const want = opts.readyCount ?? 1;
  let started = 0;
  const ready = proc.waitForLog(
    (l) => READY.test(String(l.msg)) && ++started >= want,
    opts.readyTimeoutMs ?? START_DEADLINE_MS,
  );
  const exitedFirst = proc.exited.then((s) => {
    throw new Error(`${proc.name} exited (${s.code}) before it was ready:
${[...proc.stray, ...proc.lines.map((l) => JSON.stringify(l))].join("\n").slice(-2000)}`);
  });
  try {
    await Promise.race([ready, exitedFirst]);
  } catch (err) {
    await proc.stop("SIGKILL");
    throw err;
  } finally {
    ready.catch(() => {});
    exitedFirst.catch(() => {});
  }
  return proc;
}

// ---------------------------------------------------------------------------------------------
// A set of services, one process each.

/** A service to start, and how many "started" lines it logs when ready (default 1). */
export interface ServiceStart {
  name: string;
  ready?: number;
}

/** The services of the feedback pipeline: what the fault tests exercise. */
export const FEEDBACK_SERVICES: readonly string[] = [
  "state",
  "ingest",
  "sentiment",
  "topics",
  "dispatch",
  "gateway",
];

/** The services of the content moderation pipeline, with how many "started" lines each logs. */
export const MODERATION_SERVICES: readonly Required<ServiceStart>[] = [
  { name: "content-state", ready: 1 },
  { name: "moderation", ready: 1 },
  { name: "review", ready: 2 },
  { name: "storage", ready: 2 },
  { name: "scheduler", ready: 1 },
  { name: "gateway", ready: 1 },
];

/** Every service the supervisor runs. */
export const ALL_SERVICES: readonly string[] = SERVICES.map((s) => s.name);

/** Settings the fault tests' meshes use (the default base environment): quick retries and drains. */
export const TEST_ENV: Record<string, string> = {
  WEFT_LOG_LEVEL: "info",
  WEFT_RETRY_BASE_MS: "50",
  WEFT_RETRY_MAX_MS: "400",
  WEFT_ACK_WAIT_MS: "5000",
  WEFT_DRAIN_MS: "3000",
  WEFT_MAX_ATTEMPTS: "4",
};

/** Which services {@link startServices} runs, and how. */
export interface ServicesOptions {
  /** The services, started in this order (default {@link FEEDBACK_SERVICES}). */
  services?: readonly (string | ServiceStart)[];
  /** The environment under `env` (default {@link TEST_ENV}). */
  baseEnv?: Record<string, string>;
  /** Extra environment for every service (e.g. OTEL_*, WEFT_FAIL_ON). */
  env?: Record<string, string>;
  /** Per-service environment, by service name, over `env`. */
  serviceEnv?: Record<string, Record<string, string>>;
  /** A running nats-server to use (left running); by default the mesh starts its own. */
  nats?: NatsServer;
  /** The gateway's port (default: a free one). */
  port?: number;
  /** Create Weft's topology before the services start (default: when it starts its own server). */
  topology?: boolean;
  /**
   * When a service counts as started: `"log"` (default) when it logs its "started" lines
   * (fails at once if one exits first); `"ping"` when the gateway answers /readyz and every
   * service answers `$SRV.PING` (the services are spawned all at once).
   */
  ready?: "log" | "ping";
  /** With `ready: "log"`, start them all at once instead of one after another. */
  parallel?: boolean;
  /** The signal the mesh's disposal sends every service (default SIGKILL: nothing drains). */
  stopSignal?: Deno.Signal;
  /**
   * Run every service in one process (`--together`): `start`, `kill` and the mesh's
   * process map then act on that one process, whichever service they name; `start` with a
   * key of its own (`name#2`) starts another such process, a replica of every service.
   */
  together?: boolean;
}

/**
 * The whole mesh for end-to-end tests: every service, debug logs, quick retries, ready when
 * every service answers `$SRV.PING`, stopped with SIGTERM. Spread it and add `env`.
 */
export const WHOLE_MESH: Readonly<ServicesOptions> = {
  services: ALL_SERVICES,
  baseEnv: { WEFT_LOG_LEVEL: "debug", WEFT_RETRY_BASE_MS: "50", WEFT_DRAIN_MS: "2000" },
  topology: false,
  ready: "ping",
  stopSignal: "SIGTERM",
};

/** A running set of services. */
export interface ServiceMesh extends AsyncDisposable {
  /** The nats-server: the mesh's own, or the one it was given. */
  nats: NatsServer;
  nc: NatsConnection;
  js: JetStreamClient;
  jsm: JetStreamManager;
  /** The configuration the services' environment makes. */
  config: Config;
  /** The gateway's base URL. */
  gatewayUrl: string;
  /** The running processes, by key (a service's name, or name#n for replicas). */
  procs: Map<string, ServiceProcess>;
  /** Every JSON log line the services wrote, parsed. */
  logs: Record<string, unknown>[];
  /** Lines that were not JSON log lines, from every service. */
  stray: string[];
  /** Resolves with the first log line of any service (past or future) matching `pred`. */
  waitForLog(
    pred: (line: Record<string, unknown>) => boolean,
    ms?: number,
  ): Promise<Record<string, unknown>>;
  /** Starts a service (key: name, or name#n for replicas); resolves when it is ready. */
  start(name: string, env?: Record<string, string>, key?: string): Promise<ServiceProcess>;
  /** Sends a signal to a service (default SIGKILL) and waits for it to exit. */
  kill(key: string, signal?: Deno.Signal): Promise<Deno.CommandStatus>;
  /** Names of services whose process has exited on its own. */
  crashed(): string[];
  /** Stops every service (SIGKILL by default: nothing gets to drain). */
  stopAll(signal?: Deno.Signal): Promise<void>;
  /** Starts the mesh's services again, as at the start. */
  startAll(): Promise<void>;
}

async function until<T>(what: string, ms: number, probe: () => Promise<T | undefined>) {
  const deadline = Date.now() + ms;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const v = await probe();
      if (v !== undefined) return v;
    } catch (err) {
      last = err;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what}`, { cause: last });
}

/**
 * Starts services, each as its own process, with the environment
 * `{...baseEnv, ...env, NATS_URL, PORT}` (and `serviceEnv[name]` over it).
 *
 * @example
 * ```ts ignore
 * await using mesh = await startServices({ env: { WEFT_SLOW_MS: "100" } });
 * await mesh.kill("topics");
 * await mesh.start("topics");
 * await using whole = await startServices({ ...WHOLE_MESH, env: { OTEL_DENO: "true" } });
 * await using moderation = await startServices({
 *   services: MODERATION_SERVICES, baseEnv: {}, parallel: true, nats: server,
 * });
 * ```
 */
export async function startServices(opts: ServicesOptions = {}): Promise<ServiceMesh> {
  // Each service once (a list may name the gateway twice, as pipelines' lists joined do).
  const specs = [
    ...new Map(
      (opts.services ?? FEEDBACK_SERVICES).map((s) => typeof s === "string" ? { name: s } : s)
        .map((s) => [s.name, s]),
    ).values(),
  ];
  const readyCount = (name: string) => specs.find((s) => s.name === name)?.ready ?? 1;
  const ownsNats = !opts.nats;
  const nats = opts.nats ?? await startNatsServer();
  const port = opts.port ?? freePort();
  const gatewayUrl = `http://127.0.0.1:${port}`;
  const baseEnv: Record<string, string> = {
    ...(opts.baseEnv ?? TEST_ENV),
    ...opts.env,
    NATS_URL: nats.url,
    PORT: String(port),
  };
  const config = loadConfig({ env: (n) => baseEnv[n] ?? Deno.env.get(n), args: [] });
  const procs = new Map<string, ServiceProcess>();
  const expectedExit = new Set<ServiceProcess>();
  const logs = new LogBook();
  const stray: string[] = [];
  const envOf = (name: string, env: Record<string, string> = {}) => ({
    ...baseEnv,
    ...opts.serviceEnv?.[name],
    ...env,
  });
  const output = (key: string): SpawnOptions => ({
    key,
    onLine: (line) => logs.add(line),
    onStray: (text) => stray.push(text),
  });
  let nc: NatsConnection | undefined;

  const TOGETHER = "together";
  /** In one process: the process a key names (a replica's own key, else the one process). */
  const togetherKey = (name: string, key: string) => key === name ? TOGETHER : key;
  const start = async (name: string, env: Record<string, string> = {}, key = name) => {
    if (opts.together) {
      // Another key (name#n) starts one more process of every service: a replica of them all.
      const procKey = togetherKey(name, key);
      const running = procs.get(procKey);
      if (running && !running.gone) return running;
      const proc = await startService(TOGETHER, envOf(name, env), {
        ...output(procKey),
        together: specs.map((s) => s.name),
        readyCount: specs.reduce((n, s) => n + (s.ready ?? 1), 0),
      });
      procs.set(procKey, proc);
      return proc;
    }
    const proc = await startService(name, envOf(name, env), {
      ...output(key),
      readyCount: readyCount(name),
    });
    procs.set(key, proc);
    return proc;
  };

  const kill = (key: string, signal: Deno.Signal = "SIGKILL") => {
    const proc = procs.get(opts.together && !procs.has(key) ? TOGETHER : key);
    if (!proc) throw new Error(`no service ${key} in the mesh`);
    expectedExit.add(proc);
    return proc.stop(signal);
  };

  const stopAll = async (signal: Deno.Signal = "SIGKILL") => {
    await Promise.all([...procs.keys()].map((key) => kill(key, signal)));
  };

  const pinged = async (nc: NatsConnection) => {
    try {
      if (specs.some((s) => s.name === "gateway")) {
        await until("gateway /readyz", START_DEADLINE_MS, async () => {
          const r = await fetch(`${gatewayUrl}/readyz`);
          await r.body?.cancel();
          return r.ok ? true : undefined;
        });
      }
      const want = specs.map((s) => `weft-${s.name}`).sort();
      await until("every service to answer $SRV.PING", START_DEADLINE_MS, async () => {
        const names = new Set<string>();
        const answers = await nc.requestMany("$SRV.PING", undefined, {
          strategy: "stall",
          stall: 100,
          maxWait: 1000,
        });
        for await (const m of answers) names.add(m.json<{ name: string }>().name);
        return want.every((n) => names.has(n)) ? true : undefined;
      });
    } catch (err) {
      throw new Error(`mesh did not start; output: ${stray.slice(-20).join("\n")}`, {
        cause: err,
      });
    }
  };

  const startAll = async () => {
    if (opts.ready === "ping") {
      if (opts.together) {
        const together = specs.map((s) => s.name);
        procs.set(
          TOGETHER,
          spawnService(TOGETHER, envOf(TOGETHER), {
            ...output(TOGETHER),
            together,
          }),
        );
      } else {
        for (const { name } of specs) {
          procs.set(name, spawnService(name, envOf(name), output(name)));
        }
      }
      await pinged(nc!);
    } else if (opts.together) {
      await start(specs[0]!.name);
    } else if (opts.parallel) {
      const results = await Promise.allSettled(specs.map((s) => start(s.name)));
      const failed = results.find((r) => r.status === "rejected");
      if (failed) {
        await stopAll("SIGKILL");
        throw (failed as PromiseRejectedResult).reason;
      }
    } else {
      for (const { name } of specs) await start(name);
    }
  };

  const stopSignal = opts.stopSignal ?? "SIGKILL";
  const dispose = async () => {
    await stopAll(stopSignal);
    await nc?.close();
    if (ownsNats) await nats[Symbol.asyncDispose]();
  };

  let jsm: JetStreamManager;
  try {
    nc = await connectClient(nats.url, "weft-test");
    jsm = await jetstreamManager(nc);
    if (opts.topology ?? ownsNats) await ensureTopology(nc, jsm, config);
    await startAll();
  } catch (err) {
    await dispose();
    throw err;
  }

  return {
    nats,
    nc,
    js: jetstream(nc),
    jsm,
    config,
    gatewayUrl,
    procs,
    logs: logs.lines,
    stray,
    waitForLog: (pred, ms = 10_000) =>
      logs.wait(pred, ms, () => new Error("timed out waiting for a log line")),
    start,
    kill,
    crashed() {
      return [...procs.values()].filter((p) => !expectedExit.has(p) && p.gone).map((p) => p.name);
    },
    stopAll,
    startAll,
    [Symbol.asyncDispose]: dispose,
  };
}

// ---------------------------------------------------------------------------------------------
// The supervisor of `deno task start`.

/**
 * A fresh directory for a supervisor's nats-server (its store and identities). It lies
 * under the repository's data/, the one place `deno task start` may write.
 */
export async function meshTempDir(prefix: string): Promise<string> {
  const dir = new URL("data/tmp/", ROOT).pathname;
  await Deno.mkdir(dir, { recursive: true });
  return await Deno.makeTempDir({ dir, prefix });
}

/**
 * Removes `dir` when disposed. Declared before the mesh that uses the directory, it is
 * removed after that mesh stops, whether the test passed or failed.
 *
 * @example
 * ```ts ignore
 * const dir = await meshTempDir("weft-x-");
 * await using _dir = removedAtEnd(dir);
 * await using mesh = await startMesh({ WEFT_PIPELINES: `${dir}/x.ts` });
 * ```
 */
export function removedAtEnd(dir: string): AsyncDisposable {
  return {
    async [Symbol.asyncDispose]() {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };
}

/** A port whose next `n - 1` ports are free too (a cluster's client ports). */
export function freePortRun(n: number): number {
  for (let attempt = 0; attempt < 100; attempt++) {
    const p = freePort();
    if (p + n - 1 <= 65535 && Array.from({ length: n - 1 }, (_, i) => p + i + 1).every(portFree)) {
      return p;
    }
  }
  throw new Error(`no run of ${n} free ports found`);
}

/** A running supervisor. */
export interface Mesh extends AsyncDisposable {
  gatewayUrl: string;
  storeDir: string;
  natsPort: number;
  natsUrl: string;
  /** nats-server's HTTP monitoring port (/varz, /jsz...). */
  natsMonitorPort: number;
  /**
   * How to connect as one of the mesh's NATS identities (`ops` for what the nats CLI does,
   * `admin` for the topology, or a service's name).
   */
  credentials(identity: string): NatsCredentials;
  /** Every JSON log line printed so far, parsed. */
  logs: Record<string, unknown>[];
  /** Resolves with the first log line (past or future) matching `pred`. */
  waitForLog(
    pred: (line: Record<string, unknown>) => boolean,
    ms: number,
    what: string,
  ): Promise<Record<string, unknown>>;
  /** Sends `signal` to the supervisor and resolves with its exit status. */
  stop(signal?: Deno.Signal): Promise<Deno.CommandStatus>;
  child: Deno.ChildProcess;
}

/**
 * Runs `deno task rebuild-state [--pipeline NAME] [flags]` with `env`: its exit code, the
 * figures of its last JSON line, and what it printed (for a failure message).
 */
export async function rebuildStateTask(
  env: Record<string, string>,
  pipeline?: string,
  flags: readonly string[] = [],
): Promise<{ code: number; figures: Record<string, number>; output: string }> {
  const out = await new Deno.Command("deno", {
    args: [
      "task",
      "-q",
      "rebuild-state",
      ...(pipeline ? ["--pipeline", pipeline] : []),
      ...flags,
    ],
    cwd: new URL("../../", import.meta.url),
    env,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout).trim();
  return {
    code: out.code,
    figures: text ? JSON.parse(text.split("\n").at(-1)!) : {},
    output: text + new TextDecoder().decode(out.stderr),
  };
}

/** The `deno run ...` arguments of a deno.json task. */
export async function taskArgs(name: string): Promise<string[]> {
  const deno = JSON.parse(await Deno.readTextFile(new URL("deno.json", ROOT)));
  const task = deno.tasks[name];
  const command: string = typeof task === "string" ? task : task.command;
  const [bin, ...args] = command.split(/\s+/);
  if (bin !== "deno") throw new Error(`task ${name} does not start with deno`);
  return args;
}

/**
 * A task's arguments ({@link taskArgs}) with Deno's `--quiet` after its subcommand: Deno's own
 * diagnostics (the "Download ..." lines of a cold cache) stay off stderr, the program's do not.
 */
export function quiet(args: string[]): string[] {
  const [sub, ...rest] = args;
  return sub === undefined ? args : [sub, "--quiet", ...rest];
}

/** `WEFT_TEST_MESH=process`: every test mesh one process per service. */
const PER_PROCESS = Deno.env.get("WEFT_TEST_MESH") === "process";

/**
 * For meshes whose tests check what the mesh does, not how its processes behave: every
 * service in one process (`WEFT_TOGETHER=all`, the supported one-process mode), which starts
 * and stops in about a third of the CPU (4.7 s against 15.7 s here), so the suite fits its
 * time on two cores. `WEFT_TEST_MESH=process deno task test` runs them one process per
 * service instead, as `deno task start` does by default. Tests of processes (kills, restarts,
 * identities, the default start) do not use it.
 */
export const ONE_PROCESS: Readonly<Record<string, string>> = PER_PROCESS
  ? {}
  : { WEFT_TOGETHER: "all" };

/**
 * {@link ONE_PROCESS} for {@link startServices}: spread into its options, it runs the mesh's
 * services in one process (`together`) unless `WEFT_TEST_MESH=process`.
 */
export const SERVICES_IN_ONE_PROCESS: Readonly<Pick<ServicesOptions, "together">> = PER_PROCESS
  ? {}
  : { together: true };

/** What a supervisor or a service says when a port it was given is held by someone else. */
const PORT_TAKEN = /is taken by|AddrInUse|address already in use/i;

/** A mesh that did not start because a port picked for it was taken meanwhile. */
class PortTakenError extends Error {}

/** How many times {@link startMesh} picks fresh ports when one was taken before it bound it. */
const PORT_ATTEMPTS = 3;

/**
 * Starts the supervisor of `deno task start` and waits until the gateway listens.
 *
 * The ports it picks are free when picked, not held: a test file running beside this one
 * (its own worker, with its own {@link freePort}) may bind one before the supervisor does,
 * which then stops with "port N is taken by another process". Such a start is tried again
 * with fresh ports (the ports the caller pinned stay), up to {@link PORT_ATTEMPTS} times.
 */
export async function startMesh(
  env: Record<string, string> = {},
  opts: { storeDir?: string; natsPort?: number; port?: number; keepStore?: boolean } = {},
): Promise<Mesh> {
  for (let attempt = 1;; attempt++) {
    try {
      return await startMeshOnce(env, opts);
    } catch (err) {
      if (!(err instanceof PortTakenError) || attempt >= PORT_ATTEMPTS) throw err;
    }
  }
}

async function startMeshOnce(
  env: Record<string, string>,
  opts: { storeDir?: string; natsPort?: number; port?: number; keepStore?: boolean },
): Promise<Mesh> {
  const port = opts.port ?? freePort();
  // A cluster's nodes listen on natsPort, +1, +2...: find a run of free ports.
  const nodes = Number(env.WEFT_CLUSTER ?? 1);
  const natsPort = opts.natsPort ?? freePortRun(nodes);
  const storeDir = opts.storeDir ?? await meshTempDir("weft-mesh-");
  const monitorPort = freePort();
  const child = new Deno.Command("deno", {
    args: await taskArgs("start"),
    cwd: ROOT,
    env: {
      PORT: String(port),
      WEFT_NATS_PORT: String(natsPort),
      WEFT_NATS_MONITOR_PORT: String(monitorPort),
      WEFT_NATS_DIR: storeDir,
      WEFT_DRAIN_MS: "3000",
      ...env,
    },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const book = new LogBook();
  const read = (text: string) => {
    let line: LogLine;
    try {
      line = JSON.parse(text);
    } catch {
      line = { raw: text };
    }
    book.add(line);
  };
  const pumps = Promise.all([eachLine(child.stdout, read), eachLine(child.stderr, read)]);
  const waitForLog = (pred: (l: LogLine) => boolean, ms: number, what: string) =>
    book.wait(pred, ms, () => new Error(`timed out after ${ms} ms: ${what}`));
  let status: Deno.CommandStatus | undefined;
  const stop = async (signal: Deno.Signal = "SIGINT") => {
    if (!status) {
      try {
        child.kill(signal);
      } catch { /* already gone */ }
      status = await child.status;
      await pumps;
    }
    return status;
  };
  const mesh: Mesh = {
    gatewayUrl: `http://127.0.0.1:${port}`,
    storeDir,
    natsPort,
    natsUrl: `nats://127.0.0.1:${natsPort}`,
    natsMonitorPort: Number(env.WEFT_NATS_MONITOR_PORT ?? monitorPort),
    credentials: (identity) => ({
      nkeySeedFile: `${storeDir}/${IDENTITY_DIR}/${identity}.nk`,
      identity,
    }),
    logs: book.lines,
    waitForLog,
    stop,
    child,
    async [Symbol.asyncDispose]() {
      await stop();
      if (!opts.keepStore) await Deno.remove(storeDir, { recursive: true }).catch(() => {});
    },
  };
  // The wait's timer is cleared whatever wins: a supervisor that exits first must not leave
  // a timer running into the next test.
  const settled = new AbortController();
  const listening = book.wait(
    (l) => l.msg === "gateway listening",
    START_DEADLINE_MS,
    () => new Error(`timed out after ${START_DEADLINE_MS} ms: the gateway to listen`),
    settled.signal,
  );
  const exitedFirst = child.status.then((s) => {
    throw new Error(`the supervisor exited with ${s.code} before the gateway listened`);
  });
  // A port taken before the supervisor (or the gateway it starts) bound it: stop at once.
  const portTaken = book.wait(
    (l) => PORT_TAKEN.test(JSON.stringify(l)),
    START_DEADLINE_MS,
    () => new Error("no port taken"),
    settled.signal,
  ).then((l) => {
    throw new PortTakenError(`a port picked for the mesh was taken: ${JSON.stringify(l)}`);
  });
  try {
    await Promise.race([listening, exitedFirst, portTaken]);
  } catch (err) {
    const taken = err instanceof PortTakenError ||
      book.lines.some((l) => PORT_TAKEN.test(JSON.stringify(l)));
    if (taken) {
      // Tried again with fresh ports: a store the caller gave is kept for that start.
      await stop();
      if (opts.storeDir === undefined) {
        await Deno.remove(storeDir, { recursive: true }).catch(() => {});
      }
      throw new PortTakenError(
        `${(err as Error).message}\n${book.lines.map((l) => JSON.stringify(l)).join("\n")}`,
      );
    }
    await mesh[Symbol.asyncDispose]();
    throw new Error(
      `${(err as Error).message}\n${book.lines.map((l) => JSON.stringify(l)).join("\n")}`,
    );
  } finally {
    settled.abort();
    listening.catch(() => {});
    exitedFirst.catch(() => {});
    portTaken.catch(() => {});
  }
  return mesh;
}

// ---------------------------------------------------------------------------------------------
// A mesh's gateway.

/** Submits one item through the gateway at `url`; returns its id. */
export async function submit(
  url: string,
  text: string,
  headers: HeadersInit = {},
): Promise<string> {
  const r = await fetch(`${url}/feedback`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: JSON.stringify({ text }),
  });
  if (r.status !== 202) throw new Error(`submit: ${r.status} ${await r.text()}`);
  return (await r.json() as { id: string }).id;
}

/** Waits until the item's state is final (processed or failed); returns the state. */
export function waitFinal(url: string, id: string, ms = 20_000): Promise<{ status?: string }> {
  return until(`item ${id} to finish`, ms, async () => {
    const r = await fetch(`${url}/feedback/${id}`);
    const body = await r.json() as { status?: string };
    return body.status === "processed" || body.status === "failed" ? body : undefined;
  });
}
