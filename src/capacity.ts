/**
 * Capacity: nothing accepted is ever discarded to make room. Every stream that holds work
 * refuses new messages when full (discard-new, see topology.ts), and intake stops
 * accepting new items earlier, at a high-water mark of the stream's limits, so items
 * already accepted keep room for the events of their remaining steps. An alert (a log
 * line, and the usage gauges in /metrics) fires well before that.
 *
 * The guard reads every stream it watches (cheap stream info, never consumer info) once per
 * refresh interval, with or without intake, so the alert fires on growth from items' later
 * events too; a check never answers from a reading older than that interval (one
 * stream-info request shared by every request waiting on it). It answers from that reading
 * plus what it admitted since: each admission counts as much as the stream grew per
 * admission between its last two readings (at least one message of the stream's average
 * size), so a fast fill cannot outrun a reading up to a second old. From the alert level on
 * (by that estimate), a reading older than `nearMs` (50 ms) is refreshed before the answer;
 * and an estimate past the mark is confirmed by a reading before a refusal.
 *
 * A stream whose items are tracked ({@link CapacityGuard.track}: the gateway tracks every
 * definition's) also keeps room for its items in flight, followed in the stream (an ordered
 * consumer) from their first event to their last: each is taken to store what the most costly of the last 100
 * ended items stored (while none has ended, one event per step the size of the largest
 * seen), and a new item is refused when the stream, what was published since its reading,
 * what the items in flight will still store and the new items themselves would pass the mark.
 * An item admitted whose entry the guard has not seen yet (its publish on its way, or the
 * follower behind) counts in flight at that cost too, for up to {@link UNSEEN_MS}: concurrent
 * admissions, and a batch's items, each keep their room.
 * Items in flight before the guard started are not followed (only an entry starts following).
 *
 * @module
 */
import {
  DeliverPolicy,
  jetstream,
  JetStreamApiError,
  type JetStreamManager,
  type JsMsg,
  type StreamInfo,
} from "@nats-io/jetstream";
import type { MsgHdrs, NatsConnection } from "@nats-io/nats-core";
import { ErrorCode, WeftError } from "./errors.ts";
import type { Logger } from "./observability/log.ts";

/** A stream's use of its limits. */
export interface StreamUsage {
  stream: string;
  /** Bytes stored / max_bytes (0 when unlimited). */
  bytes: number;
  /** Messages stored / max_msgs (0 when unlimited). */
  messages: number;
}

/** The larger of a stream's byte and message usage ratios. */
export function usageOf(info: StreamInfo): StreamUsage {
  const { config, state } = info;
  return {
    stream: config.name,
    bytes: config.max_bytes > 0 ? state.bytes / config.max_bytes : 0,
    messages: config.max_msgs > 0 ? state.messages / config.max_msgs : 0,
  };
}

/** Thrown at intake when a stream is past its high-water mark: HTTP 507 with Retry-After. */
export class CapacityError extends WeftError {
  /**
   * The error for `usage` past `highWater`; `projected`, when given, is the usage the items
   * in flight (and the refused one) would take the stream to.
   */
  constructor(
    usage: StreamUsage,
    highWater: number,
    retryAfterSeconds = 30,
    projected?: number,
  ) {
    const pct = (r: number) => Math.round(r * 100);
    const now = Math.max(usage.bytes, usage.messages);
    super(
      ErrorCode.InsufficientStorage,
      `stream ${usage.stream} is ${pct(now)}% full` +
        (projected !== undefined && pct(projected) > pct(now)
          ? `, ${pct(projected)}% with what the items in flight and the new ones will store`
          : "") +
        ` (new items are refused from ${pct(highWater)}%, so accepted ones ` +
        `can finish); retry later, or grow the stream (${limitSetting(usage.stream)})`,
      // Written for the client: how full, and that a retry later is the answer.
      { retryAfterSeconds, shown: true },
    );
    this.name = "CapacityError";
  }
}

