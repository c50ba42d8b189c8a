/**
 * Waiting in tests: on a promise or a condition, always with a deadline, never a sleep.
 *
 * @module
 */

/** Resolves with `p`, or rejects naming `what` when `ms` pass first. */
export async function deadline<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Re-checks `check` until it returns a value other than undefined/false, or fails after
 * `ms`. For conditions with no event to wait on (a consumer's counters, a KV entry).
 */
export async function waitFor<T>(
  check: () => Promise<T | undefined | false> | T | undefined | false,
  ms: number,
  what: string,
): Promise<T> {
  const until = Date.now() + ms;
  let last: unknown;
  while (Date.now() < until) {
    try {
      const v = await check();
      if (v !== undefined && v !== false) return v as T;
    } catch (err) {
      last = err;
    }
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`timed out after ${ms} ms: ${what}${last ? ` (last error: ${last})` : ""}`);
}
