/**
 * Server-sent event streams of pipeline events: history replayed from JetStream, then live.
 *
 * Live events come from ONE ordered consumer per stream per gateway ({@link LiveFeeds}),
 * fanned out in-process to every client's bounded queue, so a thousand clients cost the
 * server one consumer, not a thousand, and reads never starve writes. A client that asks
 * for history (Last-Event-ID, `replay=true`, an item's stream) joins the live feed first,
 * then reads its history with a short-lived consumer (deleted when caught up), then takes
 * its queue, skipping what the replay already sent (by stream sequence): no gap, no
 * duplicate. A client whose queue overflows (it does not read) or that cannot take a frame
 * within the write timeout is cut; it resumes with Last-Event-ID (event ids are stream
 * sequences) and misses nothing.
 *
 * @module
 */
import type { Context } from "hono";
import { streamSSE } from "hono/streaming";
import {
  DeliverPolicy,
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamClient,
} from "@nats-io/jetstream";
import type { Config } from "../config.ts";
import type { Logger } from "../log.ts";
import { ErrorCode, WeftError } from "../errors.ts";
import { deterministicId } from "../events.ts";
import { readStream } from "../stream_reader.ts";
import { FEEDBACK_STREAM, FINAL_EVENT_TYPES, subjectMatches } from "../subjects.ts";

/** Most frames a client's live queue holds before the client is cut as too slow. */
export const SSE_QUEUE_FRAMES = 256;
/** Most bytes a client's live queue holds before the client is cut as too slow. */
export const SSE_QUEUE_BYTES = 128 * 1024;

/** What to stream. */
export interface SseSelection {
  /** Subject filter, e.g. `feedback.*.ID` or `feedback.*.*`. */
  filter: string;
  /** Close after an item's final event (per-item streams). */
  closeOnFinal: boolean;
  /** Without Last-Event-ID: replay everything (true) or start with new events (false). */
  replay: boolean;
  /**
   * Where a replay starts: the item's first event's stream sequence. Without it a replay
   * reads the stream from its first message, which on nats-server 2.9 with a wildcard
   * filter means matching every message the stream holds, under its locks.
   */
  from?: number;
  /** The stream to read; defaults to FEEDBACK. */
  stream?: string;
  /** The event types that end a per-item stream; defaults to the feedback ones. */
  finalTypes?: ReadonlySet<string>;
  /** The item of a per-item stream: lets a resumed stream that saw its end close at once. */
  itemId?: string;
}