/** The setting that limits `stream`: an object store's (`OBJ_<name>`) or an event stream's. */
function limitSetting(stream: string): string {
  return stream.startsWith("OBJ_") ? "WEFT_OBJECT_STORE_MAX_BYTES" : "WEFT_STREAM_MAX_BYTES";
}

/** JetStream's "store failed" API error code (nats-server JSStreamStoreFailedF). */
const STREAM_STORE_FAILED = 10077;

/** True when a publish was refused because the stream is at a limit (discard-new). */
export function isStreamFull(err: unknown): boolean {
  return err instanceof JetStreamApiError && err.code === STREAM_STORE_FAILED &&
    /maximum (bytes|messages)/i.test(err.message);
}

/**
 * The error intake answers when the stream itself refused a publish for being full (the
 * backstop behind the high-water mark): 507 with Retry-After.
 */
export function streamFullError(stream: string, cause: unknown): WeftError {
  return new WeftError(
    ErrorCode.InsufficientStorage,
    `stream ${stream} is full; retry later, or grow the stream (${limitSetting(stream)})`,
    { cause, retryAfterSeconds: 30, shown: true },
  );
}

/** Settings of a {@link CapacityGuard}. */
export interface CapacityOptions {
  /** Usage ratio from which intake refuses new items. Default 0.9. */
  highWater?: number;
  /** Usage ratio from which a warning is logged (once per crossing). Default 0.8. */
  alertAt?: number;
  /**
   * How old a reading may be before a check waits for a fresh one, ms; also how often every
   * watched stream is read, with or without intake (so the alert fires on growth from an
   * item's later events too). Default 1000.
   */
  refreshMs?: number;
  /**
   * From the alert level on, how old a reading may be before a check waits for a fresh one,
   * ms. Default 50.
   */
  nearMs?: number;
  log?: Logger;
}

/**
 * How to follow a stream's items in it (see {@link CapacityGuard.track}): the subjects
 * its events are published on, and what a subject says of its item.
 */
export interface ItemEvents {
  /** The connection to follow them on (an ordered consumer of the stream). */
  nc: NatsConnection;
  /** Subject filter of every event of the stream's items (`orders.>`). */
  subject: string;
  /**
   * The item an event subject belongs to, whether the event is its entry (the only event
   * that starts following an item) and whether it ends it (its last event), or undefined
   * for a subject that is no item's event.
   */
  itemOf(subject: string): { item: string; entry: boolean; end: boolean } | undefined;
  /**
   * Events an item may store at most, its entry included, taken until an item has ended
   * (its real size is learned from ended items then). Default 8.
   */
  eventsPerItem?: number;
}

/**
 * The {@link ItemEvents} of a pipeline whose events are stored on `<pipeline>.<type>.<item>`
 * subjects: an item enters at its `entry` type and ends at any of `ends`.
 *
 * @example
 * ```ts ignore
 * await guard.track("ORDERS", itemEventsByType(nc, "orders", {
 *   entry: "orders.placed",
 *   ends: ["orders.shipped", "orders.failed"],
 *   eventsPerItem: 4,
 * }));
 * ```
 */
export function itemEventsByType(
  nc: NatsConnection,
  pipeline: string,
  types: { entry: string; ends: readonly string[]; eventsPerItem: number },
): ItemEvents {
  const ends = new Set(types.ends);
  return {
    nc,
    subject: `${pipeline}.*.*`,
    itemOf(subject) {
      const [root, token, item, ...rest] = subject.split(".");
      if (root !== pipeline || !token || !item || rest.length > 0) return undefined;
      const type = `${pipeline}.${token}`;
      return { item, entry: type === types.entry, end: ends.has(type) };
    },
    eventsPerItem: types.eventsPerItem,
  };
}

