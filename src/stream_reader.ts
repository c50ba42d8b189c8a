/**
 * Reading what a stream holds right now, start to end, with an ordered consumer: no
 * durable state on the server, nothing acknowledged, nothing changed. The state rebuild,
 * the dead-letter listing and tests use it.
 *
 * @module
 */
import {
  DeliverPolicy,
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamClient,
  type JsMsg,
} from "@nats-io/jetstream";

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
   * How long to wait in all for the next message while the server says more are pending, ms,
   * before failing with {@link StreamReadStalled}; within it the read starts again twice after
   * its last message, each time after a third of it without one. A pause never ends a read
   * early: the read ends at the last pending message, or at once when nothing matches.
   * Default 30,000.
   */
  stallMs?: number;
  /**
   * Most bytes the reader asks the server for ahead of what it has yielded (its prefetch),
   * raised to the largest message the server takes ({@link prefetchBytes}): a reader whose
   * caller stops taking messages (an event stream whose client stopped reading) holds no more.
   * By default that largest message's worth.
   */
  maxBytes?: number;
}

/**
 * Bytes that readers sharing one NATS connection may have asked the server for, all together:
 * each reader takes its prefetch ({@link readerPrefetch}) before it starts and gives it back
 * when it ends. nats-server cuts a connection it has more than its `max_pending` (64 MiB by
 * default) waiting to be sent to as a slow consumer: hundreds of readers on one connection,
 * each asking for its prefetch (about 1 MiB), would have it cut, and with it everything else
 * the connection carries (publishes, live feeds). A reader waits for its share, first come
 * first served; one that wants more than the whole budget waits until it has the whole budget
 * to itself.
 *
 * @example
 * ```ts
 * import { ReadBudget } from "./stream_reader.ts";
 * const budget = new ReadBudget(3);
 * const first = await budget.acquire(2);
 * const second = budget.acquire(2); // waits: only 1 byte is free
 * console.assert(budget.free === 1 && budget.waiting === 1);
 * first();
 * (await second)();
 * console.assert(budget.free === 3);
 * ```
 */
export class ReadBudget {
  #free: number;
  #queue: { bytes: number; grant: () => void }[] = [];
  constructor(readonly total: number) {
    this.#free = total;
  }
  /** Bytes not taken now. */
  get free(): number {
    return this.#free;
  }
  /** Readers waiting for their share now. */
  get waiting(): number {
    return this.#queue.length;
  }
  /**
   * Takes `bytes` (at most the whole budget) once they are free and every earlier waiter has
   * been served; resolves to the function that gives them back (once). Rejects with
   * `signal`'s reason when it aborts first.
   */
  acquire(bytes: number, signal?: AbortSignal): Promise<() => void> {
    const want = Math.min(Math.max(0, bytes), this.total);
    let given = false;
    const release = () => {
      if (given) return;
      given = true;
      this.#free += want;
      this.#serve();
    };
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (this.#queue.length === 0 && this.#free >= want) {
      this.#free -= want;
      return Promise.resolve(release);
    }
    return new Promise((resolve, reject) => {
      const waiter = {
        bytes: want,
        grant: () => {
          signal?.removeEventListener("abort", abort);
          resolve(release);
        },
      };
      const abort = () => {
        const i = this.#queue.indexOf(waiter);
        if (i >= 0) this.#queue.splice(i, 1);
        this.#serve(); // the next waiter may fit now
        reject(signal!.reason);
      };
      signal?.addEventListener("abort", abort, { once: true });
      this.#queue.push(waiter);
    });
  }
  #serve() {
    while (this.#queue.length > 0 && this.#free >= this.#queue[0]!.bytes) {
      const next = this.#queue.shift()!;
      this.#free -= next.bytes;
      next.grant();
    }
  }
}

/** What a message may add to its size on delivery (its subject and reply subject), bytes. */
const DELIVERY_OVERHEAD = 64 * 1024;

/**
 * The prefetch a read asks for: `wanted` bytes, but at least the largest message the server
 * takes (its `max_payload`, 1 MiB by default) with its subjects, so that any stored message fits
 * in one pull (a message larger than a pull's `max_bytes` is never delivered: the read would
 * stall on it).
 *
 * @example
 * ```ts
 * import { prefetchBytes } from "./stream_reader.ts";
 * console.assert(prefetchBytes(1_048_576) === 1_048_576 + 64 * 1024);
 * console.assert(prefetchBytes(1_048_576, 8 * 1024 * 1024) === 8 * 1024 * 1024);
 * ```
 */
export function prefetchBytes(maxPayload: number, wanted = 0): number {
  return Math.max(wanted, maxPayload + DELIVERY_OVERHEAD);
}

/**
 * The prefetch a read on `js`'s connection asks for ({@link prefetchBytes} of the server's
 * `max_payload`, and `wanted`): what a reader takes from a {@link ReadBudget}.
 */
export function readerPrefetch(js: JetStreamClient, wanted?: number): number {
  return prefetchBytes(maxPayloadOf(js), wanted);
}

