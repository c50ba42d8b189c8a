/**
 * A network link that a test can cut: a TCP relay on a free loopback port in front of
 * `targetPort`. While cut, every relayed connection is closed and new ones are closed as
 * soon as they are accepted, as when a site's uplink goes down. While paused, connections
 * stay open but nothing passes (bytes wait in the relay), as when a server stops answering.
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
  /** Holds every byte sent either way, connections kept open, until {@link Link.resume}. */
  pause(): void;
  /** Passes the bytes held by {@link Link.pause}, and any after them, again. */
  resume(): void;
}

/** Starts a relay to `127.0.0.1:targetPort`. */
export function startLink(targetPort: number): Link {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const open = new Set<Deno.Conn>();
  const relays = new Set<Promise<void>>();
  let up = true;
  let paused: PromiseWithResolvers<void> | undefined;
  /** Passes chunks on, each after the pause (if any) ends. */
  const gate = () =>
    new TransformStream<Uint8Array, Uint8Array>({
      async transform(chunk, out) {
        if (paused) await paused.promise;
        out.enqueue(chunk);
      },
    });
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
      client.readable.pipeThrough(gate()).pipeTo(server.writable, { preventClose: true })
        .catch(() => {}),
      server.readable.pipeThrough(gate()).pipeTo(client.writable, { preventClose: true })
        .catch(() => {}),
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
    pause() {
      paused ??= Promise.withResolvers<void>();
    },
    resume() {
      paused?.resolve();
      paused = undefined;
    },
    async [Symbol.asyncDispose]() {
      up = false;
      paused?.resolve();
      paused = undefined;
      listener.close();
      for (const c of [...open]) close(c);
      await accepting;
      await Promise.all([...relays]);
    },
  };
}
