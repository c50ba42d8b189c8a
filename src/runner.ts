/**
 * The one runner behind every stage. It alone knows NATS: it binds the stage's durable
 * consumer, decodes and validates each message, calls the pure handler, publishes what it
 * returns (with message ids, so a redelivery never yields a second downstream event, and
 * a traceparent header), acks, retries failures with backoff, keeps slow handlers' leases
 * with in-progress acks, dead-letters what cannot succeed, and drains on stop.
 *
 * @module
 */
import {
  LETTER_WAIT_MS,
  settledVerdict,
  type StageInputs,
  storedLetters,
} from "./failure_letter.ts";
import { Buffer } from "node:buffer";
import { headers, type MsgHdrs, type NatsConnection } from "@nats-io/nats-core";
import {
  type ConsumerMessages,
  jetstream,
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamClient,
  type JetStreamManager,
  jetstreamManager,
  type JsMsg,
  type MsgRequest,
  type PubAck,
  type StoredMsg,
} from "@nats-io/jetstream";
import type { Span } from "@opentelemetry/api";
import type { Config } from "./config.ts";
import {
  ConflictError,
  ErrorCode,
  errorCode,
  isPermanent,
  NotFoundError,
  toDeadLetterReason,
  ValidationError,
  WeftError,
} from "./errors.ts";
import { deterministicId, sha256Hex } from "./events.ts";
import { canonicalDigest, canonicalJson } from "./canonical_json.ts";
import type { DeadLetter } from "./events.gen.ts";
import { isStreamFull } from "./capacity.ts";
import { duplicateName } from "./duplicate_names.ts";
import { inexactNumber } from "./exact_numbers.ts";
import { type FaultConfig, withFaults } from "./faults.ts";
import type { Logger } from "./observability/log.ts";
import { retryDelay } from "./retry.ts";
import {
  type EventEnvelope,
  type EventMap,
  isEntryEvent,
  knownEventTypes,
  validateDocument,
  validateEvent,
} from "./schemas.ts";
import type { InputOf, MessageInfo, OutputEvent, Stage, StageInput } from "./stage.ts";
import {
  DEADLETTER_STREAM,
  deadLetterSubject,
  eventSubject,
  HANDOVER_HEADER,
  ITEM_ID,
  parseEventSubject,
  REDRIVE_ITEM_HEADER,
  REDRIVE_OF_HEADER,
} from "./subjects.ts";
import { BACKLOG_SEQ_KEY, stageConsumerConfig } from "./topology.ts";
import { ensureConsumer } from "./topology.ts";
import { versionAtLeast } from "./nats_server.ts";
import {
  EXPECTED_LAST_SUBJECT_SEQ,
  type LastMessage,
  lastMessagesReader,
  storedFirstOnSubject,
  subjectPattern,
} from "./last_messages.ts";
import {
  childContext,
  formatTraceparent,
  parseTraceparent,
  type TraceContext,
} from "./observability/trace.ts";
import { WeftMetrics } from "./observability/metrics.ts";
import {
  activeTraceContext,
  recordFailure,
  SpanKind,
  startSpan,
  traceContextOf,
  withSpan,
} from "./observability/telemetry.ts";

/** Counters a runner keeps; metrics read them. */
export interface StageStats {
  /** Messages taken from the consumer, redeliveries included. */
  received: number;
  /** Messages handled, published and acked. */
  processed: number;
  /** Failed attempts handed back for a later retry. */
  retried: number;
  /** Messages given up on and dead-lettered. */
  deadLettered: number;
  /** Events published from handler outputs. */
  published: number;
  /** Sum of handler times, ms. */
  handlerMs: number;
}

/** A running stage. */
export interface StageRunner {
  /** Live counters of this runner. */
  readonly stats: Readonly<StageStats>;
  /** Stops fetching, waits (up to the drain deadline) for in-flight work, then returns. */
  stop(): Promise<void>;
  /** Resolves when the runner has stopped, by `stop()` or because its consumer ended. */
  readonly done: Promise<void>;
}

/** What {@link runStage} needs. */
export interface RunStageOptions<I extends StageInput> {
  /** The NATS connection the runner consumes and publishes on. */
  nc: NatsConnection;
  /** The stage to run. */
  stage: Stage<I>;
  /** Concurrency, retry, ack-wait and drain settings, and optional fault injection. */
  config:
    & Pick<
      Config,
      "concurrency" | "maxAttempts" | "ackWaitMs" | "retryBaseMs" | "retryMaxMs" | "drainMs"
    >
    & Partial<Pick<Config, "handlerTimeoutMs">>
    & Partial<FaultConfig>;
  /** Where the runner logs. */
  log: Logger;
  /** Recorded as the `source` of events; defaults to `weft-<stage>`. */
  source?: string;
  /** The clock handlers and dead letters see; defaults to the system clock. */
  now?: () => Date;
  /** Where the stage's Prometheus metrics go; a private registry when absent. */
  metrics?: WeftMetrics;
}

const utf8 = new TextDecoder("utf-8", { fatal: true });
const encoder = new TextEncoder();
/** Originals larger than this are kept only in the dead letter, not on the failed event. */
const MAX_ORIGINAL_ON_EVENT = 256 * 1024;

/**
 * The data of the event an item fails with when a stage gives up on it (`<pipeline>.failed`):
 * one shape in every pipeline (each one's `schemas/<pipeline>.failed.v1.json`).
 */
export interface ItemFailedData {
  /** The stage that gave up on the item. */
  stage: string;
  /** Stable error code, e.g. invalid_event, handler_failed. */
  code: string;
  /** Why the stage gave up. */
  reason: string;
  /** Deliveries made before the stage gave up. */
  attempts: number;
  /** Where the original message is kept in the DEADLETTER stream. */
  dead_letter_subject: string;
  /** The subject the stage gave up on the message on (a redrive republishes it there). */
  subject?: string;
  /** The id of the event the stage gave up on, when it is a Weft event (even a large one). */
  event_id?: string;
  /**
   * SHA-256 of the canonical JSON of the message the stage gave up on (even a large one): a
   * copy stored again resumes the item only with this digest (a redrive's, byte for byte).
   */
  original_sha256?: string;
  /** The message the stage gave up on, when small and shallow enough. */
  original?: Record<string, unknown>;
}

/** Deepest nesting of arrays and objects a message may have; deeper is poison. */
export const MAX_DEPTH = 64;
/**
 * Largest payload a dead letter carries in full. A letter must fit the server's message
 * limit (1 MB) after JSON escaping (up to 2x for quotes and backslashes, 6x for control
 * characters) or base64 (4/3x); a larger original is kept truncated, with its size and
 * SHA-256, and stays whole in its own stream at `stream_seq`.
 */
const MAX_LETTER_PAYLOAD = 128 * 1024;

/**
 * True when `value` nests arrays and objects at most `max` levels deep. Iterative, so it
 * is safe on any input (JSON.parse accepts nesting that recursive code cannot walk).
 *
 * @example
 * ```ts
 * import { depthWithin } from "./runner.ts";
 * console.assert(depthWithin({ a: [1, { b: 2 }] }, 3));
 * console.assert(!depthWithin(JSON.parse("[".repeat(100) + "]".repeat(100)), 64));
 * ```
 */
export function depthWithin(value: unknown, max: number): boolean {
  const stack: [unknown, number][] = [[value, 0]];
  while (stack.length > 0) {
    const [v, depth] = stack.pop()!;
    if (v === null || typeof v !== "object") continue;
    if (depth >= max) return false;
    for (const child of Array.isArray(v) ? v : Object.values(v)) stack.push([child, depth + 1]);
  }
  return true;
}

/** A dead letter's copy of the original body: whole when it fits, else its head and hash. */
function payloadOf(data: Uint8Array): Pick<
  DeadLetter,
  "payload" | "payload_encoding" | "payload_truncated" | "payload_size" | "payload_sha256"
> {
  const hash = sha256Hex(data);
  const truncated = data.length > MAX_LETTER_PAYLOAD;
  const head = truncated ? data.subarray(0, MAX_LETTER_PAYLOAD) : data;
  let payload: string;
  let encoding: "utf8" | "base64" = "utf8";
  try {
    payload = utf8.decode(head);
  } catch {
    payload = Buffer.from(head).toString("base64");
    encoding = "base64";
  }
  return {
    payload,
    payload_encoding: encoding,
    payload_size: data.length,
    payload_sha256: hash,
    ...(truncated ? { payload_truncated: true } : {}),
  };
}

/**
 * Decodes a message body as JSON; a {@link ValidationError} when it is not, or when it holds a
 * number a JavaScript number cannot keep or an object that writes one name twice (naming it).
 */
