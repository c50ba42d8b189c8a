import assert from "node:assert/strict";
import { isNegator, normalize, tokenize } from "./text.ts";

Deno.test("tokenize() lower-cases words and keeps inner apostrophes", () => {
  assert.deepEqual(tokenize("It DOESN’T work!").map((t) => t.word), ["it", "doesn't", "work"]);
});

Deno.test("tokenize() marks shouted words and clause starts", () => {
  const t = tokenize("This is BAD. Really, I");
  assert.deepEqual(t.map((x) => x.shouted), [false, false, true, false, false]);
  assert.deepEqual(t.map((x) => x.clauseStart), [true, false, false, true, true]);
});

Deno.test("tokenize() keeps letters of other scripts", () => {
  assert.deepEqual(tokenize("café über").map((t) => t.word), ["café", "über"]);
});

Deno.test("normalize() straightens apostrophes and collapses spaces", () => {
  assert.equal(normalize("  Can’t   LOG\nin "), "can't log in");
});

Deno.test("isNegator() knows words and n't contractions", () => {
  assert.equal(isNegator("never"), true);
  assert.equal(isNegator("shouldn't"), true);
  assert.equal(isNegator("dont"), true);
  assert.equal(isNegator("note"), false);
});
