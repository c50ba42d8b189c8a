/**
 * A real nats-server per test, with Weft's topology, and a configuration pointing at it;
 * and reading and writing the feedback pipeline's stream and state bucket on any server.
 *
 * @module
 */
import type { NatsConnection } from "@nats-io/nats-core";
import { type JetStreamClient, type JetStreamManager, jetstreamManager } from "@nats-io/jetstream";
import { type Config, loadConfig } from "../../src/config.ts";
import type { FeedbackState } from "../../pipelines/feedback/events.gen.ts";
import { createLogger, type Logger } from "../../src/observability/log.ts";
import { connectNats, type NatsCredentials } from "../../src/nats.ts";
import { type NatsServer, type NatsServerOptions, startNatsServer } from "../../src/nats_server.ts";
import { readStream } from "../../src/stream_reader.ts";
import { FEEDBACK_STREAM, STATE_BUCKET } from "../../pipelines/feedback/subjects.ts";
import { ensureTopology } from "../../src/topology.ts";

/**
 * A test's own NATS client: {@link connectNats} whose first connect, when it times out (10 s)
 * on a loaded machine, is tried again for up to a minute, as a service's is under the
 * supervisor. A refused connection or identity still rejects at once. (Seen with three test
 * files at a time on two cores: a first connect to a mesh's server timed out after nats.js's
 * 20 s and failed the test.)
 */
export function connectClient(
  url: string,
  name: string,
  credentials: NatsCredentials = {},
): Promise<NatsConnection> {
  return connectNats(url, name, credentials, { timeoutMs: 10_000, patienceMs: 60_000 });
}

/** A running server, a connection to it and the topology in place. */
export interface TestNats extends AsyncDisposable {
  server: NatsServer;
  nc: NatsConnection;
  jsm: JetStreamManager;
  config: Config;
  /** A logger that keeps lines in `lines` instead of printing them. */
  log: Logger;
  lines: string[];
}

/**
 * A test configuration: the defaults, fast retries, the reference ruleset (so decisions
 * are the seed decisions), and `overrides`.
 */
export function testConfig(natsUrl: string, overrides: Partial<Config> = {}): Config {
  return {
    ...loadConfig({ env: () => undefined, args: [] }),
    natsUrl,
    analyzers: "rules",
    rulesPath: "rules/reference.json",
    retryBaseMs: 20,
    retryMaxMs: 200,
    stateFlushMs: 5,
    drainMs: 2_000,
    ...overrides,
  };
}

/**
 * Starts a server (with `serverOptions`, e.g. a monitor port or extra arguments) and connects;
 * dispose to close and remove everything.
 */
export async function startTestNats(
  overrides: Partial<Config> = {},
  serverOptions: NatsServerOptions = {},
): Promise<TestNats> {
  const server = await startNatsServer(serverOptions);
  const nc = await connectClient(server.url, "weft-test");
  const jsm = await jetstreamManager(nc);
  const config = testConfig(server.url, overrides);
  await ensureTopology(nc, jsm, config);
  const lines: string[] = [];
  const log = createLogger("test", "debug", (l) => lines.push(l));
  return {
    server,
    nc,
    jsm,
    config,
    log,
    lines,
    async [Symbol.asyncDispose]() {
      await nc.close();
      await server[Symbol.asyncDispose]();
    },
  };
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

/**
 * Options for a NATS request a Weft service answers: on a loaded machine an answer can take
 * longer than nats.js's default 1 s.
 */
export const PATIENT = { timeout: 10_000 } as const;

/** Every item's state in the state bucket. */
export async function readStates(
  js: JetStreamClient,
  // A read of the bucket while the state writer still writes stalled with messages said to be
  // pending (StreamReadStalled after 30 s): older revisions the writer's updates removed after
  // their count, which the reader now sees past (src/stream_reader.ts, 837dabc). Callers that
  // poll (waitUntil) still pass a short stallMs, give up on a stalled read and read again.
  stallMs = 30_000,
): Promise<Map<string, FeedbackState>> {
  const states = new Map<string, FeedbackState>();
  for await (const m of readStream(js, `KV_${STATE_BUCKET}`, { stallMs })) {
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
