import assert from "node:assert/strict";
import { classificationReport, formatReport, MetricsError } from "./classification_metrics.ts";

Deno.test("classificationReport() scores a perfect prediction as 1", () => {
  const r = classificationReport(["a", "b", "c"], ["a", "b", "c"]);
  assert.equal(r.accuracy, 1);
  assert.equal(r.macroF1, 1);
  assert.deepEqual(r.confusion, [[1, 0, 0], [0, 1, 0], [0, 0, 1]]);
});

Deno.test("classificationReport() computes precision, recall and F1 per class", () => {
  // gold: a a b b ; predicted: a b b b
  const r = classificationReport(["a", "a", "b", "b"], ["a", "b", "b", "b"]);
  const [a, b] = r.perClass;
  assert.equal(a?.precision, 1);
  assert.equal(a?.recall, 0.5);
  assert.ok(Math.abs(a!.f1 - 2 / 3) < 1e-12);
  assert.ok(Math.abs(b!.precision - 2 / 3) < 1e-12);
  assert.equal(b?.recall, 1);
  assert.ok(Math.abs(b!.f1 - 0.8) < 1e-12);
  assert.ok(Math.abs(r.macroF1 - (2 / 3 + 0.8) / 2) < 1e-12);
  assert.equal(r.accuracy, 0.75);
  assert.deepEqual(r.confusion, [[1, 1], [0, 2]]);
});

Deno.test("classificationReport() gives F1 0 to a class never predicted", () => {
  const r = classificationReport(["x", "y"], ["x", "x"], ["x", "y", "z"]);
  assert.equal(r.perClass[1]?.f1, 0);
  assert.equal(r.perClass[2]?.support, 0);
  assert.equal(r.labels.length, 3);
});

Deno.test("classificationReport() averages macro-F1 only over classes present in gold", () => {
  // z never occurs in gold but is predicted once: it lowers x's precision, not the average count.
  const r = classificationReport(["x", "x", "y"], ["x", "z", "y"], ["x", "y", "z"]);
  // x: p=1 r=0.5 f1=2/3 ; y: f1=1 ; z: support 0, left out
  assert.ok(Math.abs(r.macroF1 - (2 / 3 + 1) / 2) < 1e-12);
  assert.match(formatReport(r), /leaves out classes absent from gold: z/);
});

Deno.test("classificationReport() rejects lists of different lengths", () => {
  assert.throws(() => classificationReport(["a"], []), MetricsError);
});

Deno.test("classificationReport() rejects a label outside the given classes", () => {
  assert.throws(() => classificationReport(["a"], ["q"], ["a"]), MetricsError);
});

Deno.test("formatReport() prints a stable header line", () => {
  const text = formatReport(classificationReport(["a", "b"], ["a", "a"]));
  assert.match(text, /^n=2 accuracy=0\.5000 macro_f1=0\.3333\n/);
  assert.match(text, /confusion \(rows=gold, cols=predicted\)/);
});
