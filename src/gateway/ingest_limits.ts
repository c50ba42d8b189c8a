/**
 * Per-API-key ingest limits: a rate (token bucket: sustained items per second with a burst)
 * and a daily quota, configured per role and per key (`WEFT_RATE_LIMITS`). A request over
 * either gets `429 rate_limited` with `Retry-After`; nothing is accepted for it.
 *
 * Written here rather than taken from npm: it needs a non-blocking take of N tokens (a batch
 * counts its items) that says how long until they are there, keyed by the caller's key with
 * limits that depend on its role and name, plus a daily quota; Hono's rate-limit packages
 * count requests in fixed windows behind a store abstraction. The logic is ~40 lines.
 *
 * Limits are kept per gateway process: with N gateway replicas a key may use N times them.
 *
 * @module
 */
import { ErrorCode, WeftError } from "../errors.ts";

/** One limit: any field may be left out (no limit of that kind). */
export interface IngestLimit {
  /** Sustained items per second. */
  per_second?: number;
  /** Items allowed at once after idling; defaults to `per_second`. */
  burst?: number;
  /** Items per UTC day. */
  per_day?: number;
}

/** `WEFT_RATE_LIMITS`: limits by role, and by key name (which win over their role's). */
export interface IngestLimits {
  roles?: Partial<Record<string, IngestLimit>>;
  keys?: Partial<Record<string, IngestLimit>>;
}

/**
 * Parses `WEFT_RATE_LIMITS`; undefined when invalid.
 *
 * @example
 * ```ts
 * import { parseIngestLimits } from "./ingest_limits.ts";
 * const l = parseIngestLimits('{"roles":{"ingest":{"per_second":50,"per_day":100000}}}');
 * console.assert(l?.roles?.ingest?.per_second === 50);
 * ```
 */
export function parseIngestLimits(raw: string): IngestLimits | undefined {
  let v: unknown;
  try {
    v = JSON.parse(raw);
  } catch {
    return undefined;
  }
  if (v === null || typeof v !== "object" || Array.isArray(v)) return undefined;
  const ok = (l: unknown) =>
    l !== null && typeof l === "object" && !Array.isArray(l) &&
    Object.entries(l).every(([k, n]) =>
      ["per_second", "burst", "per_day"].includes(k) && typeof n === "number" && n > 0
    );
  const { roles, keys, ...rest } = v as IngestLimits;
  if (Object.keys(rest).length > 0) return undefined;
  for (const group of [roles, keys]) {
    if (group === undefined) continue;
    if (typeof group !== "object" || group === null) return undefined;
    if (!Object.values(group).every(ok)) return undefined;
  }
  return v as IngestLimits;
}

/** Takes ingest allowance for callers. */
export interface IngestLimiter {
  /** Takes `n` items for `who`, or throws a 429 {@link WeftError} with Retry-After. */
  take(who: { name: string; role: string }, n?: number): void;
}

/**
 * A limiter over `limits`; `now` is injectable for tests.
 *
 * @example
 * ```ts
 * import { createIngestLimiter } from "./ingest_limits.ts";
 * const limiter = createIngestLimiter({ keys: { web: { per_second: 1, burst: 1 } } });
 * limiter.take({ name: "web", role: "ingest" });
 * try { limiter.take({ name: "web", role: "ingest" }); } catch (e) { console.assert((e as { code: string }).code === "rate_limited"); }
 * ```
 */
export function createIngestLimiter(
  limits: IngestLimits,
  now: () => number = () => Date.now(),
): IngestLimiter {
  const buckets = new Map<string, { tokens: number; at: number }>();
  const days = new Map<string, { day: number; used: number }>();
  const refuse = (message: string, seconds: number) =>
    new WeftError(ErrorCode.RateLimited, message, {
      retryAfterSeconds: Math.max(1, Math.ceil(seconds)),
    });
  return {
    take(who, n = 1) {
      const limit = limits.keys?.[who.name] ?? limits.roles?.[who.role];
      if (!limit) return;
      const t = now();
      const day = Math.floor(t / 86_400_000);
      const used = days.get(who.name);
      const usedToday = used?.day === day ? used.used : 0;
      if (limit.per_day !== undefined && usedToday + n > limit.per_day) {
        throw refuse(
          `daily quota of ${limit.per_day} items used up`,
          ((day + 1) * 86_400_000 - t) / 1000,
        );
      }
      if (limit.per_second !== undefined) {
        const burst = limit.burst ?? limit.per_second;
        const b = buckets.get(who.name) ?? { tokens: burst, at: t };
        const tokens = Math.min(burst, b.tokens + ((t - b.at) / 1000) * limit.per_second);
        if (n > burst) throw refuse(`at most ${burst} items at once`, burst / limit.per_second);
        if (tokens < n) {
          buckets.set(who.name, { tokens, at: t });
          throw refuse(
            `rate limit of ${limit.per_second} items/s reached`,
            (n - tokens) / limit.per_second,
          );
        }
        buckets.set(who.name, { tokens: tokens - n, at: t });
      }
      days.set(who.name, { day, used: usedToday + n });
    },
  };
}
