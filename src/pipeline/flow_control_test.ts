import assert from "node:assert/strict";
import { createBatcher, createStepLimiter, keyAt } from "./flow_control.ts";

Deno.test("a concurrency limit per key holds each customer to its limit and lets others run", async () => {
  const limiter = createStepLimiter({ concurrency: { limit: 2, key: "customer.id" } });
  const signal = new AbortController().signal;
  const a1 = await limiter.acquire({ customer: { id: "a" } }, signal);
  const a2 = await limiter.acquire({ customer: { id: "a" } }, signal);
  let third = false;
  const a3 = limiter.acquire({ customer: { id: "a" } }, signal).then((r) => (third = true, r));
  const b1 = await limiter.acquire({ customer: { id: "b" } }, signal); // another key: at once
  await Promise.resolve();
  assert.equal(third, false, "a third call for customer a waits");
  a1();
  (await a3)();
  assert.equal(third, true, "and runs when one of a's finishes");
  a2();
  b1();
});

Deno.test("keys are read from dotted paths; a missing one is the empty key", () => {
  assert.equal(keyAt({ a: { b: 7 } }, "a.b"), "7");
  assert.equal(keyAt({ a: "x" }, "a"), "x");
  assert.equal(keyAt({}, "a.b"), "");
  assert.equal(keyAt({ a: 1 }, undefined), "");
});

Deno.test("a batcher hands up to maxItems values at once, each caller getting its own result", async () => {
  const batches: number[][] = [];
  const double = createBatcher({ maxItems: 3, maxWaitMs: 10_000 }, (xs: number[]) => {
    batches.push(xs);
    return xs.map((x) => x * 2);
  });
  // Three arrive together: one batch at once, without waiting for maxWaitMs.
  assert.deepEqual(await Promise.all([1, 2, 3].map((x) => double(x, undefined))), [2, 4, 6]);
  assert.deepEqual(batches, [[1, 2, 3]]);
});

Deno.test("a batcher sends what arrived within maxWaitMs, and a failed batch fails each call", async () => {
  const { mock } = await import("node:test");
  mock.timers.enable({ apis: ["setTimeout"] });
  try {
    let calls = 0;
    const f = createBatcher({ maxItems: 10, maxWaitMs: 50 }, (xs: number[]) => {
      calls++;
      if (xs.includes(0)) throw new Error("boom");
      return xs.map((x) => -x);
    });
    const one = f(1, undefined);
    const two = f(2, undefined);
    assert.equal(calls, 0, "held until maxWaitMs");
    mock.timers.tick(50);
    assert.deepEqual(await Promise.all([one, two]), [-1, -2]);
    const bad = [f(0, undefined), f(5, undefined)];
    mock.timers.tick(50);
    for (const p of bad) await assert.rejects(p, /boom/);
    assert.equal(calls, 2);
  } finally {
    mock.timers.reset();
  }
});
