/**
 * A network link that a test can cut: a TCP relay on a free loopback port in front of
 * `targetPort`. While cut, every relayed connection is closed and new ones are closed as
 * soon as they are accepted, as when a site's uplink goes down.
 *
 * @module
 */

/** A relay between a client and a server. */
export interface Link extends AsyncDisposable {
  /** The port to connect to instead of the target's. */
  readonly port: number;
  /** True while connections go through. */
  readonly up: boolean;
  /** Closes every relayed connection and refuses new ones until {@link Link.restore}. */
  cut(): void;
  /** Lets connections through again. */
  restore(): void;
}

/** Starts a relay to `127.0.0.1:targetPort`. */
export function startLink(targetPort: number): Link {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const open = new Set<Deno.Conn>();
  const relays = new Set<Promise<void>>();
  let up = true;
  const close = (c: Deno.Conn) => {
    open.delete(c);
    try {
      c.close();
    } catch { /* already closed */ }
  };
  const relay = async (client: Deno.Conn) => {
    let server: Deno.Conn;
    try {
      server = await Deno.connect({ hostname: "127.0.0.1", port: targetPort });
    } catch {
      return close(client);
    }
    open.add(server);
    if (!up) return void (close(client), close(server));
    // Either direction ending ends both.
    await Promise.race([
      client.readable.pipeTo(server.writable, { preventClose: true }).catch(() => {}),
      server.readable.pipeTo(client.writable, { preventClose: true }).catch(() => {}),
    ]);
    close(client);
    close(server);
  };
  const accepting = (async () => {
    for await (const conn of listener) {
      if (!up) {
        conn.close();
        continue;
      }
      open.add(conn);
      const p = relay(conn);
      relays.add(p);
      p.finally(() => relays.delete(p));
    }
  })().catch(() => {});
  return {
    port: (listener.addr as Deno.NetAddr).port,
    get up() {
      return up;
    },
    cut() {
      up = false;
      for (const c of [...open]) close(c);
    },
    restore() {
      up = true;
    },
    async [Symbol.asyncDispose]() {
      up = false;
      listener.close();
      for (const c of [...open]) close(c);
      await accepting;
      await Promise.all([...relays]);
    },
  };
}
