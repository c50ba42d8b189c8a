import assert from "node:assert/strict";
import { agreementOf } from "./agreement.ts";

Deno.test("Cohen's kappa: 1 for identical labelings, 0 for chance agreement, and the confusion matrix", () => {
  const same = agreementOf(["a", "b", "a"], ["a", "b", "a"]);
  assert.equal(same.agreement, 1);
  assert.equal(same.kappa, 1);
  // Production says a/b half and half; the candidate always says a: agreement 0.5, kappa 0.
  const chance = agreementOf(["a", "b", "a", "b"], ["a", "a", "a", "a"]);
  assert.equal(chance.agreement, 0.5);
  assert.equal(chance.kappa, 0);
  assert.deepEqual(chance.confusion, { a: { a: 2 }, b: { a: 2 } });
  // A textbook case: 20+15 agree of 50, marginals 25/25 and 30/20: kappa = (0.7 - 0.5) / 0.5.
  const a = [
    ...Array(20).fill("y"),
    ...Array(5).fill("y"),
    ...Array(10).fill("n"),
    ...Array(15).fill("n"),
  ];
  const b = [
    ...Array(20).fill("y"),
    ...Array(5).fill("n"),
    ...Array(10).fill("y"),
    ...Array(15).fill("n"),
  ];
  assert.ok(Math.abs(agreementOf(a, b).kappa - 0.4) < 1e-9);
});
