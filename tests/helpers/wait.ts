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
 * Calls `check` until it returns a value other than undefined/false, for at most `ms`: again
 * after 25 ms, then half as long again each time up to every `maxPauseMs`, with a last look
 * at the deadline. Quick for what holds soon, and a long wait does not keep the mesh it
 * watches busy answering (a look is usually a request to a service sharing the test's
 * cores). A check that throws counts as not yet; the last error is kept.
 */
async function poll<T>(
  check: () => Promise<T | undefined | false> | T | undefined | false,
  ms: number,
  maxPauseMs: number,
): Promise<{ value: T } | { last: unknown }> {
  const until = Date.now() + ms;
  let last: unknown;
  let pause = 25;
  while (true) {
    try {
      const v = await check();
      if (v !== undefined && v !== false) return { value: v as T };
    } catch (err) {
      last = err;
    }
    const left = until - Date.now();
    if (left <= 0) return { last };
    await new Promise((r) => setTimeout(r, Math.min(pause, left)));
    pause = Math.min(maxPauseMs, Math.round(pause * 1.5));
  }
}

/**
 * Re-checks `check` (see `poll`: up to every 250 ms) until it returns a value other than
 * undefined/false, or fails after `ms`. For conditions with no event to wait on (a
 * consumer's counters, a KV entry).
 */
export async function waitFor<T>(
  check: () => Promise<T | undefined | false> | T | undefined | false,
  ms: number,
  what: string,
): Promise<T> {
  const r = await poll(check, ms, 250);
  if ("value" in r) return r.value;
  throw new Error(`timed out after ${ms} ms: ${what}${r.last ? ` (last error: ${r.last})` : ""}`);
}

/**
 * Re-checks the condition `check` (see `poll`: up to every `maxPauseMs`, 250 by default)
 * until it holds; after `ms`, fails with `describe()`, asked for only then. For conditions
 * that are costly to check (a whole stream's counts, every state in the bucket) and whose
 * failure needs explaining. A check that throws (e.g. a request while the server restarts)
 * counts as not yet.
 */
export async function waitUntil(
  check: () => Promise<boolean> | boolean,
  ms: number,
  describe: () => Promise<string> | string = () => "condition not met",
  maxPauseMs = 250,
): Promise<void> {
  const r = await poll(check, ms, maxPauseMs);
  if ("value" in r) return;
  const why = await Promise.resolve().then(describe).catch((e) => String(e));
  throw new Error(`timed out after ${ms} ms: ${why}`, { cause: r.last });
}
