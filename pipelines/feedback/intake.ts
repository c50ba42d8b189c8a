/**
 * Accepting feedback: the one code path behind POST /feedback, POST /feedback/batch and
 * the `weft.feedback.submit` request subject. A submission becomes a `feedback.ingested`
 * event published with a message id derived from the item id, so a repeated submission
 * within the duplicate window is dropped by the stream, and one after it is answered from
 * what the stream already holds. An Idempotency-Key is remembered in a KV bucket with
 * the first answer.
 *
 * @module
 */
import type { NatsConnection } from "@nats-io/nats-core";
import {
  jetstream,
  type JetStreamClient,
  type JetStreamManager,
  jetstreamManager,
} from "@nats-io/jetstream";
import { type KV, Kvm } from "@nats-io/kv";
import { ulid } from "ulid";
import {
  ErrorCode,
  isOutcomeUnknown,
  isWrongLastSequence,
  NotFoundError,
  OutcomeUnknownError,
  toProblem,
  ValidationError,
  WeftError,
} from "../../src/errors.ts";
import { createEvent, deterministicId } from "../../src/events.ts";
import type { FeedbackIngested, FeedbackState, FeedbackSubmission } from "./events.gen.ts";
import { canonicalJson } from "../../src/canonical_json.ts";
import { eventMessage, publishEvent } from "../../src/runner.ts";
import { allowsAtomicBatch, ATOMIC_BATCHES_IN_FLIGHT, storeBatch } from "../../src/atomic_batch.ts";
import pLimit from "p-limit";
import { type CapacityGuard, isStreamFull, streamFullError } from "../../src/capacity.ts";
import type { IngestLimiter } from "../../src/gateway/ingest_limits.ts";
import { firstEventSeq } from "../../src/state.ts";
import { applyEvent } from "./state.ts";
import { readState } from "../../src/state_writer.ts";
import { eventSubject, IDEMPOTENCY_BUCKET, ITEM_ID } from "../../src/subjects.ts";
import { FEEDBACK_STREAM, STATE_BUCKET } from "./subjects.ts";
import { FeedbackEventType } from "./events.ts";
import { ingestedEventId, itemOf } from "./stages.ts";
import { childContext, type TraceContext } from "../../src/observability/trace.ts";
import { activeTraceContext } from "../../src/observability/telemetry.ts";

/** The answer to an accepted submission. */
export interface Accepted {
  /** The item's id: the submitted one, or a new ULID. */
  id: string;
  /** Always `accepted`: the pipeline runs asynchronously. */
  status: "accepted";
  /** Where to read the item's state and events, relative to the gateway. */
  links: { state: string; events: string };
}

/** An answer and whether it repeats an earlier one. */
export interface IntakeResult<T> {
  /** The answer. */
  body: T;
  /** True when this is the first answer given again (same id or Idempotency-Key). */
  replayed: boolean;
}

/** Options of one submission. */
export interface SubmitOptions {
  /** The request's Idempotency-Key (1 to 255 characters); a repeat gets the first answer. */
  idempotencyKey?: string;
  /** The caller's trace context, continued by the ingested event; a new trace when absent. */
  trace?: TraceContext | null;
  /** Who submits: their ingest rate and daily quota are charged (see ingest_limits.ts). */
  who?: { name: string; role: string };
}

/** Accepts feedback and answers state lookups. */
export interface Intake {
  /** Accepts one submission, publishing it as a `feedback.ingested` event. */
  submit(submission: FeedbackSubmission, opts?: SubmitOptions): Promise<IntakeResult<Accepted>>;
  /** Accepts several submissions as a whole; ids may not repeat within the batch. */
  submitBatch(
    items: FeedbackSubmission[],
    opts?: SubmitOptions,
  ): Promise<IntakeResult<{ items: Accepted[] }>>;
  /** The item's state; a {@link NotFoundError} when unknown. */
  state(id: string): Promise<FeedbackState>;
  /** True when anything is known about the item. */
  exists(id: string): Promise<boolean>;
  /**
   * The stream sequence of the item's first event, where its event stream starts; null
   * when nothing is known about the item.
   */
  eventsStart(id: string): Promise<number | null>;
  /** The JetStream client it publishes with (event streams read through it too). */
  readonly js: JetStreamClient;
  /** The JetStream manager it looks up stream messages with. */
  readonly jsm: JetStreamManager;
}

const encoder = new TextEncoder();

/** The links of an item, relative to the gateway. */
export function acceptedAnswer(id: string): Accepted {
  return {
    id,
    status: "accepted",
    links: { state: `/feedback/${id}`, events: `/feedback/${id}/events` },
  };
}

