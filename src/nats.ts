/**
 * Connecting to NATS the same way in every service.
 *
 * @module
 */
import { connect } from "@nats-io/transport-node";
import type { NatsConnection, Status } from "@nats-io/nats-core";

/**
 * Connects to the NATS server(s) in `url` (comma-separated), reconnecting forever: a
 * restarted server must not take the mesh down with it.
 */
export function connectNats(url: string, name: string): Promise<NatsConnection> {
  return connect({
    servers: url.split(",").map((s) => s.trim()),
    name,
    maxReconnectAttempts: -1,
    reconnectTimeWait: 500,
    waitOnFirstConnect: false,
  });
}

/** Whether a connection is up right now, kept from its status events. */
export interface ConnectionHealth {
  /** False from a disconnect until the next reconnect, and after close. */
  readonly up: boolean;
  /** Stops watching. */
  stop(): void;
}

/**
 * Watches `nc`'s status, so a request can be refused at once (503) while the server is
 * unreachable instead of waiting out a publish timeout.
 *
 * @example
 * ```ts ignore
 * const health = watchConnection(nc);
 * if (!health.up) throw new WeftError(ErrorCode.Unavailable, "NATS is unreachable");
 * ```
 */
export function watchConnection(nc: NatsConnection): ConnectionHealth {
  let up = !nc.isClosed();
  // nats.js returns a stoppable queued iterator, typed only as AsyncIterable.
  const statuses = nc.status() as AsyncIterable<Status> & { stop?: () => void };
  (async () => {
    for await (const s of statuses) {
      if (s.type === "disconnect" || s.type === "close") up = false;
      else if (s.type === "reconnect") up = true;
    }
  })().catch(() => {});
  nc.closed().then(() => (up = false));
  return {
    get up() {
      return up && !nc.isClosed();
    },
    stop: () => statuses.stop?.(),
  };
}
