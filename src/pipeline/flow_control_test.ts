import assert from "node:assert/strict";
import { createStepLimiter, keyAt } from "./flow_control.ts";

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
