import assert from "node:assert/strict";
import fc from "fast-check";
import canonicalize from "canonicalize";
import { canonicalJson } from "./canonical_json.ts";

Deno.test("canonical JSON is RFC 8785's for every well-formed JSON value", () => {
  fc.assert(
    fc.property(fc.jsonValue(), (value) => {
      assert.equal(canonicalJson(value), canonicalize(value));
    }),
    { numRuns: 2_000 },
  );
});

Deno.test("the order of object keys does not change the text", () => {
  assert.equal(
    canonicalJson({ b: { d: 1, c: [2, { f: null, e: "x" }] }, a: true }),
    '{"a":true,"b":{"c":[2,{"e":"x","f":null}],"d":1}}',
  );
});

Deno.test("a lone surrogate, which JSON.parse accepts, is written escaped instead of throwing", () => {
  const parsed = JSON.parse('{"text":"a\\ud800b"}');
  assert.throws(() => canonicalize(parsed), "the package refuses it");
  assert.equal(canonicalJson(parsed), '{"text":"a\\ud800b"}');
  assert.notEqual(canonicalJson(parsed), canonicalJson({ text: "a\udc00b" }));
  assert.notEqual(canonicalJson(parsed), canonicalJson({ text: "a\ufffdb" }));
});

Deno.test("what JSON cannot hold is left out of objects and is null in arrays", () => {
  assert.equal(canonicalJson({ a: undefined, b: 1 }), '{"b":1}');
  assert.equal(canonicalJson([undefined, () => 1]), "[null,null]");
  assert.equal(canonicalJson(undefined), undefined);
});
