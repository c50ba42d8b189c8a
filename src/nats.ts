/**
 * Connecting to NATS the same way in every service.
 *
 * @module
 */
import { connect } from "@nats-io/transport-node";
import type { NatsConnection } from "@nats-io/nats-core";

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
