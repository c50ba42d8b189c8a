/**
 * Per-step flow control of a definition's work steps: at most N handler calls at once and
 * at most N calls per period, for the whole step or per key taken from the item's input
 * (e.g. at most 5 LLM calls at once per customer). In process: with R replicas of a step
 * the limits hold per replica. The rate limit is a sliding log per key (the times of its
 * last `limit` calls: a call waits until the oldest is a whole period old, so no window of
 * `periodMs` ever holds more than `limit` calls, which a token bucket's burst and refill
 * would allow); the concurrency limit is a small keyed semaphore (a few lines, no library
 * keys one).
 *
 * @module
 */
import { type Clock, systemClock } from "../ai/llm/clock.ts";
import type { FlowControl } from "./definition.ts";

/** The value at a dotted path of `doc`, as a key; `""` when absent. */
export function keyAt(doc: unknown, path: string | undefined): string {
  if (!path) return "";
  let v: unknown = doc;
  for (const part of path.split(".")) {
    v = v !== null && typeof v === "object" ? (v as Record<string, unknown>)[part] : undefined;
  }
  return v === undefined || v === null ? "" : typeof v === "string" ? v : JSON.stringify(v);
}

/** Limits applied around a handler call. */
export interface StepLimiter {
  /**
   * Waits for a token and a slot for the item (the token is stamped when the call starts,
   * holding its slot; no slot is held while waiting for a token); returns the release of the
   * slot. Rejects with `signal.reason` when the signal aborts while it waits.
   */
  acquire(input: unknown, signal: AbortSignal): Promise<() => void>;
  /**
   * How many keys it holds state for now. Bounded by the keys in use: a key's log of call
   * times is forgotten once its last call is a whole period old (nothing in it limits any
   * more), and its concurrency slots once none is taken.
   */
  keys(): number;
}

/**
 * The limiter of a step's `flow`; one that never waits when it sets none. `clock` is what
 * the rate limit reads and sleeps on (tests pass a manual one).
 *
 * @example
 * ```ts
 * import { createStepLimiter } from "./flow_control.ts";
 * const limiter = createStepLimiter({ concurrency: { limit: 1, key: "customer" } });
 * const release = await limiter.acquire({ customer: "c1" }, new AbortController().signal);
 * release();
 * ```
 */
export function createStepLimiter(
  flow: FlowControl | undefined,
  clock: Clock = systemClock,
): StepLimiter {
  const conc = flow?.concurrency;
  const rate = flow?.rateLimit;
  const slots = new Map<string, { active: number; waiting: (() => void)[] }>();
  // A fractional limit: at most its whole part per period (2.5 per second is 2 in any second);
  // one below 1: one call per `periodMs / limit` (0.5 per second is one per 2 s).
  const most = rate ? (rate.limit >= 1 ? Math.floor(rate.limit) : 1) : 0;
  const period = rate ? (rate.limit >= 1 ? rate.periodMs : rate.periodMs / rate.limit) : 0;
  // Per key: the times of its last `most` calls, oldest first, and how many callers are in its
  // acquire. Keys come from items (e.g. a customer id), so without forgetting idle ones a
  // flood of distinct keys would grow this map, and the process, without bound.
  const logs = new Map<string, { times: number[]; busy: number }>();
  let swept = clock.now();
  const sweep = (now: number) => {
    if (!rate || now - swept < period) return;
    swept = now;
    for (const [key, l] of logs) {
      if (l.busy === 0 && !(now - (l.times.at(-1) ?? -Infinity) < period)) logs.delete(key);
    }
  };
  return {
    keys: () => logs.size + slots.size,
    async acquire(input, signal) {
      if (!rate) return conc ? await takeSlot(keyAt(input, conc.key), signal) : () => {};
      // The rate's token is stamped when the call starts, once it holds its slot: a token
      // taken while the call still waited for a slot counted a start that came later, so
      // calls the slots held back started together with later ones, more than `limit` in a
      // window (2 per second ran 4 within 502 ms). It waits for room in its key's log
      // without a slot, so a key out of tokens holds no slot that another key could use.
      const key = keyAt(input, rate.key);
      sweep(clock.now());
      let l = logs.get(key);
      if (!l) logs.set(key, l = { times: [], busy: 0 });
      l.busy++;
      try {
        for (;;) {
          await roomIn(l, signal);
          const release = conc ? await takeSlot(keyAt(input, conc.key), signal) : () => {};
          const now = clock.now();
          prune(l, now);
          if (l.times.length < most) {
            l.times.push(now);
            return release;
          }
          release(); // the room went to another call while this one waited for its slot
        }
      } finally {
        l.busy--;
      }
    },
  };

  /** Drops the calls a whole period old: a window of `period` ending now excludes them. */
  function prune(l: { times: number[] }, now: number): void {
    while (l.times.length > 0 && now - l.times[0]! >= period) l.times.shift();
  }

  /** Waits until the key's log has room for a call (takes none). */
  async function roomIn(l: { times: number[] }, signal: AbortSignal): Promise<void> {
    for (;;) {
      signal.throwIfAborted();
      const now = clock.now();
      prune(l, now);
      if (l.times.length < most) return;
      await clock.sleep(l.times[0]! + period - now, signal);
    }
  }

  async function takeSlot(key: string, signal: AbortSignal): Promise<() => void> {
    const limit = conc!.limit;
    let s = slots.get(key);
    if (!s) slots.set(key, s = { active: 0, waiting: [] });
    const slot = s;
    if (slot.active < limit) slot.active++;
    else {
      // A release hands its slot straight to the first waiter (`active` stays as it is), so
      // no newcomer can take it in between, and the key's entry is never dropped while a
      // woken waiter has yet to run: two releases in one tick, the second finding no
      // waiter and the count at 0, dropped it before, and the woken waiter ran on the
      // dropped entry beside newcomers on a fresh one, over the limit.
      signal.throwIfAborted();
      await new Promise<void>((resolve, reject) => {
        const wake = () => {
          signal.removeEventListener("abort", onAbort);
          resolve();
        };
        const onAbort = () => {
          const i = slot.waiting.indexOf(wake);
          if (i >= 0) slot.waiting.splice(i, 1);
          reject(signal.reason);
        };
        slot.waiting.push(wake);
        signal.addEventListener("abort", onAbort, { once: true });
      });
    }
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const next = slot.waiting.shift();
      if (next) next(); // the slot passes to it
      else if (--slot.active === 0) slots.delete(key);
    };
  }
}