/** Refuses intake into streams past their high-water mark. */
export interface CapacityGuard extends Disposable {
  /**
   * Throws {@link CapacityError} when `stream` is at or past the high-water mark, or (for a
   * tracked stream) would be with `items` more items (default 1: a batch passes its size).
   * Resolves to a function to call when the admission stored no item after all (refused, or a
   * replay of a stored one): the room kept for it until its entry is seen is given back.
   */
  check(stream: string, items?: number): Promise<() => void>;
  /** Reads `stream` every refresh interval from now on (its alert fires without intake). */
  watch(stream: string): void;
  /**
   * Reserves room for `stream`'s items in flight (resolves once it follows them): followed in
   * the stream from their entry to
   * their last event, each counts for what an item has stored at most (of the last ones
   * that ended) less what it stored so far, and a check refuses a new item when the stream
   * plus those reserves plus the new item's would pass the high-water mark.
   */
  track(stream: string, events: ItemEvents): Promise<void>;
  /** The latest reading of every stream checked so far (for /metrics). */
  readings(): StreamUsage[];
  /**
   * What the guard follows of a tracked `stream`: its items in flight and the events it has
   * seen since it began (undefined for a stream not tracked).
   */
  following(stream: string): { items: number; events: number } | undefined;
  /** Stops reading and following streams. */
  close(): void;
}

/**
 * A guard over `jsm`'s streams.
 *
 * @example
 * ```ts ignore
 * using guard = createCapacityGuard(jsm, { highWater: 0.9, log });
 * await guard.check("ORDERS"); // CapacityError (507) when 90% full
 * ```
 */
