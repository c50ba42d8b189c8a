/**
 * Dead letters and redrive: list what the stages gave up on (from the DEADLETTER
 * stream) with their reasons, and re-submit one, a filtered set, or all of them.
 *
 * A redrive republishes the original message, byte for byte, to its original subject
 * with a NEW message id (`redrive-<dead-letter seq>-<n>`), so the duplicate window does
 * not drop it, and records a marker on `deadletter.redriven.<dead-letter seq>` so a letter
 * is redriven once unless asked again explicitly. The item's history then shows both
 * attempts: the failed one, the failed event, and the redriven one. A bus submission
 * without an id gets the item id it was dead-lettered under, so it stays the same item.
 *
 * Served over HTTP by the gateway (`GET /deadletters`, `POST /deadletters/redrive`) and
 * over NATS request/reply (`weft.deadletters.list`, `weft.deadletters.redrive`).
 *
 * @module
 */
import { Buffer } from "node:buffer";
import { headers, type Msg, type NatsConnection } from "@nats-io/nats-core";
import {
  type ConsumerConfig,
  jetstream,
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamClient,
  type JetStreamManager,
  type StoredMsg,
} from "@nats-io/jetstream";
import { ErrorCode, ValidationError } from "./errors.ts";
import { sha256Hex } from "./events.ts";
import {
  assertMatchesSubject,
  assertSubjectItem,
  decodeJson,
  depthWithin,
  MAX_DEPTH,
  messagesOn,
  storedMessage,
} from "./runner.ts";
import { maxPayloadOf, replyTo, requestJson } from "./gateway/requests.ts";
import {
  type EventMap,
  requestDocument,
  submissionDocument,
  validateDocument,
  validateEvent,
} from "./schemas.ts";
import type { DeadLetter } from "./events.gen.ts";
import type { Logger } from "./observability/log.ts";
import type { Auth } from "./gateway/auth.ts";
import { Role } from "./config.ts";
import { STAGE_DESCRIPTION } from "./topology.ts";
import {
  DEADLETTER_STREAM,
  parseEventSubject,
  REDRIVE_ITEM_HEADER,
  REDRIVE_OF_HEADER,
  REDRIVEN_TOKEN,
  subjectMatches,
} from "./subjects.ts";

/** Request subject listing dead letters: body = a {@link DeadLetterFilter} as JSON (or empty). */
export const DEADLETTERS_LIST_SUBJECT = "weft.deadletters.list";
/** Request subject redriving dead letters: body = a {@link RedriveRequest} as JSON. */
export const DEADLETTERS_REDRIVE_SUBJECT = "weft.deadletters.redrive";
/** Markers of redriven letters: `deadletter.redriven.<dead-letter seq>` ("redriven" is no stage). */
export const REDRIVEN_PREFIX = `deadletter.${REDRIVEN_TOKEN}`;
/** Largest accepted body of a redrive request (`POST /deadletters/redrive` and its subject), bytes. */
export const REDRIVE_BODY_LIMIT = 256 * 1024;

/** Which dead letters. Every given field must match. */
export interface DeadLetterFilter {
  /** The stage that gave up. */
  stage?: string;
  /** The error code, e.g. `handler_failed`. */
  code?: string;
  /** The item. */
  item_id?: string;
  /** true: only letters never redriven. */
  pending?: boolean;
}

/** A dead letter as listed. */
export interface DeadLetterEntry {
  /** Sequence of the dead letter in DEADLETTER: its id for redrive. */
  seq: number;
  /** Subject of the dead letter, `deadletter.<stage>.<item_id|unknown>`. */
  subject: string;
  /** The dead letter itself, with the original message. */
  letter: DeadLetter;
  /** How often it was redriven so far. */
  redrives: number;
}

/** What to redrive: letters by seq, those matching a filter, or every pending one. */
export type RedriveRequest =
  | { ids: number[] }
  | { filter: DeadLetterFilter }
  | { all: true };

/** The outcome of a redrive. */
export interface RedriveResult {
  /** What was re-published, by dead-letter seq. */
  redriven: { seq: number; item_id?: string; subject: string; msg_id: string }[];
  /** Requested seqs that are not dead letters. */
  not_found: number[];
  /** Letters that were not re-published, and why (see {@link checkRedrivable}). */
  refused: { seq: number; reason: string }[];
}

