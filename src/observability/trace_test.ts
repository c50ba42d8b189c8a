import assert from "node:assert/strict";
import { childContext, formatTraceparent, parseTraceparent } from "./trace.ts";
import { retryDelay } from "../retry.ts";

Deno.test("parseTraceparent() reads a W3C traceparent and refuses malformed ones", () => {
  const header = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
  assert.deepEqual(parseTraceparent(header), {
    traceId: "0af7651916cd43dd8448eb211c80319c",
    spanId: "b7ad6b7169203331",
    sampled: true,
  });
  assert.equal(formatTraceparent(parseTraceparent(header)!), header);
  for (
    const bad of [
      undefined,
      "",
      "00-xyz-b7ad6b7169203331-01",
      "00-00000000000000000000000000000000-b7ad6b7169203331-01",
    ]
  ) {
    assert.equal(parseTraceparent(bad), null);
  }
});

Deno.test("childContext() keeps the trace id and takes a new span id", () => {
  const parent = parseTraceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")!;
  const child = childContext(parent);
  assert.equal(child.traceId, parent.traceId);
  assert.notEqual(child.spanId, parent.spanId);
  assert.match(childContext().traceId, /^[0-9a-f]{32}$/);
});

Deno.test("retryDelay() doubles per attempt, stays within half and all of the cap, and never exceeds the maximum", () => {
  assert.equal(retryDelay(1, 100, 10_000, () => 0), 50);
  assert.equal(retryDelay(1, 100, 10_000, () => 1), 100);
  assert.equal(retryDelay(4, 100, 10_000, () => 1), 800);
  assert.equal(retryDelay(20, 100, 10_000, () => 1), 10_000);
});
