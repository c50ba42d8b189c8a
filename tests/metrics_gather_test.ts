import assert from "node:assert/strict";
import { headers } from "@nats-io/nats-core";
import { gatherServiceMetrics, MetricsCache } from "../src/gateway/mesh_metrics.ts";
import { INSTANCE_HEADER } from "../src/observability/micro.ts";
import { METRICS_SUBJECT, type MetricsJson } from "../src/observability/metrics.ts";
import { startTestNats } from "./helpers/nats.ts";

/** A metrics answer counting `n` processed items. */
const answer = (n: number): MetricsJson =>
  [{
    name: "weft_processed_total",
    help: "",
    type: "counter",
    aggregator: "sum",
    values: [{ value: n, labels: { stage: "dispatch" } }],
  }] as unknown as MetricsJson;

Deno.test("a service instance that answers a metrics gather too late still counts, with its last answer", async () => {
  await using t = await startTestNats();
  // A real responder on the bus, as a service instance's metrics endpoint: it answers the
  // first gather at once, and the second only after that gather has stopped waiting.
  let calls = 0;
  let late: Promise<void> = Promise.resolve();
  const sub = t.nc.subscribe(METRICS_SUBJECT, {
    callback: (_err, m) => {
      const h = headers();
      h.set(INSTANCE_HEADER, "dispatch-1");
      const reply = () => m.respond(JSON.stringify(answer(5)), { headers: h });
      if (++calls === 1) return void reply();
      late = new Promise((r) => setTimeout(r, 600)).then(() => void reply());
    },
  });
  const count = (parts: unknown[]) => parts.length;
  try {
    const cache = new MetricsCache();
    const opts = { cache, maxWaitMs: 300, stallMs: 100 };
    assert.equal(count(await gatherServiceMetrics(t.nc, opts)), 1, "answered in time");
    const second = await gatherServiceMetrics(t.nc, opts);
    assert.equal(calls, 2);
    assert.deepEqual(second, [answer(5)], "the late instance counts with its last answer");

    // Without the cache the same late instance drops out of the sum.
    calls = 1;
    assert.equal(count(await gatherServiceMetrics(t.nc, { maxWaitMs: 300, stallMs: 100 })), 0);
    await late;
  } finally {
    sub.unsubscribe();
  }
});

Deno.test("an instance's last answer is kept only so long", () => {
  const cache = new MetricsCache(1_000);
  assert.equal(cache.merge([{ instance: "a", value: answer(1) }], 0).length, 1);
  assert.equal(cache.merge([], 500).length, 1, "missing once: its last answer");
  assert.equal(cache.merge([], 1_600).length, 0, "gone too long: dropped");
  assert.equal(cache.merge([{ value: answer(2) }], 1_700).length, 1, "an unnamed answer passes");
  assert.equal(cache.merge([], 1_800).length, 0, "and is not kept");
});
