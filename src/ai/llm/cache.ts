/**
 * Result cache of the LLM analyzers, keyed by analyzer kind + prompt version + model +
 * SHA-256 of the text. The interface is async so a NATS KV bucket can be plugged in later;
 * the built-in one is a bounded in-memory LRU.
 *
 * @module
 */

/**
 * Where validated model answers are kept. Values are plain JSON.
 *
 * @example
 * ```ts
 * import type { LlmCache } from "./cache.ts";
 * const none: LlmCache = { get: () => Promise.resolve(undefined), set: () => Promise.resolve() };
 * ```
 */
export interface LlmCache {
  /** The value stored under `key`, or undefined. */
  get(key: string): Promise<unknown>;
  /** Stores `value` (JSON-serialisable) under `key`. */
  set(key: string, value: unknown): Promise<void>;
}

/**
 * The largest answer the LLM analyzers (and llm steps) cache, in characters of its JSON
 * text (32 KiB): a larger one is returned but not cached, so a model padding its answers
 * cannot fill the process's memory through the cache (1000 entries hold at most ~32 M
 * characters).
 *
 * @example
 * ```ts
 * import { MAX_CACHED_ANSWER_CHARS } from "./cache.ts";
 * MAX_CACHED_ANSWER_CHARS; // 32768
 * ```
 */
export const MAX_CACHED_ANSWER_CHARS = 32_768;

/**
 * The in-memory LRU, with its size visible.
 *
 * @example
 * ```ts
 * import { createLruCache } from "./cache.ts";
 * const cache = createLruCache({ maxEntries: 2 });
 * await cache.set("a", 1);
 * cache.size; // 1
 * ```
 */
export interface LruCache extends LlmCache {
  /** Entries held. */
  readonly size: number;
}

/**
 * Creates a bounded LRU (a Map in recency order; the oldest entry goes first).
 *
 * @example
 * ```ts
 * import { createLruCache } from "./cache.ts";
 * const cache = createLruCache({ maxEntries: 1000 });
 * await cache.set("k", { label: "positive", score: 0.8 });
 * await cache.get("k"); // { label: "positive", score: 0.8 }
 * ```
 */
export function createLruCache(options: { maxEntries: number }): LruCache {
  const max = Math.max(1, Math.floor(options.maxEntries));
  const map = new Map<string, unknown>();
  return {
    get size() {
      return map.size;
    },
    get(key) {
      if (!map.has(key)) return Promise.resolve(undefined);
      const value = map.get(key);
      map.delete(key);
      map.set(key, value);
      return Promise.resolve(value);
    },
    set(key, value) {
      map.delete(key);
      map.set(key, value);
      while (map.size > max) {
        const oldest = map.keys().next();
        if (oldest.done) break;
        map.delete(oldest.value);
      }
      return Promise.resolve();
    },
  };
}

/**
 * Hex SHA-256 of a text (UTF-8).
 *
 * @example
 * ```ts
 * import { sha256Hex } from "./cache.ts";
 * (await sha256Hex("")).slice(0, 8); // "e3b0c442"
 * ```
 */
export async function sha256Hex(text: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Builds a cache key `<kind>.<promptVersion>.<model>.<sha256(text)>`, with characters
 * outside `[A-Za-z0-9_-]` in kind, version and model replaced by `_` so the key is also a
 * valid NATS KV key.
 *
 * @example
 * ```ts
 * import { cacheKey } from "./cache.ts";
 * await cacheKey({ kind: "sentiment", promptVersion: "v1", model: "gpt-4o-mini", text: "hi" });
 * // "sentiment.v1.gpt-4o-mini.8f434346..."
 * ```
 */
export async function cacheKey(
  parts: { kind: string; promptVersion: string; model: string; text: string },
): Promise<string> {
  const safe = (s: string) => s.replace(/[^A-Za-z0-9_-]/g, "_");
  return `${safe(parts.kind)}.${safe(parts.promptVersion)}.${safe(parts.model)}.${await sha256Hex(
    parts.text,
  )}`;
}
