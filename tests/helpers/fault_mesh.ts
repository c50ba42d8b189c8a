/**
 * A real Weft mesh for tests: a real nats-server (file store in a temp dir, so it can be
 * killed and restarted on the same port and store) and every service as its own
 * `deno run` process with the permissions the supervisor gives it (`startService`).
 * Nothing is mocked.
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
import { connect } from "@nats-io/transport-node";
import { loadConfig } from "../../src/config.ts";
import { freePort, type NatsServer, startNatsServer } from "../../src/nats_server.ts";
import { type ServiceProcess, startService } from "./services.ts";
import { ensureTopology } from "../../src/topology.ts";
import { FEEDBACK_STREAM, STATE_BUCKET } from "../../src/subjects.ts";
import { readStream } from "../../src/stream_reader.ts";
import type { FeedbackState } from "../../src/events.gen.ts";

/** The services of the feedback pipeline: what the fault tests exercise. */
export const FEEDBACK_SERVICES: readonly string[] = [
  "state",
  "ingest",
  "sentiment",
  "topics",
  "dispatch",
  "gateway",
];

/** Settings every test mesh uses: quick retries and drains. */
export const TEST_ENV: Record<string, string> = {
  WEFT_LOG_LEVEL: "info",
  WEFT_RETRY_BASE_MS: "50",
  WEFT_RETRY_MAX_MS: "400",
  WEFT_ACK_WAIT_MS: "5000",
  WEFT_DRAIN_MS: "3000",
  WEFT_MAX_ATTEMPTS: "4",
};

/** A running mesh. */
export interface Mesh extends AsyncDisposable {
  nats: NatsServer;
  nc: NatsConnection;
  js: JetStreamClient;
  jsm: JetStreamManager;
  gatewayUrl: string;
  procs: Map<string, ServiceProcess>;
  /** Starts a service (key: name, or name#n for replicas); resolves when it is ready. */
  start(name: string, env?: Record<string, string>, key?: string): Promise<ServiceProcess>;
  /** Sends a signal to a service and waits for it to exit. */
  kill(key: string, signal?: Deno.Signal): Promise<Deno.CommandStatus>;
  /** Names of services whose process has exited on its own. */
  crashed(): string[];
}

/** Starts nats-server and the given services (all by default). */
export async function startMesh(opts: {
  services?: string[];
  env?: Record<string, string>;
  /** Per-service environment, by service name. */
  serviceEnv?: Record<string, Record<string, string>>;
} = {}): Promise<Mesh> {
  const nats = await startNatsServer();
  const port = freePort();
  const baseEnv: Record<string, string> = {
    ...TEST_ENV,
    ...opts.env,
    NATS_URL: nats.url,
    PORT: String(port),
  };
  const config = loadConfig({ env: (n) => baseEnv[n] ?? Deno.env.get(n), args: [] });
  const nc = await connect({ servers: nats.url, maxReconnectAttempts: -1, reconnectTimeWait: 200 });
  const jsm = await jetstreamManager(nc);
  await ensureTopology(nc, jsm, config);
  const procs = new Map<string, ServiceProcess>();
  const expectedExit = new Set<ServiceProcess>();

  const start = async (name: string, env: Record<string, string> = {}, key = name) => {
    const proc = await startService(name, { ...baseEnv, ...opts.serviceEnv?.[name], ...env }, {
      key,
    });
    procs.set(key, proc);
    return proc;
  };

  const kill = (key: string, signal: Deno.Signal = "SIGKILL") => {
    const proc = procs.get(key)!;
    expectedExit.add(proc);
    return proc.stop(signal);
  };

  for (const name of opts.services ?? FEEDBACK_SERVICES) await start(name);

  const mesh: Mesh = {
    nats,
    nc,
    js: jetstream(nc),
    jsm,
    gatewayUrl: `http://127.0.0.1:${port}`,
    procs,
    start,
    kill,
    crashed() {
      return [...procs.values()].filter((p) => !expectedExit.has(p) && p.gone).map((p) => p.name);
    },
    async [Symbol.asyncDispose]() {
      await Promise.all([...procs.values()].map((p) => {
        expectedExit.add(p);
        return p.stop("SIGKILL");
      }));
      await nc.close();
      await nats[Symbol.asyncDispose]();
    },
  };
  return mesh;
}

/** Resolves when `check` returns true; throws with `describe()` after the deadline. */
export async function waitFor(
  check: () => Promise<boolean> | boolean,
  deadlineMs: number,
  describe: () => Promise<string> | string = () => "condition not met",
): Promise<void> {
  const end = Date.now() + deadlineMs;
  let lastError: unknown;
  while (true) {
    try {
      if (await check()) return;
    } catch (err) {
      lastError = err; // e.g. a request timing out while the server restarts: try again
    }
    if (Date.now() > end) {
      const why = await Promise.resolve().then(describe).catch((e) => String(e));
      throw new Error(`timed out after ${deadlineMs} ms: ${why}`, { cause: lastError });
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Per-subject message counts of `filter` in FEEDBACK, by the subject's last token (item id). */
export async function countsByItem(
  jsm: JetStreamManager,
  filter: string,
): Promise<Map<string, number>> {
  const info = await jsm.streams.info(FEEDBACK_STREAM, { subjects_filter: filter });
  const counts = new Map<string, number>();
  for (const [subject, n] of Object.entries(info.state.subjects ?? {})) {
    counts.set(subject.slice(subject.lastIndexOf(".") + 1), n as number);
  }
  return counts;
}

/** Every item's state in the state bucket. */
export async function readStates(js: JetStreamClient): Promise<Map<string, FeedbackState>> {
  const states = new Map<string, FeedbackState>();
  for await (const m of readStream(js, `KV_${STATE_BUCKET}`)) {
    const id = m.subject.slice(`$KV.${STATE_BUCKET}.`.length);
    if (m.data.length === 0) states.delete(id);
    else states.set(id, m.json<FeedbackState>());
  }
  return states;
}

/** Publishes submissions onto feedback.submit with their ids as message ids, retrying until stored. */
export async function pushItems(
  js: JetStreamClient,
  items: { id: string; text: string }[],
  parallel = 64,
): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const item = items[next++]!;
      for (let attempt = 0;; attempt++) {
        try {
          await js.publish("feedback.submit", JSON.stringify(item), {
            msgID: `submit-${item.id}`,
            timeout: 2000,
          });
          break;
        } catch (err) {
          if (attempt > 200) throw err;
          await new Promise((r) => setTimeout(r, 100));
        }
      }
    }
  };
  await Promise.all(Array.from({ length: parallel }, worker));
}
