/**
 * The last message on each of a few subjects of a stream, read in one request: a batched direct
 * get (`$JS.API.DIRECT.GET.<stream>` with `multi_last`, nats-server 2.11+, on a stream with
 * `allow_direct`). Where two or more single reads (`STREAM.MSG.GET`) would each be a JetStream
 * API request, a JSON answer with base64 bodies, and a wake-up of the caller, this is one
 * request whose answers are the stored messages themselves. A read that cannot be trusted
 * whole answers `null`, and the caller reads the way it did before.
 *
 * @module
 */
import { type MsgHdrs, type NatsConnection, NoRespondersError } from "@nats-io/nats-core";
import { versionAtLeast } from "./nats_server.ts";

/** The first nats-server release that answers a direct get with `multi_last`. */
export const BATCHED_DIRECT_GET_SERVER = "2.11.0";

/** A stored message as a batched direct get returns it. */
export interface LastMessage {
  /** The subject it is stored on. */
  subject: string;
  /** Its stream sequence. */
  seq: number;
  /** Its body. */
  data: Uint8Array;
  /** The headers it was stored with (plus the direct get's `Nats-*` ones). */
  headers: MsgHdrs;
  /** Its body parsed as JSON (throws when it is not). */
  json<T = unknown>(): T;
}

/** The header with which a stream stores a message only as the first on its subject ("0"). */
export const EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence";

/**
 * True when `m` was stored as the first message on its subject: it carries "expected last
 * subject sequence 0" (the stream keeps a message's headers), which the server checked against
 * its own subject (no `...-Subject` header naming another subject to check), so it stored it
 * only while its subject held nothing. The subject's last message carrying it is therefore also
 * its first: nothing before it, nothing after.
 *
 * @example
 * ```ts
 * import { headers } from "@nats-io/nats-core";
 * import { storedFirstOnSubject } from "./last_messages.ts";
 * const h = headers();
 * h.set("Nats-Expected-Last-Subject-Sequence", "0");
 * console.assert(storedFirstOnSubject({ headers: h }));
 * h.set("Nats-Expected-Last-Subject-Sequence-Subject", "orders.other.o1");
 * console.assert(!storedFirstOnSubject({ headers: h }));
 * ```
 */
export function storedFirstOnSubject(m: { headers: MsgHdrs }): boolean {
  return m.headers.get(EXPECTED_LAST_SUBJECT_SEQ) === "0" &&
    !m.headers.has(`${EXPECTED_LAST_SUBJECT_SEQ}-Subject`);
}

const decoder = new TextDecoder();

/** Whether the server `nc` is connected to answers batched direct gets. */
export function answersBatchedReads(nc: NatsConnection): boolean {
  return versionAtLeast(nc.info?.version ?? "0.0.0", BATCHED_DIRECT_GET_SERVER);
}

/** How long a stream that answered no batched read is read the other way before trying again. */
const RETRY_AFTER_MS = 60_000;

/**
 * A reader of the last message on each of `subjects` (literal subjects, at most a few, or
 * filters with wildcards, such as an item's whole subject space `orders.*.o1`: each subject they
 * match, up to 256, else `null`) in `stream`, in one request: a map from subject to its last message (a subject with none is
 * absent), or `null` when this read cannot be trusted whole, for the caller to read the way it
 * did before. `null` when the server is older than 2.11 (without a request), the stream does not
 * allow direct gets (then no batched read is tried for a minute), the server answers anything
 * but the messages followed by its end-of-batch, nothing matched (an answer that says nothing of
 * how current the server answering was), or, with `atLeastSeq`, the server that answered held
 * less of the stream than that sequence (a direct get may be answered by a replica that lags
 * its leader; one that has the stream up to `atLeastSeq` has everything stored before it).
 *
 * @example
 * ```ts ignore
 * const read = lastMessagesReader(nc, "ORDERS");
 * const last = await read(["orders.placed.o1", "orders.failed.o1"], { atLeastSeq: 42 });
 * if (last === null) {
 *   // read them one by one
 * }
 * ```
 */
export function lastMessagesReader(
  nc: NatsConnection,
  stream: string,
  opts: { timeoutMs?: number } = {},
): (
  subjects: readonly string[],
  opts?: { atLeastSeq?: number },
) => Promise<Map<string, LastMessage> | null> {
  const supported = answersBatchedReads(nc);
  let offUntil = 0;
  return async (subjects, { atLeastSeq = 0 } = {}) => {
    if (!supported || performance.now() < offUntil) return null;
    const wanted = new Set(subjects);
    // Wildcards (an item's whole subject space, `orders.*.o1`): each subject they match once.
    const patterns = subjects.filter((s) => s.includes("*") || s.includes(">"))
      .map(subjectPattern);
    const batch = patterns.length > 0 ? MAX_WILDCARD_ANSWERS : subjects.length;
    const found = new Map<string, LastMessage>();
    let ended = false;
    try {
      const answers = await nc.requestMany(
        `$JS.API.DIRECT.GET.${stream}`,
        JSON.stringify({ multi_last: subjects, batch }),
        // The end-of-batch (and any status) has an empty body; a stored message with an empty
        // body ends the answer early too, and then it is not trusted (no end-of-batch seen).
        { strategy: "sentinel" as never, maxWait: opts.timeoutMs ?? 5000 },
      );
      for await (const m of answers) {
        const code = m.headers?.code ?? 0;
        if (code === 204) {
          const upTo = Number(m.headers!.get("Nats-UpTo-Sequence"));
          ended = Number.isSafeInteger(upTo) && upTo >= atLeastSeq;
          break;
        }
        if (code !== 0 || !m.headers) break; // a refusal, or "no results": not trusted
        const subject = m.headers.get("Nats-Subject");
        const seq = Number(m.headers.get("Nats-Sequence"));
        const asked = wanted.has(subject) || patterns.some((p) => p.test(subject));
        if (!asked || !Number.isSafeInteger(seq) || seq <= 0) break;
        const data = m.data;
        found.set(subject, {
          subject,
          seq,
          data,
          headers: m.headers,
          json: <T>() => JSON.parse(decoder.decode(data)) as T,
        });
      }
    } catch (err) {
      // No responders: the stream does not take direct gets (no `allow_direct`), or is gone.
      if (err instanceof NoRespondersError) {
        offUntil = performance.now() + RETRY_AFTER_MS;
      }
      return null;
    }
    // As many answers as the batch allows: there may be more (not trusted whole).
    return ended && (patterns.length === 0 || found.size < batch) ? found : null;
  };
}

/** At most this many subjects answered for a read with wildcards; more: read the other way. */
const MAX_WILDCARD_ANSWERS = 256;

/**
 * A NATS subject filter (`*`: one token, `>`: the rest) as a regular expression.
 *
 * @example
 * ```ts
 * import { subjectPattern } from "./last_messages.ts";
 * console.assert(subjectPattern("orders.*.o1").test("orders.placed.o1"));
 * console.assert(!subjectPattern("orders.*.o1").test("orders.placed.o12"));
 * ```
 */
export function subjectPattern(filter: string): RegExp {
  const tokens = filter.split(".").map((t) =>
    t === "*" ? "[^.]+" : t === ">" ? ".+" : t.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")
  );
  return new RegExp(`^${tokens.join("\\.")}$`);
}
