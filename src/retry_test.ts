import assert from "node:assert/strict";
import { retrying } from "./retry.ts";

Deno.test("retrying calls again until the call works, and gives up with the last error after its attempts", async () => {
  const signal = new AbortController().signal;
  let calls = 0;
  const value = await retrying(() => {
    calls++;
    return calls < 3
      ? Promise.reject(new Error(`stream not found (${calls})`))
      : Promise.resolve(7);
  }, { attempts: 5, baseMs: 1, maxMs: 2, signal });
  assert.equal(value, 7);
  assert.equal(calls, 3);

  calls = 0;
  await assert.rejects(
    retrying(() => Promise.reject(new Error(`down ${++calls}`)), {
      attempts: 4,
      baseMs: 1,
      maxMs: 2,
      signal,
    }),
    /down 4/,
  );
  assert.equal(calls, 4);
});