/**
 * A batched step's limits, split by what they count: a limit per key counts the key's items
 * (each item takes its slot and token before it joins a batch), a limit without a key counts
 * the step's `handleBatch` calls (one batched API call each). Before, every limit counted
 * items, so a global `concurrency: 1` handed over batches of one item, each held back for
 * `maxWaitMs`.
 *
 * @example
 * ```ts
 * import { batchedLimits } from "./flow_control.ts";
 * const { perItem, perCall } = batchedLimits({
 *   batch: { maxItems: 10, maxWaitMs: 50 },
 *   concurrency: { limit: 1 },
 *   rateLimit: { limit: 5, periodMs: 1000, key: "customer" },
 * });
 * console.log(perItem.rateLimit?.key, perCall.concurrency?.limit); // customer 1
 * ```
 */
export function batchedLimits(
  flow: FlowControl,
): { perItem: FlowControl; perCall: FlowControl } {
  const { concurrency, rateLimit } = flow;
  return {
    perItem: {
      ...(concurrency?.key ? { concurrency } : {}),
      ...(rateLimit?.key ? { rateLimit } : {}),
    },
    perCall: {
      ...(concurrency && !concurrency.key ? { concurrency } : {}),
      ...(rateLimit && !rateLimit.key ? { rateLimit } : {}),
    },
  };
}

/**
 * Gathers single calls into batches: up to `maxItems` values, or whatever arrived within
 * `maxWaitMs` of the first, handed to `run` at once; each caller gets its own result. With
 * `order`, a batch is handed over sorted by it (the runner passes each message's stream
 * sequence: calls arrive in whatever order their own awaits end, not the stream's). A
 * failed batch fails each of its calls. A call with `alone` (a retry: the runner passes it for
 * a redelivered message) runs at once in a batch of its own, so a failed batch's items are
 * retried item by item: one bad item cannot fail the others again, and each item's retries
 * are its own.
 *
 * @example
 * ```ts
 * import { createBatcher } from "./flow_control.ts";
 * const double = createBatcher({ maxItems: 10, maxWaitMs: 5 }, async (xs: number[]) => xs.map((x) => x * 2));
 * console.log(await Promise.all([double(1, undefined), double(2, undefined)])); // [2, 4]
 * console.log(await double(3, undefined, { alone: true })); // 6, in a batch of one
 * ```
 */
export function createBatcher<V, C, R>(
  opts: { maxItems: number; maxWaitMs: number; order?: (ctx: C) => number },
  run: (values: V[], ctxs: C[]) => Promise<R[]> | R[],
): (value: V, ctx: C, call?: { alone?: boolean }) => Promise<R> {
  type Entry = { value: V; ctx: C; resolve: (r: R) => void; reject: (e: unknown) => void };
  const pending: Entry[] = [];
  let timer: ReturnType<typeof setTimeout> | undefined;
  const runBatch = async (batch: Entry[]) => {
    try {
      const results = await run(batch.map((e) => e.value), batch.map((e) => e.ctx));
      if (!Array.isArray(results) || results.length !== batch.length) {
        throw new Error(
          `handleBatch returned ${Array.isArray(results) ? results.length : "no"} results for ` +
            `${batch.length} values`,
        );
      }
      batch.forEach((e, i) => e.resolve(results[i]!));
    } catch (err) {
      for (const e of batch) e.reject(err);
    }
  };
  const flush = async () => {
    if (timer !== undefined) clearTimeout(timer);
    timer = undefined;
    const batch = pending.splice(0, opts.maxItems);
    if (opts.order) batch.sort((a, b) => opts.order!(a.ctx) - opts.order!(b.ctx));
    if (pending.length > 0) timer = setTimeout(flush, opts.maxWaitMs);
    if (batch.length > 0) await runBatch(batch);
  };
  return (value, ctx, call) =>
    new Promise<R>((resolve, reject) => {
      if (call?.alone) return void runBatch([{ value, ctx, resolve, reject }]);
      pending.push({ value, ctx, resolve, reject });
      if (pending.length >= opts.maxItems) void flush();
      else if (timer === undefined) timer = setTimeout(flush, opts.maxWaitMs);
    });
}
