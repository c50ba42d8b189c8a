/**
 * Keeps each item's state in the KV bucket, folded from its events.
 *
 * Per-item state must not halve throughput, so the writer neither wakes nor writes once per
 * event: it pulls events in batches (waiting `stateFlushMs` after the first one, see
 * batch_pull.ts), folds each item's events in memory and writes each item once per batch,
 * with all writes in flight together. Writes are compare-and-set on the entry's revision,
 * so concurrent writers (replicas) or a restart never lose a field: on conflict the writer
 * re-reads and folds again. Acks go out only after the write they depend on succeeded.
 *
 * @module
 */
import type { NatsConnection } from "@nats-io/nats-core";
import {
  AckPolicy,
  DeliverPolicy,
  jetstream,
  JetStreamApiCodes,
  JetStreamApiError,
  jetstreamManager,
  type JsMsg,
} from "@nats-io/jetstream";
import { type KV, Kvm } from "@nats-io/kv";
import type { Config } from "./config.ts";
import type { Logger } from "./observability/log.ts";
import { retryDelay } from "./retry.ts";
import {
  assertMatchesSubject,
  assertSubjectItem,
  deadLetter,
  decodeJson,
  messagesOn,
  storedMessage,
} from "./runner.ts";
import { ConflictError, NotFoundError } from "./errors.ts";
import {
  failureVerdict,
  letterLooks,
  letterRetryMs,
  letterWindowMs,
  type StageInputs,
  storedLetters,
} from "./failure_letter.ts";
import type { AnyEvent, EventMap } from "./schemas.ts";
import { validateEvent } from "./schemas.ts";
import { ITEM_ID, parseEventSubject } from "./subjects.ts";
import { ensureConsumer } from "./topology.ts";
import { pullBatches } from "./batch_pull.ts";
import { parseTraceparent } from "./observability/trace.ts";
import type { WeftMetrics } from "./observability/metrics.ts";

const MAX_CACHED = 20_000;
/** Most events folded in one batch. */
const MAX_BATCH = 2000;
/** Most of an item's messages read to judge an event its state does not lead to. */
const MAX_HISTORY = 1000;

/** A message's headers, as a live message (`headers`) or a stored one (`header`) has them. */
export interface HeaderReader {
  get(key: string): string;
}

