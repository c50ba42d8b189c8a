/**
 * Batched pulls from a durable consumer: for readers that fold many small messages and can
 * wait a few milliseconds, such as the state writer.
 *
 * `consume()` hands over each message the moment the server sends it, so a reader of a
 * trickle wakes once per message. Under Deno each wake-up (socket read, parser, async
 * iterator, microtasks) costs about 50 µs of CPU, more than folding the message; at 1,000
 * items/s the state writer, which reads every event of every item, spent most of its CPU
 * waking up. Here the reader takes one batch, then lets `lingerMs` pass (counted from that
 * pull) before it asks for the next, so what arrives meanwhile comes as one batch: one
 * wake-up per batch. When nothing is waiting, its pull waits for the next message (no
 * polling) and hands it over at once.
 *
 * How much is waiting comes from the `pending` count the server puts on every message it
 * delivers, never from consumer info: on nats-server 2.9 a consumer info request on a
 * wildcard filter counts the stream's subjects under the lock the stream writes with, so
 * asking it before every batch stalled every publish (see docs/BENCH.md).
 *
 * @module
 */
import type { Consumer, JsMsg } from "@nats-io/jetstream";
import type { Logger } from "./observability/log.ts";
import { sleep } from "./retry.ts";

/** How {@link pullBatches} pulls. */
export interface PullBatchesOptions {
  /** Least time from one batch to the next unless a backlog waits, ms. */
  lingerMs: number;
  /** Most messages in one batch. */
  maxBatch: number;
  /** How long one idle wait for a first message lasts before it is renewed, ms (>= 1000). */
  idleExpiresMs?: number;
  /** Called when a pull fails; the pull is retried after `retryMs`. */
  onError?: (err: unknown) => Promise<void> | void;
  retryMs?: number;
  log?: Logger;
}

/** Batches of messages; `close()` ends the iteration after the pull in progress. */
export interface MessageBatches extends AsyncIterable<JsMsg[]> {
  close(): void;
}

/**
 * Pulls a consumer's messages in batches of at most `maxBatch`, at most one batch per
 * `lingerMs` unless a backlog waits: a backlog is taken in full batches without pause.
 *
 * @example
 * ```ts ignore
 * const batches = pullBatches(consumer, { lingerMs: 20, maxBatch: 2000 });
 * for await (const batch of batches) {
 *   for (const m of batch) m.ack();
 * }
 * ```
 */
export function pullBatches(consumer: Consumer, opts: PullBatchesOptions): MessageBatches {
  const idleExpires = Math.max(1000, opts.idleExpiresMs ?? 30_000);
  const retryMs = opts.retryMs ?? 500;
  const closing = new AbortController();
  let closed = false;
  let current: { stop(err?: Error): void } | undefined;
  const pause = (ms: number) => sleep(ms, closing.signal);

  /** Pulls up to `n` messages, waiting at most `expires` for them. */
  async function take(n: number, expires: number, into: JsMsg[]): Promise<number> {
    const messages = await consumer.fetch({ max_messages: n, expires });
    current = messages;
    let got = 0;
    try {
      for await (const m of messages) {
        into.push(m);
        got++;
      }
    } finally {
      current = undefined;
    }
    return got;
  }

  async function* batches(): AsyncGenerator<JsMsg[]> {
    let lastPull = -Infinity;
    let backlog = false;
    while (!closed) {
      const batch: JsMsg[] = [];
      try {
        // What arrives within `lingerMs` of the last batch waits to come as one batch.
        const wait = backlog ? 0 : lastPull + opts.lingerMs - performance.now();
        if (wait > 0) await pause(wait);
        if (closed) break;
        // One pull that waits for the next message (not a poll); its `pending` says how
        // many more wait behind it.
        if (await take(1, idleExpires, batch) === 0) continue;
        let waiting = batch[0]!.info.pending;
        while (waiting > 0 && batch.length < opts.maxBatch && !closed) {
          // Exactly what is waiting, so the pull ends as soon as it has arrived. Another
          // reader of the same durable may take some of it: then this pull ends at its
          // expiry, with what it got.
          const want = Math.min(waiting, opts.maxBatch - batch.length);
          const got = await take(want, 1000, batch);
          if (got < want) break;
          waiting = batch[batch.length - 1]!.info.pending;
        }
        lastPull = performance.now();
        backlog = batch.length >= opts.maxBatch && waiting > 0;
      } catch (err) {
        if (closed) {
          if (batch.length > 0) yield batch;
          break;
        }
        opts.log?.warn("pull failed; retrying", { err });
        if (batch.length > 0) yield batch;
        await pause(retryMs);
        await opts.onError?.(err);
        continue;
      }
      yield batch;
    }
  }

  const iterator = batches();
  return {
    [Symbol.asyncIterator]: () => iterator,
    close() {
      closed = true;
      current?.stop();
      closing.abort();
    },
  };
}