export function decodeJson(data: Uint8Array): unknown {
  let text: string;
  try {
    text = utf8.decode(data);
  } catch (cause) {
    throw new ValidationError("body is not valid UTF-8", {
      code: ErrorCode.InvalidEvent,
      field: "/",
      cause,
    });
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (cause) {
    throw new ValidationError(`body is not JSON: ${(cause as Error).message}`, {
      code: ErrorCode.InvalidEvent,
      field: "/",
      cause,
    });
  }
  const inexact = inexactNumber(text);
  if (inexact) {
    const at = inexact.pointer || "/";
    throw new ValidationError(
      `${at}: the number ${inexact.source} cannot be kept as written (beyond ±1.7e308, or an ` +
        "integer past 2^53, which would be rounded): send it as a string",
      { code: ErrorCode.InvalidField, field: at },
    );
  }
  const twice = duplicateName(text);
  if (twice !== undefined) {
    throw new ValidationError(
      `${twice}: this member is written twice in one object (JSON.parse would keep only the ` +
        "last, and another reader the first): send it once",
      { code: ErrorCode.InvalidField, field: twice },
    );
  }
  return value;
}

/** The decoded body when it is JSON, else undefined (for naming its item). */
function tryDecode(data: Uint8Array): unknown {
  try {
    return decodeJson(data);
  } catch {
    return undefined;
  }
}

/** Validates a decoded body as what the stage consumes. */
export function validateInput<I extends StageInput>(input: I, value: unknown): InputOf<I> {
  if (input.kind === "event") return validateEvent(value, input.types) as InputOf<I>;
  try {
    return validateDocument(input.name, value) as InputOf<I>;
  } catch (err) {
    if (err instanceof ValidationError) {
      throw new ValidationError(err.message, {
        code: ErrorCode.InvalidEvent,
        field: err.field,
        cause: err,
      });
    }
    throw err;
  }
}

/**
 * Refuses a message whose subject names its item with a token that is no item id (ITEM_ID:
 * 1 to 64 of `A-Z a-z 0-9 _ -`): a literal `*` or `>` published as a subject names no item,
 * and taken for one it would match other items' subjects in a lookup, or be refused as a KV
 * key and retried. `item` undefined: the subject names none. Permanent: dead-lettered at once,
 * failing no item.
 *
 * @example
 * ```ts
 * import { assertSubjectItem } from "./runner.ts";
 * assertSubjectItem("o1", "orders.approved.o1");
 * try {
 *   assertSubjectItem("*", "orders.approved.*");
 * } catch (err) {
 *   console.assert((err as { code: string }).code === "invalid_event");
 * }
 * ```
 */
export function assertSubjectItem(item: string | undefined, subject: string): void {
  if (item === undefined || ITEM_ID.test(item)) return;
  throw new WeftError(
    ErrorCode.InvalidEvent,
    `invalid item id ${JSON.stringify(item.slice(0, 100))} in subject ${subject.slice(0, 300)}: ` +
      `an item id is 1 to 64 of A-Z a-z 0-9 _ - (a wildcard names no item); nothing was changed`,
  );
}

/** `item` when it is an item id (ITEM_ID), else undefined: what a dead letter may name. */
function validItem(item: string | undefined): string | undefined {
  return item !== undefined && ITEM_ID.test(item) ? item : undefined;
}

/** The item an event-shaped raw message is about, as far as it can be told. */
export function itemIdOf(raw: unknown): string | undefined {
  const candidate = (raw as { item_id?: unknown } | null)?.item_id;
  return typeof candidate === "string" && ITEM_ID.test(candidate) ? candidate : undefined;
}

function typeOfRaw(raw: unknown): string | undefined {
  const t = (raw as { type?: unknown } | null)?.type;
  return typeof t === "string" ? t : undefined;
}

function traceIdOf(raw: unknown, fromHeader?: TraceContext | null): string | undefined {
  if (fromHeader) return fromHeader.traceId;
  const t = (raw as { trace_id?: unknown } | null)?.trace_id;
  return typeof t === "string" && /^[0-9a-f]{32}$/.test(t) ? t : undefined;
}

/**
 * Refuses an event whose body disagrees with the subject it came on: the subject
 * (`<pipeline>.<type>.<item_id>`) is what NATS permissions guard, so it, not the body,
 * says which item an event is about and what it is.
 *
 * @example
 * ```ts
 * import { assertMatchesSubject } from "./runner.ts";
 * import { registerEvents } from "./schemas.ts";
 * // (A pipeline's events module registers its events; subjects of others are refused.)
 * registerEvents({
 *   events: { "orders.priced": { $id: "orders.priced", properties: { version: { const: 1 } } } },
 * });
 * assertMatchesSubject({ type: "orders.priced", item_id: "a" }, "orders.priced.a");
 * try {
 *   assertMatchesSubject({ type: "orders.priced", item_id: "victim" }, "orders.priced.a");
 * } catch (err) {
 *   console.assert((err as { code: string }).code === "subject_mismatch");
 * }
 * ```
 */
export function assertMatchesSubject(
  event: { type: string; item_id: string },
  subject: string,
): void {
  const s = parseEventSubject(subject);
  if (!s) {
    throw new WeftError(
      ErrorCode.SubjectMismatch,
      `subject ${JSON.stringify(subject)} is not an event subject (<pipeline>.<type>.<item_id>)`,
      { field: "/type" },
    );
  }
  if (event.type !== s.type) {
    throw new WeftError(
      ErrorCode.SubjectMismatch,
      `event type ${JSON.stringify(event.type)} does not match its subject ${subject}`,
      { field: "/type" },
    );
  }
  if (event.item_id !== s.itemId) {
    throw new WeftError(
      ErrorCode.SubjectMismatch,
      `item_id ${JSON.stringify(event.item_id)} does not match its subject ${subject}`,
      { field: "/item_id" },
    );
  }
}

/** True when a publish was refused because its subject already holds a message. */
export function isAlreadyStored(err: unknown): boolean {
  return err instanceof JetStreamApiError &&
    err.code === JetStreamApiCodes.StreamWrongLastSequence;
}

/**
 * Publishes one event with its message id and a traceparent in the trace.
 *
 * An item's entry event ({@link isEntryEvent}: its pipeline registered it as one) is published with "expected last subject
 * sequence 0": the stream stores it only if its subject holds nothing yet, so a re-sent
 * submission can never start an item twice, whatever the duplicate window. A refusal means
 * the event is already stored, which is success: then it resolves to false, as it does for a
 * duplicate (true when this call stored it). A caller that must know the stored event is its
 * own (an intake comparing bodies) looks it up on false.
 */
export async function publishEvent(
  js: JetStreamClient,
  event: OutputEvent,
  parent: TraceContext | null,
  entry: boolean = isEntryEvent(event.type),
  /**
   * Where the item's entry event is stored: what a once-per-item output's subject holds from
   * before it is not the item's (an event for the id published before it entered).
   */
  entrySubject?: string,
  /**
   * Whether an event held on the subject carries the item's input as `event` does
   * (`Stage.inputOf`): one that carries another is not the item's, and `event` is stored
   * after it. Without it, any valid event of the type for the item is taken for its own.
   */
  sameInput?: (held: unknown) => boolean,
  /** `Stage.storedStands`: whether an event held on the subject is one the item's state takes. */
  stands?: (held: { type: string; seq: number; raw: unknown }) => Promise<boolean>,
  /**
   * Where the step's input for the item is stored (`Stage.inputSubject`): what the subject holds
   * from before the first message there is no output of the step, and `event` is stored after it.
   */
  inputSubject?: string,
): Promise<boolean> {
  const m = eventMessage(event, parent, entry);
  try {
    // A duplicate (the stream already holds a message under this event id, on this subject)
    // was not stored by this call. An entry event's id follows from its item alone, so the
    // message held may carry another body: nats-server 2.9 answers a second entry event of
    // an item within the duplicate window so, not with the expected-sequence refusal. A
    // message held under the event's id is judged as a once-per-item refusal's would be
    // (found by probing: a step's key published its event for an item not yet at the step,
    // under the id the step's own would carry; the step's own was then answered "duplicate"
    // and dropped, and the item stopped there for good with no letter): when it is junk, the
    // event is published after it (on nats-server 2.9, whose outputs rely on their ids alone,
    // as a second message on the subject).
    const own = heldIsEvent(js, event, entrySubject, sameInput, stands, inputSubject);
    return !(await publishUnique(js, m.subject, m.data, m.headers, own)).duplicate;
  } catch (err) {
    if (isOverMaxPayload(err)) throw tooLargeToPublish(event, m.data.length, err);
    if (!entry || !isAlreadyStored(err)) throw err;
    return await publishAfterJunk(js, event, m, entrySubject, sameInput, stands, inputSubject);
  }
}

/**
 * After an entry event's publish stored nothing (the item's entry is stored already): throws a
 * permanent conflict when the stored one carries another input than `event`, as `inputOf`
 * reads them (the item's id taken by another body). One it cannot read as an event of the
 * item, or none, is no conflict.
 */
async function assertSameEntry(
  jsm: JetStreamManager,
  stream: string,
  inputOf: (event: unknown) => unknown,
  event: OutputEvent,
): Promise<void> {
  const held = await storedMessage(jsm, stream, {
    last_by_subj: eventSubject(event.type, event.item_id),
  });
  if (!held) return;
  const body = tryDecode(held.data) as { type?: unknown; item_id?: unknown } | null;
  if (body?.type !== event.type || body.item_id !== event.item_id) return;
  if (canonicalJson(inputOf(body)) !== canonicalJson(inputOf(event))) {
    throw new ConflictError(
      `item ${event.item_id} was already submitted with a different body; the first stands`,
      { permanent: true },
    );
  }
}

/** Whether `held` carries the item's input as `event` does, as `stage.inputOf` reads them. */
function sameInputOf(stage: Pick<Stage, "inputOf">, held: unknown, event: OutputEvent): boolean {
  return canonicalJson(stage.inputOf!(held)) === canonicalJson(stage.inputOf!(event));
}

/**
 * Whether a message held on `event`'s subject is that event, stored already: the event's type
 * and item, valid, no hand-over's copy, and (each when given) stored after the item's entry
 * and the step's first input for it, carrying the item's input, and taken by the item's
 * state. What a once-per-item publish refused (or answered "duplicate") looks for.
 */
function heldIsEvent(
  js: JetStreamClient,
  event: OutputEvent,
  entrySubject?: string,
  sameInput?: (held: unknown) => boolean,
  stands?: (held: { type: string; seq: number; raw: unknown }) => Promise<boolean>,
  inputSubject?: string,
): (held: Pick<StoredMsg, "header" | "data" | "seq">) => Promise<boolean> {
  const known = event.type in knownEventTypes();
  const subject = eventSubject(event.type, event.item_id);
  let since: Promise<number> | undefined;
  /** Where the item entered, or reached the step: what is stored before is none of its. */
  const enteredAt = async () => {
    const jsm = await js.jetstreamManager(false);
    const stream = await jsm.streams.find(subject);
    let entered = entrySubject === undefined ? 0 : (await storedMessage(
      jsm,
      stream,
      { next_by_subj: entrySubject, seq: 0 } as unknown as MsgRequest,
    ))?.seq ?? 0;
    if (inputSubject !== undefined) {
      // The item reached the step with its first input stored after its entry.
      const reached = await storedMessage(
        jsm,
        stream,
        { next_by_subj: inputSubject, seq: entered + 1 } as unknown as MsgRequest,
      );
      if (reached) entered = reached.seq;
    }
    return entered;
  };
  const isIt = (raw: unknown, seq: number, entered: number, stored: Pick<StoredMsg, "header">) => {
    if (seq < entered) return false;
    // A hand-over's copy is not the event: the running definition's hand-over stores one only
    // after the event itself, on the same subject, and every consumer but the steps it names
    // acks it unread. Taken for the event, one a step's key stored first, naming no step, kept
    // the step's own event from the stream, and the item stopped there with no dead letter.
    if (stored.header?.get(HANDOVER_HEADER)) return false;
    try {
      const e = raw as { type?: unknown; item_id?: unknown };
      if (e?.type !== event.type || e.item_id !== event.item_id) return false;
      if (known) validateEvent(raw, [event.type as keyof EventMap]);
      return sameInput === undefined || sameInput(raw);
    } catch {
      return false;
    }
  };
  return async (held) => {
    since ??= enteredAt();
    const raw = tryDecode(held.data);
    return isIt(raw, held.seq, await since, held) &&
      (stands === undefined || await stands({ type: event.type, seq: held.seq, raw }));
  };
}

/** Stream sequences a runner remembers having acked, for redeliveries crossing their ack. */
const RECENT_ACKS = 1024;

/** Most messages on one item's subject read to find the event a refusal says is there. */
const MAX_SUBJECT_SCAN = 64;

/**
 * After a once-per-item publish was refused ("expected last subject sequence 0"): whether the
 * subject holds an event of this type for this item. If it holds only messages that are none
 * (not JSON, another type, one its schema refuses: published there by anyone who may; with
 * `entrySubject`, one stored before the item's entry event, i.e. before the item existed; with
 * `sameInput`, one carrying another input than the item's; with `inputSubject`, one stored
 * before the step's first input for the item, i.e. before the item reached the step; a
 * hand-over's copy, its `Weft-Handover-To` header set; with `stands`, one the item's state does
 * not take), the event is published after them, against the subject's last message, so junk
 * stored first cannot keep the item from its event. True when this call stored it.
 */
async function publishAfterJunk(
  js: JetStreamClient,
  event: OutputEvent,
  m: { subject: string; data: Uint8Array; headers: MsgHdrs },
  entrySubject?: string,
  sameInput?: (held: unknown) => boolean,
  stands?: (held: { type: string; seq: number; raw: unknown }) => Promise<boolean>,
  inputSubject?: string,
): Promise<boolean> {
  const jsm = await js.jetstreamManager(false);
  const stream = await jsm.streams.find(m.subject);
  const taken = heldIsEvent(js, event, entrySubject, sameInput, stands, inputSubject);
  for (let attempt = 0; attempt < 5; attempt++) {
    // The usual refusal (a re-sent submission, a redelivery): the event is the subject's last.
    const newest = await jsm.streams.getMessage(stream, { last_by_subj: m.subject })
      .catch(() => null);
    if (newest && await taken(newest)) return false;
    let last = 0;
    for await (const held of messagesOn(jsm, stream, m.subject, { max: MAX_SUBJECT_SCAN })) {
      if (await taken(held)) return false; // stored already: success
      last = held.seq;
    }
    // Nothing readable there (last 0) is no proof it is stored: what the refusal was for may be
    // gone since (deleted, purged, aged out), or, in a cluster, was a publish on the subject
    // still in flight (nats-server refuses an expected subject sequence while one is), that
    // may never be stored. Taken as stored, the step acked its input and the item stalled with
    // no letter (found by reading; a test deletes the message in between): published again
    // as the subject's first, and a subject that keeps refusing fails to be retried.
    m.headers.set(EXPECTED_LAST_SUBJECT_SEQ, String(last));
    try {
      return !(await publishUnique(js, m.subject, m.data, m.headers, taken)).duplicate;
    } catch (err) {
      if (!isAlreadyStored(err)) throw err;
      // Something was stored on the subject meanwhile: look again.
    }
  }
  throw new WeftError(ErrorCode.Unavailable, `${m.subject} kept changing under a once publish`);
}

/**
 * Publishes a message carrying a `Nats-Msg-Id` and makes sure the stream holds *it*. A
 * PubAck that says "duplicate" answers whatever message took that id first within the
 * stream's duplicate window: a redelivery's own copy (fine), or, since ids follow from the
 * item and are predictable, a message published on purpose under a future event's id by
 * anyone who may publish on the stream, which would have the event dropped in silence.
 * When the message stored under the id is on another subject, or is a hand-over's copy
 * (`Weft-Handover-To`, which the steps it does not name skip), this one is published again
 * without the id (its other headers, such as "expected last subject sequence", still hold).
 */
export async function publishUnique(
  js: JetStreamClient,
  subject: string,
  data: Uint8Array,
  hdrs: MsgHdrs,
  /**
   * Whether the message held under the id on this subject is this one (its event, stored
   * before); by default any but a hand-over's copy is. One that is not is junk stored first
   * under a predictable id, and this message is published again without the id.
   */
  isOwn?: (held: StoredMsg) => Promise<boolean>,
): Promise<PubAck> {
  const ack = await js.publish(subject, data, { headers: hdrs });
  if (!ack.duplicate) return ack;
  const jsm = await js.jetstreamManager(false);
  // A read that fails (no stream leader during an election, a timeout) says nothing of what
  // is held: retried, not taken for this message (taken, junk under a predictable id stood
  // in for the event whenever the read failed, and the item stopped with no letter). One
  // gone since (purged, aged out) is taken, as before.
  const stored = await storedMessage(jsm, ack.stream, { seq: ack.seq }).catch((err) => {
    throw new WeftError(
      ErrorCode.Unavailable,
      `${subject}: the stream answered "duplicate" for message id ` +
        `${hdrs.get("Nats-Msg-Id")} and the message it holds under it could not be read: ` +
        `retried`,
      { cause: err },
    );
  });
  // On this subject, it is this message, unless it is a hand-over's copy: a hand-over stores
  // its copies under ids of their own, so one under this id was published by hand.
  if (
    !stored ||
    (stored.subject === subject && !stored.header?.get(HANDOVER_HEADER) &&
      (isOwn === undefined || await isOwn(stored)))
  ) return ack;
  const again = headers();
  for (const [k, v] of hdrs) if (k !== "Nats-Msg-Id") { for (const x of v) again.append(k, x); }
  return await js.publish(subject, data, { headers: again });
}

/** The client's refusal of a message over the server's `max_payload`: no retry can pass it. */
function isOverMaxPayload(err: unknown): boolean {
  return err instanceof Error && /max_payload/.test(err.message);
}

/** A permanent error for an event over the server's message size limit. */
function tooLargeToPublish(event: OutputEvent, bytes: number, cause: unknown): WeftError {
  return new WeftError(
    ErrorCode.PayloadTooLarge,
    `event ${event.type} of item ${event.item_id} is ${bytes} bytes, more than the server ` +
      `takes in one message (max_payload)`,
    { cause, field: "/" },
  );
}

/**
 * An event as the message {@link publishEvent} publishes: its subject, JSON body, and
 * headers (traceparent, `Weft-Event-Type`, its event id as `Nats-Msg-Id`, and for an entry
 * event "expected last subject sequence 0"). An atomic batch of entry events
 * (src/atomic_batch.ts) sends the same messages.
 */
export function eventMessage(
  event: OutputEvent,
  parent: TraceContext | null,
  entry: boolean = isEntryEvent(event.type),
): { subject: string; data: Uint8Array; headers: MsgHdrs } {
  const h = headers();
  h.set(
    "traceparent",
    formatTraceparent(
      // With telemetry on, the active span (the stage's consumer span, the gateway's
      // HTTP span) is the parent of the next hop; otherwise a new span id per hop.
      activeTraceContext() ??
        childContext(parent ?? { traceId: event.trace_id, spanId: "", sampled: true }),
    ),
  );
  h.set("Weft-Event-Type", event.type);
  // What nats.js's msgID and expect options set, as headers, so a batch carries them too.
  h.set("Nats-Msg-Id", event.id);
  if (entry) h.set(EXPECTED_LAST_SUBJECT_SEQ, "0");
  return {
    subject: eventSubject(event.type, event.item_id),
    data: encoder.encode(JSON.stringify(event)),
    headers: h,
  };
}

/**
 * True when `m` is the first message stored on its subject, or carries the same event as
 * the first (a redrive republishes it byte for byte, under the same event id).
 */
async function isFirstEntry(
  jsm: JetStreamManager,
  stream: string,
  m: JsMsg,
  eventId: string,
): Promise<boolean> {
  // Stored under "expected last subject sequence 0", checked against its own subject (the
  // headers are stored with it): the server let it in only as the first message on its
  // subject, so no lookup is needed. Anything else (a redrive, a message published without the
  // check) is looked up.
  if (m.headers && storedFirstOnSubject({ headers: m.headers })) return true;
  // STREAM.MSG.GET takes next_by_subj (nats-server 2.9+); nats.js types only seq/last_by_subj.
  const first = await jsm.streams.getMessage(
    stream,
    { next_by_subj: m.subject, seq: 0 } as unknown as MsgRequest,
  );
  if (!first || first.seq === m.seq) return true;
  try {
    return (first.json<{ id?: unknown }>()).id === eventId;
  } catch {
    return false;
  }
}

/**
 * Throws `not_found` (permanent) unless `item`'s entry event is stored on `entrySubject`
 * before stream sequence `seq`: a message of an item that never entered (or entered only
 * after it) is run by no step; its dead letter fails nothing, there being no item.
 */
async function assertEntered(
  jsm: JetStreamManager,
  stream: string,
  entrySubject: string,
  seq: number,
  item: string,
  type: string | undefined,
): Promise<void> {
  const first = await storedMessage(
    jsm,
    stream,
    { next_by_subj: entrySubject, seq: 0 } as unknown as MsgRequest,
  );
  if (first && first.seq <= seq) return; // (equal: this message is the entry itself)
  throw new NotFoundError(
    `no item ${JSON.stringify(item)}: ${type ?? "this event"} counts only for an item whose ` +
      `entry event (${entrySubject}) was stored before it, and none was (stream sequence ` +
      `${seq}); nothing was run`,
  );
}

/**
 * The outputs a previous delivery of the same message already stored: on a redelivery the
 * runner publishes only the others, so a plain (core NATS) subscriber does not see an event
 * twice. Looks at the last message on each output's subject (its message id).
 */
async function alreadyStored(
  jsm: JetStreamManager,
  stream: string,
  outputs: OutputEvent[],
  /**
   * Whether a message held under an event's id is that event (`heldIsEvent`): ids are
   * predictable, and junk stored first under one (found by probing: a step's event published
   * for an item before it reached the step) is not the event, whatever id it carries.
   */
  isOwn?: (event: OutputEvent) => (held: StoredMsg) => Promise<boolean>,
): Promise<Set<OutputEvent>> {
  const stored = new Set<OutputEvent>();
  await Promise.all(outputs.map(async (event) => {
    try {
      const last = await jsm.streams.getMessage(stream, {
        last_by_subj: eventSubject(event.type, event.item_id),
      });
      if (
        last?.header.get("Nats-Msg-Id") === event.id && (!isOwn || await isOwn(event)(last))
      ) stored.add(event);
    } catch {
      // Nothing stored on that subject (or the lookup failed): publish as usual, the
      // stream's de-duplication still stores it once.
    }
  }));
  return stored;
}

/** Refused: the item already has one of its stage's `outcomes` (a `conflict`, failing nothing). */
class OutcomeTaken extends WeftError {
  constructor(type: string, seq: number) {
    super(
      ErrorCode.Conflict,
      `the item already has its outcome ${type} (stream sequence ${seq})`,
      { permanent: true },
    );
  }
}

/**
 * An outcome the item already has, stored under another event id than the one `outputs`
 * would publish (`taken`), and those of `outputs`' outcomes stored already (`stored`: a
 * redelivery's or a redriven copy's own output is not a conflict, and is not stored again).
 */
async function outcomeTaken(
  jsm: JetStreamManager,
  stream: string,
  outputs: OutputEvent[],
  outcomes: ReadonlySet<string>,
  /** Whether a stored outcome is the item's (`Stage.holdsOutcome`); by default every one is. */
  holds?: (item: string, held: { type: string; seq: number }) => Promise<boolean>,
  /** The item's subjects' last messages, read at once ({@link ItemLasts}); null: one by one. */
  lasts: ItemLasts | null = null,
): Promise<{ taken?: { type: string; seq: number }; stored: OutputEvent[] }> {
  const mine = outputs.filter((e) => outcomes.has(e.type));
  if (mine.length === 0) return { stored: [] };
  const byId = new Map(mine.map((e) => [e.id, e]));
  const item = mine[0]!.item_id;
  // A lookup that cannot tell throws: the message is retried like any failed publish.
  const found = await Promise.all([...outcomes].map(async (type) => {
    const last = await lastOnItem(jsm, stream, eventSubject(type, item), lasts);
    if (!last) return undefined;
    const own = byId.get(last.msgId);
    // One its history does not lead to is not the item's: it takes nothing, and is not this
    // message's own either, whatever id it was stored under (ids are predictable: one stored
    // first under the outcome's own id had the outcome skipped as stored already).
    if (holds && !(await holds(item, { type, seq: last.seq }))) return undefined;
    if (own) return { own };
    return { taken: { type, seq: last.seq } };
  }));
  return {
    taken: found.find((f) => f?.taken)?.taken,
    stored: found.flatMap((f) => (f?.own ? [f.own] : [])),
  };
}

/** The message of `stream` that `query` names; null when there is none (any other error throws). */
export async function storedMessage(
  jsm: JetStreamManager,
  stream: string,
  query: Parameters<JetStreamManager["streams"]["getMessage"]>[1],
) {
  try {
    return await jsm.streams.getMessage(stream, query);
  } catch (err) {
    if (err instanceof JetStreamApiError && err.code === JetStreamApiCodes.NoMessageFound) {
      return null;
    }
    throw err;
  }
}

/**
 * The messages stored on `subject` in `stream`, oldest first: from stream sequence `from`
 * (default the first), before `before` (default no bound), at most `max` (default 64), one
 * direct read each (STREAM.MSG.GET with next_by_subj, nats-server 2.9+; nats.js types only
 * seq and last_by_subj). For an item's own subject, which holds a few.
 *
 * @example
 * ```ts ignore
 * for await (const m of messagesOn(jsm, "ORDERS", "orders.approved.o1")) console.log(m.seq);
 * ```
 */
export async function* messagesOn(
  jsm: JetStreamManager,
  stream: string,
  subject: string,
  opts: { from?: number; before?: number; max?: number } = {},
): AsyncGenerator<StoredMsg> {
  const before = opts.before ?? Infinity;
  for (let seq = opts.from ?? 1, n = 0; seq < before && n < (opts.max ?? 64); n++) {
    const m = await storedMessage(jsm, stream, { next_by_subj: subject, seq } as unknown as {
      seq: number;
    });
    if (!m || m.seq >= before) return;
    yield m;
    seq = m.seq + 1;
  }
}

/**
 * Whether item `item` of pipeline `name` has failed and not been resumed since: its last
 * `failed` event is not followed by the message it failed on, stored again by a redrive (the
 * same event id, when the failure names one: an item's timers all share one subject, so
 * another timer of the item stored after the failure resumes nothing; and the same body, by
 * the digest the failure records: a copy with its id and another body is no redrive). Read
 * from the stream (direct reads, only when a timer fires, a decision comes or a step would end
 * the item), not from the item's state, which trails. `lastFailure`: the item's last `failed`
 * message when the caller has read it already (not read again); `inputs`: what each of the
 * pipeline's stages consumes ({@link StageInputs}).
 */
export async function itemFailedNow(
  jsm: JetStreamManager,
  stream: string,
  name: string,
  item: string,
  lastFailure?: { seq: number; time?: Date; json(): unknown },
  inputs?: StageInputs,
): Promise<boolean> {
  const last = async (subject: string) => {
    try {
      return await jsm.streams.getMessage(stream, { last_by_subj: subject });
    } catch {
      return null;
    }
  };
  let failed: { seq: number; time?: Date; json(): unknown } | null = lastFailure ??
    await last(`${name}.failed.${item}`);
  if (!failed) return false;
  // Only a failure a runner's dead letter is stored for counts (failure_letter.ts): found by
  // probing, a step's key publishing the failure of an item waiting for a decision made the
  // decision answer 409. The item's earlier failures are read only when its last one is such.
  if (!(await failureCounts(jsm, stream, `${name}.failed`, failed, inputs))) {
    failed = null;
    const earlier = { before: lastFailure?.seq ?? Infinity };
    try {
      for await (const m of messagesOn(jsm, stream, `${name}.failed.${item}`, earlier)) {
        if (
          m.seq < (lastFailure?.seq ?? Infinity) &&
          await failureCounts(jsm, stream, `${name}.failed`, m, inputs)
        ) failed = m;
      }
    } catch {
      return true; // as still failed, asked about again later
    }
    if (!failed) return false;
  }
  let on: unknown;
  let eventId: unknown;
  let digest: string | undefined;
  try {
    const data = (failed.json() as {
      data?: {
        subject?: unknown;
        event_id?: unknown;
        original_sha256?: unknown;
        original?: unknown;
      };
    }).data;
    on = data?.subject;
    eventId = data?.event_id;
    // (A failure stored before the digest was recorded has the message itself, when small.)
    digest = typeof data?.original_sha256 === "string"
      ? data.original_sha256
      : data?.original !== undefined
      ? canonicalDigest(data.original)
      : undefined;
  } catch {
    return true;
  }
  if (typeof on !== "string") return true;
  const again = await last(on);
  if (!again || again.seq <= failed.seq) return true;
  if (typeof eventId !== "string" && digest === undefined) return false;
  const isIt = (m: { json(): unknown }) => {
    try {
      const body = m.json() as { id?: unknown } | null;
      if (typeof eventId === "string" && body?.id !== eventId) return false;
      return digest === undefined || canonicalDigest(body) === digest;
    } catch {
      return false; // not JSON: not the one it failed on
    }
  };
  if (isIt(again)) return false;
  // The messages on the subject between the failure and the last one, up to a bound (an
  // item's own subject holds a few; past it the item is taken as still failed, and is asked
  // about again later). A read that fails counts the same.
  try {
    const between = { from: failed.seq + 1, before: again.seq, max: 256 };
    for await (const m of messagesOn(jsm, stream, on, between)) if (isIt(m)) return false;
  } catch {
    // as still failed
  }
  return true;
}

/**
 * Whether failure `m` counts: a runner's dead letter is stored for it, or it is younger than
 * {@link LETTER_WAIT_MS} with none yet (the runner stores it right after). A read that fails
 * counts it.
 *
 * @example
 * ```ts ignore
 * if (await failureCounts(jsm, "ORDERS", "orders.failed", lastFailure)) console.log("failed");
 * ```
 */
export async function failureCounts(
  jsm: JetStreamManager,
  stream: string,
  failedType: string,
  m: { time?: Date; json(): unknown },
  inputs?: StageInputs,
): Promise<boolean> {
  let event: { id?: unknown; item_id?: unknown; data?: unknown };
  try {
    event = m.json() as typeof event;
  } catch {
    return false; // not JSON: no runner's failure
  }
  if (event === null || typeof event !== "object" || typeof event.item_id !== "string") {
    return false;
  }
  try {
    const item_id = event.item_id;
    // Its letter may be on its way (the runner stores it right after): asked again until the
    // failure is LETTER_WAIT_MS old. Taken for failed meanwhile, a forged failure had dispatch
    // dead-letter the item's next event for good (found by probing).
    const born = m.time?.getTime() ?? Date.now();
    const verdict = await settledVerdict(
      storedLetters(jsm, stream),
      failedType,
      { ...event, item_id },
      born + LETTER_WAIT_MS,
      undefined,
      inputs,
    );
    return verdict.type === "vouched";
  } catch {
    return true;
  }
}

/** The last message stored on `subject` in `stream` (a wildcard too); null when there is none. */
function lastOn(jsm: JetStreamManager, stream: string, subject: string) {
  return storedMessage(jsm, stream, { last_by_subj: subject });
}

/**
 * The last message on each subject of an item (`<pipeline>.*.<item>`, `subject`), read in one
 * batched direct get (nats-server 2.11+) where a stage would otherwise read its outcomes'
 * subjects and its history's end one request each (`STREAM.MSG.GET`, a JetStream API call:
 * five per item for a step publishing an outcome after another event, four times the CPU of
 * the one read, client and server, measured 2026-12-07).
 */
interface ItemLasts {
  /** The item's subjects, as a filter. */
  subject: string;
  pattern: RegExp;
  messages: Map<string, LastMessage>;
}

/**
 * The last message on `subject`: from `lasts` when its read covers the subject, else read.
 * Its sequence and message id; null when there is none.
 */
async function lastOnItem(
  jsm: JetStreamManager,
  stream: string,
  subject: string,
  lasts: ItemLasts | null,
): Promise<{ seq: number; msgId: string } | null> {
  if (lasts && lasts.pattern.test(subject)) {
    const m = lasts.messages.get(subject);
    return m ? { seq: m.seq, msgId: m.headers.get("Nats-Msg-Id") } : null;
  }
  const m = await lastOn(jsm, stream, subject);
  return m ? { seq: m.seq, msgId: m.header.get("Nats-Msg-Id") } : null;
}

/** The subjects of `event`'s item in its stream: `<pipeline>.*.<item>`. */
function itemSubjects(event: { type: string; item_id: string }): string {
  return `${event.type.slice(0, event.type.indexOf("."))}.*.${event.item_id}`;
}

/** A handler's longest call when the configuration names none (`WEFT_HANDLER_TIMEOUT_MS`). */
const DEFAULT_HANDLER_TIMEOUT_MS = 300_000;

/**
 * Handler calls in flight, each with a signal that aborts when the stage stops or its call
 * passes `ms`: a call that has not answered by then fails (a retryable handler failure), so a
 * handler awaiting something that never comes cannot hold its message, and its item, for
 * ever. One sweep timer for the stage, not one timer per message (the hot path).
 */
function callDeadlines(ms: number, stop: AbortSignal) {
  type Call = { at: number; controller: AbortController; fail: (err: Error) => void };
  const calls = new Set<Call>();
  const expire = (c: Call, err: Error) => {
    calls.delete(c);
    c.controller.abort(err);
    c.fail(err);
  };
  let timer: ReturnType<typeof setInterval> | undefined;
  const sweep = () => {
    const now = performance.now();
    for (const c of calls) {
      if (c.at > now) continue;
      expire(
        c,
        new WeftError(
          ErrorCode.HandlerFailed,
          `the handler did not answer within ${ms} ms (WEFT_HANDLER_TIMEOUT_MS)`,
        ),
      );
    }
    if (calls.size === 0) {
      clearInterval(timer);
      timer = undefined;
    }
  };
  // The stage stopping aborts each call's signal; what a call then does is its own, as
  // before (the runner has stopped waiting for it).
  stop.addEventListener("abort", () => {
    for (const c of calls) c.controller.abort(stop.reason);
  }, { once: true });
  return {
    async run<T>(call: (signal: AbortSignal) => T | Promise<T>): Promise<T> {
      const controller = new AbortController();
      const { promise, reject } = Promise.withResolvers<never>();
      const c: Call = { at: performance.now() + ms, controller, fail: reject };
      calls.add(c);
      timer ??= setInterval(sweep, Math.max(25, Math.min(1000, Math.floor(ms / 4))));
      try {
        return await Promise.race([call(controller.signal), promise]);
      } finally {
        calls.delete(c);
      }
    },
    /** Stops the sweep (the stage has stopped). */
    close() {
      clearInterval(timer);
      timer = undefined;
    },
  };
}

/**
 * The first of `types` (an item's outcomes, its failure) that `item` has an event of in
 * `stream`; undefined when it has none, or it cannot tell.
 */
async function endedWith(
  jsm: JetStreamManager,
  stream: string,
  item: string,
  types: ReadonlySet<string>,
  /** Whether an outcome stored for the item is its own (`Stage.holdsOutcome`); by default yes. */
  holds?: (item: string, held: { type: string; seq: number }) => Promise<boolean>,
): Promise<string | undefined> {
  const found = await Promise.all(
    [...types].map(async (type) => {
      const last = await lastOn(jsm, stream, eventSubject(type, item)).catch(() => null);
      if (!last) return undefined;
      // One its history does not lead to is no end of the item (a lookup that fails: as one).
      if (holds && !(await holds(item, { type, seq: last.seq }).catch(() => true))) {
        return undefined;
      }
      return type;
    }),
  );
  return found.find((f) => f !== undefined);
}

/** Where an item's history in its stream ends: the last sequence on `<pipeline>.*.<item>`. */
interface HistoryEnd {
  subject: string;
  seq: number;
}

/** The end of `event`'s item's history (all its events' subjects) in `stream`. */
async function historyEnd(
  jsm: JetStreamManager,
  stream: string,
  event: OutputEvent,
  /** The item's subjects' last messages, read at once; null: read the end alone. */
  lasts: ItemLasts | null = null,
): Promise<HistoryEnd> {
  const subject = itemSubjects(event);
  if (lasts && lasts.subject === subject) {
    let seq = 0;
    for (const m of lasts.messages.values()) seq = Math.max(seq, m.seq);
    return { subject, seq };
  }
  return { subject, seq: (await lastOn(jsm, stream, subject))?.seq ?? 0 };
}

/**
 * Publishes an outcome only if its item's history still ends where it did when the runner
 * checked that the item had no outcome (nats-server 2.11+: "expected last subject sequence"
 * on the item's whole subject space): two steps deciding one item at the same instant cannot
 * both store an outcome. The one refused is retried, and then finds the other's outcome.
 */
async function publishFenced(
  js: JetStreamClient,
  event: OutputEvent,
  parent: TraceContext | null,
  end: HistoryEnd,
  /** Whether an outcome stored for the item is its own (`Stage.holdsOutcome`). */
  holds?: (item: string, held: { type: string; seq: number }) => Promise<boolean>,
): Promise<void> {
  const m = eventMessage(event, parent, false);
  m.headers.set(EXPECTED_LAST_SUBJECT_SEQ, String(end.seq));
  m.headers.set(`${EXPECTED_LAST_SUBJECT_SEQ}-Subject`, end.subject);
  try {
    // One held under the outcome's id that the item does not take is junk stored first: the
    // outcome is stored after it, without the id.
    await publishUnique(
      js,
      m.subject,
      m.data,
      m.headers,
      holds && ((held) => holds(event.item_id, { type: event.type, seq: held.seq })),
    );
  } catch (err) {
    if (!isAlreadyStored(err)) throw err;
    throw new WeftError(
      ErrorCode.Conflict,
      `item ${event.item_id} changed while its outcome was decided (${end.subject} ` +
        `moved past sequence ${end.seq}): retried`,
      { cause: err, permanent: false },
    );
  }
}

/** Who is dead-lettering: the stage (or writer) name and the service that records it. */
export interface DeadLetterContext {
  js: JetStreamClient;
  stage: string;
  source: string;
  now: () => Date;
  log: Logger;
  /**
   * The failure event published for the item (`<pipeline>.failed`); without one, the item
   * is not failed (a state writer keeping a poison event).
   */
  failedType?: string;
  /**
   * The item's outcome types (`Stage.finalTypes`): an item that already has one is not
   * failed; looked up with `jsm` in the message's stream.
   */
  finalTypes?: ReadonlySet<string>;
  /**
   * Whether an outcome stored for the item is its own (`Stage.holdsOutcome`): one that is not
   * (a step's key's, for an item that had not reached the step) does not keep it from failing.
   */
  holdsOutcome?: (item: string, held: { type: string; seq: number }) => Promise<boolean>;
  jsm?: JetStreamManager;
  /**
   * The outcome the item's state records when it has ended (`Stage.outcomeOf`): an end of
   * any definition, the running one's or an earlier one's whose end step it lacks.
   */
  outcomeOf?: (item: string) => Promise<string | undefined>;
}

/**
 * Whether `item` already has its outcome: one of `ctx.finalTypes` in the stream of `m`, or
 * (`ctx.outcomeOf`) the end its state records, of whichever definition (an end step the
 * running one lacks): a late or forged message for a finished item, which the letter keeps
 * and which fails nothing. False when neither says so or it cannot tell (the item is
 * failed, as before).
 */
async function finished(ctx: DeadLetterContext, m: JsMsg, item: string): Promise<boolean> {
  const outcome =
    (ctx.finalTypes && ctx.jsm
      ? await endedWith(ctx.jsm, m.info.stream, item, ctx.finalTypes, ctx.holdsOutcome)
      : undefined) ?? await ctx.outcomeOf?.(item).catch(() => undefined);
  if (outcome) ctx.log.info("not failing a finished item", { item_id: item, outcome });
  return outcome !== undefined;
}

/** The id of a Weft event (a string `id` beside a string `type`); undefined for anything else. */
function eventIdOf(raw: unknown): string | undefined {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) return undefined;
  const { id, type } = raw as { id?: unknown; type?: unknown };
  return typeof id === "string" && typeof type === "string" ? id : undefined;
}

