/**
 * Retry delays: exponential backoff with "equal jitter", so retries of many items that
 * failed together spread out instead of hammering a recovering dependency in step; and
 * the wait itself, cut short when its signal aborts.
 *
 * @module
 */

/**
 * The delay before retry number `attempt` (1 = first retry), in ms: half of
 * `min(max, base * 2^(attempt-1))` fixed, the other half random.
 *
 * @example
 * ```ts
 * import { retryDelay } from "./retry.ts";
 * const d = retryDelay(3, 100, 10_000, () => 0.5);
 * console.assert(d === 300);
 * ```
 */
export function retryDelay(
  attempt: number,
  baseMs: number,
  maxMs: number,
  random: () => number = Math.random,
): number {
  const cap = Math.min(maxMs, baseMs * 2 ** Math.max(0, attempt - 1));
  return Math.round(cap / 2 + random() * (cap / 2));
}

/**
 * Waits `ms`, or less when `signal` aborts meanwhile; never rejects.
 *
 * @example
 * ```ts
 * import { sleep } from "./retry.ts";
 * const stop = new AbortController();
 * stop.abort();
 * await sleep(60_000, stop.signal); // returns at once
 * ```
 */
export function sleep(ms: number, signal: AbortSignal): Promise<void> {
  if (signal.aborted) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
  });
}

/**
 * Calls `fn` until it resolves, at most `attempts` times, waiting {@link retryDelay} between
 * tries; rejects with the last error. For start-up calls that can fail for a moment and then
 * work (e.g. on a cluster, a stream just created is not usable on every node at once).
 * (p-retry would do; these few lines reuse the jittered delay every retry here uses.)
 *
 * @example
 * ```ts
 * import { retrying } from "./retry.ts";
 * let calls = 0;
 * const v = await retrying(async () => {
 *   if (++calls < 3) throw new Error("not yet");
 *   return "ok";
 * }, { attempts: 5, baseMs: 1, maxMs: 5, signal: new AbortController().signal });
 * console.assert(v === "ok" && calls === 3);
 * ```
 */
export async function retrying<T>(
  fn: () => Promise<T>,
  opts: { attempts: number; baseMs: number; maxMs: number; signal: AbortSignal },
): Promise<T> {
  for (let attempt = 1;; attempt++) {
    try {
      return await fn();
    } catch (err) {
      if (attempt >= opts.attempts || opts.signal.aborted) throw err;
      await sleep(retryDelay(attempt, opts.baseMs, opts.maxMs), opts.signal);
    }
  }
}

/**
 * `make()` on the first call and its promise after, except that a rejected one is not kept:
 * the next call makes it again. For what is opened once and used for the life of a process
 * (a bucket, a JetStream manager): one failure while NATS is away must not stay cached and
 * fail every later call.
 *
 * @example
 * ```ts
 * import { lazy } from "./retry.ts";
 * let calls = 0;
 * const open = lazy(() => ++calls === 1 ? Promise.reject(new Error("down")) : Promise.resolve(calls));
 * await open().catch(() => {}); // the first try fails...
 * console.assert(await open() === 2 && await open() === 2); // ...the next opens, once
 * ```
 */
export function lazy<T>(make: () => Promise<T>): () => Promise<T> {
  let p: Promise<T> | undefined;
  return () =>
    p ??= make().catch((err) => {
      p = undefined;
      throw err;
    });
}
