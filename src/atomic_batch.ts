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
  const batch = await js.startBatch(first!.subject, first!.data, { headers: first!.headers });
  const last = rest.pop()!;
  for (const m of rest) batch.add(m.subject, m.data, { headers: m.headers });
  try {
    await batch.commit(last.subject, last.data, { headers: last.headers });
  } catch (err) {
    throw new AtomicBatchRefused(messages.length, { cause: err });
  }
}