/** A dead letter ready to store: its subject, body and message id, and what its log names. */
export interface PreparedLetter {
  subject: string;
  data: Uint8Array;
  msgID: string;
  /** The fields the "dead-lettered" log line (and a held letter's) carry. */
  fields: Record<string, unknown>;
}

/**
 * Gives up on a message for good: publishes its pipeline's failure event for its item (when
 * the item is known) so its state and SSE stream end, keeps the message in the DEADLETTER
 * stream with the reason, then terminates it so the server never redelivers it. When the
 * item's stream is full even for its failure event, the letter says so (`item_not_failed`)
 * and an error is logged: the item stays at its last state until the letter is redriven.
 */
export async function deadLetter(
  ctx: DeadLetterContext,
  m: JsMsg,
  err: unknown,
  raw: unknown,
  itemId: string | undefined,
  trace: TraceContext | null,
  opts: { failItem?: boolean } = {},
): Promise<void> {
  await storeLetter(ctx, m, await prepareLetter(ctx, m, err, raw, itemId, trace, opts));
}

/**
 * The first half of {@link deadLetter}: fails the item (its failure event, published once,
 * under a fixed message id) and builds the letter, without storing it.
 */
export async function prepareLetter(
  ctx: DeadLetterContext,
  m: JsMsg,
  err: unknown,
  raw: unknown,
  itemId: string | undefined,
  trace: TraceContext | null,
  opts: { failItem?: boolean } = {},
): Promise<PreparedLetter> {
  const { code, reason } = toDeadLetterReason(err);
  const letter: DeadLetter = {
    stage: ctx.stage,
    code,
    reason,
    attempts: m.info.deliveryCount,
    subject: m.subject,
    stream_seq: m.seq,
    time: ctx.now().toISOString(),
    ...payloadOf(m.data),
  };
  if (itemId) letter.item_id = itemId;
  const dlSubject = deadLetterSubject(ctx.stage, itemId);
  if (
    itemId && ctx.failedType && (opts.failItem ?? true) && !(await finished(ctx, m, itemId))
  ) {
    // Every pipeline fails an item on its own `<name>.failed`, all of one shape.
    const failedType = ctx.failedType;
    const data: ItemFailedData = {
      stage: ctx.stage,
      code,
      reason,
      attempts: m.info.deliveryCount,
      dead_letter_subject: dlSubject,
      subject: m.subject,
      ...(eventIdOf(raw) ? { event_id: eventIdOf(raw) } : {}),
      ...(raw !== undefined && depthWithin(raw, MAX_DEPTH)
        ? { original_sha256: canonicalDigest(raw) }
        : {}),
      // The original rides along only when small and shallow: serializing a deeply
      // nested poison message again could overflow the stack (the letter keeps it all).
      ...(raw !== null && typeof raw === "object" && !Array.isArray(raw) &&
          m.data.length <= MAX_ORIGINAL_ON_EVENT && depthWithin(raw, MAX_DEPTH)
        ? { original: raw as Record<string, unknown> }
        : {}),
    };
    const failed: EventEnvelope & { data: ItemFailedData } = {
      id: deterministicId(itemId, failedType, String(m.seq)),
      type: failedType,
      version: 1,
      item_id: itemId,
      trace_id: traceIdOf(raw, trace) ?? childContext().traceId,
      time: ctx.now().toISOString(),
      source: ctx.source,
      data,
    };
    // Before the letter, so the letter can say when it could not be stored. (Both are
    // published under fixed message ids: a redelivery after either stores neither twice.)
    try {
      await publishEvent(ctx.js, failed as unknown as OutputEvent, trace);
    } catch (err) {
      // A full stream (past the high-water mark, intake refuses new items; see capacity.ts)
      // takes no failure event either: retrying cannot help until it has room, so the letter
      // says the item is not failed, and whoever grows the stream redrives it.
      if (!isStreamFull(err)) throw err;
      letter.item_not_failed = `stream ${m.info.stream} is full: its ${failedType} event ` +
        `could not be stored, so the item stays at its last state; grow the stream ` +
        `(WEFT_STREAM_MAX_BYTES), then redrive this letter`;
      letter.reason = (`${reason}; the item could not be marked failed (stream ` +
        `${m.info.stream} is full)`).slice(0, 2000);
      ctx.log.error("item not marked failed: its stream is full", {
        item_id: itemId,
        trace_id: traceIdOf(raw, trace),
        stream: m.info.stream,
        dead_letter_subject: dlSubject,
        code,
        reason,
      });
    }
  }
  return {
    subject: dlSubject,
    data: encoder.encode(JSON.stringify(letter)),
    msgID: `dl-${m.info.stream}-${m.seq}-${ctx.stage}`,
    fields: {
      item_id: itemId,
      trace_id: traceIdOf(raw, trace),
      event_type: typeOfRaw(raw),
      code,
      reason,
      attempts: m.info.deliveryCount,
    },
  };
}