/** What a state writer folds: which events, into which bucket, how. */
export interface StateSpec<S> {
  /** Durable consumer name. */
  durable: string;
  /** The stream the events are read from. */
  stream: string;
  /** Subject filter of every event to fold. */
  filter: string;
  /** The KV bucket the state is written to, one entry per item. */
  bucket: string;
  /** The event types the writer accepts; anything else is dead-lettered. */
  eventTypes: readonly (keyof EventMap)[];
  /**
   * Pure, idempotent fold of one event stored at `seq`. Undefined when the item has no state
   * and the event makes none (a definition's awaited event for an item never submitted):
   * nothing is written for it.
   */
  apply(state: S | undefined, event: AnyEvent, seq: number): S | undefined;
  /** True when nothing more will happen to the item (it leaves the cache). */
  isFinal(state: S): boolean;
  /**
   * Whether `event` alone makes a state final (`isFinal(apply(undefined, event))`, which the
   * writer computes without it): a cheaper answer, asked of every event it reads.
   */
  isFinalEvent?(event: AnyEvent): boolean;
  /**
   * The pipeline's failure event type (`orders.failed`): one folds only when a runner's dead
   * letter is stored for it ({@link failureVerdict}); the writer dead-letters any other
   * `conflict`, failing nothing. Unset: failures are folded as they come.
   */
  failedType?: string;
  /**
   * What each of the pipeline's stages consumes: a failure whose letter names a message its
   * stage does not consume is refused like one without a letter ({@link StageInputs}).
   */
  stageInputs?: StageInputs;
  /** Recorded as the source of dead letters. */
  source: string;
  /**
   * Decodes and checks an event itself (a definition's pipeline), instead of schemas/ and
   * `eventTypes`; it must check that the event is about the item its subject names.
   * `storedAt`: when the server stored the message (ms since the epoch), the time of a
   * message that carries none of its own (an awaited event), the same live and in a rebuild.
   */
  decode?(raw: unknown, subject: string, storedAt: number, headers?: HeaderReader): AnyEvent;
  /**
   * True for a subject whose invalid messages another consumer of the stream dead-letters
   * (a definition's awaited events: its control step, which acts on them). The writer skips
   * such a message it cannot read (acks it, counts it in `stats.skipped`, logs it at debug),
   * so the message has one dead letter, not two.
   */
  lettersElsewhere?(subject: string): boolean;
  /**
   * Whether `event` may start an item's state: the item's entry event (an order's
   * `orders.submitted`), or the failure its intake published for it. With {@link entrySubject},
   * an item starts only so: any other event for an item with no state, and nothing stored on
   * its entry subject before it, is dead-lettered `not_found` and folds nothing (a step's
   * key publishing its own event for an id that never entered makes no item). A rebuild and a
   * hub's view of a site's items skip it alike.
   */
  starts?(event: AnyEvent): boolean;
  /** The subject an item's entry event is stored on (`orders.submitted.<item>`). */
  entrySubject?(item: string): string;
  /**
   * Why the item's history, folded into `state`, does not lead to `event` (stored at `seq`),
   * else undefined: a step's event for an item that has not reached the step (the shipping
   * step's key publishing `orders.shipped` for an order waiting for approval). Such an event
   * is not folded ({@link foldLed}): it changes no state, outcome or time. The writer
   * dead-letters it `conflict`, failing nothing, and a rebuild skips it. The writer's `state`
   * may lack events stored before `event` that reach it later (a redelivery after a restart,
   * another writer's batch): it then judges `event` on the item's events stored before it, read
   * from the stream in order, and folds it when they lead there.
   */
  refuses?(state: S, event: AnyEvent, seq: number): string | undefined;
  /**
   * The highest stream sequence folded into `state`, for a fold that refuses, itself, what
   * `refuses` refuses (a definition's): a writer whose state lacks events stored before one
   * it is given (delivered later) folds them first, read from the stream, those after this.
   */
  lastSeq?(state: S): number;
}

/**
 * Folds `event`, stored at `seq`, into `state` as `spec`'s state writer does once the item's
 * events stored before it are folded: not at all when the item's history does not lead to it
 * ({@link StateSpec.refuses}). What a rebuild, a hub's view of a site's items and the writer's
 * own judgement fold with.
 *
 * @example
 * ```ts ignore
 * for (const { event, seq } of history) state = foldLed(spec, state, event, seq);
 * ```
 */
export function foldLed<S>(
  spec: StateSpec<S>,
  state: S | undefined,
  event: AnyEvent,
  seq: number,
): S | undefined {
  if (state !== undefined && spec.refuses?.(state, event, seq) !== undefined) return state;
  return spec.apply(state, event, seq);
}

/**
 * Whether `event`, the first seen for an item with no state, folds nothing under `spec`'s rule
 * that an item starts only at its entry event ({@link StateSpec.starts}), unless something was
 * stored on the item's entry subject before it.
 */
export function startsNoItem<S>(spec: StateSpec<S>, event: AnyEvent): boolean {
  return spec.starts !== undefined && spec.entrySubject !== undefined && !spec.starts(event);
}

/** A running state writer. */
export interface StateWriter {
  /**
   * Events read, state writes made, write conflicts retried, batches folded, and invalid
   * messages skipped (another consumer dead-letters them: {@link StateSpec.lettersElsewhere}).
   */
  readonly stats: {
    events: number;
    writes: number;
    conflicts: number;
    batches: number;
    skipped: number;
  };
  /** Stops pulling, waits (up to the drain deadline) for pending writes, then returns. */
  stop(): Promise<void>;
  /** Resolves when the writer has stopped, after writing everything it held. */
  readonly done: Promise<void>;
}