interface Marker {
  dl_seq: number;
  msg_id: string;
  time: string;
}

const decoder = new TextDecoder();
const encoder = new TextEncoder();
/** The fields of a dead-letter filter (a redrive's `filter`, `GET /deadletters`' parameters). */
export const FILTER_KEYS: ReadonlySet<string> = new Set(["stage", "code", "item_id", "pending"]);

/**
 * Validates a filter from a request; a {@link ValidationError} naming the field: a JSON
 * pointer under `at` in a body, or what `name` makes of it (`GET /deadletters` names the bare
 * query parameter).
 */
export function parseFilter(
  value: unknown,
  at = "",
  name: (key: string) => string = (key) => `${at}/${key}`,
): DeadLetterFilter {
  if (value === undefined || value === null) return {};
  if (typeof value !== "object" || Array.isArray(value)) {
    throw new ValidationError(`${at || "/"} must be an object`, { field: at || "/" });
  }
  const out: DeadLetterFilter = {};
  for (const [k, v] of Object.entries(value)) {
    const field = name(k);
    if (!FILTER_KEYS.has(k)) {
      throw new ValidationError(`${field} is not a filter field`, { field });
    }
    if (k === "pending") {
      if (typeof v !== "boolean") {
        throw new ValidationError(`${field} must be a boolean`, { field });
      }
      out.pending = v;
    } else {
      if (typeof v !== "string" || v.length === 0 || v.length > 128) {
        throw new ValidationError(`${field} must be a non-empty string`, { field });
      }
      out[k as "stage" | "code" | "item_id"] = v;
    }
  }
  return out;
}

/**
 * Validates a redrive request: exactly one of `ids`, `filter`, `all: true`.
 *
 * @example
 * ```ts
 * import { parseRedriveRequest } from "./redrive.ts";
 * console.assert("ids" in parseRedriveRequest({ ids: [3] }));
 * ```
 */
export function parseRedriveRequest(value: unknown): RedriveRequest {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new ValidationError("body must be an object with ids, filter or all", { field: "/" });
  }
  const v = value as Record<string, unknown>;
  const keys = Object.keys(v);
  const unknown = keys.find((k) => !["ids", "filter", "all"].includes(k));
  if (unknown !== undefined) {
    throw new ValidationError(`/${unknown} is not a field of a redrive (ids, filter, all)`, {
      field: `/${unknown}`,
    });
  }
  if (keys.length !== 1) {
    throw new ValidationError("body must have exactly one of ids, filter, all", { field: "/" });
  }
  if ("ids" in v) {
    const ids = v.ids;
    if (
      !Array.isArray(ids) || ids.length === 0 || ids.length > 10_000 ||
      !ids.every((n) => Number.isSafeInteger(n) && n > 0)
    ) {
      throw new ValidationError("/ids must be 1 to 10000 positive integers (dead-letter seqs)", {
        field: "/ids",
      });
    }
    return { ids: ids as number[] };
  }
  if ("filter" in v) {
    const filter = parseFilter(v.filter, "/filter");
    // A filter or `all` redrives a letter once; again only by its seq (docs/REDRIVE.md).
    if (filter.pending === false) {
      throw new ValidationError(
        "/filter/pending: a filter redrives only letters not redriven yet; redrive one again " +
          "by its seq in ids",
        { field: "/filter/pending" },
      );
    }
    return { filter };
  }
  if (v.all !== true) throw new ValidationError("/all must be true", { field: "/all" });
  return { all: true };
}

function matches(e: DeadLetterEntry, f: DeadLetterFilter): boolean {
  return (f.stage === undefined || e.letter.stage === f.stage) &&
    (f.code === undefined || e.letter.code === f.code) &&
    (f.item_id === undefined || e.letter.item_id === f.item_id) &&
    (f.pending !== true || e.redrives === 0);
}

/** What {@link listDeadLetterPage} answers. */
export interface DeadLetterPage {
  /** The oldest matches, at most `limit`, and no more than `maxBytes` of letters. */
  items: DeadLetterEntry[];
  /**
   * How many letters match. Without `code`, and without `pending` beside `stage` or `item_id`,
   * it comes from the stream's counts (the messages on the filter's letter subjects, less
   * redrive markers, less letters redriven for `pending`), and nothing past the page is read;
   * otherwise the letters on the filter's subjects are all read to count it.
   */
  total: number;
  /** True when matches within `limit` were left out to stay within `maxBytes`. */
  truncated?: true;
}

