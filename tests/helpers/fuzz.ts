/**
 * The fast-check arbitraries the fuzz tests share: request bodies built from valid seeds,
 * and path parameters.
 *
 * @module
 */
import fc from "fast-check";

/** Mutates a valid JSON value: replaces, drops or adds a field (any JSON for a non-object). */
export function mutated(seed: unknown): fc.Arbitrary<unknown> {
  const anyJson = fc.jsonValue({ maxDepth: 3 });
  if (seed === null || typeof seed !== "object" || Array.isArray(seed)) return anyJson;
  const keys = Object.keys(seed);
  return fc.oneof(
    fc.constant(seed),
    fc.record({ key: fc.constantFrom(...keys), value: anyJson }).map(({ key, value }) => ({
      ...seed,
      [key]: value,
    })),
    fc.constantFrom(...keys).map((key) => {
      const copy: Record<string, unknown> = { ...seed };
      delete copy[key];
      return copy;
    }),
    fc.record({ key: fc.string({ maxLength: 12 }), value: anyJson }).map(({ key, value }) => ({
      ...seed,
      [key]: value,
    })),
  );
}

/**
 * A request body: none, raw bytes, a binary string, any JSON, deep nesting, or one of
 * `seeds` (valid bodies of the route) mutated.
 */
export function fuzzBody(
  seeds: readonly unknown[],
): fc.Arbitrary<string | Uint8Array<ArrayBuffer> | undefined> {
  return fc.oneof(
    fc.constant(undefined),
    fc.uint8Array({ maxLength: 512 }).map((b) => new Uint8Array(b)),
    fc.string({ maxLength: 256, unit: "binary" }),
    fc.jsonValue({ maxDepth: 4 }).map((v) => JSON.stringify(v)),
    fc.integer({ min: 100, max: 20_000 }).map((n) => "[".repeat(n) + "]".repeat(n)),
    ...seeds.map((s) => mutated(s).map((v) => JSON.stringify(v))),
  );
}

/** A path parameter: mostly plausible, sometimes hostile; `extra` adds route-specific ones. */
export function pathToken(...extra: string[]): fc.Arbitrary<string> {
  return fc.oneof(
    fc.stringMatching(/^[A-Za-z0-9_-]{1,70}$/),
    fc.string({ maxLength: 40 }),
    fc.constantFrom("..", "%00", "%2F", "*", ">", "$KV", "a.b", " ", ...extra),
  );
}