export function createCapacityGuard(
  jsm: JetStreamManager,
  opts: CapacityOptions = {},
): CapacityGuard {
  const highWater = opts.highWater ?? 0.9;
  const alertAt = opts.alertAt ?? 0.8;
  const refreshMs = opts.refreshMs ?? 1000;
  const nearMs = Math.min(refreshMs, opts.nearMs ?? 50);
  const streams = new Map<string, Watched>();
  let timer: number | undefined;
  let closed = false;

  function watched(stream: string): Watched {
    let w = streams.get(stream);
    if (!w) streams.set(stream, w = { admitted: 0 });
    if (!timer && !closed && refreshMs > 0 && refreshMs < 2 ** 31) {
      // Every watched stream is read on its own schedule too: growth from items' later
      // events (no intake at all) still raises the alert, and readings stay fresh.
      timer = setInterval(() => {
        for (const [name, w] of streams) {
          if (Date.now() - (w.reading?.at ?? 0) >= refreshMs) {
            read(name, w).catch((err) =>
              opts.log?.debug("stream reading failed", { stream: name, err: String(err) })
            );
          }
        }
      }, refreshMs) as unknown as number;
      Deno.unrefTimer(timer);
    }
    return w;
  }

  function read(stream: string, w: Watched): Promise<Reading> {
    if (w.pending) return w.pending;
    // Admissions from here on may publish after the server answers: they count on top.
    const admittedAt = w.admitted;
    const seenAt = w.items?.seenBytes ?? 0;
    const seenMsgsAt = w.items?.seenMessages ?? 0;
    const p = jsm.streams.info(stream).then((info) => {
      const usage = usageOf(info);
      const prev = w.reading;
      const ratio = Math.max(usage.bytes, usage.messages);
      let alerted = prev?.alerted ?? false;
      if (ratio >= alertAt && !alerted) {
        alerted = true;
        opts.log?.warn("stream nearly full", {
          stream,
          bytes_ratio: round(usage.bytes),
          messages_ratio: round(usage.messages),
          refuse_from: highWater,
        });
      } else if (ratio < alertAt && alerted) {
        alerted = false;
        opts.log?.info("stream below its alert level again", { stream, ratio: round(ratio) });
      }
      const reading: Reading = {
        usage,
        at: Date.now(),
        alerted,
        admittedAt,
        seenAt,
        seenMsgsAt,
        maxBytes: info.config.max_bytes,
        maxMsgs: info.config.max_msgs,
        perAdmission: perAdmission(info, usage, prev, admittedAt),
      };
      w.reading = reading;
      return reading;
    }).finally(() => (w.pending = undefined));
    w.pending = p;
    return p;
  }

  /**
   * The usage `stream` is headed for with `items` more: its reading, growth since, and the
   * reserves.
   */
  function projected(w: Watched, reading: Reading, items: number): number {
    const byAdmissions = estimate(reading, w.admitted + items - 1);
    const f = w.items;
    if (!f) return byAdmissions;
    const perItem = itemCost(f);
    const { bytes, messages } = reserved(f, perItem);
    const ofBytes = (n: number) => reading.maxBytes > 0 ? n / reading.maxBytes : 0;
    const ofMsgs = (n: number) => reading.maxMsgs > 0 ? n / reading.maxMsgs : 0;
    // Admitted items whose entry the follower has not seen yet, and the new ones: each will
    // store what an item does (before, they counted nothing until their entry was seen, so
    // concurrent requests, and every item of a batch but one, went in with no room kept).
    const unseen = unseenItems(f) + items;
    return Math.max(
      byAdmissions,
      // What the stream holds, what was published since it was read, what the items in
      // flight will still add, and the new items themselves.
      reading.usage.bytes +
        ofBytes(f.seenBytes - reading.seenAt + bytes + unseen * perItem.bytes),
      reading.usage.messages +
        ofMsgs(f.seenMessages - reading.seenMsgsAt + messages + unseen * perItem.messages),
    );
  }

  return {
    async check(stream, items = 1) {
      if (closed) throw new Error("the capacity guard is closed");
      items = Math.max(1, Math.floor(items));
      const w = watched(stream);
      let reading = w.reading;
      if (!reading) reading = await read(stream, w);
      else {
        const near = projected(w, reading, items) >= alertAt;
        // A reading older than its interval is never answered from (far from the mark a
        // stale one once admitted an item into a 99.9% full stream); near the mark, one
        // older than nearMs is not either (so a drained stream accepts again at once).
        if (Date.now() - reading.at > (near ? nearMs : refreshMs)) {
          reading = await read(stream, w);
        }
      }
      let ratio = projected(w, reading, items);
      const since = w.admitted > reading.admittedAt ||
        (w.items !== undefined && w.items.seenBytes > reading.seenAt);
      if (ratio >= highWater && since) {
        // Past the mark by the estimate alone (admissions or events since the reading): a
        // reading confirms it before a refusal.
        reading = await read(stream, w);
        ratio = projected(w, reading, items);
      }
      if (ratio >= highWater) {
        const now = Math.max(reading.usage.bytes, reading.usage.messages);
        // A tracked stream's detail says how full it is and, apart, how full what is in flight
        // and the new items would make it (a batch's projection is no fill level).
        throw w.items
          ? new CapacityError(reading.usage, highWater, 30, ratio)
          : new CapacityError({ ...reading.usage, bytes: Math.max(now, ratio) }, highWater);
      }
      w.admitted += items;
      const f = w.items;
      if (!f) return () => {};
      const at = Date.now();
      for (let i = 0; i < items; i++) f.unseen.push(at);
      let given = false;
      return () => {
        if (given) return;
        given = true;
        // Admissions are alike: the newest ones not seen yet are taken back.
        f.unseen.splice(Math.max(0, f.unseen.length - items), items);
      };
    },
    watch(stream) {
      if (!closed) watched(stream);
    },
    async track(stream, events) {
      if (closed) return;
      const w = watched(stream);
      if (w.items) return;
      const f: Flights = {
        items: new Map(),
        ended: [],
        seenBytes: 0,
        seenMessages: 0,
        unseen: [],
        eventsPerItem: events.eventsPerItem ?? 8,
      };
      w.items = f;
      const js = jetstream(events.nc);
      // What the stream stores, as stored: an ordered consumer (a plain subscription on the
      // subjects a stream captures is no identity's to make; see src/identities.ts).
      let next = (await jsm.streams.info(stream)).state.last_seq + 1;
      const seen = (m: JsMsg) => {
        next = m.seq + 1;
        const at = events.itemOf(m.subject);
        if (!at) return;
        const size = storedSize(m);
        f.seenBytes += size;
        f.seenMessages++;
        let item = f.items.get(at.item);
        if (!item) {
          // Only an item's entry starts following it. Any other event for an id not followed
          // (a decision or timer anyone with a publish grant can send for an id that never
          // entered, a repeat for an item that ended, an item in flight before the guard
          // began) is counted in the stream's growth above but reserves nothing: each such
          // id once stayed "in flight" for good and refused intake far below the mark.
          if (!at.entry) return;
          item = { bytes: 0, messages: 0, largest: 0 };
          f.items.set(at.item, item);
          f.unseen.shift(); // an admission's entry, now counted as an item in flight
        }
        item.bytes += size;
        item.messages++;
        item.largest = Math.max(item.largest, size);
        if (at.end) {
          f.items.delete(at.item);
          f.ended.push({ bytes: item.bytes, messages: item.messages });
          if (f.ended.length > ENDED_KEPT) f.ended.shift();
        }
      };
      const follow = async (): Promise<void> => {
        const consumer = await js.consumers.get(stream, {
          // One filter, in the consumer's create subject: what a reader's grant allows.
          filter_subjects: events.subject,
          deliver_policy: DeliverPolicy.StartSequence,
          opt_start_seq: next,
        });
        const messages = await consumer.consume({ max_messages: 256, expires: 5_000 });
        const done = (async () => {
          for await (const m of messages) seen(m);
        })().catch((err) => opts.log?.warn("items no longer followed", { stream, err }))
          .then(() => {
            consumer.delete().catch(() => {});
            if (closed) return;
            // Ended on its own (a lost stream leader): followed again from where it was.
            const again = setTimeout(() => {
              if (!closed) {
                follow().catch((err) => opts.log?.warn("items not followed", { stream, err }));
              }
            }, 1000);
            Deno.unrefTimer(again as unknown as number);
          });
        f.stop = () => {
          messages.stop();
          return done;
        };
      };
      await follow();
      if (closed) await f.stop?.();
    },
    readings: () => [...streams.values()].flatMap((w) => w.reading ? [w.reading.usage] : []),
    following(stream) {
      const f = streams.get(stream)?.items;
      return f && { items: f.items.size, events: f.seenMessages };
    },
    close() {
      closed = true;
      clearInterval(timer);
      for (const w of streams.values()) w.items?.stop?.().catch(() => {});
    },
    [Symbol.dispose]() {
      this.close();
    },
  };
}