/** Bytes of letters one listing keeps in memory by default (`GET /deadletters`). */
export const LIST_MAX_BYTES = 16 * 1024 * 1024;

/**
 * The subject filter of the letters `f` can match (`deadletter.<stage>.<item_id>`, either a
 * wildcard when not given); undefined when no letter can: a stage or item id that is no
 * subject token (a dot, a wildcard, a space), or the markers' `redriven`.
 */
export function letterSubjectFilter(f: DeadLetterFilter): string | undefined {
  const token = (v: string | undefined) => v === undefined ? "*" : /^[^.*>\s]+$/.test(v) ? v : null;
  const stage = token(f.stage);
  const item = token(f.item_id);
  if (stage === null || item === null || stage === REDRIVEN_TOKEN) return undefined;
  return `deadletter.${stage}.${item}`;
}

/** Redrive markers per letter seq token (`deadletter.redriven.<seq>`), from the stream's counts. */
async function redriveCounts(
  jsm: JetStreamManager,
): Promise<{ last: number; byToken: Map<string, number> }> {
  const info = await jsm.streams.info(DEADLETTER_STREAM, {
    subjects_filter: `${REDRIVEN_PREFIX}.*`,
  });
  const byToken = new Map<string, number>();
  for (const [subject, n] of Object.entries(info.state.subjects ?? {})) {
    byToken.set(subject.slice(REDRIVEN_PREFIX.length + 1), n);
  }
  return { last: info.state.last_seq, byToken };
}

/** Messages stored on `subject` in DEADLETTER: a consumer's count, no message read. */
async function countOn(js: JetStreamClient, subject: string): Promise<number> {
  const consumer = await js.consumers.get(DEADLETTER_STREAM, { filter_subjects: subject });
  try {
    return (await consumer.info(true)).num_pending;
  } finally {
    await consumer.delete().catch(() => {});
  }
}

/** True for a marker's subject, which `deadletter.*.*` matches too. */
const isMarker = (subject: string) => subject.startsWith(`${REDRIVEN_PREFIX}.`);

/**
 * The letters on the filter's subjects, oldest first, stored before the call (a letter a
 * redrive leads to is not read by that redrive): one direct read each, so a listing holds
 * one letter at a time besides those it keeps, and stops where its answer is complete.
 */
async function* scanLetters(
  jsm: JetStreamManager,
  subject: string,
  last: number,
  byToken: Map<string, number>,
): AsyncGenerator<{ entry: DeadLetterEntry; bytes: number }> {
  for await (
    const m of messagesOn(jsm, DEADLETTER_STREAM, subject, {
      before: last + 1,
      max: Infinity,
    })
  ) {
    if (isMarker(m.subject)) continue;
    let letter: DeadLetter;
    try {
      letter = m.json<DeadLetter>();
    } catch {
      continue; // not a dead letter someone published by hand: skip
    }
    if (letter === null || typeof letter !== "object") continue;
    const redrives = byToken.get(String(m.seq)) ?? 0;
    yield { entry: { seq: m.seq, subject: m.subject, letter, redrives }, bytes: m.data.length };
  }
}

/**
 * Lists dead letters matching `filter`, oldest first: at most `limit`, and at most
 * `maxBytes` of letters (the page then says `truncated`). Only the filter's subjects are
 * read (`deadletter.<stage>.<item_id>`), and only as far as the page needs, unless its
 * `total` can only be counted by reading them all (see {@link DeadLetterPage}).
 *
 * @example
 * ```ts ignore
 * import { listDeadLetterPage } from "./redrive.ts";
 * const { items, total } = await listDeadLetterPage(js, { stage: "orders-pay" }, 10);
 * ```
 */
