/**
 * Runs the whole mesh exactly as `deno task start` does: the same command line, read
 * from deno.json, with its own nats-server on free ports and a temporary store.
 *
 * @module
 */
import { freePort, portFree } from "../../src/nats_server.ts";
import type { NatsCredentials } from "../../src/nats.ts";
import { IDENTITY_DIR } from "../../src/supervisor.ts";
import { deadline } from "./wait.ts";

const root = new URL("../../", import.meta.url);

/**
 * A fresh directory for a supervisor's nats-server (its store and identities). It lies
 * under the repository's data/, the one place `deno task start` may write.
 */
export async function meshTempDir(prefix: string): Promise<string> {
  const dir = new URL("data/tmp/", root).pathname;
  await Deno.mkdir(dir, { recursive: true });
  return await Deno.makeTempDir({ dir, prefix });
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

/** The `deno run ...` arguments of a deno.json task. */
export async function taskArgs(name: string): Promise<string[]> {
  const deno = JSON.parse(await Deno.readTextFile(new URL("deno.json", root)));
  const task = deno.tasks[name];
  const command: string = typeof task === "string" ? task : task.command;
  const [bin, ...args] = command.split(/\s+/);
  if (bin !== "deno") throw new Error(`task ${name} does not start with deno`);
  return args;
}

/**
 * For meshes whose tests check what the mesh does, not how its processes behave: every
 * service in one process (`WEFT_TOGETHER=all`, the supported one-process mode), which starts
 * and stops in about a third of the CPU (4.7 s against 15.7 s here), so the suite fits its
 * time on two cores. `WEFT_TEST_MESH=process deno task test` runs them one process per
 * service instead, as `deno task start` does by default. Tests of processes (kills, restarts,
 * identities, the default start) do not use it.
 */
export const ONE_PROCESS: Readonly<Record<string, string>> =
  Deno.env.get("WEFT_TEST_MESH") === "process" ? {} : { WEFT_TOGETHER: "all" };

/** Starts the supervisor of `deno task start` and waits until the gateway listens. */
export async function startMesh(
  env: Record<string, string> = {},
  opts: { storeDir?: string; natsPort?: number; port?: number; keepStore?: boolean } = {},
): Promise<Mesh> {
  const port = opts.port ?? freePort();
  // A cluster's nodes listen on natsPort, +1, +2...: find a run of free ports.
  const nodes = Number(env.WEFT_CLUSTER ?? 1);
  const natsPort = opts.natsPort ?? freePortRun(nodes);
  const storeDir = opts.storeDir ?? await meshTempDir("weft-mesh-");
  const child = new Deno.Command("deno", {
    args: await taskArgs("start"),
    cwd: root,
    env: {
      PORT: String(port),
      WEFT_NATS_PORT: String(natsPort),
      WEFT_NATS_MONITOR_PORT: String(freePort()),
      WEFT_NATS_DIR: storeDir,
      WEFT_DRAIN_MS: "3000",
      ...env,
    },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const logs: Record<string, unknown>[] = [];
  const waiters: {
    pred: (l: Record<string, unknown>) => boolean;
    resolve: (l: Record<string, unknown>) => void;
  }[] = [];
  const pump = async (stream: ReadableStream<Uint8Array>) => {
    let buf = "";
    for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
      buf += chunk;
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const text = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        let line: Record<string, unknown>;
        try {
          line = JSON.parse(text);
        } catch {
          line = { raw: text };
        }
        logs.push(line);
        for (const w of [...waiters]) {
          if (w.pred(line)) {
            waiters.splice(waiters.indexOf(w), 1);
            w.resolve(line);
          }
        }
      }
    }
  };
  const pumps = Promise.all([pump(child.stdout), pump(child.stderr)]);
  const waitForLog = (pred: (l: Record<string, unknown>) => boolean, ms: number, what: string) => {
    const found = logs.find(pred);
    if (found) return Promise.resolve(found);
    return deadline(
      new Promise<Record<string, unknown>>((resolve) => waiters.push({ pred, resolve })),
      ms,
      what,
    );
  };
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
    credentials: (identity) => ({
      nkeySeedFile: `${storeDir}/${IDENTITY_DIR}/${identity}.nk`,
      identity,
    }),
    logs,
    waitForLog,
    stop,
    child,
    async [Symbol.asyncDispose]() {
      await stop();
      if (!opts.keepStore) await Deno.remove(storeDir, { recursive: true }).catch(() => {});
    },
  };
  // Its own timer, cleared whatever wins: a supervisor that exits first must not leave a
  // timer running into the next test.
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    await Promise.race([
      new Promise<void>((resolve) => {
        if (logs.some((l) => l.msg === "gateway listening")) return resolve();
        waiters.push({ pred: (l) => l.msg === "gateway listening", resolve: () => resolve() });
      }),
      new Promise<never>((_, reject) => {
        timer = setTimeout(
          () => reject(new Error("timed out after 30000 ms: the gateway to listen")),
          30_000,
        );
      }),
      child.status.then((s) => {
        throw new Error(`the supervisor exited with ${s.code} before the gateway listened`);
      }),
    ]);
    clearTimeout(timer);
  } catch (err) {
    clearTimeout(timer);
    await mesh[Symbol.asyncDispose]();
    throw new Error(`${(err as Error).message}\n${logs.map((l) => JSON.stringify(l)).join("\n")}`);
  }
  return mesh;
}
