import assert from "node:assert/strict";
import { clockOffset, dueSends, percentile } from "./stats.ts";

Deno.test("percentile() takes the nearest rank", () => {
  const xs = Array.from({ length: 100 }, (_, i) => i + 1);
  assert.equal(percentile(xs, 0.5), 50);
  assert.equal(percentile(xs, 0.99), 99);
  assert.equal(percentile(xs, 1), 100);
  assert.equal(percentile(xs, 0), 1);
  assert.equal(percentile([7], 0.99), 7);
  assert.equal(Number.isNaN(percentile([], 0.5)), true);
});

Deno.test("dueSends() paces by the clock and never passes the total", () => {
  assert.equal(dueSends(0, 500, 5000), 1);
  assert.equal(dueSends(1.9, 500, 5000), 1);
  assert.equal(dueSends(2, 500, 5000), 2);
  assert.equal(dueSends(1000, 500, 5000), 501);
  assert.equal(dueSends(60_000, 500, 5000), 5000);
  // Batches of 50 at 500 items/s: 10 requests a second.
  assert.equal(dueSends(250, 10, 100), 3);
});

Deno.test("clockOffset() trusts the probe with the shortest round trip", () => {
  assert.equal(
    clockOffset([
      { sentAt: 0, remote: 1_000_050, receivedAt: 40 },
      { sentAt: 100, remote: 1_000_101, receivedAt: 102 },
      { sentAt: 200, remote: 1_000_230, receivedAt: 260 },
    ]),
    1_000_000,
  );
  assert.throws(() => clockOffset([]), RangeError);
});
