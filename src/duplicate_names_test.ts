import assert from "node:assert/strict";
import fc from "fast-check";
import { duplicateName } from "./duplicate_names.ts";

Deno.test("a name written twice in one object is found, with the pointer of its member", () => {
  assert.equal(duplicateName('{"text":"x","text":"y"}'), "/text");
  assert.equal(duplicateName('{"a":1, "b" : 2 ,\n "a" :3}'), "/a");
  assert.equal(duplicateName('[0,{"items":[{},{"k":1,"k":2}]}]'), "/1/items/1/k");
  // Compared as decoded: an escape spells the same name.
  assert.equal(duplicateName('{"id":"a","\\u0069d":"b"}'), "/id");
  // Pointer tokens escape "~" and "/" (RFC 6901).
  assert.equal(duplicateName('{"a/b":{"~":1,"~":2}}'), "/a~1b/~0");
  // Past the names kept in a list, in a set.
  const many = Array.from({ length: 40 }, (_, i) => `"n${i}":${i}`).join(",");
  assert.equal(duplicateName(`{${many},"n3":0}`), "/n3");
  assert.equal(duplicateName(`{${many},"n39":0}`), "/n39");
});

Deno.test("names that repeat only across objects, or inside strings, are not duplicates", () => {
  assert.equal(duplicateName('{"a":{"a":{"a":1}},"b":[{"a":1},{"a":2}]}'), undefined);
  assert.equal(duplicateName('{"a":"\\"a\\":1","b":"\\\\","c":"\\\\\\"a\\":"}'), undefined);
  assert.equal(duplicateName('"a"'), undefined);
  assert.equal(duplicateName("[1,2,3]"), undefined);
  assert.equal(duplicateName("{}"), undefined);
});

Deno.test("no document JSON.stringify writes has a duplicate; one written in is found", () => {
  fc.assert(
    fc.property(fc.jsonValue(), (value) => duplicateName(JSON.stringify(value)) === undefined),
    { numRuns: 500 },
  );
  fc.assert(
    fc.property(
      fc.dictionary(fc.string(), fc.jsonValue(), { minKeys: 1 }),
      fc.nat(),
      (object, pick) => {
        const names = Object.keys(object);
        const name = names[pick % names.length]!;
        const text = JSON.stringify(object);
        const twice = `${text.slice(0, -1)},${JSON.stringify(name)}:0}`;
        const pointer = `/${name.replaceAll("~", "~0").replaceAll("/", "~1")}`;
        return duplicateName(twice) === pointer;
      },
    ),
    { numRuns: 500 },
  );
});

Deno.test("a 60,000-name object and a 100,000-deep nesting are scanned whole, without recursion", () => {
  const names = Array.from({ length: 60_000 }, (_, i) => `"k${i}":${i}`).join(",");
  assert.equal(duplicateName(`{${names},"k59999":1}`), "/k59999");
  assert.equal(duplicateName("[".repeat(100_000) + "]".repeat(100_000)), undefined);
  assert.equal(duplicateName(`{"a":"${"\\\\".repeat(100_000)}","a":1}`), "/a");
});
