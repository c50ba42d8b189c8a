/**
 * Observability end to end: the whole mesh as real processes on a real nats-server;
 * known load in, then `GET /metrics`, the NATS services protocol and the JSON logs out.
 */
import assert from "node:assert/strict";
import { headers } from "@nats-io/nats-core";
import { FeedbackEventType } from "../pipelines/feedback/events.ts";
import { SERVICES } from "../src/supervisor.ts";
import {
  ONE_PROCESS,
  startMesh,
  startServices,
  submit,
  waitFinal,
  WHOLE_MESH,
} from "./helpers/mesh.ts";
import { jetstream } from "@nats-io/jetstream";
import { meshMetrics } from "../src/gateway/mesh_metrics.ts";
import { WeftMetrics } from "../src/observability/metrics.ts";
import { startTestNats } from "./helpers/nats.ts";
import { readSse } from "./helpers/sse.ts";

/** One sample's value from Prometheus text; undefined when absent. */
function sample(text: string, name: string, labels: Record<string, string> = {}) {
  const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`);
  for (const line of text.split("\n")) {
    if (line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (.+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const have = m[2] ? m[2].split(/,(?=\w+=)/) : [];
    if (want.every((w) => have.includes(w)) && have.length === want.length) return Number(m[3]);
  }
  return undefined;
}

async function scrape(url: string): Promise<string> {
  const r = await fetch(`${url}/metrics`);
  assert.equal(r.status, 200);
  assert.match(r.headers.get("content-type") ?? "", /^text\/plain; version=0\.0\.4/);
  return await r.text();
}

/** Every service of the mesh registers with the NATS services protocol. */
const SERVICE_NAMES = SERVICES.map((s) => `weft-${s.name}`).sort();

Deno.test("the mesh reports exact metrics, NATS micro answers and JSON logs after a known load", async (t) => {
  await using mesh = await startServices(WHOLE_MESH);
  const ids: string[] = [];
  for (let i = 0; i < 5; i++) {
    ids.push(await submit(mesh.gatewayUrl, `great product, slow delivery ${i}`));
  }
  // One poison event: shaped like an ingested event for item "poison1", but invalid.
  const h = headers();
  h.set("Weft-Event-Type", FeedbackEventType.Ingested);
  await mesh.nc.request(
    "feedback.ingested.poison1",
    new TextEncoder().encode(JSON.stringify({ type: "feedback.ingested", item_id: "poison1" })),
    { headers: h, timeout: 5000 },
  ).catch(() => {}); // a JetStream ack; the stream stores it either way
  for (const id of ids) await waitFinal(mesh.gatewayUrl, id);
  await waitFinal(mesh.gatewayUrl, "poison1");

  // Methods a caller made up, each of which was once a /metrics series of its own.
  for (const method of ["FOO1", "FOO2"]) {
    const r = await fetch(`${mesh.gatewayUrl}/x`, { method });
    await r.body?.cancel();
  }

  // Everything settled: nothing pending or unacked on any durable consumer.
  let text = "";
  const deadline = Date.now() + 15_000;
  while (Date.now() < deadline) {
    text = await scrape(mesh.gatewayUrl);
    const busy = ["ingest", "sentiment", "topics", "dispatch", "state"].some((c) =>
      (sample(text, "weft_consumer_pending", { stream: "FEEDBACK", consumer: c }) ?? 1) > 0 ||
      (sample(text, "weft_consumer_ack_pending", { stream: "FEEDBACK", consumer: c }) ?? 1) > 0
    );
    const e2e = (sample(text, "weft_item_end_to_end_seconds_count", {
      stage: "state",
      outcome: "processed",
    }) ?? 0) +
      (sample(text, "weft_item_end_to_end_seconds_count", { stage: "state", outcome: "failed" }) ??
        0);
    if (!busy && e2e === 6 && sample(text, "weft_metrics_sources") === 5) break;
  }

  await t.step("GET /metrics counts every stage's work exactly", () => {
    for (const stage of ["sentiment", "topics", "dispatch"]) {
      const processed = sample(text, "weft_stage_processed_total", { stage });
      assert.equal(processed, 5, `${stage} processed`);
      assert.equal(sample(text, "weft_stage_handler_seconds_count", { stage }), 5);
      assert.ok((sample(text, "weft_stage_handler_seconds_sum", { stage }) ?? -1) >= 0);
      assert.equal(sample(text, "weft_stage_retried_total", { stage }), undefined);
    }
    assert.equal(sample(text, "weft_stage_received_total", { stage: "sentiment" }), 6);
    assert.equal(sample(text, "weft_stage_dead_lettered_total", { stage: "sentiment" }), 1);
    assert.equal(sample(text, "weft_stage_dead_lettered_total", { stage: "state" }), 1);
    // 5 items x 5 events + the poison event + poison1's failed event.
    assert.equal(sample(text, "weft_stage_received_total", { stage: "state" }), 27);
    assert.equal(sample(text, "weft_stage_processed_total", { stage: "state" }), 26);
    assert.equal(
      sample(text, "weft_stage_failed_total", { stage: "sentiment", code: "unknown_version" }),
      1,
    );
    assert.equal(
      sample(text, "weft_stage_published_total", { stage: "dispatch", type: "feedback.processed" }),
      5,
    );
    assert.equal(
      sample(text, "weft_stage_published_total", { stage: "sentiment", type: "feedback.failed" }),
      undefined, // the failed event is the dead-letter path's, counted as dead-lettered
    );
    assert.equal(
      sample(text, "weft_item_end_to_end_seconds_count", { stage: "state", outcome: "processed" }),
      5,
    );
    assert.equal(
      sample(text, "weft_item_end_to_end_seconds_count", { stage: "state", outcome: "failed" }),
      1,
    );
    for (const c of ["ingest", "sentiment", "topics", "dispatch", "state"]) {
      assert.equal(sample(text, "weft_consumer_pending", { stream: "FEEDBACK", consumer: c }), 0);
      assert.equal(
        sample(text, "weft_consumer_ack_pending", { stream: "FEEDBACK", consumer: c }),
        0,
      );
    }
    // The poison event is dead-lettered by sentiment and kept aside by the state writer.
    assert.equal(sample(text, "weft_deadletter_messages"), 2);
    // Every service but the gateway, which gathers them, answers the metrics request.
    assert.equal(sample(text, "weft_metrics_sources"), SERVICES.length - 1);
    assert.equal(sample(text, "weft_sse_clients"), 0);
    assert.equal(
      sample(text, "weft_http_requests_total", {
        method: "POST",
        route: "/feedback",
        status: "202",
      }),
      5,
    );
    assert.equal(
      sample(text, "weft_http_requests_total", {
        method: "other",
        route: "unmatched",
        status: "404",
      }),
      2,
      "made-up methods are counted as other",
    );
    assert.doesNotMatch(text, /method="FOO/);
  });

  await t.step("GET /dashboard/recent lists the latest events oldest first", async () => {
    const r = await fetch(`${mesh.gatewayUrl}/dashboard/recent?limit=10`);
    const { events } = await r.json() as { events: { seq: number; event: { type: string } }[] };
    assert.equal(events.length, 10);
    const seqs = events.map((e) => e.seq);
    assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b));
    const all = await (await fetch(`${mesh.gatewayUrl}/dashboard/recent?limit=500`)).json() as {
      events: { event: { type: string; item_id: string } }[];
    };
    const processed = all.events.filter((e) => e.event.type === "feedback.processed");
    assert.deepEqual(processed.map((e) => e.event.item_id).sort(), [...ids].sort());
    // The first listed pipeline's by default; another's by name (none of its events here).
    const feedback = await (await fetch(
      `${mesh.gatewayUrl}/dashboard/recent?pipeline=feedback&limit=500`,
    )).json() as typeof all;
    assert.deepEqual(feedback.events, all.events);
    const content = await (await fetch(`${mesh.gatewayUrl}/dashboard/recent?pipeline=content`))
      .json() as typeof all;
    assert.ok(content.events.every((e) => e.event.type.startsWith("content.")));
  });

  await t.step("GET /dashboard/stream sends the mesh's per-stage figures as SSE", async () => {
    const page = await fetch(`${mesh.gatewayUrl}/dashboard`);
    assert.match(await page.text(), /<title>Weft dashboard<\/title>/);
    const r = await fetch(`${mesh.gatewayUrl}/dashboard/stream`);
    assert.equal(r.headers.get("content-type"), "text/event-stream");
    const reader = r.body!.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    while (!buf.includes("\n\n")) buf += (await reader.read()).value ?? "";
    await reader.cancel();
    assert.match(buf, /^event: metrics$/m);
    const data = JSON.parse(/^data: (.*)$/m.exec(buf)![1]!);
    assert.equal(data.stages.dispatch.processed, 5);
    assert.equal(data.stages.sentiment.deadLettered, 1);
    assert.equal(data.endToEnd.count, 6);
  });

  await t.step(
    "every service answers $SRV.PING, INFO and STATS like `nats micro` expects",
    async () => {
      const gather = async <T>(subject: string) => {
        const out: T[] = [];
        const it = await mesh.nc.requestMany(subject, undefined, {
          strategy: "stall",
          stall: 200,
          maxWait: 2000,
        });
        for await (const m of it) out.push(m.json<T>());
        return out;
      };
      type Ping = { type: string; name: string; id: string; version: string };
      // On a loaded machine a service may answer after a gather's stall window: ping again
      // until each has answered (within a deadline), then check that no other did.
      const byName = new Map<string, Ping>();
      const deadline = Date.now() + 15_000;
      while (Date.now() < deadline && SERVICE_NAMES.some((n) => !byName.has(n))) {
        for (const p of await gather<Ping>("$SRV.PING")) byName.set(p.name, p);
      }
      const pings = [...byName.values()];
      assert.deepEqual(pings.map((p) => p.name).sort(), SERVICE_NAMES);
      for (const p of pings) {
        assert.equal(p.type, "io.nats.micro.v1.ping_response");
        assert.equal(p.version, "0.1.0");
      }
      type Info = { name: string; endpoints: { name: string; subject: string }[] };
      const infos = await gather<Info>("$SRV.INFO.weft-sentiment");
      assert.equal(infos.length, 1);
      assert.deepEqual(
        infos[0]!.endpoints.map((e) => [e.name, e.subject]).sort(),
        [["metrics", "weft.sentiment.metrics"], ["status", "weft.sentiment.status"]],
      );
      const gatewayInfo = await gather<Info>("$SRV.INFO.weft-gateway");
      assert.deepEqual(gatewayInfo[0]!.endpoints.map((e) => e.name), ["status"]);

      type Stats = {
        type: string;
        name: string;
        endpoints: {
          name: string;
          num_requests: number;
          num_errors: number;
          processing_time: number;
          data: Record<string, number>;
        }[];
      };
      const stats = await gather<Stats>("$SRV.STATS.weft-dispatch");
      assert.equal(stats.length, 1);
      assert.equal(stats[0]!.type, "io.nats.micro.v1.stats_response");
      const metricsEndpoint = stats[0]!.endpoints.find((e) => e.name === "metrics")!;
      assert.ok(metricsEndpoint.num_requests >= 1, "the scrapes above reached dispatch");
      assert.equal(metricsEndpoint.num_errors, 0);
      assert.equal(metricsEndpoint.data.processed, 5);
      assert.equal(metricsEndpoint.data.published, 10);

      const status = await mesh.nc.request("weft.sentiment.status", undefined, { timeout: 2000 });
      const s = status.json<Record<string, unknown>>();
      assert.equal(s.service, "weft-sentiment");
      assert.equal(s.processed, 5);
      assert.equal(s.deadLettered, 1);
    },
  );

  await t.step(
    "services write only JSON lines with time, level, service, stage, item, trace and event type",
    () => {
      assert.deepEqual(mesh.stray, [], "no free-text output");
      assert.ok(mesh.logs.length > 0);
      for (const l of mesh.logs) {
        assert.equal(typeof l.time, "string");
        assert.ok(["debug", "info", "warn", "error"].includes(l.level as string));
        assert.match(l.service as string, /^weft-/);
      }
      const handled = mesh.logs.filter((l) =>
        l.msg === "handled" && l.stage === "topics" && ids.includes(l.item_id as string)
      );
      assert.equal(handled.length, 5);
      for (const l of handled) {
        assert.equal(l.service, "weft-topics");
        assert.equal(l.event_type, "feedback.sentiment_analyzed");
        assert.match(l.trace_id as string, /^[0-9a-f]{32}$/);
      }
      const dl = mesh.logs.find((l) => l.msg === "dead-lettered" && l.stage === "sentiment");
      assert.equal(dl?.item_id, "poison1");
      assert.equal(dl?.event_type, "feedback.ingested");
      assert.deepEqual(mesh.stray, [], "no free-text output on stderr");
    },
  );

  // Last: it submits one more item, which the exact counts above do not expect.
  await t.step(
    "a /dashboard/recent snapshot ends at last_seq, and the live feed resumes there with no gap",
    async () => {
      const snap = await (await fetch(`${mesh.gatewayUrl}/dashboard/recent?limit=500`)).json() as {
        events: { seq: number }[];
        last_seq: number;
      };
      assert.ok(snap.events.every((e) => e.seq <= snap.last_seq));
      assert.equal(snap.events.at(-1)!.seq, snap.last_seq);
      // An item processed after the snapshot and before the page opens its feed: a feed opened
      // "from now" would miss all of it (the dashboard's rows stayed stuck that way).
      const late = await submit(mesh.gatewayUrl, "arrived between snapshot and feed");
      await waitFinal(mesh.gatewayUrl, late);
      const res = await fetch(`${mesh.gatewayUrl}/events`, {
        headers: { "last-event-id": String(snap.last_seq) },
      });
      const frames = await readSse(res, {
        timeoutMs: 15_000,
        stopAfter: (e) => e.event === FeedbackEventType.Processed && e.data.includes(late),
      });
      const mine = frames.filter((f) => f.data.includes(late)).map((f) => f.event);
      assert.deepEqual(mine, [
        FeedbackEventType.Ingested,
        FeedbackEventType.SentimentAnalyzed,
        FeedbackEventType.TopicsExtracted,
        FeedbackEventType.Dispatched,
        FeedbackEventType.Processed,
      ]);
      assert.ok(frames.every((f) => Number(f.id) > snap.last_seq));
    },
  );
});

Deno.test("/metrics keeps answering while ephemeral consumers come and go", async () => {
  await using t = await startTestNats();
  const js = jetstream(t.nc);
  let churning = true;
  // As SSE replays and listings do: ordered consumers created and deleted all the time.
  const churn = Promise.all(Array.from({ length: 20 }, async () => {
    while (churning) {
      const c = await js.consumers.get("FEEDBACK", { filter_subjects: "feedback.*.*" });
      const msgs = await c.consume({ max_messages: 1 });
      msgs.stop();
      await c.delete().catch(() => {});
    }
  }));
  try {
    for (let i = 0; i < 100; i++) {
      const text = await (await meshMetrics(t.nc, t.jsm, new WeftMetrics(), { maxWaitMs: 50 }))
        .metrics();
      assert.match(text, /weft_stream_usage_ratio/);
    }
  } finally {
    churning = false;
    await churn;
  }
});

Deno.test("weft_items_accepted_total counts every pipeline's accepted items: feedback, content and a definition's", async () => {
  // Found by an operator's probe: only the feedback intake counted its items.
  await using mesh = await startMesh({
    ...ONE_PROCESS,
    WEFT_PIPELINES: "pipelines/support/pipeline.ts",
  });
  const post = async (path: string, body: unknown, status = 202) => {
    const r = await fetch(`${mesh.gatewayUrl}${path}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    assert.equal(r.status, status, await r.clone().text());
    await r.body?.cancel();
  };
  await post("/feedback", { text: "fine" });
  await post("/content", { text: "a friendly note" });
  await post("/content", { text: "another friendly note" });
  await post("/pipelines/support/items", { customer: "ann", text: "where is my order" });
  await post("/pipelines/support/items/batch", {
    items: [{ customer: "ann", text: "a" }, { customer: "bob", text: "b" }],
  });
  await post("/pipelines/support/items", { customer: 1 }, 422); // refused: not counted
  const text = await scrape(mesh.gatewayUrl);
  assert.deepEqual(
    ["feedback", "content", "support"].map((pipeline) =>
      sample(text, "weft_items_accepted_total", { pipeline })
    ),
    [1, 2, 3],
  );
});