export async function listDeadLetterPage(
  js: JetStreamClient,
  filter: DeadLetterFilter = {},
  limit = 1000,
  opts: { maxBytes?: number; total?: boolean } = {},
): Promise<DeadLetterPage> {
  const maxBytes = opts.maxBytes ?? LIST_MAX_BYTES;
  const subject = letterSubjectFilter(filter);
  if (subject === undefined) return { items: [], total: 0 };
  const jsm = await js.jetstreamManager();
  const { last, byToken } = await redriveCounts(jsm);
  let total: number | undefined;
  if (opts.total !== false && filter.code === undefined) {
    const narrowed = filter.stage !== undefined || filter.item_id !== undefined;
    if (!filter.pending || !narrowed) {
      // Markers are on `deadletter.redriven.<seq>`: a wildcard stage takes them in too.
      const markers = filter.stage !== undefined
        ? 0
        : filter.item_id !== undefined
        ? byToken.get(filter.item_id) ?? 0
        : [...byToken.values()].reduce((a, b) => a + b, 0);
      const letters = (await countOn(js, subject)) - markers;
      total = Math.max(0, filter.pending ? letters - byToken.size : letters);
    }
  }
  const items: DeadLetterEntry[] = [];
  let bytes = 0;
  let counted = 0;
  let truncated = false;
  for await (const { entry: e, bytes: size } of scanLetters(jsm, subject, last, byToken)) {
    if (!matches(e, filter)) continue;
    counted++;
    if (items.length < limit && !truncated) {
      if (items.length > 0 && bytes + size > maxBytes) truncated = true;
      else {
        items.push(e);
        bytes += size;
      }
    }
    const full = items.length >= limit || truncated;
    if (full && (total !== undefined || opts.total === false)) break;
  }
  return { items, total: total ?? counted, ...(truncated ? { truncated: true as const } : {}) };
}

/**
 * Lists dead letters matching `filter`, oldest first, at most `limit` (and at most
 * {@link LIST_MAX_BYTES} of letters), reading only what that needs.
 *
 * @example
 * ```ts ignore
 * import { listDeadLetters } from "./redrive.ts";
 * const crashed = await listDeadLetters(js, { stage: "topics", pending: true });
 * ```
 */
export async function listDeadLetters(
  js: JetStreamClient,
  filter: DeadLetterFilter = {},
  limit = 1000,
): Promise<DeadLetterEntry[]> {
  return (await listDeadLetterPage(js, filter, limit, { total: false })).items;
}

/** The original message's bytes, as the letter keeps them. */
function letterBytes(letter: DeadLetter): Uint8Array {
  return letter.payload_encoding === "base64"
    ? new Uint8Array(Buffer.from(letter.payload, "base64"))
    : encoder.encode(letter.payload);
}

/** The bytes to republish for a letter (`bytes`: its original, by default as it keeps it). */
export function originalBody(letter: DeadLetter, bytes = letterBytes(letter)): Uint8Array {
  if (!submissionDocument(letter.subject) || !letter.item_id) return bytes;
  // A bus submission without an id was given one from its stream position; keep it, so the
  // redriven submission is the same item and not a new one. Read as its consumer reads it:
  // a body that is not UTF-8, or holds a number JavaScript cannot keep as written, would be
  // re-encoded here into another submission (replacement characters, null, a rounded number).
  try {
    const doc = decodeJson(bytes) as Record<string, unknown> | null;
    if (doc && typeof doc === "object" && !Array.isArray(doc) && doc.id === undefined) {
      return encoder.encode(JSON.stringify({ ...doc, id: letter.item_id }));
    }
  } catch { /* not as its consumer reads JSON: kept as it was, and refused by the checks */ }
  return bytes;
}

/** What may be republished for a letter, or why nothing may. */
export type Redrivable = { body: Uint8Array; refused?: undefined } | { refused: string };

/**
 * Checks that a dead letter may be redriven, so a redrive can only ever re-deliver what a
 * stage consumed, never write anywhere else (a forged letter naming `$JS.API...`, a KV key,
 * or another item's events):
 * 1. its subject is consumed by the durable consumer of the stage that gave up on it (the
 *    allowlist is the live topology: the consumer's filter subject), or, that consumer gone (a
 *    step renamed or removed since), by a consumer a Weft stage made; and is no system subject;
 * 2. the stream that holds that subject still has, at the letter's `stream_seq`, a message on
 *    that subject with the letter's bytes (when retention already removed the original, the
 *    other checks stand alone); a letter that keeps only the head of a large original is
 *    redriven from that message, checked against the letter's SHA-256, or not at all;
 * 3. the original passes again the validation its consumer applies: a poison message would
 *    only be dead-lettered again.
 */
export async function checkRedrivable(
  jsm: JetStreamManager,
  letter: DeadLetter,
  opts: RedriveOptions = {},
): Promise<Redrivable> {
  const refusal = await refusalOf(jsm, letter, opts);
  return typeof refusal === "string" ? { refused: refusal } : { body: refusal };
}

