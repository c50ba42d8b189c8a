/**
 * One stage of the bare reference pipeline of `deno task bench`: the idiomatic minimal
 * JetStream forwarder, nothing else. It binds an existing durable pull consumer (explicit
 * acks), and for each message publishes its body unchanged to the next subject, waits for
 * the publish ack, then acks the message. No decoding, validation, headers, message ids,
 * retries or state: the floor Weft's runner is compared against.
 *
 * Usage: `deno run --allow-net=127.0.0.1:PORT bench/bare_stage.ts NATS_URL STREAM CONSUMER NEXT_SUBJECT`
 *
 * @module
 */
import { connect } from "@nats-io/transport-node";
import { jetstream } from "@nats-io/jetstream";

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
): Promise<void> {
  const nc = await connect({ servers: url, name: `bench-bare-${consumer}` });
  const js = jetstream(nc);
  const c = await js.consumers.get(stream, consumer);
  const messages = await c.consume();
  const stop = () => {
    messages.stop();
  };
  Deno.addSignalListener("SIGTERM", stop);
  Deno.addSignalListener("SIGINT", stop);
  for await (const m of messages) {
    await js.publish(next, m.data);
    m.ack();
  }
  await nc.drain();
}

if (import.meta.main) {
  const [url, stream, consumer, next] = Deno.args;
  if (!url || !stream || !consumer || !next) {
    throw new Error("usage: bare_stage.ts NATS_URL STREAM CONSUMER NEXT_SUBJECT");
  }
  await forward(url, stream, consumer, next);
}