/** The server's max_payload as `js`'s connection was told it (1 MiB when it does not say). */
function maxPayloadOf(js: JetStreamClient): number {
  const nc = (js as unknown as { nc?: { info?: { max_payload?: number } } }).nc;
  return nc?.info?.max_payload ?? 1024 * 1024;
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

/** Thrown when a stream read's messages end before the last one pending (its connection closed). */
export class StreamReadCut extends Error {
  constructor(stream: string) {
    super(`reading stream ${stream} was cut short: its connection closed mid-read`);
    this.name = "StreamReadCut";
  }
}

/**
 * Yields every message of `stream` (matching the filter) stored when reading started, and
 * any stored while it reads, up to the last one pending. It ends when the server says no
 * more are pending (the message's own `pending` count, or the consumer's at its creation
 * when nothing matches), or, after half a second without a message, when the stream holds no
 * matching message after the last one read (a count may include messages removed before they
 * were sent); never because messages were slow to come: a read that stopped on a pause would
 * silently skip the rest (an SSE replay would leave a gap, a rebuild a partial state).
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
  const stallMs = opts.stallMs ?? 30_000;
  // A stalled read starts again after its last message with a new ordered consumer, up to
  // RESTARTS times within `stallMs` in all: an ordered consumer whose server-side half is gone
  // (it lived on a cluster node that died, or the server dropped it) is noticed by nats.js only
  // after missed heartbeats, and a pause of the server is outlasted either way.
  const wait = Math.max(1, Math.floor(stallMs / (RESTARTS + 1)));
  let read = 0;
  let after: number | undefined;
  for (let attempt = 0;; attempt++) {
    const from = after !== undefined ? { ...opts, startSeq: after + 1 } : opts;
    let stalled = false;
    for await (const m of readOnce(js, stream, from, wait)) {
      if (m === STALLED) {
        stalled = true;
        break;
      }
      read++;
      after = m.seq;
      yield m;
    }
    if (!stalled) return;
    if (attempt >= RESTARTS) throw new StreamReadStalled(stream, read, stallMs);
  }
}

/**
 * Whether `stream` holds no message matching `filter` after sequence `last` (one direct read);
 * false when the read fails, so a read goes on waiting as before.
 */
async function nothingAfter(
  js: JetStreamClient,
  stream: string,
  filter: string | undefined,
  last: number,
): Promise<boolean> {
  try {
    const jsm = await js.jetstreamManager(false);
    // (nats.js types only seq and last_by_subj; the server takes next_by_subj, 2.9+.)
    const m = await jsm.streams.getMessage(stream, {
      seq: last + 1,
      next_by_subj: filter ?? ">",
    } as { seq: number });
    return m === null;
  } catch (err) {
    return err instanceof JetStreamApiError && err.code === JetStreamApiCodes.NoMessageFound;
  }
}

/** How many times a stalled read starts again before it fails. */
const RESTARTS = 2;
const STALLED = Symbol("stalled");
const PAUSED = Symbol("paused");
/** How long a read waits for its next message before it asks the stream whether any is left. */
const PAUSE_MS = 500;

/** One ordered consumer's read: its messages, then STALLED when it waited `wait` ms for one. */
async function* readOnce(
  js: JetStreamClient,
  stream: string,
  opts: ReadStreamOptions,
  wait: number,
): AsyncGenerator<JsMsg | typeof STALLED> {
  const consumer = await js.consumers.get(stream, {
    ...(opts.filter ? { filter_subjects: opts.filter } : {}),
    ...(opts.startSeq !== undefined
      ? { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: opts.startSeq }
      : opts.startTime !== undefined
      ? { deliver_policy: DeliverPolicy.StartTime, opt_start_time: opts.startTime.toISOString() }
      : { deliver_policy: opts.deliverPolicy ?? DeliverPolicy.All }),
  });
  try {
    // The ordered consumer's creation answer counts what it has to deliver.
    if ((await consumer.info(true)).num_pending === 0) return;
    // Bounded in bytes, not messages: nats.js pulls again only as messages are taken, so a
    // caller that stops taking them holds at most this prefetch. (1,000 messages ahead, the
    // bound before, cost up to 1,000 events' bytes per reader: ~12 MB a stalled SSE replay
    // client with ~480 KB events, measured.)
    const messages = await consumer.consume({ max_bytes: readerPrefetch(js, opts.maxBytes) });
    const it = messages[Symbol.asyncIterator]();
    let last = (opts.startSeq ?? 1) - 1;
    const nextMessage = () => {
      const p = it.next();
      p.catch(() => {}); // (left unawaited when the read ends at a pause; awaited otherwise)
      return p;
    };
    let pending = nextMessage();
    try {
      while (true) {
        // A message's `pending` is counted when the server sends it: messages removed after
        // that (a bucket's older revisions, a delete, a purge, an age limit) are never sent,
        // so the count may not reach 0. After a pause the stream itself is asked: no message
        // matching past the last one read is the end (found on nats-server 2.9 under load: a
        // read of a state bucket waited out its stall time with nothing left to read).
        const waitedFrom = Date.now();
        let next: IteratorResult<JsMsg> | typeof STALLED | typeof PAUSED;
        for (;;) {
          const left = wait - (Date.now() - waitedFrom);
          if (left <= 0) {
            next = STALLED;
            break;
          }
          let timer: ReturnType<typeof setTimeout> | undefined;
          const paused = new Promise<typeof PAUSED>((r) => {
            timer = setTimeout(r, Math.min(left, PAUSE_MS), PAUSED);
          });
          try {
            next = await Promise.race([pending, paused]);
          } finally {
            clearTimeout(timer); // also when the read fails (its connection closed)
          }
          if (next !== PAUSED) break;
          if (await nothingAfter(js, stream, opts.filter, last)) return;
        }
        if (next === STALLED) {
          yield STALLED;
          return;
        }
        // The messages end before the last pending one only when the connection closed (or
        // drained) under the read: ending quietly would pass a partial read for a whole one.
        if (next.done) throw new StreamReadCut(stream);
        last = next.value.seq;
        yield next.value;
        if (next.value.info.pending === 0) return;
        pending = nextMessage();
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
