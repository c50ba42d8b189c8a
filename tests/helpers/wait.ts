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
 * `ms`. For conditions with no event to wait on (a consumer's counters, a KV entry). It looks
 * again after 25 ms, then half as long again each time up to every 250 ms: quick for what
 * holds soon, and a long wait does not keep the mesh it watches busy answering (a look is
 * usually a request to a service sharing the test's cores).
 */
export async function waitFor<T>(
  check: () => Promise<T | undefined | false> | T | undefined | false,
  ms: number,
  what: string,
): Promise<T> {
  const until = Date.now() + ms;
  let last: unknown;
  let pause = 25;
  while (Date.now() < until) {
    try {
      const v = await check();
      if (v !== undefined && v !== false) return v as T;
    } catch (err) {
      last = err;
    }
    // Never sleep past the deadline: the last look is at it.
    await new Promise((r) => setTimeout(r, Math.max(0, Math.min(pause, until - Date.now()))));
    pause = Math.min(250, Math.round(pause * 1.5));
  }
  try {
    const v = await check();
    if (v !== undefined && v !== false) return v as T;
  } catch (err) {
    last = err;
  }
  throw new Error(`timed out after ${ms} ms: ${what}${last ? ` (last error: ${last})` : ""}`);
}

/**
 * Re-checks the condition `check` every `intervalMs` (100) until it holds; after `ms`, fails with
 * `describe()`, asked for only then. For conditions that are costly to check (a whole
 * stream's counts, every state in the bucket) and whose failure needs explaining. A check
 * that throws (e.g. a request while the server restarts) counts as not yet.
 */
export async function waitUntil(
  check: () => Promise<boolean> | boolean,
  ms: number,
  describe: () => Promise<string> | string = () => "condition not met",
  intervalMs = 100,
): Promise<void> {
  const end = Date.now() + ms;
  let lastError: unknown;
  while (true) {
    try {
      if (await check()) return;
    } catch (err) {
      lastError = err;
    }
    if (Date.now() > end) {
      const why = await Promise.resolve().then(describe).catch((e) => String(e));
      throw new Error(`timed out after ${ms} ms: ${why}`, { cause: lastError });
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}
