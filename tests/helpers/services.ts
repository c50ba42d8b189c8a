/**
 * Runs Weft services as real `deno run` processes for end-to-end tests, with the same
 * arguments, narrow permissions and environment the supervisor gives them (`serviceArgs`,
 * `serviceEnv`). Each process's JSON log lines are collected so a test can wait for
 * "started" instead of sleeping. The one place tests spawn a service; the mesh helpers
 * (service_mesh.ts, fault_mesh.ts) build on it.
 *
 * @module
 */
import { loadConfig } from "../../src/config.ts";
import { serviceArgs, serviceEnv, SERVICES, type ServiceSpec } from "../../src/supervisor.ts";

const ROOT = new URL("../../", import.meta.url).pathname;

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
  const spec: ServiceSpec | undefined = SERVICES.find((s) => s.name === name);
  if (!spec) throw new Error(`no service ${name}`);
  const key = opts.key ?? name;
  const config = loadConfig({ env: (k) => env[k], args: [] });
  const child = new Deno.Command("deno", {
    args: serviceArgs(spec, config),
    cwd: ROOT,
    env: { ...env, ...serviceEnv(spec, (k) => env[k]) },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const lines: Record<string, unknown>[] = [];
  const stray: string[] = [];
  const waiters = new Set<(line: Record<string, unknown>) => void>();
  const addStray = (text: string) => {
    stray.push(text);
    opts.onStray?.(text);
  };
  const pump = async (stream: ReadableStream<Uint8Array>, json: boolean) => {
    let buf = "";
    for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
      buf += chunk;
      let i: number;
      while ((i = buf.indexOf("\n")) >= 0) {
        const text = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (!text.trim()) continue;
        let line: Record<string, unknown>;
        try {
          if (!json) throw new Error("stderr");
          line = JSON.parse(text);
        } catch {
          addStray(text);
          continue;
        }
        lines.push(line);
        opts.onLine?.(line);
        for (const w of [...waiters]) w(line);
      }
    }
  };
  const pumps = Promise.all([pump(child.stdout, true), pump(child.stderr, false)]).catch(
    () => {},
  );
  let gone = false;
  const exited = child.status.then(async (s) => {
    await pumps;
    gone = true;
    return s;
  });

  const waitForLog = (pred: (l: Record<string, unknown>) => boolean, timeoutMs = 15_000) => {
    const found = lines.find(pred);
    if (found) return Promise.resolve(found);
    return new Promise<Record<string, unknown>>((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        waiters.delete(check);
      };
      const check = (line: Record<string, unknown>) => {
        if (!pred(line)) return;
        done();
        resolve(line);
      };
      const timer = setTimeout(() => {
        done();
        reject(
          new Error(
            `${key}: no matching log line within ${timeoutMs} ms; other output: ${
              stray.join("\n").slice(-2000)
            }`,
          ),
        );
      }, timeoutMs);
      waiters.add(check);
    });
  };

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
    lines,
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
  opts: SpawnOptions & { readyTimeoutMs?: number; readyCount?: number } = {},
): Promise<ServiceProcess> {
  const proc = spawnService(name, env, opts);
  const want = opts.readyCount ?? 1;
  let started = 0;
  const ready = proc.waitForLog(
    (l) => READY.test(String(l.msg)) && ++started >= want,
    opts.readyTimeoutMs ?? 30_000,
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

/** The services of the content moderation pipeline, with how many "started" lines each logs. */
export const MODERATION_SERVICES: readonly { name: string; ready: number }[] = [
  { name: "content-state", ready: 1 },
  { name: "moderation", ready: 1 },
  { name: "review", ready: 2 },
  { name: "storage", ready: 2 },
  { name: "scheduler", ready: 1 },
  { name: "gateway", ready: 1 },
];

/** A set of running services. */
export interface Mesh extends AsyncDisposable {
  readonly services: ServiceProcess[];
  /** Stops every service (SIGKILL by default: nothing gets to drain). */
  stopAll(signal?: Deno.Signal): Promise<void>;
  /** Starts every service again. */
  startAll(): Promise<void>;
}

/**
 * Starts every moderation service (all at once) against `env`'s NATS_URL.
 *
 * @example
 * ```ts ignore
 * await using mesh = await startMesh({ NATS_URL: server.url, PORT: String(freePort()) });
 * ```
 */
export async function startMesh(env: Record<string, string>): Promise<Mesh> {
  let services: ServiceProcess[] = [];
  const startAll = async () => {
    const results = await Promise.allSettled(
      MODERATION_SERVICES.map((s) => startService(s.name, env, { readyCount: s.ready })),
    );
    services = results.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
    const failed = results.find((r) => r.status === "rejected");
    if (failed) {
      await Promise.all(services.map((s) => s.stop("SIGKILL")));
      throw (failed as PromiseRejectedResult).reason;
    }
  };
  const stopAll = async (signal: Deno.Signal = "SIGKILL") => {
    await Promise.all(services.map((s) => s.stop(signal)));
  };
  await startAll();
  return {
    get services() {
      return services;
    },
    stopAll,
    startAll,
    async [Symbol.asyncDispose]() {
      await stopAll("SIGKILL");
    },
  };
}