/** Counts open SSE clients against the configured total and per-key maximums. */
export class SseClients {
  #open = 0;
  #byKey = new Map<string, number>();
  /** `max` clients in all; `maxPerKey` per API key (when requests carry one). */
  constructor(readonly max: number, readonly maxPerKey = Infinity) {}
  /** Clients open now. */
  get open(): number {
    return this.#open;
  }
  /** Takes a slot for a client (of `key`, when given); false when a cap is reached. */
  tryOpen(key?: string): boolean {
    if (this.#open >= this.max) return false;
    if (key !== undefined && (this.#byKey.get(key) ?? 0) >= this.maxPerKey) return false;
    this.#open++;
    if (key !== undefined) this.#byKey.set(key, (this.#byKey.get(key) ?? 0) + 1);
    return true;
  }
  /** Frees the slot taken by {@link tryOpen} with the same `key`. */
  close(key?: string): void {
    this.#open--;
    if (key === undefined) return;
    const n = (this.#byKey.get(key) ?? 1) - 1;
    if (n <= 0) this.#byKey.delete(key);
    else this.#byKey.set(key, n);
  }
}

/**
 * Takes an SSE slot for the request's client (its API key, hashed, when it sends one):
 * the key to free it with, or a 503 problem with Retry-After when a cap is reached.
 */
export function openSlot(clients: SseClients, c: Context): string | undefined {
  const auth = c.req.header("authorization");
  const key = auth ? deterministicId("sse-key", auth) : undefined;
  if (!clients.tryOpen(key)) {
    throw new WeftError(ErrorCode.Unavailable, "too many event streams open; retry later", {
      retryAfterSeconds: 5,
    });
  }
  return key;
}

/** One event as a client receives it: encoded once, written to every client as is. */
interface Frame {
  seq: number;
  subject: string;
  type: string;
  /** The SSE wire bytes: `id`, `event` and one `data` line (event JSON has no raw newline). */
  bytes: Uint8Array;
}

const encoder = new TextEncoder();

/** The frame of a stored message. */
function frameOf(
  m: { seq: number; subject: string; data: Uint8Array; headers?: { get(k: string): string } },
): Frame {
  const type = m.headers?.get("Weft-Event-Type") || typeOfSubject(m.subject);
  const data = decoder.decode(m.data).replace(/[\r\n]+/g, " ");
  return {
    seq: m.seq,
    subject: m.subject,
    type,
    bytes: encoder.encode(`id: ${m.seq}\nevent: ${type}\ndata: ${data}\n\n`),
  };
}

/** A client's place on a live feed: a bounded queue. */
export interface FeedSubscription {
  /** The next frame; "overflow" when the queue overflowed; "closed" once closed. */
  next(): Promise<Frame | "overflow" | "closed">;
  /** Resolves when the queue overflows. */
  readonly overflowed: Promise<"overflow">;
  /** Leaves the feed. */
  close(): void;
}

class Sub implements FeedSubscription {
  #queue: Frame[] = [];
  #bytes = 0;
  #overflow = false;
  #closed = false;
  #wake?: () => void;
  #signalOverflow!: () => void;
  /** Resolves when the queue overflows: a write blocked on a silent client ends then. */
  readonly overflowed: Promise<"overflow"> = new Promise((r) => {
    this.#signalOverflow = () => r("overflow");
  });
  constructor(readonly match: (subject: string) => boolean, readonly leave: (s: Sub) => void) {}
  push(f: Frame) {
    if (this.#closed || this.#overflow) return;
    if (this.#queue.length >= SSE_QUEUE_FRAMES || this.#bytes + f.bytes.length > SSE_QUEUE_BYTES) {
      this.#overflow = true;
      this.#queue = [];
      this.#signalOverflow();
    } else {
      this.#queue.push(f);
      this.#bytes += f.bytes.length;
    }
    this.#wake?.();
  }
  async next(): Promise<Frame | "overflow" | "closed"> {
    while (true) {
      if (this.#closed) return "closed";
      if (this.#overflow) return "overflow";
      const f = this.#queue.shift();
      if (f) {
        this.#bytes -= f.bytes.length;
        return f;
      }
      await new Promise<void>((r) => (this.#wake = r));
      this.#wake = undefined;
    }
  }
  close() {
    if (this.#closed) return;
    this.#closed = true;
    this.#queue = [];
    this.#wake?.();
    this.leave(this);
  }
}

/**
 * The live feeds of one gateway: per stream, one ordered consumer from new messages on
 * (started with the first client, deleted after the last leaves), fanned out to clients.
 */
export class LiveFeeds {
  #feeds = new Map<string, Feed>();
  constructor(readonly js: JetStreamClient, readonly log: Logger) {}
  /**
   * Joins the live feed of `stream` (events on `filter`) with the frames `match` selects.
   * Resolves once the feed's consumer is reading, so anything stored later reaches the
   * subscription.
   */
  async join(
    stream: string,
    filter: string,
    match: (subject: string) => boolean,
  ): Promise<FeedSubscription> {
    const key = `${stream} ${filter}`;
    let feed = this.#feeds.get(key);
    if (!feed) this.#feeds.set(key, feed = new Feed(this.js, stream, filter, this.log));
    return await feed.join(match);
  }
}

class Feed {
  #subs = new Set<Sub>();
  #running?: Promise<{ stop(): Promise<void> }>;
  constructor(
    readonly js: JetStreamClient,
    readonly stream: string,
    readonly filter: string,
    readonly log: Logger,
  ) {}

  async join(match: (subject: string) => boolean): Promise<FeedSubscription> {
    const sub = new Sub(match, (s) => this.#leave(s));
    this.#subs.add(sub);
    try {
      await (this.#running ??= this.#start());
    } catch (err) {
      sub.close();
      throw err;
    }
    return sub;
  }

  #leave(sub: Sub) {
    this.#subs.delete(sub);
    if (this.#subs.size > 0 || !this.#running) return;
    const running = this.#running;
    this.#running = undefined;
    running.then((r) => r.stop(), () => {});
  }

  async #start(): Promise<{ stop(): Promise<void> }> {
    const consumer = await this.js.consumers.get(this.stream, {
      filter_subjects: this.filter,
      deliver_policy: DeliverPolicy.New,
    });
    const messages = await consumer.consume({ max_messages: 256 });
    const loop = (async () => {
      for await (const m of messages) {
        const frame = frameOf(m);
        for (const sub of this.#subs) if (sub.match(m.subject)) sub.push(frame);
      }
    })().catch((err) => this.log.warn("live feed ended", { stream: this.stream, err }));
    return {
      stop: async () => {
        messages.stop();
        await loop;
        // nats.js leaves an ordered consumer on the server for 5 minutes after stop().
        await consumer.delete().catch(() => {});
      },
    };
  }
}

const decoder = new TextDecoder();

/** The stream sequence to resume after, from a Last-Event-ID header. */
export function resumeAfter(lastEventId: string | undefined): number | undefined {
  if (lastEventId === undefined) return undefined;
  const n = Number(lastEventId.trim());
  return Number.isSafeInteger(n) && n >= 0 ? n : undefined;
}

/**
 * The stream sequence of an item's latest final event, or undefined when it has none: a
 * per-item stream whose client has seen exactly that far is over.
 */
async function latestFinalSeq(
  js: JetStreamClient,
  stream: string,
  finalTypes: ReadonlySet<string>,
  itemId: string,
): Promise<number | undefined> {
  const jsm = await js.jetstreamManager();
  let latest: number | undefined;
  for (const type of finalTypes) {
    try {
      const m = await jsm.streams.getMessage(stream, { last_by_subj: `${type}.${itemId}` });
      if (m && (latest === undefined || m.seq > latest)) latest = m.seq;
    } catch (err) {
      if (!(err instanceof JetStreamApiError && err.code === JetStreamApiCodes.NoMessageFound)) {
        throw err;
      }
    }
  }
  return latest;
}

/** Streams events matching `sel` to the client as SSE. */
export function streamEvents(
  c: Context,
  js: JetStreamClient,
  sel: SseSelection,
  opts: {
    config: Pick<Config, "sseKeepAliveMs" | "sseWriteTimeoutMs">;
    clients: SseClients;
    feeds: LiveFeeds;
    log: Logger;
    /** The per-key slot this client holds, freed when it ends. */
    key?: string;
  },
): Response {
  const after = resumeAfter(c.req.header("Last-Event-ID"));
  const streamName = sel.stream ?? FEEDBACK_STREAM;
  const finalTypes = sel.finalTypes ?? FINAL_EVENT_TYPES;
  return streamSSE(c, async (stream) => {
    let keepAlive: ReturnType<typeof setInterval> | undefined;
    let sub: FeedSubscription | undefined;
    let last = after ?? 0;
    /** Writes one frame within the write timeout; false when the client is too slow. */
    const send = async (f: Frame): Promise<boolean> => {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const timedOut = new Promise<"timeout">((r) => {
        timer = setTimeout(() => r("timeout"), opts.config.sseWriteTimeoutMs);
      });
      const outcome = await Promise.race([
        stream.write(f.bytes).then(() => "ok"),
        timedOut,
        ...(sub ? [sub.overflowed] : []),
      ]);
      clearTimeout(timer);
      if (outcome !== "ok") {
        opts.log.warn("sse client too slow: dropped", {
          filter: sel.filter,
          seq: f.seq,
          ...(outcome === "overflow" ? { queue: "full" } : {}),
        });
        return false;
      }
      last = f.seq;
      return true;
    };
    try {
      keepAlive = setInterval(() => {
        stream.write(": ping\n\n").catch(() => sub?.close());
      }, opts.config.sseKeepAliveMs);
      stream.onAbort(() => sub?.close());
      /** Sends the stored history from `startSeq` on; "end" when the stream should close. */
      const replay = async (startSeq: number | undefined): Promise<"more" | "end"> => {
        for await (
          const m of readStream(js, streamName, {
            filter: sel.filter,
            ...(startSeq !== undefined ? { startSeq } : {}),
            idleMs: 250,
          })
        ) {
          if (stream.aborted) return "end";
          if (m.seq <= last) continue;
          const frame = frameOf(m);
          if (!(await send(frame))) return "end";
          // Close at a final event only when nothing follows it: a redriven item's replay
          // goes past its earlier failure to the outcome of the new attempt.
          if (sel.closeOnFinal && finalTypes.has(frame.type) && m.info.pending === 0) {
            return "end";
          }
        }
        return "more";
      };
      const history = after !== undefined || sel.replay;
      // History first, as long as it takes, with no live queue filling meanwhile; then join
      // the live feed and replay once more what was stored between the two (a short gap):
      // nothing falls in between, and what both deliver is sent once (by sequence).
      if (history && await replay(after !== undefined ? after + 1 : sel.from) === "end") return;
      sub = await opts.feeds.join(
        streamName,
        sel.filter.split(".").length === 3 ? `${sel.filter.split(".")[0]}.*.*` : sel.filter,
        (subject) => subjectMatches(sel.filter, subject),
      );
      if (stream.aborted) return;
      if (history && await replay(last > 0 ? last + 1 : sel.from) === "end") return;
      // A per-item stream whose client has already seen the item's final event is over
      // (a client resuming with Last-Event-ID after the end would otherwise wait forever).
      if (sel.closeOnFinal && sel.itemId !== undefined) {
        const fin = await latestFinalSeq(js, streamName, finalTypes, sel.itemId);
        if (fin !== undefined && fin <= last) return;
      }
      while (!stream.aborted) {
        const f = await sub.next();
        if (f === "closed") return;
        if (f === "overflow") {
          opts.log.warn("sse client too slow: dropped", { filter: sel.filter, queue: "full" });
          return;
        }
        if (f.seq <= last) continue; // already sent by the replay
        if (!(await send(f))) return;
        if (sel.closeOnFinal && finalTypes.has(f.type)) return;
      }
    } finally {
      clearInterval(keepAlive);
      sub?.close();
      opts.clients.close(opts.key);
    }
  }, async (err, stream) => {
    opts.log.error("sse stream failed", { err });
    await stream.writeSSE({ event: "error", data: JSON.stringify({ error: "stream failed" }) })
      .catch(() => {});
  });
}

function typeOfSubject(subject: string): string {
  const parts = subject.split(".");
  return parts.length === 3 ? `${parts[0]}.${parts[1]}` : subject;
}
