import assert from "node:assert/strict";
import {
  comparedScope,
  contrastWeights,
  hedgeScope,
  irrealisScope,
  isNegator,
  normalize,
  tokenize,
} from "./text.ts";

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

Deno.test("tokenize() marks sentence starts and question sentences", () => {
  const t = tokenize("Fast app. Is it free? Yes, 2.5 MB");
  assert.deepEqual(t.map((x) => x.word), [
    "fast",
    "app",
    "is",
    "it",
    "free",
    "yes",
    "2",
    "5",
    "mb",
  ]);
  assert.deepEqual(
    t.map((x) => x.sentenceStart),
    [true, false, true, false, false, true, false, false, false],
  );
  assert.deepEqual(
    t.map((x) => x.question),
    [false, false, true, true, true, false, false, false, false],
  );
});

Deno.test("contrastWeights() scopes 'but' to its sentence and halves 'although' clauses", () => {
  const w = contrastWeights(tokenize("Nice. Slow but good. Although pricey, fine"))!;
  assert.deepEqual([...w], [1, 0.5, 1, 1.5, 1, 0.5, 1]);
  assert.equal(contrastWeights(tokenize("plain text")), undefined);
});

Deno.test("irrealisScope() covers the rest of the clause after would/wish/if", () => {
  assert.deepEqual([...irrealisScope(tokenize("it would be great, thanks"))!], [0, 0, 1, 1, 0]);
  assert.equal(irrealisScope(tokenize("it is great")), undefined);
});

Deno.test("hedgeScope() covers the rest of the clause after maybe/probably/seems", () => {
  assert.deepEqual([...hedgeScope(tokenize("maybe it is fine, thanks"))!], [0, 1, 1, 1, 0]);
  assert.equal(hedgeScope(tokenize("it is fine")), undefined);
});

Deno.test("comparedScope() covers what follows 'than' to the end of its clause", () => {
  assert.deepEqual([...comparedScope(tokenize("better than the old one, sadly"))!], [
    0,
    0,
    1,
    1,
    1,
    0,
  ]);
  assert.equal(comparedScope(tokenize("good enough")), undefined);
});
