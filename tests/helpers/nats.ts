/**
 * A real nats-server per test, with Weft's topology, and a configuration pointing at it.
 *
 * @module
 */
import type { NatsConnection } from "@nats-io/nats-core";
import { type JetStreamManager, jetstreamManager } from "@nats-io/jetstream";
import { type Config, loadConfig } from "../../src/config.ts";
import { createLogger, type Logger } from "../../src/log.ts";
import { connectNats } from "../../src/nats.ts";
import { type NatsServer, startNatsServer } from "../../src/nats_server.ts";
import { ensureTopology } from "../../src/topology.ts";

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

/** Starts a server and connects; dispose to close and remove everything. */
export async function startTestNats(overrides: Partial<Config> = {}): Promise<TestNats> {
  const server = await startNatsServer();
  const nc = await connectNats(server.url, "weft-test");
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
