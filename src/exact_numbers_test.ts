import assert from "node:assert/strict";
import { inexactNumber } from "./exact_numbers.ts";

Deno.test("a number past a double's range is found, with where it is and how it was written", () => {
  assert.deepEqual(inexactNumber('{"a":{"b":[1,1e400]}}'), { pointer: "/a/b/1", source: "1e400" });
  assert.deepEqual(inexactNumber("[-1E+309]"), { pointer: "/0", source: "-1E+309" });
  assert.deepEqual(inexactNumber("1e400"), { pointer: "", source: "1e400" });
  assert.equal(inexactNumber('{"a/b~":1e999}')?.pointer, "/a~1b~0", "keys escaped as JSON Pointer");
});

Deno.test("an integer past 2^53 that a double would round is found; one a double holds exactly is not", () => {
  assert.equal(inexactNumber('{"n":12345678901234567890123}')?.pointer, "/n");
  assert.equal(inexactNumber('{"n":9007199254740993}')?.source, "9007199254740993");
  assert.equal(inexactNumber('{"n":-9007199254740993}')?.pointer, "/n");
  assert.equal(inexactNumber('{"n":9007199254740993.0}')?.source, "9007199254740993.0");
  assert.equal(inexactNumber('{"n":12345678901234567890123.00}')?.pointer, "/n");
  assert.equal(inexactNumber('{"n":9007199254740992}'), undefined, "2^53 itself");
  assert.equal(
    inexactNumber('{"n":9007199254740992.0}'),
    undefined,
    "2^53 with a fraction of zeros",
  );
  // With an exponent a number is a float, rounded as JSON floats are.
  assert.equal(inexactNumber('{"n":1.2345678901234567890123e22}'), undefined);
  assert.equal(inexactNumber('{"n":1152921504606846976}'), undefined, "2^60, exactly a double");
});

Deno.test("floats, small exponents and digits inside strings are left alone", () => {
  for (
    const ok of [
      '{"f":0.1,"g":1.2345678901234567890123,"e":1e300,"tiny":1e-400}',
      '{"id":"12345678901234567890123","trace":"0af7651916cd43dd8448eb211c80319c"}',
      JSON.stringify({ big: 1.2345678901234568e+22, max: Number.MAX_VALUE }),
      "[]",
    ]
  ) assert.equal(inexactNumber(ok), undefined, ok);
});

Deno.test("a body too deep for a reviver is left to the depth limit, not thrown on", () => {
  const deep = "[".repeat(200_000) + "1e400" + "]".repeat(200_000);
  assert.equal(inexactNumber(deep), undefined);
});