/** What a redrive knows besides the catalog of events. */
export interface RedriveOptions {
  /**
   * Validates an original on a subject the catalog does not know (a definition's), as its
   * consumer would; throws what that consumer would dead-letter it for.
   */
  check?: (subject: string, value: unknown) => void;
  /**
   * Where the item a pipeline subject names has its entry event stored (e.g.
   * `orders.placed.<id>` for `orders.priced.<id>`); undefined for a subject of no known
   * pipeline; for a submission (`orders.submit`), of the item `item` its letter names. A
   * `not_found` letter (an event for an item that had not entered) is refused while nothing is
   * stored there, and a submission's `conflict` letter (its id taken by another body) once
   * something is: either redrive would be dead-lettered again.
   */
  entrySubject?: (subject: string, item?: string) => string | undefined;
}

async function refusalOf(
  jsm: JetStreamManager,
  letter: DeadLetter,
  opts: RedriveOptions,
): Promise<string | Uint8Array> {
  const subject = letter.subject;
  if (typeof subject !== "string" || /^[$_]/.test(subject) || /[\s*>]/.test(subject)) {
    return `subject ${JSON.stringify(subject)} may never be published to by a redrive`;
  }
  // An item id every consumer refuses at once (checked before anything else there).
  try {
    const parts = subject.split(".");
    if (parts.length === 3) assertSubjectItem(parts[2], subject);
  } catch (err) {
    return `the original would be dead-lettered again: ${(err as Error).message}`;
  }
  let stream: string;
  try {
    stream = await jsm.streams.find(subject);
  } catch {
    return `no stream holds ${subject}`;
  }
  if (stream === DEADLETTER_STREAM) return `${subject} is a dead-letter subject`;
  const filtersOf = (c: ConsumerConfig) =>
    c.filter_subjects ?? (c.filter_subject ? [c.filter_subject] : []);
  let own: ConsumerConfig | undefined;
  try {
    own = (await jsm.consumers.info(stream, letter.stage)).config;
  } catch { /* gone: a step renamed or removed since (below) */ }
  if (own && !filtersOf(own).some((f) => subjectMatches(f, subject))) {
    return `stage ${letter.stage} does not consume ${subject}`;
  }
  if (!own) {
    // The stage's consumer is gone (a definition's step renamed or removed since): the letter
    // may still go where a step of the running topology consumes its subject, as the new
    // name of the step does.
    let taken = false;
    try {
      for await (const ci of jsm.consumers.list(stream)) {
        if (
          ci.config.description?.startsWith(STAGE_DESCRIPTION) &&
          filtersOf(ci.config).some((f) => subjectMatches(f, subject))
        ) {
          taken = true;
          break;
        }
      }
    } catch { /* not allowed to list: as if no step took it */ }
    if (!taken) {
      return `stage ${JSON.stringify(letter.stage)} has no consumer on ${stream}, and no step ` +
        `of the running topology consumes ${subject}`;
    }
  }
  let bytes = letterBytes(letter);
  let stored: StoredMsg | null = null;
  try {
    stored = await jsm.streams.getMessage(stream, { seq: letter.stream_seq });
  } catch (err) {
    if (!(err instanceof JetStreamApiError && err.code === JetStreamApiCodes.NoMessageFound)) {
      throw err;
    }
  }
  if (stored && stored.subject !== subject) {
    return `the letter does not match message ${letter.stream_seq} of ${stream}`;
  }
  if (letter.payload_truncated) {
    if (!stored) {
      return `the letter keeps only the head of the original, which ${stream} no longer holds`;
    }
    if (sha256Hex(stored.data) !== letter.payload_sha256) {
      return `the letter does not match message ${letter.stream_seq} of ${stream}`;
    }
    bytes = stored.data;
  } else if (stored && !sameBytes(stored.data, bytes)) {
    return `the letter does not match message ${letter.stream_seq} of ${stream}`;
  }
  if (letter.code === ErrorCode.NotFound && opts.entrySubject) {
    const entry = opts.entrySubject(subject);
    if (
      entry !== undefined && entry !== subject &&
      !await storedMessage(jsm, stream, { last_by_subj: entry })
    ) {
      return `the original would be dead-lettered again: its item has not entered (nothing is ` +
        `stored on ${entry})`;
    }
  }
  if (
    letter.code === ErrorCode.Conflict && opts.entrySubject && letter.item_id &&
    submissionDocument(subject)
  ) {
    // A bus submission naming an id another body took: that body's item stands for good.
    const entry = opts.entrySubject(subject, letter.item_id);
    if (entry !== undefined && await storedMessage(jsm, stream, { last_by_subj: entry })) {
      return `the original would be dead-lettered again: item ${letter.item_id} has entered ` +
        `already (stored on ${entry}), and its first submission stands`;
    }
  }
  const body = originalBody(letter, bytes);
  try {
    const value = decodeJson(body);
    // Every consumer refuses a body nesting deeper than this before anything else.
    if (!depthWithin(value, MAX_DEPTH)) {
      throw new Error(`body nests deeper than ${MAX_DEPTH} levels`);
    }
    // A submission or a request is a plain document, whatever its subject looks like: a
    // request on `digest.request.<pipeline>` is no `digest.request` event of an item.
    const document = submissionDocument(subject) ?? requestDocument(subject);
    if (document) validateDocument(document, value);
    else if (parseEventSubject(subject)) {
      const event = validateEvent(value, [parseEventSubject(subject)!.type as keyof EventMap]);
      assertMatchesSubject(event, subject);
    } else opts.check?.(subject, value);
  } catch (err) {
    return `the original would be dead-lettered again: ${(err as Error).message}`;
  }
  return body;
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** The letter stored at `seq` in DEADLETTER; undefined when there is none (or a marker). */
async function letterAt(
  jsm: JetStreamManager,
  seq: number,
  byToken: Map<string, number>,
): Promise<DeadLetterEntry | undefined> {
  const m = await storedMessage(jsm, DEADLETTER_STREAM, { seq });
  if (!m || isMarker(m.subject) || !subjectMatches("deadletter.*.*", m.subject)) return undefined;
  try {
    const letter = m.json<DeadLetter>();
    if (letter === null || typeof letter !== "object") return undefined;
    return { seq, subject: m.subject, letter, redrives: byToken.get(String(seq)) ?? 0 };
  } catch {
    return undefined;
  }
}

/**
 * Republishes the selected dead letters' originals to their original subjects, each after
 * {@link checkRedrivable}; refused letters are reported, never published.
 *
 * @example
 * ```ts ignore
 * import { redrive } from "./redrive.ts";
 * const { redriven } = await redrive(js, { filter: { stage: "topics", code: "handler_failed" } });
 * ```
 */
export async function redrive(
  js: JetStreamClient,
  req: RedriveRequest,
  opts: RedriveOptions = {},
): Promise<RedriveResult> {
  const jsm = await js.jetstreamManager();
  const { last, byToken } = await redriveCounts(jsm);
  // The letters' seqs first (a letter is read again when its turn comes), so a redrive of
  // thousands holds no more than one letter at a time.
  let seqs: number[] = [];
  const notFound: number[] = [];
  if ("ids" in req) seqs = [...new Set(req.ids)];
  else {
    const filter = "filter" in req ? { ...req.filter, pending: true } : { pending: true };
    const subject = letterSubjectFilter(filter);
    if (subject !== undefined) {
      for await (const { entry: e } of scanLetters(jsm, subject, last, byToken)) {
        if (matches(e, filter)) seqs.push(e.seq);
      }
    }
  }
  const result: RedriveResult = { redriven: [], not_found: notFound, refused: [] };
  for (const seq of seqs) {
    const e = await letterAt(jsm, seq, byToken);
    if (!e) {
      notFound.push(seq);
      continue;
    }
    const checked = await checkRedrivable(jsm, e.letter, opts);
    if (checked.refused !== undefined) {
      result.refused.push({ seq: e.seq, reason: checked.refused });
      continue;
    }
    const msgId = `redrive-${e.seq}-${e.redrives + 1}`;
    const h = headers();
    h.set(REDRIVE_OF_HEADER, String(e.seq));
    // The item it was dead-lettered under: a definition's intake, which names a bus
    // submission's item by its stream position, re-submits it as that item (not a new one).
    if (e.letter.item_id) h.set(REDRIVE_ITEM_HEADER, e.letter.item_id);
    await js.publish(e.letter.subject, checked.body, { msgID: msgId, headers: h });
    const marker: Marker = { dl_seq: e.seq, msg_id: msgId, time: new Date().toISOString() };
    await js.publish(`${REDRIVEN_PREFIX}.${e.seq}`, encoder.encode(JSON.stringify(marker)), {
      msgID: `marker-${msgId}`,
    });
    const item: RedriveResult["redriven"][number] = {
      seq: e.seq,
      subject: e.letter.subject,
      msg_id: msgId,
    };
    if (e.letter.item_id) item.item_id = e.letter.item_id;
    result.redriven.push(item);
  }
  if (result.redriven.length === 0 && result.refused.length > 0) {
    throw new ValidationError(
      `nothing redriven: ${result.refused.map((r) => `${r.seq}: ${r.reason}`).join("; ")}`
        .slice(0, 2000),
      { field: "ids" in req ? "/ids" : "filter" in req ? "/filter" : "/all" },
    );
  }
  return result;
}

/**
 * A `weft.deadletters.list` request: a filter's fields, and `limit` (1 to 100000) as
 * `GET /deadletters?limit=` takes; no limit lists every match.
 */
function parseListRequest(value: unknown): { filter: DeadLetterFilter; limit: number } {
  if (typeof value !== "object" || value === null || !("limit" in value)) {
    return { filter: parseFilter(value), limit: Number.MAX_SAFE_INTEGER };
  }
  const { limit, ...rest } = value as Record<string, unknown>;
  if (!Number.isSafeInteger(limit) || (limit as number) < 1 || (limit as number) > 100_000) {
    throw new ValidationError("/limit must be an integer from 1 to 100000", { field: "/limit" });
  }
  return { filter: parseFilter(rest), limit: limit as number };
}

const LIST_HINT = "the oldest letters that fit the server's max_payload; narrow with a filter " +
  '({"stage", "code", "item_id", "pending"}) or {"limit": N}';

/**
 * Serves `weft.deadletters.list` and `weft.deadletters.redrive`; errors answer
 * `{"error": <problem>}` like the other request subjects.
 *
 * @example
 * ```ts ignore
 * const sub = serveDeadLetterRequests(nc, log);
 * // nats req weft.deadletters.redrive '{"filter":{"stage":"topics"}}'
 * sub.stop();
 * ```
 */
export function serveDeadLetterRequests(
  nc: NatsConnection,
  log: Logger,
  auth?: Auth,
  opts: RedriveOptions = {},
): { stop(): void } {
  // With API keys configured, dead letters need an admin key, as over HTTP.
  const admin = (m: Msg) => auth?.authorize(m.headers?.get("Authorization"), [Role.Admin]);
  const js = jetstream(nc);
  // An answer past max_payload is cut to fit (fitReply), never a 500 for work that was done.
  const reply = (m: Msg, work: () => Promise<unknown>, hint: string) =>
    replyTo(m, log, work, maxPayloadOf(nc), hint);
  const body = (m: Msg): unknown => {
    if (decoder.decode(m.data).trim() === "") return undefined;
    return requestJson(m.data, REDRIVE_BODY_LIMIT);
  };
  const subs = [
    nc.subscribe(DEADLETTERS_LIST_SUBJECT, {
      queue: "weft-gateway",
      callback: (_e, m) =>
        void reply(
          m,
          async () => {
            admin(m);
            const { limit, filter } = parseListRequest(body(m));
            // No limit lists every match, as '' means (the answer says when it was cut); no
            // more letters are kept than a reply can carry.
            const page = await listDeadLetterPage(js, filter, limit, {
              maxBytes: maxPayloadOf(nc),
            });
            return page.truncated ? { ...page, hint: LIST_HINT } : page;
          },
          LIST_HINT,
        ),
    }),
    nc.subscribe(DEADLETTERS_REDRIVE_SUBJECT, {
      queue: "weft-gateway",
      callback: (_e, m) =>
        void reply(
          m,
          async () => {
            admin(m);
            const done = await redrive(js, parseRedriveRequest(body(m)), opts);
            return {
              redriven_count: done.redriven.length,
              refused_count: done.refused.length,
              not_found_count: done.not_found.length,
              ...done,
            };
          },
          "every letter counted was handled; the lists keep the first that fit the server's " +
            "max_payload (GET /deadletters lists them with their redrives)",
        ),
    }),
  ];
  return { stop: () => subs.forEach((s) => s.unsubscribe()) };
}
