/**
 * Batched pulls from a durable consumer: for readers that fold many small messages and can
 * wait a few milliseconds, such as the state writer.
 *
 * `consume()` hands over each message the moment the server sends it, so a reader of a
 * trickle wakes once per message. Under Deno each wake-up (socket read, parser, async
 * iterator, microtasks) costs about 50 µs of CPU, more than folding the message; at 1,000
 * items/s the state writer, which reads every event of every item, spent most of its CPU
 * waking up. Here the reader instead waits, without polling, for the first message; then
 * lingers `lingerMs` so that more arrive; then takes everything waiting in one pull:
 * one wake-up per batch. This is the `fetch.min.bytes` + `fetch.max.wait` pattern of
 * batch consumers elsewhere, built from nats.js `fetch()` and consumer info, because
 * nats-server 2.9 has no pull option that waits for a minimum batch.
 *
 * @module
 */
import type { Consumer, JsMsg } from "@nats-io/jetstream";
import type { Logger } from "./log.ts";
import { sleep } from "./retry.ts";

/** How {@link pullBatches} pulls. */
export interface PullBatchesOptions {
  /** How long to wait after the first message before taking what is waiting, ms. */
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
 * Pulls a consumer's messages in batches: waits for one, lingers, then takes what is
 * waiting (at most `maxBatch`). With a backlog it does not linger.
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
    while (!closed) {
      const batch: JsMsg[] = [];
      try {
        // Idle: one pull request that waits for the next message, not a poll.
        if (await take(1, idleExpires, batch) === 0) continue;
        if (closed) {
          yield batch;
          break;
        }
        // A backlog is taken at once; a trickle is given time to gather.
        if (1 + batch[0]!.info.pending < opts.maxBatch) await pause(opts.lingerMs);
        let waiting = closed ? 0 : (await consumer.info(false)).num_pending;
        while (waiting > 0 && batch.length < opts.maxBatch && !closed) {
          // Exactly what is waiting, so the pull ends as soon as it has arrived. Another
          // reader of the same durable may take some of it: then this pull ends at its
          // expiry, with what it got.
          const want = Math.min(waiting, opts.maxBatch - batch.length);
          const got = await take(want, 1000, batch);
          if (got < want) break;
          waiting -= got;
        }
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