/** The second half of {@link deadLetter}: stores the letter, then terminates the message. */
export async function storeLetter(
  ctx: DeadLetterContext,
  m: JsMsg,
  letter: PreparedLetter,
): Promise<void> {
  // Under a fixed id (a redelivery stores it once), which is predictable: found by probing,
  // junk a stage's key stored first under it had the letter answered "duplicate" and dropped,
  // the message terminated, and no letter kept. A message held under the id that is not this
  // letter (of this stage, message and item) is junk: the letter is stored after it.
  const hdrs = headers();
  hdrs.set("Nats-Msg-Id", letter.msgID);
  await publishUnique(ctx.js, letter.subject, letter.data, hdrs, (held) => {
    const same = (x: unknown) => {
      const l = x as {
        stage?: unknown;
        subject?: unknown;
        stream_seq?: unknown;
        item_id?: unknown;
      };
      return JSON.stringify([l?.stage, l?.subject, l?.stream_seq, l?.item_id ?? null]);
    };
    try {
      return Promise.resolve(
        same(held.json()) === same(JSON.parse(new TextDecoder().decode(letter.data))),
      );
    } catch {
      return Promise.resolve(false); // not JSON: no letter
    }
  });
  m.term();
  ctx.log.warn("dead-lettered", letter.fields);
}

