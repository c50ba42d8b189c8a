/**
 * The whole mesh for end-to-end tests: a real nats-server on free ports and every service
 * as its own `deno run` process with the supervisor's narrow permissions (`spawnService`),
 * their JSON log lines captured. Ready when the gateway answers /readyz
 * and every service answers `$SRV.PING`.
 *
 * @module
 */
import type { NatsConnection } from "@nats-io/nats-core";
import { type Config, loadConfig } from "../../src/config.ts";
import { connectNats } from "../../src/nats.ts";
import { freePort, type NatsServer, startNatsServer } from "../../src/nats_server.ts";
import { SERVICES } from "../../src/supervisor.ts";
import { spawnService } from "./services.ts";

/** A running mesh. */
export interface Mesh extends AsyncDisposable {
  server: NatsServer;
  /** The gateway's base URL. */
  url: string;
  nc: NatsConnection;
  config: Config;
  /** Every JSON log line the services wrote, parsed. */
  logs: Record<string, unknown>[];
  /** Lines that were not JSON (must stay empty: no free-text output). */
  stray: string[];
  /** Resolves when `pred` holds for a log line, or rejects at the deadline. */
  waitForLog(pred: (l: Record<string, unknown>) => boolean, ms?: number): Promise<void>;
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

/** Starts the mesh; extra `env` goes to every service (e.g. OTEL_*). */
export async function startMesh(opts: { env?: Record<string, string> } = {}): Promise<Mesh> {
  const server = await startNatsServer();
  const port = freePort();
  const env: Record<string, string> = {
    NATS_URL: server.url,
    PORT: String(port),
    WEFT_LOG_LEVEL: "debug",
    WEFT_RETRY_BASE_MS: "50",
    WEFT_DRAIN_MS: "2000",
    ...opts.env,
  };
  const config = loadConfig({ env: (n) => env[n], args: [] });
  const logs: Record<string, unknown>[] = [];
  const stray: string[] = [];
  const waiters = new Set<() => void>();
  const procs = SERVICES.map((spec) =>
    spawnService(spec.name, env, {
      onLine: (line) => {
        logs.push(line);
        for (const w of waiters) w();
      },
      onStray: (text) => stray.push(text),
    })
  );
  const nc = await connectNats(server.url, "weft-test");
  const url = `http://127.0.0.1:${port}`;
  const stop = async () => {
    await Promise.all(procs.map((p) => p.stop("SIGTERM")));
    await nc.close();
    await server.stop();
  };
  try {
    await until("gateway /readyz", 30_000, async () => {
      const r = await fetch(`${url}/readyz`);
      await r.body?.cancel();
      return r.ok ? true : undefined;
    });
    const want = SERVICES.map((s) => `weft-${s.name}`).sort();
    await until("every service to answer $SRV.PING", 30_000, async () => {
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
    await stop();
    throw new Error(`mesh did not start; output: ${stray.slice(-20).join("\n")}`, {
      cause: err,
    });
  }
  return {
    server,
    url,
    nc,
    config,
    logs,
    stray,
    waitForLog(pred, ms = 10_000) {
      return new Promise((resolve, reject) => {
        const check = () => {
          if (logs.some(pred)) {
            clearTimeout(timer);
            waiters.delete(check);
            resolve();
          }
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          reject(new Error("timed out waiting for a log line"));
        }, ms);
        waiters.add(check);
        check();
      });
    },
    [Symbol.asyncDispose]: stop,
  };
}

/** Submits one item through the gateway; returns its id. */
export async function submit(url: string, text: string, headers: HeadersInit = {}) {
  const r = await fetch(`${url}/feedback`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: JSON.stringify({ text }),
  });
  if (r.status !== 202) throw new Error(`submit: ${r.status} ${await r.text()}`);
  return (await r.json() as { id: string }).id;
}

/** Waits until the item's state is final (processed or failed); returns the state. */
export function waitFinal(url: string, id: string, ms = 20_000) {
  return until(`item ${id} to finish`, ms, async () => {
    const r = await fetch(`${url}/feedback/${id}`);
    const body = await r.json() as { status?: string };
    return body.status === "processed" || body.status === "failed" ? body : undefined;
  });
}
