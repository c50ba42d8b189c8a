/**
 * Reading what a stream holds right now, start to end, with an ordered consumer: no
 * durable state on the server, nothing acknowledged, nothing changed. The state rebuild,
 * the dead-letter listing and tests use it.
 *
 * @module
 */
import { DeliverPolicy, type JetStreamClient, type JsMsg } from "@nats-io/jetstream";

/** What to read. */
export interface ReadStreamOptions {
  /** Subject filter; the whole stream by default. */
  filter?: string;
  /** Where to start; the first message by default. */
  deliverPolicy?: DeliverPolicy;
  /** The first stream sequence to read (implies DeliverPolicy.StartSequence). */
  startSeq?: number;
  /**
   * Stop when no message arrives for this long, ms (only matters when the filter matches
   * nothing, since reading otherwise stops at the last pending message). Default 1000.
   */
  idleMs?: number;
}

/**
 * Yields every message of `stream` (matching the filter) stored when reading started.
 *
 * @example
 * ```ts ignore
 * import { readStream } from "./stream_reader.ts";
 * for await (const m of readStream(js, "DEADLETTER")) console.log(m.seq, m.subject);
 * ```
 */
export async function* readStream(
  js: JetStreamClient,
  stream: string,
  opts: ReadStreamOptions = {},
): AsyncGenerator<JsMsg> {
  const consumer = await js.consumers.get(stream, {
    ...(opts.filter ? { filter_subjects: opts.filter } : {}),
    ...(opts.startSeq !== undefined
      ? { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: opts.startSeq }
      : { deliver_policy: opts.deliverPolicy ?? DeliverPolicy.All }),
  });
  const messages = await consumer.consume({ max_messages: 1000 });
  const it = messages[Symbol.asyncIterator]();
  try {
    while (true) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const idle = new Promise<"idle">((
        r,
      ) => (timer = setTimeout(() => r("idle"), opts.idleMs ?? 1000)));
      const next = await Promise.race([it.next(), idle]);
      clearTimeout(timer);
      if (next === "idle" || next.done) return;
      yield next.value;
      if (next.value.info.pending === 0) return;
    }
  } finally {
    messages.stop();
    // nats.js leaves an ordered consumer on the server for 5 minutes after stop(): delete
    // it, so no listing or rebuild leaves one behind.
    await consumer.delete().catch(() => {});
  }
}