/**
 * Runs a stage until stopped.
 *
 * @example
 * ```ts ignore
 * import { runStage } from "./runner.ts";
 * const runner = await runStage({ nc, stage: sentimentStage(analyzer), config, log });
 * Deno.addSignalListener("SIGTERM", () => runner.stop());
 * await runner.done;
 * ```
 */
export async function runStage<I extends StageInput>(
  opts: RunStageOptions<I>,
): Promise<StageRunner> {
  const { nc, config } = opts;
  const stage = withFaults(opts.stage, {
    failOn: config.failOn ?? "",
    failStage: config.failStage ?? "",
    slowMs: config.slowMs ?? 0,
    slowStage: config.slowStage ?? "",
  });
  const source = opts.source ?? `weft-${stage.name}`;
  const now = opts.now ?? (() => new Date());
  const log = opts.log.with({ stage: stage.name });
  const metrics = opts.metrics ?? new WeftMetrics();
  const labels = { stage: stage.name };
  const js = jetstream(nc);
  const jsm = await jetstreamManager(nc);
  const stream = stage.stream;
  // nats-server 2.9 looked up a subject's last sequence on the stream's write path, which
  // delayed publish acks under bursts when every event carried the check: there, `once`
  // outputs rely on their message ids and the duplicate window, as before.
  const version = nc.info?.version ?? "0.0.0";
  const markBacklog = versionAtLeast(version, "2.10.0");
  const consumerConfig = stageConsumerConfig(stage, config, {
    multiFilter: markBacklog,
    metadata: markBacklog,
  });
  // A stage draining another's consumer (`durable`) takes it as it is.
  const ensure = () =>
    stage.durable === undefined
      ? ensureConsumer(jsm, stream, consumerConfig, { markBacklog })
      : Promise.resolve();
  await ensure();
  const consumer = await js.consumers.get(stream, stage.durable ?? stage.name);
  // A step new to a stream that holds messages (a step added to, or renamed in, a running
  // definition, or given another durable) is handed the stream's whole history: what its
  // consumer was created behind. Those of items that have ended, or that went on from the
  // event already (`stage.wentOn`: past a renamed step), are acked unhandled; running the step
  // for them would repeat its side effects (an email, a payment) and its events.
  // Without the mark (nats-server 2.9 has no consumer metadata; a consumer made before the
  // mark existed), what the stream stored before the consumer was created is its backlog.
  const backlogOf = async () => {
    const info = await consumer.info(false);
    const seq = Number(info.config.metadata?.[BACKLOG_SEQ_KEY] ?? 0);
    const created = Date.parse(info.created);
    return { seq, beforeNanos: seq > 0 || Number.isNaN(created) ? 0 : created * 1e6 };
  };
  let backlog = await backlogOf();
  const endTypes = new Set([...stage.finalTypes ?? [], stage.failedType]);
  const finalTypes: ReadonlySet<string> = new Set(stage.finalTypes ?? []);
  // Whether an event type starts this stage's items (its entry events).
  const isEntry = (type: string) => stage.entryTypes?.has(type) ?? isEntryEvent(type);
  const once = versionAtLeast(version, "2.10.0") ? stage.once : undefined;
  // nats-server 2.11 checks a publish against the last sequence of a wildcard subject, which
  // makes a stage's outcome check and its publish one atomic step (`publishFenced`).
  const fences = versionAtLeast(version, "2.11.0");
  // (The same servers answer batched direct gets: an item's outcomes and history end in one.)
  const readLasts = fences ? lastMessagesReader(nc, stream) : undefined;
  // Pull only as many messages as there are free handler slots (no prefetch): a message
  // starts its handler, and so its in-progress acks, the moment it arrives, so a slow
  // handler can never let a waiting message's ack wait expire.
  let batch: ConsumerMessages | undefined;
  let stopping = false;
  const stats: StageStats = {
    received: 0,
    processed: 0,
    retried: 0,
    deadLettered: 0,
    published: 0,
    handlerMs: 0,
  };
  const abort = new AbortController();
  const deadlines = callDeadlines(
    config.handlerTimeoutMs ?? DEFAULT_HANDLER_TIMEOUT_MS,
    abort.signal,
  );
  const inFlight = new Set<Promise<void>>();
  /**
   * The stream sequences in this runner's handler slots, each with the most deliveries the
   * server has counted for it. A delivery of one already here is its lease run out while it is
   * worked on (its in-progress acks did not land: a consumer leader moving, a starved
   * process), not an attempt: it runs nothing and settles nothing; the first delivery's ack,
   * nak or term settles the message (the server takes them by stream sequence).
   */
  const working = new Map<number, { deliveries: number }>();
  /** Stream sequences this runner acked lately: a redelivery that crossed the ack is acked. */
  const acked = new Set<number>();
  const ackedHere = (seq: number) => {
    acked.add(seq);
    if (acked.size > RECENT_ACKS) acked.delete(acked.values().next().value!);
  };
  let wake: (() => void) | undefined;
  const dlContext: DeadLetterContext = {
    js,
    stage: stage.name,
    source,
    now,
    log,
    failedType: stage.failedType,
    finalTypes: stage.finalTypes,
    jsm,
    ...(stage.outcomeOf ? { outcomeOf: (item: string) => stage.outcomeOf!(item) } : {}),
    ...(stage.holdsOutcome
      ? {
        holdsOutcome: (item: string, held: { type: string; seq: number }) =>
          stage.holdsOutcome!(item, held),
      }
      : {}),
  };

  // Aborted when stop() is called: a held letter (below) hands its message back then.
  const stopped = new AbortController();

  /**
   * Keeps a message whose letter DEADLETTER refused for being full (discard-new): it stays
   * in its handler slot with its lease renewed (in-progress acks, as a slow handler's), so
   * the server neither redelivers it nor counts it against `max_deliver`, which would drop it
   * with no letter. The letter, built once (the item's failure event is not published again),
   * is stored as soon as DEADLETTER has room, tried again with the retry backoff; then the
   * message is terminated as usual. On stop it is handed back (nak) for the next run.
   */
  async function holdLetter(m: JsMsg, letter: PreparedLetter, cause: unknown): Promise<void> {
    const since = performance.now();
    metrics.lettersHeld.inc(labels);
    log.error(
      "dead letter not stored: stream DEADLETTER is full; the message is held until it has room",
      {
        ...letter.fields,
        stream: DEADLETTER_STREAM,
        dead_letter_subject: letter.subject,
        stream_seq: m.seq,
        err: cause,
      },
    );
    try {
      for (let attempt = 1;; attempt++) {
        if (!(await pause(retryDelay(attempt, config.retryBaseMs, config.retryMaxMs)))) {
          m.nak();
          log.warn("held message handed back on stop: its dead letter is not stored yet", {
            ...letter.fields,
            stream_seq: m.seq,
          });
          return;
        }
        try {
          await storeLetter(dlContext, m, letter);
          stats.deadLettered++;
          metrics.deadLettered.inc(labels);
          log.info("held dead letter stored", {
            item_id: letter.fields.item_id,
            stream_seq: m.seq,
            held_ms: Math.round(performance.now() - since),
          });
          return;
        } catch (err) {
          if (isStreamFull(err)) log.debug("held dead letter: DEADLETTER still full", { attempt });
          else log.warn("held dead letter not stored; trying again", { attempt, err });
        }
      }
    } finally {
      metrics.lettersHeld.dec(labels);
    }
  }

  /** Waits `ms`; false when the stage is stopped first. */
  function pause(ms: number): Promise<boolean> {
    if (stopped.signal.aborted) return Promise.resolve(false);
    return new Promise((resolve) => {
      const onStop = () => {
        clearTimeout(timer);
        resolve(false);
      };
      const timer = setTimeout(() => {
        stopped.signal.removeEventListener("abort", onStop);
        resolve(true);
      }, ms);
      stopped.signal.addEventListener("abort", onStop, { once: true });
    });
  }

  function handle(m: JsMsg): Promise<void> {
    const here = working.get(m.seq);
    if (here || acked.has(m.seq)) {
      stats.received++;
      metrics.received.inc(labels);
      if (!here) {
        m.ack(); // handled and acked here already: its ack crossed this redelivery
        return Promise.resolve();
      }
      // Counted by the server, but no attempt: a later failure of the handler still running
      // is judged on this count (below), so the message never outlasts `max_deliver` unsettled.
      here.deliveries = Math.max(here.deliveries, m.info.deliveryCount);
      log.warn("redelivered while still handled here (lease lost): not an attempt", {
        subject: m.subject,
        seq: m.seq,
        delivery: m.info.deliveryCount,
      });
      return Promise.resolve();
    }
    const mine = { deliveries: m.info.deliveryCount };
    working.set(m.seq, mine);
    const parent = parseTraceparent(m.headers?.get("traceparent"));
    const span = startSpan(`${stage.name} process`, SpanKind.CONSUMER, parent, {
      "messaging.system": "nats",
      "messaging.destination.name": m.subject,
      "messaging.operation.type": "process",
      "weft.stage": stage.name,
      "weft.delivery_count": m.info.deliveryCount,
    });
    return withSpan(span, () => handleIn(m, traceContextOf(span) ?? parent, span, mine))
      .finally(() => {
        working.delete(m.seq);
        span.end();
      });
  }

  async function handleIn(
    m: JsMsg,
    trace: TraceContext | null,
    span: Span,
    mine: { deliveries: number },
  ): Promise<void> {
    stats.received++;
    metrics.received.inc(labels);
    let raw: unknown;
    const message: MessageInfo = {
      subject: m.subject,
      seq: m.seq,
      storedAt: m.time.getTime(),
      deliveryCount: m.info.deliveryCount,
    };
    if (trace) message.traceId = trace.traceId;
    const redriveOf = Number(m.headers?.get(REDRIVE_OF_HEADER) || NaN);
    if (Number.isSafeInteger(redriveOf) && redriveOf > 0) {
      message.redriveOf = redriveOf;
      const item = m.headers?.get(REDRIVE_ITEM_HEADER);
      if (item) message.redriveItem = item;
    }
    const handover = m.headers?.get(HANDOVER_HEADER);
    if (handover) message.handoverTo = handover.split(",");
    if (stage.accepts && !stage.accepts(message)) {
      m.ack(); // on this stage's consumer, but not for it (a wide filter)
      return;
    }
    // Keep the lease from the moment the message is taken, not only while the handler runs:
    // checking an entry event's first delivery is a round trip to the server, and on a
    // loaded machine that, or a slow handler, can outlast the ack wait.
    const keepAlive = setInterval(
      () => m.working(),
      Math.max(500, Math.floor(config.ackWaitMs / 3)),
    );
    // Whether the message got as far as the handler (read and checked), for failsItem.
    let handled = false;
    try {
      // The item its subject names (the stage's own reading of it) must be an item id, before
      // anything looks it up.
      assertSubjectItem(
        stage.identify ? stage.identify(undefined, message) : parseEventSubject(m.subject)?.itemId,
        m.subject,
      );
      if (m.info.deliveryCount > config.maxAttempts) {
        handled = true; // every earlier delivery died in it
        // Delivered past the last attempt without an outcome: the process died on it each
        // time (crash, OOM, kill). Dead-letter it without running the handler again; the
        // server's max_deliver leaves two deliveries for this.
        raw = tryDecode(m.data);
        throw new WeftError(
          ErrorCode.HandlerFailed,
          `delivered ${m.info.deliveryCount} times without an outcome: the stage may have ` +
            `died on this message each time`,
          { permanent: true },
        );
      }
      raw = decodeJson(m.data);
      if (!depthWithin(raw, MAX_DEPTH)) {
        throw new ValidationError(`body nests deeper than ${MAX_DEPTH} levels`, {
          code: ErrorCode.InvalidEvent,
          field: "/",
        });
      }
      let input: InputOf<I>;
      if (stage.decode) {
        const decoded = stage.decode(raw, message);
        if (decoded === undefined) {
          m.ack(); // on this stage's consumer, but not for it (a wide filter, another route)
          return;
        }
        input = decoded as InputOf<I>;
        const event = input as { id: string; type: string; item_id: string };
        if (stage.entryTypes?.has(event.type) && !(await isFirstEntry(jsm, stream, m, event.id))) {
          log.warn("ignored: not the item's first entry event", {
            item_id: event.item_id,
            event_type: event.type,
            seq: m.seq,
          });
          m.ack();
          return;
        }
      } else input = validateInput(stage.input, raw);
      if (stage.input.kind === "event" && !stage.decode) {
        const event = input as { id: string; type: string; item_id: string };
        assertMatchesSubject(event, m.subject);
        if (isEntryEvent(event.type) && !(await isFirstEntry(jsm, stream, m, event.id))) {
          // A second entry event of the item (forged, or published around intake): the
          // item already ran from its first one. Not an error of this message's item.
          log.warn("ignored: not the item's first entry event", {
            item_id: event.item_id,
            event_type: event.type,
            seq: m.seq,
          });
          m.ack();
          return;
        }
      }
      const itemId = itemIdOf(raw);
      if (itemId) span.setAttribute("weft.item_id", itemId);
      if (
        (m.seq <= backlog.seq || m.info.timestampNanos < backlog.beforeNanos) && itemId
      ) {
        // Only the backlog pays for these reads; a message stored after the consumer was
        // created goes straight on. An item that has ended by now, whether before the consumer
        // was created or since (a delay that fired while a restart's new step read its
        // backlog), is skipped with that reason: the reason said "before" for both (found by
        // a flaky test: two items in a delay past the step ended first, under load).
        const skip = await endedWith(jsm, stream, itemId, endTypes) !== undefined ||
            await stage.ended?.(itemId) === true
          ? "skipped: the item has ended; the event is from before this step's consumer was created"
          : await stage.wentOn?.(input, message) === true
          ? "skipped: the item went on from this event before this step's consumer was created"
          : undefined;
        if (skip) {
          log.debug(skip, { item_id: itemId, seq: m.seq });
          m.ack();
          return;
        }
      }
      if (
        (message.redriveOf !== undefined || message.handoverTo !== undefined) &&
        await stage.tookAlready?.(input, message) === true
      ) {
        // A copy of an event this stage ran for already: running it again would repeat its
        // side effects, and its outputs are stored.
        log.info("skipped: this step ran for the event already", {
          item_id: itemId,
          seq: m.seq,
          ...(message.redriveOf !== undefined ? { redrive_of: message.redriveOf } : {}),
        });
        m.ack();
        return;
      }
      if (stage.admit) {
        try {
          await stage.admit(input, message);
        } catch (err) {
          // Refused, but the step ran for this event already and the item has ended since: a
          // delivery again after the step stored its outputs and before its ack was recorded
          // (its process died, or its ack was lost; with nats-server killed too, some came
          // again as a first delivery). Acked, not dead-lettered as an event for an ended item
          // (found by probing: SIGKILLs of a definition's steps and of nats-server under load
          // left `conflict` letters for items all done once).
          if (
            itemId && stage.tookAlready && finalTypes.size > 0 &&
            await endedWith(jsm, stream, itemId, finalTypes).catch(() => undefined) !==
              undefined &&
            await stage.tookAlready(input, message).catch(() => false)
          ) {
            log.info("skipped: this step ran for the event already; the item has ended", {
              item_id: itemId,
              seq: m.seq,
              delivery: m.info.deliveryCount,
            });
            m.ack();
            return;
          }
          throw err;
        }
      } else if (stage.entrySubject && itemId && stage.checksEntry !== false) {
        const type = typeOfRaw(raw);
        if (!isEntry(type ?? "")) {
          await assertEntered(jsm, stream, stage.entrySubject(itemId), m.seq, itemId, type);
        }
      }
      const started = performance.now();
      handled = true;
      const outputs = await deadlines.run((signal) =>
        stage.handle(input, { source, message, now, signal })
      );
      const took = performance.now() - started;
      stats.handlerMs += took;
      metrics.handlerSeconds.observe(labels, took / 1000);
      // A handler emitting a bad event is a bug: stop it here, before anything is published.
      for (const event of outputs) {
        if (stage.checkOutput) stage.checkOutput(event);
        else validateEvent(event, [event.type]);
      }
      // All outputs at once: one connection keeps them in order in the stream, and the item
      // does not wait a round trip per event (dispatch emits two). A failed publish fails the
      // message, whose retry re-publishes them all under the same message ids.
      // An outcome is published only where the item's history still ends where it did
      // before the check that it has none (read first), where the server can say so. The
      // events before it (a definition's step event, then the end it leads to) are stored
      // first, in order; then the history's end is read, the check made again, and the
      // outcome published against it.
      const at = stage.outcomes ? outputs.findIndex((e) => stage.outcomes!.has(e.type)) : -1;
      const outcome = at >= 0 ? outputs[at] : undefined;
      const fenced = outcome !== undefined && fences;
      /** The item's subjects' last messages in one read, or null (read one by one). */
      const itemLasts = async (event: OutputEvent): Promise<ItemLasts | null> => {
        const subject = itemSubjects(event);
        const messages = await readLasts?.([subject], { atLeastSeq: m.seq });
        return messages ? { subject, pattern: subjectPattern(subject), messages } : null;
      };
      let lasts = outcome !== undefined && stage.outcomes ? await itemLasts(outcome) : null;
      let end = fenced && at === 0 ? await historyEnd(jsm, stream, outcome, lasts) : undefined;
      /**
       * Whether an event held on `event`'s subject is one the item takes: its state takes it
       * (`storedStands`), and, for an outcome, the item holds it (`holdsOutcome`; an outcome
       * its history does not lead to, stored first under the outcome's own id, is junk).
       */
      const standsOf = (event: OutputEvent) => {
        const stands = stage.storedStands;
        const holds = stage.outcomes?.has(event.type) ? stage.holdsOutcome : undefined;
        if (!stands && !holds) return undefined;
        return async (held: { type: string; seq: number; raw: unknown }) =>
          (!stands || await stands(event.item_id, held)) &&
          (!holds || await holds(event.item_id, { type: held.type, seq: held.seq }));
      };
      /** Whether a message held on `event`'s subject is `event`, stored already. */
      const ownOf = (event: OutputEvent) =>
        heldIsEvent(
          js,
          event,
          stage.entrySubject?.(event.item_id),
          stage.inputOf && ((held) => sameInputOf(stage, held, event)),
          standsOf(event),
          stage.inputSubject?.(event.item_id),
        );
      const skip = m.info.deliveryCount > 1
        ? await alreadyStored(jsm, stream, outputs, ownOf)
        : new Set<OutputEvent>();
      const checkOutcome = async () => {
        const found = await outcomeTaken(
          jsm,
          stream,
          outputs,
          stage.outcomes!,
          stage.holdsOutcome && ((item, held) => stage.holdsOutcome!(item, held)),
          lasts,
        );
        // A second outcome (a forged or repeated decision, another branch's end): the item
        // keeps its first.
        if (found.taken) throw new OutcomeTaken(found.taken.type, found.taken.seq);
        for (const e of found.stored) skip.add(e); // this message's own, stored before
      };
      if (stage.outcomes && outcome) await checkOutcome();
      const publish = (events: OutputEvent[]) =>
        Promise.all(
          events.filter((e) => !skip.has(e)).map(async (event) => {
            const stored = await publishEvent(
              js,
              event,
              trace,
              isEntry(event.type) || once?.has(event.type) === true,
              stage.entrySubject?.(event.item_id),
              stage.inputOf && ((held) => sameInputOf(stage, held, event)),
              standsOf(event),
              stage.inputSubject?.(event.item_id),
            );
            if (!stored && stage.entryInputOf && isEntry(event.type)) {
              await assertSameEntry(jsm, stream, stage.entryInputOf, event);
            }
          }),
        );
      if (fenced) {
        await publish(outputs.slice(0, at));
        if (!skip.has(outcome) && !end) {
          lasts = await itemLasts(outcome);
          end = await historyEnd(jsm, stream, outcome, lasts);
          await checkOutcome();
        }
        if (!skip.has(outcome)) {
          await publishFenced(
            js,
            outcome,
            trace,
            end!,
            stage.holdsOutcome && ((item, held) => stage.holdsOutcome!(item, held)),
          );
        }
        await publish(outputs.slice(at + 1));
      } else if (outcome !== undefined) {
        // The outcome after the events before it, as above: one of those published again
        // after junk stored under its id (nats-server 2.9) must not land after the outcome.
        await publish(outputs.slice(0, at));
        await publish([outcome]);
        await publish(outputs.slice(at + 1));
      } else await publish(outputs);
      for (const event of outputs) {
        stats.published++;
        metrics.published.inc({ stage: stage.name, type: event.type });
      }
      m.ack();
      ackedHere(m.seq);
      stats.processed++;
      metrics.processed.inc(labels);
      log.debug("handled", {
        item_id: itemId,
        trace_id: trace?.traceId ?? traceIdOf(raw),
        event_type: typeOfRaw(raw),
        emitted: outputs.map((e) => e.type),
        handler_ms: Math.round(took * 1000) / 1000,
      });
    } catch (err) {
      recordFailure(span, err);
      metrics.failed.inc({ stage: stage.name, code: toDeadLetterReason(err).code });
      // Deliveries counted while this one ran (its lease lost) count here: past them the server
      // may deliver it no more, and a nak would leave it unsettled, with no letter.
      if (
        isPermanent(err) || Math.max(m.info.deliveryCount, mine.deliveries) >= config.maxAttempts
      ) {
        let letter: PreparedLetter | undefined;
        try {
          // The subject names the item (the body may lie); an event that disagrees with
          // its subject, or a bad awaited event (the item waits on), fails no item, nor does
          // one whose subject names no valid item (a wildcard: kept under `unknown`).
          const itemId = validItem(
            stage.identify
              ? stage.identify(raw, message)
              : parseEventSubject(m.subject)?.itemId ?? itemIdOf(raw),
          );
          let failItem = errorCode(err) !== ErrorCode.SubjectMismatch &&
            errorCode(err) !== ErrorCode.InvalidAwaitedEvent &&
            errorCode(err) !== ErrorCode.Conflict &&
            errorCode(err) !== ErrorCode.NotFound &&
            !(err instanceof OutcomeTaken) &&
            (stage.failsItem?.(message, handled) ?? true);
          // Poison for an id that never entered (nothing on its entry subject before it) fails
          // no item: its failure event would be an item of its own (the state writer refuses
          // it). Looked up on this failure path only; a lookup that fails fails the item.
          // (The type its subject names: the body may lie.)
          const type = parseEventSubject(m.subject)?.type ?? typeOfRaw(raw) ?? "";
          if (
            failItem && itemId && stage.entrySubject && !isEntry(type)
          ) {
            failItem = await assertEntered(
              jsm,
              stream,
              stage.entrySubject(itemId),
              m.seq,
              itemId,
              "",
            )
              .then(() => true, (e) => !(e instanceof NotFoundError));
          }
          letter = await prepareLetter(dlContext, m, err, raw, itemId, trace, {
            // A conflict (the item has its outcome, or has failed and holds this message
            // until it is resumed) is this message's, not a failure of the item.
            failItem,
          });
          await storeLetter(dlContext, m, letter);
          stats.deadLettered++;
          metrics.deadLettered.inc(labels);
        } catch (dlErr) {
          if (letter && isStreamFull(dlErr)) await holdLetter(m, letter, dlErr);
          else {
            // Could not record the dead letter (NATS down?): let the server redeliver.
            log.error("dead-letter failed", { err: dlErr });
            m.nak(retryDelay(1, config.retryBaseMs, config.retryMaxMs));
          }
        }
      } else {
        const delay = retryDelay(
          m.info.deliveryCount,
          config.retryBaseMs,
          config.retryMaxMs,
        );
        stats.retried++;
        metrics.retried.inc(labels);
        log.warn("retrying", {
          item_id: itemIdOf(raw),
          trace_id: trace?.traceId ?? traceIdOf(raw),
          event_type: typeOfRaw(raw),
          attempt: m.info.deliveryCount,
          delay_ms: delay,
          err,
        });
        m.nak(delay);
      }
    } finally {
      clearInterval(keepAlive);
    }
  }

  const minBatch = Math.max(1, Math.floor(config.concurrency / 4));
  const done = (async () => {
    while (!stopping) {
      // Wait for a worthwhile number of free slots (or none busy) before pulling again.
      while (!stopping && inFlight.size > 0 && config.concurrency - inFlight.size < minBatch) {
        await new Promise<void>((r) => (wake = r));
      }
      if (stopping) break;
      try {
        batch = await consumer.fetch({
          max_messages: config.concurrency - inFlight.size,
          expires: 5_000,
        });
        for await (const m of batch) {
          if (stopping) {
            // Not started: handed straight back for redelivery (unless still handled here).
            if (!working.has(m.seq)) m.nak();
            continue;
          }
          const p: Promise<void> = handle(m).finally(() => {
            inFlight.delete(p);
            wake?.();
          });
          inFlight.add(p);
        }
      } catch (err) {
        if (stopping) break;
        log.warn("fetch failed; retrying", { err });
        await new Promise((r) => setTimeout(r, 500));
        // (Deleted meanwhile: created again behind the stream's history, which it marks.)
        await ensure()
          .then(async () => (backlog = await backlogOf()))
          .catch(() => {});
      }
    }
    await Promise.all(inFlight);
  })();

  log.info("stage started", { filter: stage.filterSubject, concurrency: config.concurrency });

  return {
    stats,
    done,
    async stop() {
      stopping = true; // stop fetching; anything delivered after this is nak'ed back
      stopped.abort();
      batch?.stop();
      wake?.();
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([done, new Promise((r) => (timer = setTimeout(r, config.drainMs)))]);
      clearTimeout(timer);
      abort.abort();
      deadlines.close();
      log.info("stage stopped", { in_flight_left: inFlight.size, ...stats });
    },
  };
}