/** Whose Idempotency-Keys a submission's are when it names no caller (auth off). */
const ANONYMOUS = "anonymous";

/** Creates the intake on a connection whose topology exists. */
export async function createIntake(
  nc: NatsConnection,
  source = "weft-gateway",
  opts: {
    /** Refuses new items (507) when the FEEDBACK stream is past its high-water mark. */
    capacity?: CapacityGuard;
    /** Refuses callers over their ingest rate or quota (429). */
    limiter?: IngestLimiter;
    /** Told how many new items were accepted (replays and repeats not counted). */
    onAccepted?: (count: number) => void;
  } = {},
): Promise<Intake> {
  const { capacity, limiter, onAccepted } = opts;
  const js = jetstream(nc);
  const jsm = await jetstreamManager(nc);
  const kvm = new Kvm(nc);
  const idempotency: KV = await kvm.open(IDEMPOTENCY_BUCKET);
  const states: KV = await kvm.open(STATE_BUCKET);

  /** The item's ingested event in the stream, by its subject (an indexed lookup). */
  async function ingestedInStream(
    id: string,
  ): Promise<{ event: FeedbackIngested; seq: number } | null> {
    try {
      const m = await jsm.streams.getMessage(FEEDBACK_STREAM, {
        last_by_subj: eventSubject(FeedbackEventType.Ingested, id),
      });
      return m ? { event: m.json<FeedbackIngested>(), seq: m.seq } : null;
    } catch (err) {
      if ((err as { code?: number }).code === 10037) return null; // no message found
      throw err;
    }
  }

  async function eventsStart(id: string): Promise<number | null> {
    if (!ITEM_ID.test(id)) return null;
    const stored = await readState<FeedbackState>(states, id);
    const first = stored ? firstEventSeq(stored.state) : undefined;
    if (first !== undefined) return first;
    const ingested = await ingestedInStream(id);
    if (ingested) return ingested.seq;
    return stored ? 1 : null; // known, but no event sequence recorded: from the start
  }

  /** The item's ingested event, continuing `trace`. */
  function ingestedEvent(submission: FeedbackSubmission, id: string, trace?: TraceContext | null) {
    // With telemetry on, the active span (the HTTP request's) is the trace to continue.
    const ctx = activeTraceContext() ?? childContext(trace);
    const event = createEvent({
      type: FeedbackEventType.Ingested,
      id: ingestedEventId(id),
      itemId: id,
      traceId: ctx.traceId,
      source,
      data: itemOf(submission),
    });
    return { event, ctx };
  }

  /** Publishes the item's ingested event; false when the stream already held the item's. */
  async function publish(
    submission: FeedbackSubmission,
    id: string,
    trace?: TraceContext | null,
  ): Promise<boolean> {
    const { event, ctx } = ingestedEvent(submission, id, trace);
    try {
      return await publishEvent(js, event, ctx);
    } catch (err) {
      throw isStreamFull(err) ? streamFullError(FEEDBACK_STREAM, err) : err;
    }
  }

  // Where FEEDBACK takes atomic batches (nats-server 2.14+, see src/atomic_batch.ts), a
  // batch's items are stored all or none. nats-server keeps at most 50 batches in flight
  // per stream; one gateway uses at most ATOMIC_BATCHES_IN_FLIGHT of them, so three
  // gateway replicas stay below the limit.
  let atomic = await allowsAtomicBatch(jsm, FEEDBACK_STREAM).catch(() => false);
  const batchSlots = pLimit(ATOMIC_BATCHES_IN_FLIGHT);

  /**
   * Publishes a batch's items as one atomic batch: all of them are stored, or none and the
   * request fails (a retry with the same Idempotency-Key then stores them). Items the
   * stream already has with the same body (a replay, a client-chosen id sent again) are
   * left out, as publishOnce does for one item.
   */
  async function publishBatch(
    items: readonly FeedbackSubmission[],
    ids: readonly string[],
    replay: boolean,
    trace?: TraceContext | null,
  ): Promise<boolean> {
    let oneByOne = false;
    const stored = await storeBatch<number>({
      js,
      jsm,
      stream: FEEDBACK_STREAM,
      items: items.map((_, i) => i),
      // Only a replay or a client-chosen id may be stored already; after a refusal, any.
      remaining: async (todo, again) => {
        const left = await Promise.all(todo.map(async (i) => {
          const mayExist = again || replay || items[i]!.id !== undefined;
          return !mayExist || await isNew(items[i]!, ids[i]!, `/items/${i}/id`);
        }));
        return todo.filter((_, k) => left[k]);
      },
      message: (i) => {
        const { event, ctx } = ingestedEvent(items[i]!, ids[i]!, trace);
        return eventMessage(event, ctx, true);
      },
      oneByOne: async (todo) => {
        atomic = false;
        const published = await Promise.all(
          todo.map((i) => publishOnce(items[i]!, ids[i]!, true, trace, `/items/${i}/id`)),
        );
        oneByOne ||= published.some(Boolean);
      },
      // (The batch's room was kept by its first check: this one only asks whether it is full.)
      checkCapacity: async () => (await capacity?.check(FEEDBACK_STREAM))?.(),
    });
    if (stored > 0) onAccepted?.(stored);
    return stored > 0 || oneByOne;
  }

  /**
   * False when the stream already has item `id` with this body; throws when it has it with
   * another body (a problem naming `field`, the id's pointer in the request); true when it
   * does not have it.
   */
  async function isNew(
    submission: FeedbackSubmission,
    id: string,
    field = "/id",
  ): Promise<boolean> {
    const stored = await ingestedInStream(id);
    if (!stored) return true;
    // The same id again: the same item (replay) only with the same content; another body
    // under a known id is refused, as a reused Idempotency-Key with another body is.
    if (canonicalJson(stored.event.data) !== canonicalJson(itemOf(submission))) {
      throw new WeftError(
        ErrorCode.IdempotencyMismatch,
        `item ${id} was already submitted with a different body`,
        { field },
      );
    }
    return false;
  }

  /**
   * Runs `work` once per Idempotency-Key of a caller (keys are each API key holder's own, as
   * at any API: two callers who pick the same key do not share answers); later calls get the
   * first answer.
   */
  async function once<T>(
    key: string | undefined,
    caller: string,
    request: unknown,
    answer: () => T,
    // True when it stored something the stream did not have.
    work: (answer: T, replay: boolean) => Promise<boolean>,
  ): Promise<IntakeResult<T>> {
    if (key === undefined) {
      const body = answer();
      await work(body, false);
      return { body, replayed: false };
    }
    if (key.length === 0 || key.length > 255) {
      throw new ValidationError("Idempotency-Key must be 1 to 255 characters", {
        field: "Idempotency-Key",
      });
    }
    const kvKey = deterministicId("idempotency", caller, key);
    // Canonical JSON (src/canonical_json.ts): the same request with its keys in another order matches.
    const fingerprint = deterministicId(canonicalJson(request) ?? "");
    const body = answer();
    let revision: number;
    try {
      revision = await idempotency.create(
        kvKey,
        encoder.encode(JSON.stringify({ fingerprint, body })),
      );
    } catch (err) {
      // Only the key existing is a repeat; any other failure (a timeout, a bucket without a
      // leader or refusing writes) is passed on as what it is (NATS away is 503 unavailable).
      if (!isWrongLastSequence(err)) throw err;
      const entry = await idempotency.get(kvKey);
      const prev = entry?.operation === "PUT"
        ? entry.json<{ fingerprint: string; body: T }>()
        : undefined;
      if (!entry || !prev) {
        throw new WeftError(ErrorCode.Unavailable, "idempotency record vanished");
      }
      if (prev.fingerprint !== fingerprint) {
        throw new WeftError(
          ErrorCode.IdempotencyMismatch,
          "this Idempotency-Key was used with a different request",
          { field: "Idempotency-Key" },
        );
      }
      // Publishing is idempotent (message ids), so finishing a first attempt that failed
      // half-way is safe and makes the replayed answer true. A replay only if the first
      // attempt had stored it all: one answered 503 that stored nothing is stored now.
      const fresh = await refusedLeavesKeyUnused(
        kvKey,
        entry.revision,
        () => work(prev.body, true),
      );
      return { body: prev.body, replayed: !fresh };
    }
    await refusedLeavesKeyUnused(kvKey, revision, () => work(body, false));
    return { body, replayed: false };
  }

  /**
   * Runs `work` under the Idempotency-Key record `kvKey` (at `revision`); when it is refused
   * (a 4xx: nothing was stored), the record is removed, so the key stays unused and the
   * corrected request may take it. A 5xx keeps it: its retry finishes the same request.
   */
  async function refusedLeavesKeyUnused<R>(
    kvKey: string,
    revision: number,
    work: () => Promise<R>,
  ): Promise<R> {
    try {
      return await work();
    } catch (err) {
      const { status } = toProblem(err);
      if (status >= 400 && status < 500) {
        // Only the record this request saw: one a later request wrote stays.
        await idempotency.delete(kvKey, { previousSeq: revision }).catch(() => {});
      }
      throw err;
    }
  }

  /**
   * Publishes an item unless the stream already has it. Only client-chosen ids and
   * replays can already be there, so only they pay for the look-up. True if published.
   */
  async function publishOnce(
    submission: FeedbackSubmission,
    id: string,
    mayExist: boolean,
    trace?: TraceContext | null,
    field?: string,
  ): Promise<boolean> {
    if (mayExist && !(await isNew(submission, id, field))) return false;
    if (!(await publish(submission, id, trace))) {
      // Another submission of the id stored first (a race past the look-up above): a replay
      // only with the same body, else refused like any reused id.
      await isNew(submission, id, field);
      return false;
    }
    onAccepted?.(1);
    return true;
  }

  return {
    js,
    jsm,
    async submit(submission, opts = {}) {
      if (opts.who) limiter?.take(opts.who, 1);
      const giveBack = await capacity?.check(FEEDBACK_STREAM);
      let seenBefore = false;
      const result = await once(
        opts.idempotencyKey,
        opts.who?.name ?? ANONYMOUS,
        submission,
        () => acceptedAnswer(submission.id ?? ulid()),
        async (answer, replay) => {
          const mayExist = replay || submission.id !== undefined;
          try {
            seenBefore = !(await publishOnce(submission, answer.id, mayExist, opts.trace));
            return !seenBefore;
          } catch (err) {
            // Perhaps stored (now, or when the publish queued in the client lands): the
            // answer names the id to retry with.
            throw isOutcomeUnknown(err) ? new OutcomeUnknownError(answer.id, { cause: err }) : err;
          }
        },
      ).catch((err) => {
        // Stored nothing (or, with an unknown outcome, its entry is followed once it lands):
        // the room kept for it is given back.
        giveBack?.();
        throw err;
      });
      const replayed = result.replayed || seenBefore;
      if (replayed) giveBack?.(); // the item is stored already: nothing new in flight
      return { body: result.body, replayed };
    },
    async submitBatch(items, opts = {}) {
      if (opts.who) limiter?.take(opts.who, items.length);
      // Room for each of them, given back when the request stores nothing.
      const giveBack = await capacity?.check(FEEDBACK_STREAM, items.length);
      try {
        const seen = new Set<string>();
        items.forEach((item, i) => {
          if (item.id === undefined) return;
          if (seen.has(item.id)) {
            throw new ValidationError(`/items/${i}/id repeats an id earlier in the batch`, {
              field: `/items/${i}/id`,
            });
          }
          seen.add(item.id);
        });
        const result = await once(
          opts.idempotencyKey,
          opts.who?.name ?? ANONYMOUS,
          items,
          () => ({ items: items.map((item) => acceptedAnswer(item.id ?? ulid())) }),
          async (answer, replay) => {
            const ids = answer.items.map(({ id }) => id);
            if (atomic) {
              return await batchSlots(() => publishBatch(items, ids, replay, opts.trace));
            }
            // Every id that may be stored already is looked up before any item is published,
            // so a batch refused for one item's id stores none (and leaves its key unused).
            const fresh = await Promise.all(ids.map((id, i) => {
              const item = items[i]!;
              const mayExist = replay || item.id !== undefined;
              return !mayExist || isNew(item, id, `/items/${i}/id`);
            }));
            const published = await Promise.all(ids.map((id, i) => {
              if (!fresh[i]) return false;
              return publishOnce(items[i]!, id, false, opts.trace, `/items/${i}/id`);
            }));
            return published.some(Boolean);
          },
        );
        if (result.replayed) giveBack?.(); // stored already: nothing new in flight
        return result;
      } catch (err) {
        giveBack?.();
        throw err;
      }
    },
    async state(id) {
      if (!ITEM_ID.test(id)) throw new NotFoundError(`no feedback item ${JSON.stringify(id)}`);
      const stored = await readState<FeedbackState>(states, id);
      if (stored) return stored.state;
      // Accepted but not yet folded by the state writer: answer from the stream.
      const ingested = await ingestedInStream(id);
      if (ingested) return applyEvent(undefined, ingested.event, ingested.seq);
      throw new NotFoundError(`no feedback item ${JSON.stringify(id)}`);
    },
    async exists(id) {
      return (await eventsStart(id)) !== null;
    },
    eventsStart,
  };
}
