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
  /** Read what was stored from this time on (implies DeliverPolicy.StartTime). */
  startTime?: Date;
  /**
   * How long to wait for the next message while the server says more are pending, ms,
   * before failing with {@link StreamReadStalled}. A pause never ends a read early: the
   * read ends at the last pending message, or at once when nothing matches. Default 30,000.
   */
  stallMs?: number;
}

/** Thrown when a stream read waited `stallMs` for a message the server said was pending. */
export class StreamReadStalled extends Error {
  constructor(stream: string, readonly read: number, stallMs: number) {
    super(
      `reading stream ${stream} stalled: no message for ${stallMs} ms after ${read}, ` +
        `with more pending`,
    );
    this.name = "StreamReadStalled";
  }
}

/**
 * Yields every message of `stream` (matching the filter) stored when reading started, and
 * any stored while it reads, up to the last one pending. It ends when the server says no
 * more are pending (the message's own `pending` count, or the consumer's at its creation
 * when nothing matches), never because messages were slow to come: a read that stopped on a
 * pause would silently skip the rest (an SSE replay would leave a gap, a rebuild a partial
 * state).
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
      : opts.startTime !== undefined
      ? { deliver_policy: DeliverPolicy.StartTime, opt_start_time: opts.startTime.toISOString() }
      : { deliver_policy: opts.deliverPolicy ?? DeliverPolicy.All }),
  });
  const stallMs = opts.stallMs ?? 30_000;
  try {
    // The ordered consumer's creation answer counts what it has to deliver.
    if ((await consumer.info(true)).num_pending === 0) return;
    const messages = await consumer.consume({ max_messages: 1000 });
    const it = messages[Symbol.asyncIterator]();
    let read = 0;
    try {
      while (true) {
        let timer: ReturnType<typeof setTimeout> | undefined;
        const stalled = new Promise<"stalled">((r) => (timer = setTimeout(r, stallMs, "stalled")));
        const next = await Promise.race([it.next(), stalled]);
        clearTimeout(timer);
        if (next === "stalled") throw new StreamReadStalled(stream, read, stallMs);
        if (next.done) return;
        read++;
        yield next.value;
        if (next.value.info.pending === 0) return;
      }
    } finally {
      messages.stop();
    }
  } finally {
    // nats.js leaves an ordered consumer on the server for 5 minutes after stop(): delete
    // it, so no listing or rebuild leaves one behind.
    await consumer.delete().catch(() => {});
  }
}
