/**
 * Runs Weft services as real `deno run` processes for end-to-end tests, with the same
 * narrow permissions the supervisor gives them (`serviceArgs`). Each process's JSON log
 * lines are collected so a test can wait for "started" instead of sleeping.
 *
 * @module
 */
import { loadConfig } from "../../src/config.ts";
import { serviceArgs, SERVICES, type ServiceSpec } from "../../src/supervisor.ts";

/** A running service process. */
export interface ServiceProcess extends AsyncDisposable {
  readonly name: string;
  /** Log lines so far, parsed. */
  readonly lines: Record<string, unknown>[];
  /** Resolves with the first log line matching `pred` (past or future). */
  waitForLog(
    pred: (line: Record<string, unknown>) => boolean,
    timeoutMs?: number,
  ): Promise<Record<string, unknown>>;
  /** Sends `signal` and waits for the process to exit. */
  stop(signal?: Deno.Signal): Promise<Deno.CommandStatus>;
}

const READY = /^(stage started|state writer started|scheduler started|gateway listening)$/;

/**
 * Starts one service and waits until it says it is running.
 *
 * @example
 * ```ts ignore
 * await using moderation = await startService("moderation", { NATS_URL: server.url });
 * ```
 */
export async function startService(
  name: string,
  env: Record<string, string>,
  opts: { readyTimeoutMs?: number; readyCount?: number } = {},
): Promise<ServiceProcess> {
  const spec: ServiceSpec | undefined = SERVICES.find((s) => s.name === name);
  if (!spec) throw new Error(`no service ${name}`);
  const config = loadConfig({ env: (k) => env[k], args: [] });
  const child = new Deno.Command("deno", {
    args: serviceArgs(spec, config),
    env,
    clearEnv: false,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const lines: Record<string, unknown>[] = [];
  const waiters: {
    pred: (l: Record<string, unknown>) => boolean;
    resolve: (l: Record<string, unknown>) => void;
  }[] = [];
  const stderr: string[] = [];
  const pump = async (stream: ReadableStream<Uint8Array>, onLine: (line: string) => void) => {
    let buf = "";
    for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
      buf += chunk;
      let i: number;
      while ((i = buf.indexOf("\n")) >= 0) {
        onLine(buf.slice(0, i));
        buf = buf.slice(i + 1);
      }
    }
  };
  const pumps = Promise.all([
    pump(child.stdout, (text) => {
      let line: Record<string, unknown>;
      try {
        line = JSON.parse(text);
      } catch {
        line = { msg: text };
      }
      lines.push(line);
      for (const w of [...waiters]) {
        if (w.pred(line)) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve(line);
        }
      }
    }),
    pump(child.stderr, (text) => stderr.push(text)),
  ]);
  let exited = false;
  const status = child.status.then((s) => {
    exited = true;
    return s;
  });

  const waitForLog = (pred: (l: Record<string, unknown>) => boolean, timeoutMs = 15_000) => {
    const found = lines.find(pred);
    if (found) return Promise.resolve(found);
    let timer: ReturnType<typeof setTimeout> | undefined;
    return new Promise<Record<string, unknown>>((resolve, reject) => {
      const w = {
        pred,
        resolve: (l: Record<string, unknown>) => {
          clearTimeout(timer);
          resolve(l);
        },
      };
      waiters.push(w);
      timer = setTimeout(() => {
        waiters.splice(waiters.indexOf(w), 1);
        reject(
          new Error(
            `${name}: no matching log line within ${timeoutMs} ms; stderr: ${
              stderr.join("\n").slice(-2000)
            }`,
          ),
        );
      }, timeoutMs);
    });
  };

  const stop = async (signal: Deno.Signal = "SIGTERM") => {
    if (!exited) {
      try {
        child.kill(signal);
      } catch { /* already gone */ }
    }
    const s = await status;
    await pumps;
    return s;
  };

  const proc: ServiceProcess = {
    name,
    lines,
    waitForLog,
    stop,
    async [Symbol.asyncDispose]() {
      await stop("SIGKILL");
    },
  };
  try {
    const want = opts.readyCount ?? 1;
    await waitForLog(
      () => lines.filter((l) => READY.test(String(l.msg))).length >= want,
      opts.readyTimeoutMs ?? 30_000,
    );
  } catch (err) {
    await stop("SIGKILL");
    throw err;
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
