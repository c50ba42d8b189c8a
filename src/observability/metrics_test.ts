import assert from "node:assert/strict";
import { createLlmStats } from "../ai/llm/stats.ts";
import { aggregateMetrics, fitMetrics, registerLlmMetrics, WeftMetrics } from "./metrics.ts";
import { meshSnapshot } from "../gateway/mesh_metrics.ts";
import { serviceEnv } from "../supervisor.ts";
import { activeTraceContext, SpanKind, startSpan, traceContextOf, withSpan } from "./telemetry.ts";

Deno.test("aggregateMetrics sums replicas of a stage by label set", async () => {
  const a = new WeftMetrics();
  const b = new WeftMetrics();
  a.processed.inc({ stage: "topics" }, 3);
  b.processed.inc({ stage: "topics" }, 4);
  b.processed.inc({ stage: "dispatch" });
  a.handlerSeconds.observe({ stage: "topics" }, 0.002);
  b.handlerSeconds.observe({ stage: "topics" }, 0.004);
  const text = await aggregateMetrics([await a.json(), await b.json()]).metrics();
  assert.match(text, /^weft_stage_processed_total\{stage="topics"\} 7$/m);
  assert.match(text, /^weft_stage_processed_total\{stage="dispatch"\} 1$/m);
  assert.match(text, /^weft_stage_handler_seconds_count\{stage="topics"\} 2$/m);
  assert.match(text, /^weft_stage_handler_seconds_bucket\{le="0.0025",stage="topics"\} 1$/m);
});

Deno.test("meshSnapshot reduces the mesh's metrics to per-stage dashboard figures", async () => {
  const m = new WeftMetrics();
  m.received.inc({ stage: "sentiment" }, 6);
  m.processed.inc({ stage: "sentiment" }, 5);
  m.failed.inc({ stage: "sentiment", code: "unknown_version" });
  m.deadLettered.inc({ stage: "sentiment" });
  m.handlerSeconds.observe({ stage: "sentiment" }, 0.5);
  m.handlerSeconds.observe({ stage: "sentiment" }, 1.5);
  m.endToEndSeconds.observe({ outcome: "processed" }, 2);
  const snap = await meshSnapshot(aggregateMetrics([await m.json()]));
  assert.deepEqual(snap.stages.sentiment, {
    received: 6,
    processed: 5,
    failed: 1,
    retried: 0,
    deadLettered: 1,
    handlerSeconds: 2,
    handlerCount: 2,
    pending: 0,
    ackPending: 0,
  });
  assert.equal(snap.endToEnd.seconds, 2);
  assert.equal(snap.endToEnd.count, 1);
  // Cumulative buckets, for percentiles over a window: the 2 s item is in every bucket >= 2.
  const at = (le: number) => snap.endToEnd.buckets.find(([b]) => b === le)?.[1];
  assert.equal(at(1), 0);
  assert.equal(at(Infinity), 1);
  assert.ok(snap.endToEnd.buckets.every(([le, n]) => n === (le >= 2 ? 1 : 0)));
});

Deno.test("registerLlmMetrics reads tokens, cost and calls from the LLM stats when scraped", async () => {
  const m = new WeftMetrics();
  const stats = createLlmStats();
  registerLlmMetrics(m.registry, stats, "sentiment");
  stats.count("calls", 2);
  stats.addUsage({ prompt_tokens: 100, completion_tokens: 20, total_tokens: 120, cost_usd: 0.5 });
  const text = await m.text();
  assert.match(text, /^weft_llm_tokens_total\{stage="sentiment",kind="prompt"\} 100$/m);
  assert.match(text, /^weft_llm_tokens_total\{stage="sentiment",kind="completion"\} 20$/m);
  assert.match(text, /^weft_llm_cost_usd_total\{stage="sentiment"\} 0.5$/m);
  assert.match(text, /^weft_llm_calls_total\{stage="sentiment",outcome="sent"\} 2$/m);
  stats.addUsage({ prompt_tokens: 1, completion_tokens: 0, total_tokens: 1, cost_usd: 0 });
  assert.match(await m.text(), /kind="prompt"\} 101$/m, "totals, not increments, each scrape");
});

Deno.test("serviceEnv names each service's spans only when OTEL_DENO is on", () => {
  const spec = { name: "topics", entry: "services/topics.ts", access: {} };
  assert.deepEqual(serviceEnv(spec, () => undefined), {});
  assert.deepEqual(serviceEnv(spec, (n) => (n === "OTEL_DENO" ? "false" : undefined)), {});
  assert.deepEqual(serviceEnv(spec, (n) => (n === "OTEL_DENO" ? "true" : undefined)), {
    OTEL_SERVICE_NAME: "weft-topics",
  });
});

Deno.test("telemetry is a no-op without OTEL_DENO: spans do not record and headers fall back", () => {
  const parent = {
    traceId: "4bf92f3577b34da6a3ce929d0e0e4736",
    spanId: "00f067aa0ba902b7",
    sampled: true,
  };
  const span = startSpan("x process", SpanKind.CONSUMER, parent);
  assert.equal(span.isRecording(), false);
  assert.equal(traceContextOf(span), null);
  withSpan(span, () => assert.equal(activeTraceContext(), null));
  span.end();
});

Deno.test("fitMetrics cuts the largest families to fit a reply and names them", async () => {
  const m = new WeftMetrics();
  m.processed.inc({ stage: "topics" }, 3);
  for (let i = 0; i < 5000; i++) m.received.inc({ stage: `stage-${i}-${"x".repeat(40)}` });
  const json = await m.json();
  assert.equal(fitMetrics(json, 10_000_000), json, "unchanged when it fits");
  const fitted = fitMetrics(json, 64 * 1024);
  assert.ok(JSON.stringify(fitted).length <= 64 * 1024);
  assert.equal(fitted.find((f) => f.name === "weft_stage_received_total")?.values.length, 0);
  const kept = fitted.find((f) => f.name === "weft_stage_processed_total")!;
  assert.equal(kept.values[0]?.value, 3, "the small families stay");
  const note = fitted.find((f) => f.name === "weft_metrics_truncated")!;
  assert.deepEqual(note.values, [{ labels: { metric: "weft_stage_received_total" }, value: 5000 }]);
  const text = await aggregateMetrics([fitted]).metrics();
  assert.match(text, /^weft_metrics_truncated\{metric="weft_stage_received_total"\} 5000$/m);
});

Deno.test("meshSnapshot adds a pipeline's accepted items to its intake stage's figures, and no other pipeline's", async () => {
  const m = new WeftMetrics();
  m.accepted.inc({ pipeline: "orders" }, 4);
  m.accepted.inc({ pipeline: "invoices" }, 7);
  const snap = await meshSnapshot(aggregateMetrics([await m.json()]), { orders: "intake" });
  assert.equal(snap.stages.intake?.received, 4);
  assert.equal(snap.stages.intake?.processed, 4);
  assert.deepEqual(Object.keys(snap.stages), ["intake"]);
});
