/**
 * One stage of the bare reference pipeline of `deno task bench`: the idiomatic minimal
 * JetStream forwarder, nothing else. It binds an existing durable pull consumer (explicit
 * acks), and for each message publishes its body unchanged to the next subject, waits for
 * the publish ack, then acks the message. No decoding, validation, headers, message ids,
 * retries or state: the floor Weft's runner is compared against.
 *
 * Usage: `deno run --allow-net=127.0.0.1:PORT bench/bare_stage.ts NATS_URL STREAM CONSUMER NEXT_SUBJECT [item]`
 * With `item`, each message goes to `NEXT_SUBJECT.<id>`, `<id>` being the last token of the
 * subject it came on (one subject per item, as Weft's events).
 *
 * @module
 */
import { connect } from "@nats-io/transport-node";
import { jetstream } from "@nats-io/jetstream";
import { nkeyAuthenticator } from "@nats-io/nats-core";

/**
 * Forwards every message of `consumer` to `next` until the connection closes.
 *
 * @example
 * ```ts ignore
 * await forward("nats://127.0.0.1:4222", "BENCH", "s1", "bench.s2");
 * ```
 */
export async function forward(
  url: string,
  stream: string,
  consumer: string,
  next: string,
  perItem = false,
  nkeySeedFile?: string,
): Promise<void> {
  // Authenticated like Weft's services when the server wants keys (as deno task start's does).
  const seed = nkeySeedFile ? (await Deno.readTextFile(nkeySeedFile)).trim() : undefined;
  const nc = await connect({
    servers: url,
    name: `bench-bare-${consumer}`,
    ...(seed ? { authenticator: nkeyAuthenticator(new TextEncoder().encode(seed)) } : {}),
  });
  const js = jetstream(nc);
  const c = await js.consumers.get(stream, consumer);
  const messages = await c.consume();
  const stop = () => {
    messages.stop();
  };
  Deno.addSignalListener("SIGTERM", stop);
  Deno.addSignalListener("SIGINT", stop);
  for await (const m of messages) {
    await js.publish(
      perItem ? `${next}.${m.subject.slice(m.subject.lastIndexOf(".") + 1)}` : next,
      m.data,
    );
    m.ack();
  }
  await nc.drain();
}

if (import.meta.main) {
  const [url, stream, consumer, next, subjects, nkey] = Deno.args;
  if (!url || !stream || !consumer || !next || (subjects !== "item" && subjects !== "one")) {
    throw new Error(
      "usage: bare_stage.ts NATS_URL STREAM CONSUMER NEXT_SUBJECT item|one [NKEY_SEED_FILE]",
    );
  }
  await forward(url, stream, consumer, next, subjects === "item", nkey);
}
