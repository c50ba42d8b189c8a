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
 * within the write timeout is cut (its response errored, so the server closes its connection
 * once the client has taken what was queued: a graceful end would never reach a client that
 * does not read; its slot is held until then); it resumes with Last-Event-ID (event ids are stream
 * sequences) and misses nothing.
 *
 * @module
 */
import type { Context } from "hono";
import {
  DeliverPolicy,
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamClient,
} from "@nats-io/jetstream";
import type { Config } from "../config.ts";
import type { Logger } from "../observability/log.ts";
import { ErrorCode, ValidationError, WeftError } from "../errors.ts";
import { deterministicId } from "../events.ts";
import { bearerToken } from "./auth.ts";
import { ReadBudget, readerPrefetch, readStream } from "../stream_reader.ts";
import { subjectMatches } from "../subjects.ts";
import { decodeStateEvent, startsNoItem, type StateSpec } from "../state_writer.ts";
import {
  LETTER_WAIT_MS,
  type LetterReads,
  settledVerdict,
  storedLetters,
} from "../failure_letter.ts";
import { canonicalJson } from "../canonical_json.ts";
import type { AnyEvent } from "../schemas.ts";

/** Most frames a client's live queue holds before the client is cut as too slow. */
export const SSE_QUEUE_FRAMES = 256;
/** Most bytes a client's live queue holds before the client is cut as too slow. */
export const SSE_QUEUE_BYTES = 128 * 1024;

/** What to stream. */
export interface SseSelection {
  /** Subject filter, e.g. `orders.*.ID` or `orders.*.*`. */
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
  /** The stream to read. */
  stream: string;
  /** The event types that end a per-item stream (none by default). */
  finalTypes?: ReadonlySet<string>;
  /** The item of a per-item stream: lets a resumed stream that saw its end close at once. */
  itemId?: string;
  /**
   * The subject an event of `type` for `itemId` is stored under, where it is not
   * `<type>.<itemId>` (a hub's copy of an edge site's events: `site.<site>.<type>.<id>`).
   */
  subjectOf?: (type: string, itemId: string) => string;
  /** The live feed to join, shared by every item's clients; by default `<first token>.*.*`. */
  feedFilter?: string;
  /**
   * The item's state spec (a per-item stream, `itemId`): an end (a frame of a final type) that
   * the item's history, folded from the frames before it, does not lead to
   * ({@link StateSpec.refuses}: a step's key publishing the end for an item that had not
   * reached the step, which the state writer dead-letters) is not shown and ends nothing.
   */
  state?: StateSpec<unknown>;
  /**
   * Where a failure's dead letter is read to judge it (with `state`): by default DEADLETTER
   * and `stream` (a hub's copies of an edge site's letters and events: src/edge.ts).
   */
  letters?: LetterReads;
  /**
   * What the stream's subjects carry ahead of the pipeline's own (a hub's copies of an edge
   * site's events: `site.<site>.`): taken off before an event is folded with `state`.
   */
  subjectPrefix?: string;
}

/** Whether `after` is `before` resumed: a failed item's state that a redrive set running. */
function resumed(before: unknown, after: unknown): boolean {
  const status = (s: unknown) =>
    s !== null && typeof s === "object" ? (s as { status?: unknown }).status : undefined;
  return status(before) === "failed" && status(after) !== "failed";
}

/**
 * Folds a per-item stream's frames in stream order, as the item's state writer folds its
 * events, to tell the ends its history leads to from those it does not, and the copies of
 * an event its stream has had already.
 */
function endJudge(
  spec: StateSpec<unknown>,
  item: string,
  finalTypes: ReadonlySet<string>,
  vouch?: (f: Frame) => Promise<boolean>,
  prefix = "",
) {
  /** The subject `f` has in its pipeline's stream (a hub's copy's, without its prefix). */
  const subjectOf = (f: Frame) =>
    prefix !== "" && f.subject.startsWith(prefix) ? f.subject.slice(prefix.length) : f.subject;
  let state: unknown;
  let upTo = 0;
  let entered = false;
  const refused = new Set<number>();
  /** The ids of the events folded (each event once). */
  const ids = new Set<string>();
  const vetted = new Set<number>();
  const judge = {
    /**
     * Asks, before they are folded, whether `frames`' failures ({@link StateSpec.failedType})
     * are a runner's (its dead letter stored): one that is not is refused, as the state
     * writer refuses it. Other frames cost a comparison.
     */
    async vet(frames: readonly Frame[]): Promise<void> {
      if (spec.failedType === undefined || vouch === undefined) return;
      for (const f of frames) {
        if (f.type !== spec.failedType || f.seq <= upTo || vetted.has(f.seq)) continue;
        vetted.add(f.seq);
        if (!(await vouch(f))) refused.add(f.seq);
      }
    },
    /** The sequence of the last end folded that the item's history leads to. */
    lastEnd: undefined as number | undefined,
    /** Folds `f`, once, in order (frames at or before the last folded are skipped). */
    fold(f: Frame): void {
      if (f.seq <= upTo) return;
      upTo = f.seq;
      if (refused.has(f.seq)) return; // a failure no runner's letter is stored for
      entered ||= spec.entrySubject?.(item) === subjectOf(f);
      let event: AnyEvent;
      try {
        event = decodeStateEvent(spec, encoder.encode(f.text), subjectOf(f), 0);
      } catch {
        return; // dead-lettered, never folded
      }
      if (state === undefined && startsNoItem(spec, event) && !entered) return;
      if (state !== undefined && spec.refuses?.(state, event, f.seq) !== undefined) {
        refused.add(f.seq);
        return;
      }
      // A second copy of an end (stored without the once-per-item header, by a step's key):
      // the item has ended, and the state keeps the first. Found by probing: a replaying
      // client was shown both. (An end after a failure the item was redriven from changes
      // its state, and shows.)
      if (state !== undefined && finalTypes.has(f.type) && spec.isFinal(state)) {
        const next = spec.apply(state, event, f.seq);
        // (A fold that counts what it folded, a definition's `last_seq`, counts a copy too.)
        const held = (s: unknown) =>
          canonicalJson(spec.lastSeq ? { ...s as object, last_seq: undefined } : s);
        if (next === state || held(next) === held(state)) {
          refused.add(f.seq);
          return;
        }
      }
      const before = state;
      state = spec.apply(state, event, f.seq);
      // An event stored again with its id (a hand-over's copy, for the steps a changed
      // definition or a redrive sends it to; a step's key writing it again) is the same
      // event: its stream shows it once, unless it resumes a failed item (its redrive, the
      // new attempt's start). Found by probing: a redriven item's stream showed its last
      // step's event twice, the second a hand-over's copy stored as the item ended.
      readBody(f);
      const id = f.bodyType === f.type ? f.bodyId : null;
      if (id !== null && id !== undefined) {
        if (ids.has(id) && !resumed(before, state)) refused.add(f.seq);
        ids.add(id);
      }
      if (finalTypes.has(f.type) && !refused.has(f.seq)) judge.lastEnd = f.seq;
      // A redrive resumed the failed item: its failure no longer ends its stream (found by
      // probing: a client resuming after the failure was closed after the redriven event).
      else if (resumed(before, state)) judge.lastEnd = undefined;
    },
    /** Whether `f` (folded now, if not yet) is an event the item's history does not lead to. */
    refuses(f: Frame): boolean {
      judge.fold(f);
      return refused.has(f.seq);
    },
  };
  return judge;
}

