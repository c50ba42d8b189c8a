import assert from "node:assert/strict";
import {
  crossValidate,
  formatCrossValidation,
  formatRepeated,
  paramGrid,
  spread,
  stratifiedFolds,
} from "./cross_validation.ts";
import { EvalError, type EvalRow } from "./evaluation.ts";

function rowsOf(golds: string[]): EvalRow[] {
  return golds.map((gold, i) => ({ text: `t${i}`, gold, source: i % 2 ? "a" : "b" }));
}

Deno.test("stratifiedFolds() gives each fold the same mix of classes, the same way each run", () => {
  const rows = rowsOf([...Array(30).fill("flagged"), ...Array(20).fill("not_flagged")]);
  const folds = stratifiedFolds(rows, 5, 7);
  assert.deepEqual(stratifiedFolds(rows, 5, 7), folds);
  for (let f = 0; f < 5; f++) {
    const inFold = rows.filter((_, i) => folds[i] === f);
    assert.equal(inFold.length, 10);
    assert.equal(inFold.filter((r) => r.gold === "flagged").length, 6);
  }
  assert.notDeepEqual(stratifiedFolds(rows, 5, 8), folds);
});

Deno.test("stratifiedFolds() rejects fewer than two folds or fewer rows than folds", () => {
  assert.throws(() => stratifiedFolds(rowsOf(["a", "b"]), 1), EvalError);
  assert.throws(() => stratifiedFolds(rowsOf(["a", "b"]), 3), EvalError);
});

Deno.test("paramGrid() lists every combination, first values first", () => {
  assert.deepEqual(paramGrid({ a: [1, 2], b: [0, 5] }), [
    { a: 1, b: 0 },
    { a: 2, b: 0 },
    { a: 1, b: 5 },
    { a: 2, b: 5 },
  ]);
});

Deno.test("spread() gives mean, sample sd, min and max", () => {
  assert.deepEqual(spread([1, 2, 3]), { mean: 2, sd: 1, min: 1, max: 3 });
  assert.deepEqual(spread([4]), { mean: 4, sd: 0, min: 4, max: 4 });
});

Deno.test("crossValidate() scores each fold with parameters chosen without it", () => {
  const rows = rowsOf([...Array(10).fill("flagged"), ...Array(10).fill("not_flagged")]);
  const perfect = rows.map((r) => r.gold);
  const inverted = rows.map((r) => (r.gold === "flagged" ? "not_flagged" : "flagged"));
  const allFlagged = rows.map(() => "flagged");
  const cv = crossValidate("toxicity", rows, [
    { params: { threshold: 0.5 }, predicted: allFlagged },
    { params: { threshold: 0.1 }, predicted: perfect },
    { params: { threshold: 0.9 }, predicted: inverted },
  ], { folds: 2 });
  assert.equal(cv.perFold.length, 2);
  for (const r of cv.perFold) {
    assert.deepEqual(r.params, { threshold: 0.1 });
    assert.equal(r.heldOutScore, 1);
    assert.ok(Math.abs(r.defaultScore - 2 / 3) < 1e-9); // precision 0.5, recall 1
  }
  assert.deepEqual(cv.outOfFold, perfect);
  assert.equal(cv.tuned.mean, 1);
  assert.match(formatCrossValidation(cv), /tuned_held_out f1_flagged mean=1\.0000 sd=0\.0000/);
});

Deno.test("crossValidate() never lets the held-out fold pick its own parameters", () => {
  // Candidate B is right on fold 0's rows only, candidate A everywhere else: with two folds,
  // fold 0 is scored with what fold 1 prefers (A), and so scores worse than B would.
  const rows = rowsOf(["positive", "negative", "positive", "negative", "positive", "negative"]);
  const folds = stratifiedFolds(rows, 2);
  const flip = (g: string) => (g === "positive" ? "negative" : "positive");
  const a = rows.map((r, i) => (folds[i] === 0 ? flip(r.gold) : r.gold));
  const b = rows.map((r, i) => (folds[i] === 0 ? r.gold : flip(r.gold)));
  const cv = crossValidate("sentiment", rows, [
    { params: { k: 1 }, predicted: a },
    { params: { k: 2 }, predicted: b },
  ], { folds: 2 });
  assert.deepEqual(cv.perFold[0]!.params, { k: 1 });
  assert.equal(cv.perFold[0]!.heldOutScore, 0);
  assert.deepEqual(cv.perFold[1]!.params, { k: 2 });
  assert.equal(cv.perFold[1]!.heldOutScore, 0);
});

Deno.test("crossValidate() rejects candidates of the wrong length", () => {
  assert.throws(
    () =>
      crossValidate("toxicity", rowsOf(["flagged", "not_flagged"]), [
        { params: {}, predicted: ["flagged"] },
      ], { folds: 2 }),
    EvalError,
  );
});

Deno.test("formatRepeated() gives the mean over every fold of every repeat", () => {
  const rows = rowsOf([...Array(10).fill("flagged"), ...Array(10).fill("not_flagged")]);
  const perfect = rows.map((r) => r.gold);
  const runs = [1, 2, 3].map((seed) =>
    crossValidate("toxicity", rows, [{ params: {}, predicted: perfect }], { folds: 2, seed })
  );
  const text = formatRepeated(runs);
  assert.match(text, /repeats=3 folds=2/);
  assert.match(text, /all_folds_tuned_held_out f1_flagged mean=1\.0000 sd=0\.0000/);
});