/** Ended items whose sizes are kept to reserve room for the items in flight. */
const ENDED_KEPT = 100;

/** A tracked stream's items in flight, followed in the stream. */
interface Flights {
  /** What each item in flight stored so far, and its largest event. */
  items: Map<string, { bytes: number; messages: number; largest: number }>;
  /** What the last items to end stored in all. */
  ended: { bytes: number; messages: number }[];
  /** Bytes (as stored) and messages published on the stream's subjects so far. */
  seenBytes: number;
  seenMessages: number;
  /**
   * When each admitted item whose entry has not been seen yet was admitted (ms since the
   * epoch), oldest first: each entry seen takes the oldest off, an admission that stored
   * nothing gives its own back, and one older than {@link UNSEEN_MS} is dropped.
   */
  unseen: number[];
  /** Events an item is taken to store while no item has ended. */
  eventsPerItem: number;
  /** Stops following them. */
  stop?: () => Promise<void>;
}

/**
 * What an item stores in all: the most one of the last ended items stored; while none has
 * ended, {@link Flights.eventsPerItem} events the size of the largest event seen so far.
 */
function itemCost(f: Flights): { bytes: number; messages: number } {
  if (f.ended.length > 0) {
    return {
      bytes: Math.max(...f.ended.map((e) => e.bytes)),
      messages: Math.max(...f.ended.map((e) => e.messages)),
    };
  }
  let largest = FIRST_ADMISSION_BYTES;
  for (const i of f.items.values()) largest = Math.max(largest, i.largest);
  return { bytes: largest * f.eventsPerItem, messages: f.eventsPerItem };
}

