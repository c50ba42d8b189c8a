/**
 * Publishing several messages as one atomic batch: the stream stores all of them or none.
 *
 * nats-server 2.12 added atomic batch publish (ADR-50), for streams created with
 * `allow_atomic: true`; nats.js implements the client side (`js.startBatch()`). Weft
 * turns it on for each stream whose wiring asks (`atomicBatch`) where the server has it
 * (src/topology.ts), so a batch submission is all or nothing on the bus, not only in its HTTP
 * answer. On an
 * older server the intake publishes each item on its own, as before.
 *
 * Weft's entry events carry `Nats-Msg-Id` and "expected last subject sequence 0". 2.12.0
 * refuses a batch whose messages carry those headers (checked here with 2.12.0); 2.14.0 and
 * 2.15.3 take them and check each. So Weft uses atomic batches from 2.14.0 on.
 *
 * @module
 */
import type { MsgHdrs } from "@nats-io/nats-core";
import { JetStreamApiError, type JetStreamClient, type JetStreamManager } from "@nats-io/jetstream";
import { versionAtLeast } from "./nats_server.ts";
import { ErrorCode, WeftError } from "./errors.ts";

/** The first nats-server release whose atomic batches take Weft's per-message headers. */
export const ATOMIC_BATCH_SERVER = "2.14.0";

/** The most messages nats-server takes in one atomic batch (its default limit). */
export const ATOMIC_BATCH_MAX = 1000;

/**
 * Atomic batches one gateway has in flight on a stream at most: nats-server keeps at most 50
 * per stream, so three gateway replicas stay below the limit.
 */
export const ATOMIC_BATCHES_IN_FLIGHT = 16;

/** Whether a server of this version (`nc.info.version`) can store atomic batches. */
export function supportsAtomicBatch(version: string | undefined): boolean {
  return version !== undefined && versionAtLeast(version, ATOMIC_BATCH_SERVER);
}

/** Whether `stream` takes atomic batches (its `allow_atomic` is set). */
export async function allowsAtomicBatch(jsm: JetStreamManager, stream: string): Promise<boolean> {
  const info = await jsm.streams.info(stream);
  return (info.config as { allow_atomic?: boolean }).allow_atomic === true;
}

/** One message of a batch, with the headers it is stored with. */
export interface BatchMessage {
  subject: string;
  data: Uint8Array;
  headers: MsgHdrs;
}

/** nats-server's "atomic publish too many inflight" (JetStream API error code). */
const TOO_MANY_OPEN_BATCHES = 10210;

/**
 * The server did not store the batch: nothing of it is in the stream. nats.js does not
 * pass on the server's reason for a refused commit, so the caller looks at the stream to
 * find out what happened (an expected-sequence header that failed, a full stream).
 */
export class AtomicBatchRefused extends Error {
  constructor(readonly count: number, options?: ErrorOptions) {
    super(`the stream refused a batch of ${count} messages: none of them was stored`, options);
    this.name = "AtomicBatchRefused";
  }
}

/**
 * Publishes `messages` (1 to {@link ATOMIC_BATCH_MAX}) as one atomic batch and resolves
 * once the stream has stored all of them; throws {@link AtomicBatchRefused} when it stored
 * none. Headers such as `Nats-Msg-Id` and `Nats-Expected-Last-Subject-Sequence` are
 * checked for every message, and one that fails refuses the whole batch. The first
 * message's own refusal (e.g. a stream that does not allow atomic batches) is thrown as
 * nats.js reports it, a `JetStreamApiError` with the server's code.
 */
export async function publishAtomically(
  js: JetStreamClient,
  messages: readonly BatchMessage[],
): Promise<void> {
  if (messages.length === 0) return;
  if (messages.length > ATOMIC_BATCH_MAX) {
    throw new RangeError(`an atomic batch holds at most ${ATOMIC_BATCH_MAX} messages`);
  }
  const [first, ...rest] = messages;
  if (rest.length === 0) {
    // A batch of one is an ordinary publish with the same headers.
    try {
      await js.publish(first!.subject, first!.data, { headers: first!.headers });
    } catch (err) {
      throw err instanceof JetStreamApiError ? new AtomicBatchRefused(1, { cause: err }) : err;
    }
    return;
  }
  let batch;
  try {
    batch = await js.startBatch(first!.subject, first!.data, { headers: first!.headers });
  } catch (err) {
    // The server holds too many open batches (anyone who may publish on the stream can open
    // some and never commit them): nothing was stored, and a retry may pass.
    if (err instanceof JetStreamApiError && err.code === TOO_MANY_OPEN_BATCHES) {
      throw new AtomicBatchRefused(messages.length, { cause: err });
    }
    throw err;
  }
  const last = rest.pop()!;
  for (const m of rest) batch.add(m.subject, m.data, { headers: m.headers });
  try {
    await batch.commit(last.subject, last.data, { headers: last.headers });
  } catch (err) {
    throw new AtomicBatchRefused(messages.length, { cause: err });
  }
}

/** What {@link storeBatch} stores, and how it tells what the stream has already. */
export interface BatchStore<T> {
  js: JetStreamClient;
  jsm: JetStreamManager;
  /** The stream the batch goes to (it must allow atomic batches to be all or none). */
  stream: string;
  items: readonly T[];
  /**
   * The items the stream does not have yet, throwing for one it has with another body
   * (`again`: after a refused batch, when another request may have stored some meanwhile).
   */
  remaining(items: readonly T[], again: boolean): Promise<readonly T[]>;
  /** An item as the message that stores it. */
  message(item: T): BatchMessage;
  /** Stores items one by one: the stream no longer takes atomic batches (an older server). */
  oneByOne(items: readonly T[]): Promise<void>;
  /** Throws when the stream is too full to take more (507). */
  checkCapacity?(): Promise<void>;
}

/**
 * Stores a batch submission's items as one atomic batch: all of them, or none and it throws,
 * so a retry of the request stores them. Items the stream has already (a replay) are left
 * out. When the stream refuses the batch, it looks again at what the stream has (another
 * request with the same ids may have stored some), checks capacity, and tries the rest again:
 * three times in all, then 503 (none stored). Resolves to how many items the atomic batch
 * stored (0 when it went one by one: what `oneByOne` stores is its own to count).
 *
 * @example
 * ```ts ignore
 * const stored = await storeBatch({ js, jsm, stream: "ORDERS", items, remaining, message, oneByOne });
 * ```
 */
export async function storeBatch<T>(b: BatchStore<T>): Promise<number> {
  for (let attempt = 1;; attempt++) {
    const todo = await b.remaining(b.items, attempt > 1);
    if (todo.length === 0) return 0;
    try {
      await publishAtomically(b.js, todo.map(b.message));
      return todo.length;
    } catch (err) {
      if (!(err instanceof AtomicBatchRefused)) {
        // Refused at its first message: if the stream no longer takes atomic batches (an
        // older server now), item by item as on such a server.
        if (await allowsAtomicBatch(b.jsm, b.stream).catch(() => true)) throw err;
        await b.oneByOne(todo);
        return 0;
      }
      // Nothing of the batch was stored: some item was stored meanwhile by another request
      // with the same id (look again and leave it out), or the stream refused the batch:
      // full (507), or another reason (503, safe to retry).
      await b.checkCapacity?.();
      if (attempt >= 3) {
        throw new WeftError(
          ErrorCode.Unavailable,
          `the stream refused the batch of ${todo.length} items: none of them was stored; ` +
            `retry it`,
          { cause: err, retryAfterSeconds: 1 },
        );
      }
    }
  }
}
