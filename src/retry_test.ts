import assert from "node:assert/strict";
import { lazy, retrying } from "./retry.ts";

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

Deno.test("lazy makes once and shares the promise, but makes again after a rejection", async () => {
  let calls = 0;
  const open = lazy(() => {
    calls++;
    return calls === 1
      ? Promise.reject(new Error("NATS away"))
      : Promise.resolve(`bucket ${calls}`);
  });
  await assert.rejects(open(), /NATS away/);
  const [a, b] = await Promise.all([open(), open()]);
  assert.equal(a, "bucket 2");
  assert.equal(b, "bucket 2");
  assert.equal(await open(), "bucket 2");
  assert.equal(calls, 2);
});