/**
 * How long an admitted item whose entry the guard has not seen counts in flight, ms: past it,
 * its publish is taken to have stored nothing (refused, or a replay of a stored item).
 */
export const UNSEEN_MS = 30_000;

/** Admitted items whose entry is not seen yet (within {@link UNSEEN_MS}). */
function unseenItems(f: Flights): number {
  const since = Date.now() - UNSEEN_MS;
  while (f.unseen.length > 0 && f.unseen[0]! < since) f.unseen.shift();
  return f.unseen.length;
}

/** What the items in flight will still store, at `cost` ({@link itemCost}) each. */
function reserved(
  f: Flights,
  cost: { bytes: number; messages: number },
): { bytes: number; messages: number } {
  let bytes = 0;
  let messages = 0;
  for (const i of f.items.values()) {
    bytes += Math.max(0, cost.bytes - i.bytes);
    messages += Math.max(0, cost.messages - i.messages);
  }
  return { bytes, messages };
}

/** Bytes a message takes in a stream (nats-server counts its record header and checksum). */
function storedSize(m: { subject: string; data: Uint8Array; headers?: MsgHdrs }): number {
  let headers = 0;
  if (m.headers) {
    headers = 12; // "NATS/1.0\r\n" and the closing "\r\n"
    for (const k of m.headers.keys()) {
      for (const v of m.headers.values(k)) headers += k.length + v.length + 4;
    }
  }
  return 30 + m.subject.length + headers + m.data.length;
}

/** A stream the guard answers for: its latest reading and what it admitted. */
interface Watched {
  /** Admissions so far (a batch is one). */
  admitted: number;
  reading?: Reading;
  pending?: Promise<Reading>;
  /** Its items in flight, when tracked. */
  items?: Flights;
}

/** One stream-info reading. */
interface Reading {
  usage: StreamUsage;
  /** When it was answered (ms since the epoch). */
  at: number;
  /** Whether the "nearly full" warning is out. */
  alerted: boolean;
  /** {@link Watched.admitted} when it was asked for. */
  admittedAt: number;
  /** {@link Flights.seenBytes} and {@link Flights.seenMessages} when it was asked for. */
  seenAt: number;
  seenMsgsAt: number;
  /** The stream's limits (0: none). */
  maxBytes: number;
  maxMsgs: number;
  /** What one admission adds, as ratios of the limits. */
  perAdmission: { bytes: number; messages: number };
}

/** Bytes an admission is taken to add to a stream that holds nothing yet. */
const FIRST_ADMISSION_BYTES = 1024;

/**
 * What one admission adds to the stream, as ratios of its limits: how much it grew per
 * admission since the previous reading (an item's later events included), at least one
 * message of its average size.
 */
function perAdmission(
  info: StreamInfo,
  usage: StreamUsage,
  prev: Reading | undefined,
  admittedAt: number,
): { bytes: number; messages: number } {
  const { config, state } = info;
  let bytes = config.max_bytes > 0
    ? (state.messages > 0 ? state.bytes / state.messages : FIRST_ADMISSION_BYTES) /
      config.max_bytes
    : 0;
  let messages = config.max_msgs > 0 ? 1 / config.max_msgs : 0;
  const admissions = prev ? admittedAt - prev.admittedAt : 0;
  if (prev && admissions > 0) {
    bytes = Math.max(bytes, (usage.bytes - prev.usage.bytes) / admissions);
    messages = Math.max(messages, (usage.messages - prev.usage.messages) / admissions);
  }
  return { bytes, messages };
}

/** The usage ratio `reading` and the admissions since it make. */
function estimate(reading: Reading, admitted: number): number {
  const since = admitted - reading.admittedAt;
  return Math.max(
    reading.usage.bytes + since * reading.perAdmission.bytes,
    reading.usage.messages + since * reading.perAdmission.messages,
  );
}

function round(n: number): number {
  return Math.round(n * 1000) / 1000;
}
