/**
 * Per-step flow control of a definition's work steps: at most N handler calls at once and
 * at most N calls per period, for the whole step or per key taken from the item's input
 * (e.g. at most 5 LLM calls at once per customer). In process: with R replicas of a step
 * the limits hold per replica. The rate limit is the LLM client's token bucket; the
 * concurrency limit is a small keyed semaphore (a few lines, no library keys one).
 *
 * @module
 */
import { createRateLimiter, type RateLimiter } from "../llm/rate_limit.ts";
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
  /** Waits for a slot and a token for the item; returns the release of the slot. */
  acquire(input: unknown, signal: AbortSignal): Promise<() => void>;
}

/**
 * The limiter of a step's `flow`; one that never waits when it sets none.
 *
 * @example
 * ```ts
 * import { createStepLimiter } from "./flow_control.ts";
 * const limiter = createStepLimiter({ concurrency: { limit: 1, key: "customer" } });
 * const release = await limiter.acquire({ customer: "c1" }, new AbortController().signal);
 * release();
 * ```
 */
export function createStepLimiter(flow: FlowControl | undefined): StepLimiter {
  const conc = flow?.concurrency;
  const rate = flow?.rateLimit;
  const slots = new Map<string, { active: number; waiting: (() => void)[] }>();
  const buckets = new Map<string, RateLimiter>();
  return {
    async acquire(input, signal) {
      if (rate) {
        const key = keyAt(input, rate.key);
        let b = buckets.get(key);
        if (!b) {
          buckets.set(
            key,
            b = createRateLimiter({
              requestsPerSecond: rate.limit / (rate.periodMs / 1000),
              burst: rate.limit,
            }),
          );
        }
        await b.acquire(signal);
      }
      if (!conc) return () => {};
      const key = keyAt(input, conc.key);
      let s = slots.get(key);
      if (!s) slots.set(key, s = { active: 0, waiting: [] });
      while (s.active >= conc.limit) {
        signal.throwIfAborted();
        await new Promise<void>((resolve) => s!.waiting.push(resolve));
      }
      s.active++;
      let released = false;
      return () => {
        if (released) return;
        released = true;
        s!.active--;
        const next = s!.waiting.shift();
        if (next) next();
        else if (s!.active === 0) slots.delete(key);
      };
    },
  };
}