/** An item's events not written yet, and since when (ms, `performance.now()`). */
interface Held<S = unknown> {
  msgs: JsMsg[];
  events: { event: AnyEvent; seq: number }[];
  since: number;
  final: boolean;
  /**
   * What to fold instead of `events`, in order: the item's events stored up to the last of
   * them that its history leads to, when its state lacked some of those (see `screen`).
   */
  fold?: { event: AnyEvent; seq: number }[];
  /**
   * The state `screen` folded `events` into (nothing refused), from `from`, the item's cached
   * state then: written as it is while the cache still holds `from`, not folded again.
   */
  folded?: { from: S | undefined; to: S | undefined };
}

interface Cached<S> {
  state: S;
  revision: number;
}

function isWrongLastSequence(err: unknown): boolean {
  if (!(err instanceof JetStreamApiError)) return false;
  return err.code === JetStreamApiCodes.StreamWrongLastSequence ||
    err.code === JetStreamApiCodes.StreamWrongLastSequenceUnknown;
}

const encoder = new TextEncoder();

/**
 * The event a state writer of `spec` folds from one message of its stream: its body decoded
 * and checked (by `spec.decode`, or against `spec.eventTypes` and its subject), `storedAt`
 * being when the server stored it. Throws, with the reason, for a message the writer does
 * not fold (it dead-letters it, or skips it: {@link StateSpec.lettersElsewhere}). A rebuild
 * and a hub's view of an edge site's items fold through this too, so they fold exactly what
 * the writer does.
 *
 * @example
 * ```ts ignore
 * const event = decodeStateEvent(spec, m.data, m.subject, m.time.getTime(), m.headers);
 * ```
 */
export function decodeStateEvent<S>(
  spec: StateSpec<S>,
  data: Uint8Array,
  subject: string,
  storedAt: number,
  headers?: HeaderReader,
): AnyEvent {
  // `<pipeline>.<type>.<item>`: a token that is no item id (a wildcard) names none.
  const parts = subject.split(".");
  if (parts.length === 3) assertSubjectItem(parts[2], subject);
  const raw = decodeJson(data);
  if (spec.decode) return spec.decode(raw, subject, storedAt, headers);
  const event = validateEvent(raw, spec.eventTypes);
  assertMatchesSubject(event, subject);
  return event;
}

/** The body when it is JSON, else undefined (what a dead letter keeps of it). */
function tryDecodeJson(data: Uint8Array): unknown {
  try {
    return decodeJson(data);
  } catch {
    return undefined;
  }
}

/** Reads an item's state from the bucket; null when there is none. */
export async function readState<S>(
  kv: KV,
  id: string,
): Promise<{ state: S; revision: number } | null> {
  const e = await kv.get(id);
  if (!e || e.operation !== "PUT" || e.length === 0) return null;
  return { state: e.json<S>(), revision: e.revision };
}

/**
 * Starts the state writer of `spec`: a hand-wired pipeline's (its `pipelines/<name>/state.ts`),
 * or a definition's (pipelineStateSpec).
 */