/**
 * Default of the bytes a gateway's SSE replays may have asked NATS for at once, in all
 * (`WEFT_SSE_REPLAY_BYTES`): a quarter of nats-server's default `max_pending` (64 MiB), past
 * which the server cuts the gateway's one connection as a slow consumer.
 */
export const SSE_REPLAY_BYTES = 16 * 1024 * 1024;

/**
 * Counts open SSE clients against the configured total and per-key maximums, paces their
 * streams' set-up, and holds the budget their replays share ({@link replayBudget}).
 */
export class SseClients {
  #open = 0;
  #byKey = new Map<string, number>();
  /** When the next stream's turn would come with no burst left (ms, `now`'s clock). */
  #nextTurn = -Infinity;
  /**
   * `max` clients in all; `maxPerKey` per API key (when requests carry one); streams set up
   * at `opensPerSecond` after a burst of a quarter of that (0: no pacing). `now` is
   * injectable for tests.
   */
  constructor(
    readonly max: number,
    readonly maxPerKey = Infinity,
    readonly opensPerSecond = 0,
    readonly now: () => number = () => performance.now(),
    replayBytes = SSE_REPLAY_BYTES,
  ) {
    const itemShare = Math.floor(replayBytes / 4);
    this.itemReplayBudget = new ReadBudget(itemShare);
    this.replayBudget = new ReadBudget(replayBytes - itemShare);
  }
  /**
   * What the wide replays of these clients' streams (history of many items: `replay=true`,
   * Last-Event-ID) may have asked NATS for at once, in all: three quarters of `replayBytes`.
   * Each replay's reader takes its prefetch (the server's `max_payload` plus 64 KiB) from it,
   * first come first served, and gives it back when its replay ends (caught up, or its client
   * cut or gone). With {@link itemReplayBudget}, however many clients replay, the gateway's
   * connection never has more than `replayBytes` coming from the server for them, so the
   * server never cuts it as a slow consumer.
   */
  readonly replayBudget: ReadBudget;
  /**
   * The share of `replayBytes` reserved for per-item streams' replays (a quarter; an item's
   * events are few and its replay soon caught up), taken and given back as in
   * {@link replayBudget}: wide replays whose clients do not read, holding their whole budget
   * until they are cut, never hold up an item's stream.
   */
  readonly itemReplayBudget: ReadBudget;
  /**
   * Reserves the next stream set-up and says how long it must wait for it, ms (0: at once).
   * Turns are handed out first come first served at `opensPerSecond`, with a burst of a
   * quarter of a second's worth (a generic cell rate algorithm): each waiter gets its own
   * time and sleeps once, so a storm of 2,000 costs 2,000 timers, not a thundering herd.
   *
   * @example
   * ```ts
   * import { SseClients } from "./sse.ts";
   * const clients = new SseClients(100, Infinity, 4, () => 0); // 4 a second, burst of 1
   * console.assert(clients.turn() === 0 && clients.turn() === 250 && clients.turn() === 500);
   * ```
   */
  turn(): number {
    if (!(this.opensPerSecond > 0)) return 0;
    const interval = 1000 / this.opensPerSecond;
    const early = (Math.max(1, Math.floor(this.opensPerSecond / 4)) - 1) * interval;
    const now = this.now();
    const due = Math.max(this.#nextTurn, now);
    this.#nextTurn = due + interval;
    return Math.max(0, due - early - now);
  }
  /** Clients waiting for their stream's turn now (`weft_sse_waiting`). */
  get waiting(): number {
    return this.#waiting;
  }
  #waiting = 0;
  /**
   * Waits for the next stream set-up's {@link turn}, or until `signal` aborts (the client
   * left: its slot can be freed at once, not at its turn) or {@link closeAll} is called.
   */
  async waitTurn(signal?: AbortSignal): Promise<void> {
    const wait = this.turn();
    const closing = this.#closing.signal;
    if (wait <= 0 || signal?.aborted || closing.aborted) return;
    this.#waiting++;
    try {
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer);
          signal?.removeEventListener("abort", done);
          closing.removeEventListener("abort", done);
          resolve();
        };
        const timer = setTimeout(done, wait);
        signal?.addEventListener("abort", done);
        closing.addEventListener("abort", done);
      });
    } finally {
      this.#waiting--;
    }
  }
  /** Clients open now. */
  get open(): number {
    return this.#open;
  }
  #closing = new AbortController();
  /**
   * Aborted by {@link closeAll} (the gateway is stopping): every open stream ends on it,
   * and no stream opens after it.
   */
  get closing(): AbortSignal {
    return this.#closing.signal;
  }
  /**
   * Ends every stream of these slots and refuses new ones, for a gateway that stops: its
   * server waits for every open response, and an event stream never ends on its own. Each
   * client is told to reconnect ({@link SSE_RECONNECT}); it resumes elsewhere, or here after
   * the restart, with Last-Event-ID and misses nothing.
   */
  closeAll(): void {
    this.#closing.abort();
  }
  /** Takes a slot for a client (of `key`, when given); false when a cap is reached. */
  tryOpen(key?: string): boolean {
    if (this.#closing.signal.aborted) return false;
    if (this.#open >= this.max) return false;
    if (key !== undefined && (this.#byKey.get(key) ?? 0) >= this.maxPerKey) return false;
    this.#open++;
    if (key !== undefined) this.#byKey.set(key, (this.#byKey.get(key) ?? 0) + 1);
    return true;
  }
  /** Which cap refuses a client of `key` now, in words; undefined when none does. */
  capReached(key?: string): string | undefined {
    if (this.#open >= this.max) {
      return `the gateway's ${this.max} event streams are open (WEFT_SSE_MAX_CLIENTS)`;
    }
    if (key !== undefined && (this.#byKey.get(key) ?? 0) >= this.maxPerKey) {
      return `this API key's ${this.maxPerKey} event streams are open (WEFT_SSE_MAX_PER_KEY)`;
    }
    return undefined;
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
  if (clients.closing.aborted) throw stoppingError();
  // The key itself, not the header's spelling: "bearer  <key>" is the same key as
  // "Bearer <key>", and counted with it (each spelling had a WEFT_SSE_MAX_PER_KEY of its own).
  const auth = c.req.header("authorization");
  const key = auth ? deterministicId("sse-key", bearerToken(auth) ?? auth) : undefined;
  if (!clients.tryOpen(key)) {
    const cap = clients.capReached(key) ?? "too many event streams open";
    throw new WeftError(ErrorCode.Unavailable, `${cap}; retry later`, {
      retryAfterSeconds: 5,
      shown: true,
    });
  }
  return key;
}

/**
 * The last frame of a stream the gateway ends because it stops: a comment saying so, and
 * how soon to reconnect (ms; an EventSource then resumes with Last-Event-ID).
 */
export const SSE_RECONNECT = ": the gateway is stopping; reconnect\nretry: 1000\n\n";

/** The 503 a stream asked for while the gateway stops gets. */
export function stoppingError(): WeftError {
  return new WeftError(ErrorCode.Unavailable, "the gateway is stopping; retry shortly", {
    retryAfterSeconds: 1,
  });
}

/** One event as a client receives it: encoded once, written to every client as is. */
interface Frame {
  seq: number;
  subject: string;
  type: string;
  /** The SSE wire bytes: `id`, `event` and one `data` line (event JSON has no raw newline). */
  bytes: Uint8Array;
  /** The body as text, read only for a per-item stream ({@link namesAnotherItem}). */
  text: string;
  /** The item its body names (`item_id`), once read; null when it names none. */
  named?: string | null;
  /** The event type its body names (`type`), once read; null when it names none. */
  bodyType?: string | null;
  /** The event id its body names (`id`), once read; null when it names none. */
  bodyId?: string | null;
}

const encoder = new TextEncoder();

/**
 * The frame of a stored message. Its type is its subject's (`<pipeline>.<type>.<item>`),
 * which NATS permissions guard, never a header a publisher sets: a `Weft-Event-Type` header
 * naming a final type on a decision's subject would show a false end and close the stream.
 */
function frameOf(m: { seq: number; subject: string; data: Uint8Array }): Frame {
  const type = typeOfSubject(m.subject);
  const data = decoder.decode(m.data).replace(/[\r\n]+/g, " ");
  return {
    seq: m.seq,
    subject: m.subject,
    type,
    bytes: encoder.encode(`id: ${m.seq}\nevent: ${type}\ndata: ${data}\n\n`),
    text: data,
  };
}

/**
 * Whether a frame stored on `item`'s subject is an event whose body names another item (a
 * string `item_id` that is not `item`): every consumer dead-letters it (`subject_mismatch`),
 * so a per-item stream does not show it as the item's. Bodies naming no item (a person's
 * decision) are the item's. Read once per frame, only for per-item streams.
 */
function namesAnotherItem(f: Frame, item: string): boolean {
  readBody(f);
  return f.named !== null && f.named !== item;
}

/** Reads what a frame's body names (`item_id`, `type`), once. */
function readBody(f: Frame): void {
  if (f.named !== undefined) return;
  let body: { item_id?: unknown; type?: unknown; id?: unknown } | null | undefined;
  try {
    body = JSON.parse(f.text);
  } catch {
    body = undefined; // not JSON: nothing named
  }
  const named = body !== null && typeof body === "object" ? body.item_id : undefined;
  const type = body !== null && typeof body === "object" ? body.type : undefined;
  const id = body !== null && typeof body === "object" ? body.id : undefined;
  f.named = typeof named === "string" ? named : null;
  f.bodyType = typeof type === "string" ? type : null;
  f.bodyId = typeof id === "string" ? id : null;
}

/**
 * Whether a frame is an event of its subject's type by its body too (its `type`). Only such a
 * frame of a final type ends a per-item stream; one whose body disagrees (a forged or altered
 * message: every consumer dead-letters it, `subject_mismatch`) is not shown as that type.
 */
function bodyAgrees(f: Frame): boolean {
  readBody(f);
  return f.bodyType === f.type;
}

/**
 * Frames written together: one flush's frames for one filter, encoded once into `bytes`
 * and shared by every client of that filter.
 */
export interface Chunk {
  frames: Frame[];
  bytes: Uint8Array;
}

function chunkOf(frames: Frame[]): Chunk {
  if (frames.length === 1) return { frames, bytes: frames[0]!.bytes };
  const bytes = new Uint8Array(frames.reduce((n, f) => n + f.bytes.length, 0));
  let at = 0;
  for (const f of frames) {
    bytes.set(f.bytes, at);
    at += f.bytes.length;
  }
  return { frames, bytes };
}

/** A client's place on a live feed: a bounded queue. */
export interface FeedSubscription {
  /**
   * Every chunk queued so far (at least one, waiting for it); "overflow" when the queue
   * overflowed; "closed" once closed.
   */
  take(): Promise<Chunk[] | "overflow" | "closed">;
  /** Resolves when the queue overflows. */
  readonly overflowed: Promise<"overflow">;
  /** Leaves the feed. */
  close(): void;
}

class Sub implements FeedSubscription {
  #queue: Chunk[] = [];
  #frames = 0;
  #bytes = 0;
  #overflow = false;
  #closed = false;
  #wake?: () => void;
  #signalOverflow!: () => void;
  /** Resolves when the queue overflows: a write blocked on a silent client ends then. */
  readonly overflowed: Promise<"overflow"> = new Promise((r) => {
    this.#signalOverflow = () => r("overflow");
  });
  constructor(readonly group: Group, readonly leave: (s: Sub) => void) {}
  /** Queues a chunk and wakes the client. */
  push(c: Chunk) {
    if (this.#closed || this.#overflow) return;
    if (
      this.#frames + c.frames.length > SSE_QUEUE_FRAMES ||
      this.#bytes + c.bytes.length > SSE_QUEUE_BYTES
    ) {
      this.#overflow = true;
      this.#queue = [];
      this.#signalOverflow();
    } else {
      this.#queue.push(c);
      this.#frames += c.frames.length;
      this.#bytes += c.bytes.length;
    }
    this.#wake?.();
  }
  async take(): Promise<Chunk[] | "overflow" | "closed"> {
    while (true) {
      if (this.#closed) return "closed";
      if (this.#overflow) return "overflow";
      if (this.#queue.length > 0) {
        const chunks = this.#queue;
        this.#queue = [];
        this.#frames = 0;
        this.#bytes = 0;
        return chunks;
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

/** Clients with one selection: they share each flush's chunk. */
interface Group {
  key: string;
  match: (subject: string) => boolean;
  /** The one item the group follows, when it follows one: the feed indexes it. */
  itemId?: string;
  subs: Set<Sub>;
}

/**
 * The live feeds of one gateway: per stream, one ordered consumer from new messages on
 * (started with the first client, deleted after the last leaves), fanned out to clients.
 *
 * Frames are gathered for up to `flushMs`, then each group of clients with the same
 * selection gets them as one chunk, encoded once and shared: with 2,000 clients and 250
 * events a second that is one write per client per flush instead of one per event, and
 * no copying per client, which is what keeps the gateway's event loop free for ingest.
 * The cost is up to `flushMs` of delivery lag. With more clients than `writesPerSecond`
 * allows at that pace, flushes come less often (each with more frames), so fan-out work
 * stays bounded however many clients connect; and a flush writes to a few hundred clients
 * per turn of the event loop, so requests are answered between slices.
 */
export class LiveFeeds {
  #feeds = new Map<string, Feed>();
  constructor(
    readonly js: JetStreamClient,
    readonly log: Logger,
    readonly flushMs: number = SSE_FLUSH_MS,
    readonly writesPerSecond: number = SSE_WRITES_PER_S,
  ) {}
  /**
   * Joins the live feed of `stream` (events on `filter`) with the frames `match` selects;
   * clients passing the same `selection` key share chunks (and `itemId`, when given,
   * indexes the group by item). Resolves once the feed's consumer is reading, so anything
   * stored later reaches the subscription.
   */
  async join(
    stream: string,
    filter: string,
    selection: { key: string; match: (subject: string) => boolean; itemId?: string },
  ): Promise<FeedSubscription> {
    const key = `${stream} ${filter}`;
    let feed = this.#feeds.get(key);
    if (!feed) {
      this.#feeds.set(
        key,
        feed = new Feed(
          this.js,
          stream,
          filter,
          this.log,
          this.flushMs,
          this.writesPerSecond,
        ),
      );
    }
    return await feed.join(selection);
  }
}

/** Default of {@link LiveFeeds}' flush interval, ms (`WEFT_SSE_FLUSH_MS`). */
export const SSE_FLUSH_MS = 100;
/** Default of {@link LiveFeeds}' budget of client writes a second (`WEFT_SSE_WRITES_PER_S`). */
export const SSE_WRITES_PER_S = 5_000;
/** Clients a flush writes to in one turn of the event loop. */
export const SSE_FLUSH_SLICE = 200;

class Feed {
  /** Groups following every item (e.g. `/events?type=...`), matched per frame at flush. */
  #wide = new Map<string, Group>();
  /** Groups following one item each, found by the subject's last token. */
  #byItem = new Map<string, Group>();
  #size = 0;
  /** Frames since the last flush. */
  #pending: Frame[] = [];
  #flushTimer?: ReturnType<typeof setTimeout>;
  /** A flush is pushing its frames (it yields between slices of clients). */
  #flushing = false;
  /** Clients the last flush pushed to. */
  #lastPushes = 0;
  #running?: Promise<{ stop(): Promise<void> }>;
  constructor(
    readonly js: JetStreamClient,
    readonly stream: string,
    readonly filter: string,
    readonly log: Logger,
    readonly flushMs: number,
    readonly writesPerSecond: number,
  ) {}

  async join(
    sel: { key: string; match: (subject: string) => boolean; itemId?: string },
  ): Promise<FeedSubscription> {
    const groups = sel.itemId === undefined ? this.#wide : this.#byItem;
    const groupKey = sel.itemId ?? sel.key;
    let group = groups.get(groupKey);
    if (!group) {
      groups.set(groupKey, group = { key: sel.key, match: sel.match, subs: new Set() });
      if (sel.itemId !== undefined) group.itemId = sel.itemId;
    }
    const sub = new Sub(group, (s) => this.#leave(s));
    group.subs.add(sub);
    this.#size++;
    try {
      await (this.#running ??= this.#start());
    } catch (err) {
      sub.close();
      throw err;
    }
    return sub;
  }

  #leave(sub: Sub) {
    const group = sub.group;
    if (!group.subs.delete(sub)) return;
    if (group.subs.size === 0) {
      if (group.itemId !== undefined) this.#byItem.delete(group.itemId);
      else this.#wide.delete(group.key);
    }
    this.#size--;
    if (this.#size > 0 || !this.#running) return;
    const running = this.#running;
    this.#running = undefined;
    clearTimeout(this.#flushTimer);
    this.#flushTimer = undefined;
    this.#pending = [];
    running.then((r) => r.stop(), () => {});
  }

  #deliver(frame: Frame) {
    this.#pending.push(frame);
    this.#schedule();
  }

  /** Arms the next flush: none while one is running (its end arms the next). */
  #schedule() {
    if (this.#flushing || this.#flushTimer !== undefined || this.#pending.length === 0) return;
    // The fan-out's writes a second stay within the budget: with more clients than the
    // budget takes at `flushMs`, flushes come less often and each carries more frames.
    const ms = Math.max(this.flushMs, Math.ceil((1000 * this.#lastPushes) / this.writesPerSecond));
    if (ms === 0) void this.#flush();
    else this.#flushTimer = setTimeout(() => void this.#flush(), ms);
  }

  async #flush() {
    this.#flushTimer = undefined;
    this.#flushing = true;
    const frames = this.#pending;
    this.#pending = [];
    const pushes: { subs: Sub[]; chunk: Chunk }[] = [];
    for (const group of this.#wide.values()) {
      const mine = frames.filter((f) => group.match(f.subject));
      if (mine.length > 0) pushes.push({ subs: [...group.subs], chunk: chunkOf(mine) });
    }
    if (this.#byItem.size > 0) {
      const perItem = new Map<string, Frame[]>();
      for (const f of frames) {
        const id = f.subject.slice(f.subject.lastIndexOf(".") + 1);
        const group = this.#byItem.get(id);
        if (!group || !group.match(f.subject) || namesAnotherItem(f, id)) continue;
        const list = perItem.get(id);
        if (list) list.push(f);
        else perItem.set(id, [f]);
      }
      for (const [id, mine] of perItem) {
        pushes.push({ subs: [...this.#byItem.get(id)!.subs], chunk: chunkOf(mine) });
      }
    }
    // A few hundred clients' writes at a time, then a turn of the event loop: requests
    // (ingest above all) are answered between slices, not after the whole fan-out. A client
    // that leaves meanwhile ignores its push.
    let n = 0;
    for (const { subs, chunk } of pushes) {
      for (const sub of subs) {
        sub.push(chunk);
        if (++n % SSE_FLUSH_SLICE === 0) await new Promise((r) => setTimeout(r, 0));
      }
    }
    this.#lastPushes = n;
    this.#flushing = false;
    this.#schedule();
  }

  async #start(): Promise<{ stop(): Promise<void> }> {
    // From the stream's position now, not "new" as of whenever the server creates the
    // consumer: nats.js creates an ordered consumer in the background once it consumes, so
    // an event stored right after a client's stream opened could otherwise be missed.
    const jsm = await this.js.jetstreamManager(false);
    const { state } = await jsm.streams.info(this.stream);
    const consumer = await this.js.consumers.get(this.stream, {
      filter_subjects: this.filter,
      deliver_policy: DeliverPolicy.StartSequence,
      opt_start_seq: state.last_seq + 1,
    });
    // Pulls that expire in 5 s, so heartbeats every 2.5 s: after a stream leader's loss the
    // feed notices in about 5 s and recreates its consumer (with the default 30 s, its clients
    // waited 30 s and more before a new leader's events reached them).
    const messages = await consumer.consume({ max_messages: 256, expires: 5_000 });
    let stopping = false;
    const loop = (async () => {
      for await (const m of messages) this.#deliver(frameOf(m));
    })().catch((err) => this.log.warn("live feed ended", { stream: this.stream, err }))
      .then(() => {
        if (stopping) return;
        // The feed ended on its own: its clients would wait forever. Close them instead:
        // each reconnects with Last-Event-ID and misses nothing; the next join starts a
        // new feed.
        this.log.warn("live feed ended unexpectedly; closing its clients", {
          stream: this.stream,
          clients: this.#size,
        });
        this.#running = undefined;
        for (const group of [...this.#wide.values(), ...this.#byItem.values()]) {
          for (const sub of [...group.subs]) sub.close();
        }
        consumer.delete().catch(() => {});
      });
    return {
      stop: async () => {
        stopping = true;
        messages.stop();
        await loop;
        // nats.js leaves an ordered consumer on the server for 5 minutes after stop().
        await consumer.delete().catch(() => {});
      },
    };
  }
}

const decoder = new TextDecoder();

/**
 * The stream sequence to resume after, from a Last-Event-ID header: undefined when there
 * is none (or it is empty, as an EventSource that has seen no id sends none). Event ids are
 * stream sequences, so anything but digits (at most 16, a safe integer) is a 422 problem
 * naming the header, never read as "from the start" or, like `1e3`, as another number.
 * (A browser's EventSource only echoes ids the server sent; a bad one is a client's bug.)
 *
 * @example
 * ```ts
 * import { resumeAfter } from "./sse.ts";
 * console.assert(resumeAfter("41") === 41 && resumeAfter(undefined) === undefined);
 * ```
 */
export function resumeAfter(lastEventId: string | undefined): number | undefined {
  if (lastEventId === undefined) return undefined;
  const id = lastEventId.trim();
  if (id === "") return undefined;
  const n = /^[0-9]{1,16}$/.test(id) ? Number(id) : NaN;
  if (!Number.isSafeInteger(n)) {
    throw new ValidationError(
      "Last-Event-ID must be an event id this server sent: a stream sequence (digits)",
      { field: "Last-Event-ID" },
    );
  }
  return n;
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
  subjectOf: (type: string, itemId: string) => string = (type, id) => `${type}.${id}`,
): Promise<number | undefined> {
  const jsm = await js.jetstreamManager(false);
  let latest: number | undefined;
  for (const type of finalTypes) {
    try {
      const m = await jsm.streams.getMessage(stream, { last_by_subj: subjectOf(type, itemId) });
      if (!m || (latest !== undefined && m.seq <= latest)) continue;
      // Only an event the stream would show as final ends it (its body agrees).
      const f = frameOf(m);
      if (bodyAgrees(f) && !namesAnotherItem(f, itemId)) latest = m.seq;
    } catch (err) {
      if (!(err instanceof JetStreamApiError && err.code === JetStreamApiCodes.NoMessageFound)) {
        throw err;
      }
    }
  }
  return latest;
}

/**
 * An SSE response body written straight into a `ReadableStream` that Deno's server reads:
 * a write is one enqueue, settled at once while the client keeps up (up to `bufferBytes`
 * buffered), instead of Hono's `streamSSE`, whose every write crosses three streams and
 * their promises (measured in the gateway's profile with 2,000 clients). Closing the
 * connection cancels the body, which aborts the wire.
 */
export class SseWire {
  aborted = false;
  readonly body: ReadableStream<Uint8Array>;
  #controller!: ReadableStreamDefaultController<Uint8Array>;
  #onAbort: (() => void)[] = [];
  #drained: (() => void)[] = [];
  constructor(bufferBytes = 64 * 1024) {
    this.body = new ReadableStream<Uint8Array>({
      start: (c) => {
        this.#controller = c;
      },
      pull: () => {
        const waiting = this.#drained;
        this.#drained = [];
        for (const r of waiting) r();
      },
      cancel: () => this.abort(),
    }, new ByteLengthQueuingStrategy({ highWaterMark: bufferBytes }));
  }
  /**
   * Queues `data`: undefined when the client keeps up, else a promise settled once it has
   * read enough (or the wire is aborted).
   */
  write(data: Uint8Array | string): Promise<void> | undefined {
    if (this.aborted) return undefined;
    try {
      this.#controller.enqueue(typeof data === "string" ? encoder.encode(data) : data);
    } catch {
      this.abort();
      return undefined;
    }
    if ((this.#controller.desiredSize ?? 0) > 0) return undefined;
    return new Promise<void>((r) => this.#drained.push(r));
  }
  onAbort(fn: () => void) {
    this.#onAbort.push(fn);
  }
  abort() {
    if (this.aborted) return;
    this.aborted = true;
    for (const fn of this.#onAbort) fn();
    for (const r of this.#drained) r();
    this.#drained = [];
  }
  /**
   * Cuts the client: errors the body, so the server closes the connection. A graceful end
   * ({@link close}) is never taken by a client that does not read: its connection (and the
   * bytes queued for it) would stay open after its slot is freed.
   */
  drop() {
    this.abort();
    try {
      // Deno's server prints a body's error: a one-line string, not an Error and its stack.
      this.#controller.error("sse client too slow: connection closed");
    } catch { /* closed or cancelled already */ }
  }
  close() {
    try {
      this.#controller.close();
    } catch { /* closed or cancelled already */ }
  }
}

/** Runs `run` on an {@link SseWire} and answers with its body. */
function sseResponse(
  c: Context,
  run: (wire: SseWire) => Promise<void>,
  onError: (err: unknown, wire: SseWire) => void,
): Response {
  const wire = new SseWire();
  (async () => {
    try {
      await run(wire);
    } catch (err) {
      onError(err, wire);
    } finally {
      wire.close();
    }
  })();
  c.header("content-type", "text/event-stream");
  c.header("cache-control", "no-cache");
  c.header("connection", "keep-alive");
  return c.newResponse(wire.body);
}

/**
 * Streams events matching `sel` to the client as SSE, once the stream's set-up turn
 * ({@link SseClients.waitTurn}) has come: the response (headers included) waits for it.
 */
export async function streamEvents(
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
): Promise<Response> {
  let after: number | undefined;
  try {
    after = resumeAfter(c.req.header("Last-Event-ID"));
  } catch (err) {
    opts.clients.close(opts.key); // a refused request holds no slot
    throw err;
  }
  const signal = c.req.raw.signal;
  const closing = opts.clients.closing;
  await opts.clients.waitTurn(signal);
  if (signal.aborted) {
    // The client left while it waited: no stream to set up for nobody.
    opts.clients.close(opts.key);
    return c.body(null, 204);
  }
  if (closing.aborted) {
    opts.clients.close(opts.key);
    throw stoppingError();
  }
  const streamName = sel.stream;
  if (after !== undefined) {
    // An id past anything stored (a client of another server, or one that made it up) would
    // hide every event until the stream caught up with it: it resumes from now instead.
    const stored = await (await js.jetstreamManager(false)).streams.info(streamName)
      .then((i) => i.state.last_seq).catch(() => undefined);
    if (stored !== undefined && after > stored) after = stored;
  }
  const finalTypes = sel.finalTypes ?? new Set<string>();
  const joinFeed = () =>
    opts.feeds.join(
      streamName,
      sel.feedFilter ??
        (sel.filter.split(".").length === 3 ? `${sel.filter.split(".")[0]}.*.*` : sel.filter),
      {
        key: sel.filter,
        match: (subject) => subjectMatches(sel.filter, subject),
        ...(sel.itemId !== undefined ? { itemId: sel.itemId } : {}),
      },
    );
  const history = after !== undefined || sel.replay;
  // A live client is on the feed before its response starts: an event stored once the client
  // has its 200 reaches it. (A client with history joins after its replay, in the stream.)
  let joined: FeedSubscription | undefined;
  if (!history) {
    try {
      joined = await joinFeed();
    } catch (err) {
      opts.clients.close(opts.key);
      throw err;
    }
  }
  const sent = responseSent(c);
  return sseResponse(c, async (stream) => {
    let keepAlive: ReturnType<typeof setInterval> | undefined;
    let sub: FeedSubscription | undefined = joined;
    let last = after ?? 0;
    /** Writes `bytes` within the write timeout; false when the client is too slow. */
    const write = async (bytes: Uint8Array, firstSeq: number): Promise<boolean> => {
      const pending = stream.write(bytes);
      if (pending === undefined) return !stream.aborted; // taken at once: the usual case
      let timer: ReturnType<typeof setTimeout> | undefined;
      const timedOut = new Promise<"timeout">((r) => {
        timer = setTimeout(() => r("timeout"), opts.config.sseWriteTimeoutMs);
      });
      const outcome = await Promise.race([
        pending.then(() => "ok"),
        timedOut,
        ...(sub ? [sub.overflowed] : []),
      ]);
      clearTimeout(timer);
      if (outcome !== "ok") {
        opts.log.warn("sse client too slow: dropped", {
          filter: sel.filter,
          seq: firstSeq,
          ...(outcome === "overflow" ? { queue: "full" } : {}),
        });
        stream.drop();
        return false;
      }
      return true;
    };
    // The item's history, folded as its frames pass (a per-item stream given its state spec).
    /**
     * Whether a failure frame is a runner's: its dead letter is stored (failure_letter.ts),
     * waited for while the failure is younger than {@link LETTER_WAIT_MS} (the runner stores
     * it right after). A read that fails shows it, as before.
     */
    const vouch = async (f: Frame): Promise<boolean> => {
      const failedType = sel.state?.failedType;
      if (failedType === undefined) return true;
      let event: { id?: unknown; item_id?: unknown; time?: unknown; data?: unknown };
      try {
        event = JSON.parse(f.text);
      } catch {
        return true; // not an event: judged as before
      }
      const item = typeof event?.item_id === "string" ? event.item_id : sel.itemId!;
      const born = typeof event.time === "string" ? Date.parse(event.time) : NaN;
      const until = Math.min(
        Date.now() + LETTER_WAIT_MS,
        (Number.isNaN(born) ? 0 : born) + LETTER_WAIT_MS,
      );
      try {
        const reads = sel.letters ?? storedLetters(await js.jetstreamManager(), streamName);
        const v = await settledVerdict(
          reads,
          failedType,
          { ...event, item_id: item },
          until,
          () => stream.aborted,
          sel.state?.stageInputs,
        );
        return v.type === "vouched";
      } catch {
        return true;
      }
    };
    const judge = sel.state !== undefined && sel.itemId !== undefined && sel.closeOnFinal
      ? endJudge(sel.state, sel.itemId, finalTypes, vouch, sel.subjectPrefix)
      : undefined;
    /**
     * A frame the item's history does not lead to (a step's event or an end published with a
     * step's key for an item not at the step, which the state writer dead-letters): not shown.
     * Found by probing: a forged step event, refused by the state, was shown in the stream.
     */
    const refused = (f: Frame) => judge !== undefined && judge.refuses(f);
    /** A frame of a final type the item's history does not lead to (a forged end). */
    const forgedEnd = (f: Frame) => finalTypes.has(f.type) && refused(f);
    /** A frame of a final type whose body agrees: it ends a per-item stream. */
    const endsStream = (f: Frame) => finalTypes.has(f.type) && bodyAgrees(f) && !forgedEnd(f);
    /**
     * A frame of a final type whose body disagrees, or that the item's history does not lead
     * to: not shown in a per-item stream.
     */
    const hidden = (f: Frame) => finalTypes.has(f.type) && (!bodyAgrees(f) || forgedEnd(f));
    /** Sends one frame (a replay). */
    const send = async (f: Frame): Promise<boolean> => {
      if (!(await write(f.bytes, f.seq))) return false;
      last = f.seq;
      return true;
    };
    /**
     * Sends a live chunk: as it is (shared, no copy) when all of it is new and it ends no
     * stream; otherwise the new frames up to the end. "end" when the stream should close.
     */
    const sendChunk = async (c: Chunk): Promise<"more" | "end"> => {
      const lastSeq = c.frames[c.frames.length - 1]!.seq;
      if (lastSeq <= last) return "more"; // the replay sent all of it
      if (judge) {
        await judge.vet(c.frames);
        for (const f of c.frames) judge.fold(f);
      }
      const finals = sel.closeOnFinal && c.frames.some((f) => finalTypes.has(f.type));
      const skips = judge !== undefined && c.frames.some(refused);
      if (c.frames[0]!.seq > last && !finals && !skips) {
        if (!(await write(c.bytes, c.frames[0]!.seq))) return "end";
        last = lastSeq;
        return "more";
      }
      const end = finals ? c.frames.findIndex(endsStream) : -1;
      const frames = (end >= 0 ? c.frames.slice(0, end + 1) : c.frames)
        .filter((f) => f.seq > last && !(finals && hidden(f)) && !refused(f));
      if (frames.length > 0) {
        const part = chunkOf(frames);
        if (!(await write(part.bytes, frames[0]!.seq))) return "end";
        last = frames[frames.length - 1]!.seq;
      }
      return end >= 0 ? "end" : "more";
    };
    // The gateway stops: the stream ends now, its client told to reconnect (replays and
    // writes stop at the abort, a live wait wakes as its subscription closes).
    const stopping = () => {
      stream.write(SSE_RECONNECT);
      stream.abort();
    };
    try {
      closing.addEventListener("abort", stopping);
      if (closing.aborted) stopping();
      keepAlive = setInterval(() => {
        stream.write(": ping\n\n");
      }, opts.config.sseKeepAliveMs);
      // A replay waiting for its share of the replay budget stops waiting when its client goes.
      const gone = new AbortController();
      stream.onAbort(() => {
        sub?.close();
        gone.abort(new ClientGone());
      });
      /** Sends the stored history from `startSeq` on; "end" when the stream should close. */
      const replay = async (startSeq: number | undefined): Promise<"more" | "end"> => {
        let ended = false;
        for await (
          const m of readStream(js, streamName, {
            filter: sel.filter,
            ...(startSeq !== undefined ? { startSeq } : {}),
          })
        ) {
          if (stream.aborted) return "end";
          if (m.seq <= last) continue;
          const frame = frameOf(m);
          await judge?.vet([frame]);
          judge?.fold(frame);
          // Another item's event on this item's subject (dead-lettered by every consumer).
          if (sel.itemId !== undefined && namesAnotherItem(frame, sel.itemId)) continue;
          if (sel.closeOnFinal && (hidden(frame) || refused(frame))) continue;
          if (!(await send(frame))) return "end";
          ended = sel.closeOnFinal && endsStream(frame);
        }
        // Close at a final event only when nothing shown follows it: a redriven item's replay
        // goes past its earlier failure to the outcome of the new attempt.
        return ended ? "end" : "more";
      };
      // History first, as long as it takes, with no live queue filling meanwhile; then join
      // the live feed and replay once more what was stored between the two (a short gap):
      // nothing falls in between, and what both deliver is sent once (by sequence).
      if (history) {
        // Its reader's share of the gateway's replay budget (an item's stream's from the share
        // reserved for them), held through both replays: one
        // that waited for it again once on the live feed could see its queue overflow meanwhile.
        const budget = sel.itemId !== undefined
          ? opts.clients.itemReplayBudget
          : opts.clients.replayBudget;
        const release = await budget.acquire(
          readerPrefetch(js),
          gone.signal,
        );
        try {
          if (judge && after !== undefined) {
            // Resumed: the item's history up to where its client saw, folded, not sent.
            const upTo = readStream(js, streamName, {
              filter: sel.filter,
              ...(sel.from !== undefined ? { startSeq: sel.from } : {}),
            });
            for await (const m of upTo) {
              if (m.seq > after || stream.aborted) break;
              const frame = frameOf(m);
              await judge.vet([frame]);
              judge.fold(frame);
            }
          }
          if (await replay(after !== undefined ? after + 1 : sel.from) === "end") return;
          sub = await joinFeed();
          if (stream.aborted) return;
          if (await replay(last > 0 ? last + 1 : sel.from) === "end") return;
        } finally {
          release();
        }
      }
      sub ??= await joinFeed();
      if (stream.aborted) return;
      // A per-item stream whose client has already seen the item's final event is over
      // (a client resuming with Last-Event-ID after the end would otherwise wait forever).
      if (sel.closeOnFinal && sel.itemId !== undefined) {
        // (A final event before `from` is not this item's: an earlier life's at a reset site.)
        // (Of the ends its history leads to, when the judge folded it.)
        const fin = judge
          ? judge.lastEnd
          : await latestFinalSeq(js, streamName, finalTypes, sel.itemId, sel.subjectOf);
        if (fin !== undefined && fin >= (sel.from ?? 0) && fin <= last) return;
      }
      while (!stream.aborted) {
        const taken = await sub.take();
        if (taken === "closed") return;
        if (taken === "overflow") {
          opts.log.warn("sse client too slow: dropped", { filter: sel.filter, queue: "full" });
          stream.drop();
          return;
        }
        for (const chunk of taken) if (await sendChunk(chunk) === "end") return;
      }
    } finally {
      closing.removeEventListener("abort", stopping);
      clearInterval(keepAlive);
      sub?.close();
      // The slot is the connection's until the server has sent the response (or the client
      // left): a client cut as too slow that reads nothing keeps its connection open, the
      // server still holding what was queued for it, and freeing its slot at the cut let
      // waves of such clients hold connections past WEFT_SSE_MAX_CLIENTS.
      const freed = () => opts.clients.close(opts.key);
      if (sent) sent.then(freed, freed);
      else freed();
    }
  }, (err, stream) => {
    if (err instanceof ClientGone) return; // it left while its replay waited: nobody to tell
    opts.log.error("sse stream failed", { err });
    stream.write(`event: error\ndata: ${JSON.stringify({ error: "stream failed" })}\n\n`);
  });
}

/**
 * Settles once the server has sent the request's response in full or its client has gone:
 * `Deno.serve`'s `completed` (Hono's `c.env` under `Deno.serve(app.fetch)`); undefined
 * elsewhere (`app.request()` in tests).
 */
function responseSent(c: Context): Promise<void> | undefined {
  const completed = (c.env as { completed?: unknown } | undefined)?.completed;
  return completed instanceof Promise ? completed : undefined;
}

/** Why a replay stopped waiting for its share of the budget: its client went away. */
class ClientGone extends Error {
  constructor() {
    super("the client went away");
    this.name = "ClientGone";
  }
}

function typeOfSubject(subject: string): string {
  const parts = subject.split(".");
  if (parts.length === 3) return `${parts[0]}.${parts[1]}`;
  // A hub's copy of an edge site's event: site.<site>.<pipeline>.<event>.<item>.
  if (parts.length === 5 && parts[0] === "site") return `${parts[2]}.${parts[3]}`;
  return subject;
}