export async function runStateWriter<S>(opts: {
  nc: NatsConnection;
  config: Pick<
    Config,
    "stateFlushMs" | "ackWaitMs" | "maxAttempts" | "retryBaseMs" | "retryMaxMs" | "drainMs"
  >;
  log: Logger;
  now?: () => Date;
  spec: StateSpec<S>;
  /** Where the writer counts events and observes end-to-end latency. */
  metrics?: WeftMetrics;
}): Promise<StateWriter> {
  const metrics = opts.metrics;
  const { nc, config } = opts;
  const spec = opts.spec;
  const log = opts.log.with({ stage: spec.durable });
  const now = opts.now ?? (() => new Date());
  const js = jetstream(nc);
  const jsm = await jetstreamManager(nc);
  const kv = await new Kvm(nc).open(spec.bucket);
  const consumerConfig = {
    durable_name: spec.durable,
    description: "Weft state writer: folds every event into the item's KV entry",
    filter_subject: spec.filter,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    ack_wait: config.ackWaitMs * 1_000_000,
    // Two past its last attempt (a failure's letter looked for: letterLooks), for what dies in it.
    max_deliver: letterLooks(config.maxAttempts) + 2,
    max_ack_pending: 20_000,
  };
  await ensureConsumer(jsm, spec.stream, consumerConfig);
  const consumer = await js.consumers.get(spec.stream, spec.durable);
  // One wake-up per batch, not per event (see batch_pull.ts): the writer reads every
  // event of every item, so this is most of what per-item state costs.
  const batches = pullBatches(consumer, {
    lingerMs: config.stateFlushMs,
    maxBatch: MAX_BATCH,
    log,
    onError: () => ensureConsumer(jsm, spec.stream, consumerConfig).then(() => {}, () => {}),
  });
  const stats = { events: 0, writes: 0, conflicts: 0, batches: 0, skipped: 0 };
  const cache = new Map<string, Cached<S>>();
  const dlContext = { js, stage: spec.durable, source: spec.source, now, log };

  function remember(id: string, entry: Cached<S>) {
    cache.delete(id);
    if (spec.isFinal(entry.state)) return;
    cache.set(id, entry);
    if (cache.size > MAX_CACHED) cache.delete(cache.keys().next().value!);
  }

  /** Observes end-to-end latency once, when an item's state first becomes final. */
  function observeFinal(before: S | undefined, after: S) {
    if (!metrics || !spec.isFinal(after) || (before !== undefined && spec.isFinal(before))) return;
    const t = after as { created_at?: string; updated_at?: string; status?: string };
    const seconds = (Date.parse(t.updated_at ?? "") - Date.parse(t.created_at ?? "")) / 1000;
    if (seconds >= 0) {
      metrics.endToEndSeconds.observe(
        { stage: spec.durable, outcome: t.status ?? "final" },
        seconds,
      );
    }
  }

  /** Writes one item's new events; returns when written (or throws). */
  async function writeItem(
    id: string,
    events: { event: AnyEvent; seq: number }[],
    folded?: Held<S>["folded"],
  ) {
    let base: Cached<S> | null = cache.get(id) ?? null;
    let read = base !== null;
    for (let attempt = 0; attempt < 10; attempt++) {
      let state = base?.state;
      if (attempt === 0 && folded !== undefined && folded.from === state) {
        state = folded.to; // `screen` folded these very events onto this very state
      } else for (const { event, seq } of events) state = spec.apply(state, event, seq);
      if (state === undefined) {
        // Events that make no state alone: folded onto the bucket's state if it has one the
        // cache lacks, else nothing is written (no item is made up from them).
        if (!read) {
          base = await readState<S>(kv, id);
          read = true;
          if (base) continue;
        }
        log.debug("no state written: the item has none, and its events make none", {
          item_id: id,
          stream_seq: events.map((e) => e.seq),
        });
        return;
      }
      if (base && state === base.state) return; // nothing new: a redelivery
      const body = encoder.encode(JSON.stringify(state));
      try {
        const revision = base
          ? await kv.update(id, body, base.revision)
          : await kv.create(id, body);
        stats.writes++;
        observeFinal(base?.state, state!);
        remember(id, { state: state!, revision });
        return;
      } catch (err) {
        if (!isWrongLastSequence(err) && !String((err as Error).message).includes("exists")) {
          throw err;
        }
        stats.conflicts++;
        cache.delete(id);
        base = await readState<S>(kv, id);
        read = true;
      }
    }
    throw new Error(`state of ${id} kept changing under the writer`);
  }

  /**
   * The events of `group` that may fold: all of them for an item with state (cached, else in
   * the bucket), and from its first event that starts one ({@link StateSpec.starts}) or that
   * follows a message on its entry subject (an entry its consumer refused as invalid, and
   * failed the item for, still makes the item known). Those before are for an item that never
   * entered: dead-lettered `not_found`, folding nothing. Costs nothing on the usual path: an
   * item's first events reach the writer with its entry event, and its later ones find it
   * cached; otherwise one read of the bucket, and one of the stream when it has no state.
   */
  async function admit(id: string, group: Held<S>): Promise<Held<S>> {
    if (cache.has(id) || !spec.starts || !spec.entrySubject) return group;
    const from = group.events.findIndex(({ event }) => spec.starts!(event));
    if (from === 0) return group;
    try {
      const stored = await readState<S>(kv, id);
      if (stored) {
        remember(id, stored);
        return group;
      }
      const entry = await storedMessage(jsm, spec.stream, {
        next_by_subj: spec.entrySubject(id),
        seq: 0,
      } as unknown as { seq: number });
      const after = group.events.findIndex(({ seq }, i) =>
        (from >= 0 && i >= from) || (entry !== null && entry.seq < seq)
      );
      const orphans = after < 0 ? group.events.length : after;
      await Promise.all(
        group.msgs.slice(0, orphans).map(async (m, i) => {
          const { event, seq } = group.events[i]!;
          if (spec.lettersElsewhere?.(m.subject)) {
            // Its consumer judges it (and letters what it refuses): here it only makes no item.
            stats.skipped++;
            m.ack();
            return;
          }
          await letter(
            m,
            event,
            id,
            new NotFoundError(
              `no item ${
                JSON.stringify(id)
              }: a ${event.type} event counts only for an item whose ` +
                `entry event (${spec.entrySubject!(id)}) was stored before it, and none was ` +
                `(stream sequence ${seq}); no state was made`,
            ),
          );
        }),
      );
      return {
        ...group,
        msgs: group.msgs.slice(orphans),
        events: group.events.slice(orphans),
      };
    } catch (err) {
      // Cannot tell now (NATS trouble): the whole group is retried, as a failed write is.
      log.warn("state write failed", { item_id: id, err });
      await Promise.all(group.msgs.map((m, i) => putOff(m, group.events[i]!.event, id, err)));
      return { ...group, msgs: [], events: [] };
    }
  }

  /** The subject filter of one item's events (`orders.*.<item>`); undefined when unknown. */
  const itemFilter = (id: string) =>
    spec.filter.endsWith(".*") ? `${spec.filter.slice(0, -1)}${id}` : undefined;

  /**
   * Which of `seqs` (events of item `id`) the item's history does not lead to, with the
   * reason, and the events it leads to (`led`, in order): the item's events read from the
   * stream in order up to the last of them, folded as a rebuild folds them ({@link foldLed}).
   */
  async function refusedByHistory(
    id: string,
    seqs: number[],
  ): Promise<{ reasons: Map<number, string>; led: { event: AnyEvent; seq: number }[] }> {
    const filter = itemFilter(id)!;
    const last = Math.max(...seqs);
    const wanted = new Set(seqs);
    const reasons = new Map<number, string>();
    const led: { event: AnyEvent; seq: number }[] = [];
    let state: S | undefined;
    let entered = false;
    // Direct reads (a writer may read its stream's messages, not open consumers on it); an
    // item's events are few.
    const history = messagesOn(jsm, spec.stream, filter, { before: last + 1, max: MAX_HISTORY });
    for await (const m of history) {
      entered ||= spec.entrySubject?.(id) === m.subject;
      let event: AnyEvent;
      try {
        event = decodeStateEvent(spec, m.data, m.subject, m.time.getTime(), m.header);
      } catch {
        continue; // dead-lettered, never folded
      }
      if (state === undefined && startsNoItem(spec, event) && !entered) continue;
      const reason = state === undefined ? undefined : spec.refuses!(state, event, m.seq);
      if (reason !== undefined) {
        if (wanted.has(m.seq)) reasons.set(m.seq, reason);
        continue;
      }
      state = spec.apply(state, event, m.seq);
      led.push({ event, seq: m.seq });
    }
    return { reasons, led };
  }

  /**
   * Dead-letters `event` (stored at `seq`, delivered as `m`) `conflict`, not folded, failing
   * nothing (`why` says what its item's history does not lead to); naked when the letter
   * cannot be stored.
   */
  async function refuse(m: JsMsg, event: AnyEvent, seq: number, id: string, why: string) {
    await letter(
      m,
      event,
      id,
      new ConflictError(
        `${event.type} of item ${JSON.stringify(id)} (stream sequence ${seq}) was not ` +
          `folded: ${why}`,
        { permanent: true },
      ),
    );
  }

  /** Dead-letters `event` of item `id` with `err`, failing nothing; naked when it cannot be. */
  async function letter(m: JsMsg, event: AnyEvent, id: string, err: unknown) {
    await deadLetter(
      dlContext,
      m,
      err,
      event,
      id,
      parseTraceparent(m.headers?.get("traceparent")),
      { failItem: false },
    )
      .then(() => metrics?.deadLettered.inc({ stage: spec.durable }))
      .catch(() => m.nak(1000));
  }

  /**
   * Puts `m` (event `event` of item `id`) off after NATS trouble (`err`): naked to come back
   * after `ms` (by default the retry back-off), unless the server delivers it no more after
   * this delivery (its `max_deliver`): then it is dead-lettered with `err`, never dropped
   * unseen (found by reading: a read refused on every delivery left the event unfolded, with
   * no letter and no trace but a log line).
   */
  async function putOff(m: JsMsg, event: AnyEvent, id: string, err: unknown, ms?: number) {
    const delivery = m.info.deliveryCount;
    if (delivery < consumerConfig.max_deliver) {
      m.nak(ms ?? retryDelay(delivery, config.retryBaseMs, config.retryMaxMs));
      return;
    }
    await letter(m, event, id, err instanceof Error ? err : new Error(String(err)));
  }

  /**
   * The events of `group` but the failures no runner's dead letter is stored for
   * ({@link StateSpec.failedType}): those are dead-lettered `conflict`, failing nothing and
   * folding nothing (found by probing: a step's key publishing the pipeline's failure for an
   * item waiting for a decision made it read as failed). A failure whose letter is not stored
   * yet (the runner stores it right after) comes back later, until {@link letterWindowMs}
   * after it was stored. Only failures are read for: nothing on the usual path.
   */
  const letterWindow = letterWindowMs(config.ackWaitMs);
  async function vouch(id: string, group: Held<S>): Promise<Held<S>> {
    const failedType = spec.failedType;
    if (failedType === undefined || !group.events.some((e) => e.event.type === failedType)) {
      return group;
    }
    const kept: Held<S> = { ...group, msgs: [], events: [] };
    const verdicts = await Promise.all(
      group.events.map(({ event }) =>
        event.type !== failedType
          ? undefined
          : failureVerdict(storedLetters(jsm, spec.stream), failedType, event, spec.stageInputs)
            .catch(
              (err: unknown) => {
                log.warn("state write failed", { item_id: id, err });
                return { type: "retry" as const, err };
              },
            )
      ),
    );
    await Promise.all(group.msgs.map(async (m, i) => {
      const verdict = verdicts[i];
      const { event, seq } = group.events[i]!;
      if (verdict === undefined || verdict.type === "vouched") return;
      const age = Date.now() - m.info.timestampNanos / 1e6;
      const delivery = m.info.deliveryCount;
      const looks = letterLooks(config.maxAttempts);
      const later = letterRetryMs(age, letterWindow, delivery, looks);
      if (verdict.type === "retry") return await putOff(m, event, id, verdict.err, later);
      if (verdict.type === "pending" && age < letterWindow && delivery < looks + 1) {
        m.nak(later);
        return;
      }
      await refuse(m, event, seq, id, verdict.reason);
    }));
    group.msgs.forEach((m, i) => {
      const v = verdicts[i];
      if (v === undefined || v.type === "vouched") {
        kept.msgs.push(m);
        kept.events.push(group.events[i]!);
      }
    });
    return kept;
  }

  /**
   * The events of `group` the item's history leads to ({@link StateSpec.refuses}); the others
   * are dead-lettered `conflict`, failing nothing, and fold nothing. Judged on the item's state
   * (cached, else in the bucket, unless the group starts the item) with the group's earlier
   * events folded in; an event that state does not lead to is judged again on the item's events
   * stored before it, read from the stream in order (the state may lack some of them: delivered
   * later, after a restart or in another writer's batch). When those lead to it, the group
   * comes back with `fold`: the item's events up to it as read, the state's missing ones among
   * them, to fold in order before it. On the usual path (the item cached or new, nothing
   * refused) this costs no read, only one more pass of the fold in memory.
   */
  async function screen(id: string, group: Held<S>): Promise<Held<S>> {
    if (!spec.refuses || group.events.length === 0) return group;
    let to: S | undefined;
    const refusedOn = (base: S | undefined) => {
      const out = new Map<number, string>();
      let state = base;
      group.events.forEach(({ event, seq }, i) => {
        const reason = state === undefined ? undefined : spec.refuses!(state, event, seq);
        if (reason !== undefined) out.set(i, reason);
        else state = spec.apply(state, event, seq);
      });
      to = state;
      return out;
    };
    let reasons: Map<number, string>;
    let led: { event: AnyEvent; seq: number }[] | undefined;
    try {
      const cached = cache.get(id)?.state;
      let base = cached;
      // Not cached (a restart; an item that ended, which leaves the cache): its state in the
      // bucket, unless the group starts with an event that starts an item (a new one).
      if (base === undefined && spec.starts?.(group.events[0]!.event) !== true) {
        base = (await readState<S>(kv, id))?.state;
      }
      const refused = refusedOn(base);
      // Nothing refused: the fold made here, from the cached state (not one read from the
      // bucket, which writeItem does not start from), is the one to write: one fold per event.
      if (refused.size === 0) {
        return base === cached ? { ...group, folded: { from: base, to } } : group;
      }
      if (itemFilter(id) === undefined) {
        reasons = new Map([...refused].map(([i, why]) => [group.events[i]!.seq, why]));
      } else {
        const seqs = [...refused.keys()].map((i) => group.events[i]!.seq);
        ({ reasons, led } = await refusedByHistory(id, seqs));
        // Led there by events its state lacks (stored after what it folded, delivered later):
        // those are folded first, in order, as a rebuild folds them. Folded onto the state
        // alone, such a fold would refuse the event again and take nothing from it.
        if (spec.lastSeq && seqs.some((seq) => !reasons.has(seq))) {
          const upTo = Math.max(...seqs);
          const from = base === undefined ? 0 : spec.lastSeq(base);
          led = [
            ...group.events.filter(({ seq }) => seq <= from),
            ...led.filter(({ seq }) => seq > from),
            ...group.events.filter(({ seq }) => seq > upTo),
          ].filter(({ seq }) => !reasons.has(seq));
        } else led = undefined;
      }
    } catch (err) {
      // Cannot tell now (NATS trouble): the whole group is retried, as a failed write is.
      log.warn("state write failed", { item_id: id, err });
      await Promise.all(group.msgs.map((m, i) => putOff(m, group.events[i]!.event, id, err)));
      return { ...group, msgs: [], events: [] };
    }
    if (reasons.size === 0) return led ? { ...group, fold: led } : group;
    const kept: Held<S> = { ...group, msgs: [], events: [], ...(led ? { fold: led } : {}) };
    await Promise.all(group.msgs.map(async (m, i) => {
      const { event, seq } = group.events[i]!;
      const why = reasons.get(seq);
      if (why === undefined) {
        kept.msgs.push(m);
        kept.events.push(group.events[i]!);
        return;
      }
      await refuse(m, event, seq, id, why);
    }));
    // (Pushed in order above: `map` runs each callback up to its first await in turn.)
    return kept;
  }

  // An item's events usually arrive within a few ms of each other. Writing once per batch
  // would still split many items over two batches, so an item whose last event is not
  // final is held until it is, or until it has waited `stateFlushMs`: the next batch
  // (due about `stateFlushMs` later) writes it, or when no batch comes, a timer at twice
  // that. Mostly one write per item; state trails its events by at most about
  // 3 x `stateFlushMs` (linger, hold, timer).
  const held = new Map<string, Held<S>>();
  let closing = false;

  /** ms until the earliest held item must be written without a batch; undefined: none held. */
  function nextDue(now: number): number | undefined {
    let since = Infinity;
    for (const h of held.values()) if (h.since < since) since = h.since;
    return since === Infinity ? undefined : Math.max(0, since + 2 * config.stateFlushMs - now);
  }

  async function flush(batch: JsMsg[]) {
    if (batch.length > 0) stats.batches++;
    const at = performance.now();
    for (const m of batch) {
      stats.events++;
      metrics?.received.inc({ stage: spec.durable });
      try {
        // Headers only for a spec that reads them: parsing each message's costs CPU per event.
        const hdrs = spec.decode ? m.headers : undefined;
        const event = decodeStateEvent(spec, m.data, m.subject, m.time.getTime(), hdrs);
        let group = held.get(event.item_id);
        if (!group) {
          held.set(event.item_id, group = { msgs: [], events: [], since: at, final: false });
        }
        group.msgs.push(m);
        group.events.push({ event, seq: m.seq });
        // An event that alone makes a state final is the item's last one.
        if (!group.final) {
          if (spec.isFinalEvent) group.final = spec.isFinalEvent(event);
          else {
            const alone = spec.apply(undefined, event, m.seq);
            group.final = alone !== undefined && spec.isFinal(alone);
          }
        }
      } catch (err) {
        if (spec.lettersElsewhere?.(m.subject)) {
          // Its consumer keeps it as a dead letter, with the reason: one letter, not two.
          stats.skipped++;
          m.ack();
          log.debug("invalid message skipped: another consumer dead-letters it", {
            subject: m.subject,
            stream_seq: m.seq,
            reason: (err as Error).message,
          });
          continue;
        }
        // A poison event: the stage that consumes it dead-letters it with the item's
        // failure; here it is only kept (naming the subject's item, failing nothing), so
        // the state writer is not stuck on it.
        const raw = tryDecodeJson(m.data);
        const named = parseEventSubject(m.subject)?.itemId ?? m.subject.split(".")[2];
        await deadLetter(
          dlContext,
          m,
          err,
          raw,
          named !== undefined && ITEM_ID.test(named) ? named : undefined,
          parseTraceparent(m.headers?.get("traceparent")),
          { failItem: false },
        )
          .then(() => metrics?.deadLettered.inc({ stage: spec.durable }))
          .catch(() => m.nak(1000));
      }
    }
    const now = performance.now();
    const due = [...held].filter(([, h]) =>
      closing || h.final || now - h.since >= config.stateFlushMs
    );
    for (const [id] of due) held.delete(id);
    await Promise.all(due.map(async ([id, all]) => {
      const group = await screen(id, await vouch(id, await admit(id, all)));
      if (group.events.length === 0) return;
      try {
        await writeItem(id, group.fold ?? group.events, group.fold ? undefined : group.folded);
        for (const m of group.msgs) m.ack();
        metrics?.processed.inc({ stage: spec.durable }, group.msgs.length);
      } catch (err) {
        log.warn("state write failed", { item_id: id, err });
        metrics?.failed.inc({ stage: spec.durable, code: "state_write_failed" });
        await Promise.all(group.msgs.map(async (m, i) => {
          if (m.info.deliveryCount < config.maxAttempts) {
            metrics?.retried.inc({ stage: spec.durable });
            m.nak(retryDelay(m.info.deliveryCount, config.retryBaseMs, config.retryMaxMs));
            return;
          }
          // Its last attempt (the server delivers it no more after a few): kept as a dead
          // letter with the reason, not dropped unseen. The item's state lacks it until a
          // redrive (or rebuild-state) folds it in.
          await letter(m, group.events[i]!.event, id, err);
        }));
      }
    }));
  }

  const done = (async () => {
    let timer: ReturnType<typeof setTimeout> | undefined;
    let flushing: Promise<void> = Promise.resolve();
    const enqueue = (batch: JsMsg[]) => {
      if (timer !== undefined) clearTimeout(timer);
      timer = undefined;
      flushing = flushing.then(() => flush(batch)).then(() => {
        // Held items are due at their deadline even when no message comes in between.
        const wait = nextDue(performance.now());
        if (wait !== undefined && timer === undefined) timer = setTimeout(() => enqueue([]), wait);
      });
      return flushing;
    };
    // Backpressure: the next pull starts only when this batch is written.
    for await (const batch of batches) await enqueue(batch);
    closing = true; // write everything held before stopping
    await enqueue([]);
    if (timer !== undefined) clearTimeout(timer);
  })();

  log.info("state writer started", { bucket: spec.bucket, flush_ms: config.stateFlushMs });
  return {
    stats,
    done,
    async stop() {
      batches.close();
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([done, new Promise((r) => (timer = setTimeout(r, config.drainMs)))]);
      clearTimeout(timer);
      log.info("state writer stopped", stats);
    },
  };
}
