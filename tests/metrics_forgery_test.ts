/**
 * GET /metrics under `deno task start`'s authenticated nats-server: a service's key cannot
 * forge another service's figures, nor the gateway's. Found by a probe with the sentiment
 * key: every identity could subscribe to the shared `weft.metrics` and answer the gateway's
 * gather with any series (`{stage="dispatch"} 987654321`, a dead-letter count of -1 that hid
 * real dead letters), which the gateway summed without knowing who sent it.
 */
import assert from "node:assert/strict";
import { headers, type Msg, type NatsConnection } from "@nats-io/nats-core";
import { FeedbackEventType } from "../pipelines/feedback/events.ts";
import { loadPipelines } from "../src/pipeline/runtime.ts";
import { listedPipelines, meshServices, SHADOW_SERVICE } from "../src/supervisor.ts";
import { type Mesh, startMesh, submit, waitFinal } from "./helpers/mesh.ts";
import { connectClient } from "./helpers/nats.ts";
import { waitFor } from "./helpers/wait.ts";

const ROOT = new URL("../", import.meta.url);

/** A service's metrics subject, as the services protocol endpoint has it. */
const metricsSubject = (service: string) => `weft.${service}.metrics`;

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

async function scrape(mesh: Mesh): Promise<{ status: number; text: string }> {
  const r = await fetch(`${mesh.gatewayUrl}/metrics`);
  return { status: r.status, text: await r.text() };
}

const family = (name: string, type: string, values: unknown[]) => ({
  name,
  help: "forged",
  type,
  aggregator: "sum",
  values,
});

/** The forger's answers: another's stages, negative counts, and a figure of the gateway's. */
const FORGED = [
  [family("weft_stage_processed_total", "counter", [{
    labels: { stage: "dispatch" },
    value: 987654321,
  }])],
  [family("weft_stage_dead_lettered_total", "counter", [
    { labels: { stage: "state" }, value: -1 },
    { labels: { stage: "topics" }, value: -1 },
  ])],
  // Its own stage, but a count that would take the real one back.
  [family("weft_stage_dead_lettered_total", "counter", [{
    labels: { stage: "sentiment" },
    value: -1,
  }])],
  [family("weft_deadletter_pending", "gauge", [{ labels: {}, value: 0 }])],
  // A stage nobody has, and a series of no stage: the state writers' end-to-end histogram.
  [family("weft_stage_processed_total", "counter", [{ labels: { stage: "ghost" }, value: 7 }])],
  [family("weft_item_end_to_end_seconds", "histogram", [
    {
      labels: { le: "+Inf", outcome: "processed" },
      value: 1000000,
      metricName: "weft_item_end_to_end_seconds_bucket",
    },
    {
      labels: { outcome: "processed" },
      value: 1000000,
      metricName: "weft_item_end_to_end_seconds_count",
    },
    {
      labels: { outcome: "processed" },
      value: 99999999,
      metricName: "weft_item_end_to_end_seconds_sum",
    },
  ])],
];

/** The services the supervisor runs whose metrics the gateway gathers (no live shadow runs). */
async function answering(): Promise<string[]> {
  const loaded = await loadPipelines(await listedPipelines(ROOT), ROOT.pathname);
  return meshServices(loaded).services.map((s) => s.name)
    .filter((n) => n !== "gateway" && n !== SHADOW_SERVICE);
}

for (
  const [mode, env] of [
    ["one process per service", {}],
    ["--together", { WEFT_TOGETHER: "all" }],
  ] as const
) {
  Deno.test(`a service's key cannot forge GET /metrics: another's stage, a negative count or the gateway's figures are refused, every real service still counts (${mode})`, async () => {
    await using mesh = await startMesh(env);
    const expected = await answering();
    const id = await submit(mesh.gatewayUrl, "great product, slow delivery");
    await waitFinal(mesh.gatewayUrl, id);
    // A poison event (an ingested event with no text): dead-lettered by sentiment and kept
    // aside by the state writer, so there are real dead letters to hide.
    const admin = await connectClient(mesh.natsUrl, "test-admin", mesh.credentials("admin"));
    try {
      const h = headers();
      h.set("Weft-Event-Type", FeedbackEventType.Ingested);
      await admin.request(
        "feedback.ingested.poison1",
        JSON.stringify({ type: "feedback.ingested", item_id: "poison1" }),
        { headers: h, timeout: 5000 },
      );
    } finally {
      await admin.close();
    }
    await waitFinal(mesh.gatewayUrl, "poison1");

    // The forger: the sentiment service's own key and inbox prefix, listening wherever a
    // gather could reach it (the old shared subject, another service's, its own).
    const forger: NatsConnection = await connectClient(
      mesh.natsUrl,
      "forger",
      mesh.credentials("sentiment"),
    );
    const heard: Record<string, number> = {};
    const forge = (subject: string) =>
      forger.subscribe(subject, {
        callback: (err, m: Msg) => {
          if (err) return; // refused: this identity may not subscribe here
          heard[subject] = (heard[subject] ?? 0) + 1;
          for (const answer of FORGED) m.respond(JSON.stringify(answer));
        },
      });
    const subs = ["weft.metrics", metricsSubject("topics"), metricsSubject("sentiment")].map(forge);
    try {
      await forger.flush();
      // Two gathers the forger heard, every real service's answer counted and the forged
      // answers refused; or a scrape that shows a forged figure, or failed (a forged series of
      // the gateway's once made /metrics a 500).
      let last = { status: 0, text: "" };
      await waitFor(
        async () => {
          last = await scrape(mesh);
          const total = Object.values(heard).reduce((a, b) => a + b, 0);
          const { status, text } = last;
          const settled = (sample(text, "weft_metrics_sources") ?? 0) >= expected.length &&
            (sample(text, "weft_metrics_refused_total", { service: "sentiment" }) ?? 0) >=
              FORGED.length;
          const forged = sample(text, "weft_stage_processed_total", { stage: "dispatch" }) !== 1;
          return total >= 2 && (status !== 200 || settled || forged) ? true : undefined;
        },
        60_000,
        `every service's metrics, and two gathers the forger heard (${mode})`,
      )
        .catch((err) => {
          throw new Error(
            `${(err as Error).message}: heard ${JSON.stringify(heard)}; last scrape ` +
              `${last.status}\n${last.text.split("\n").filter((l) => /sources|refused/.test(l))}`,
            { cause: err },
          );
        });
      // A scrape after the forger answered a whole gather.
      const { status, text } = await scrape(mesh);
      assert.equal(status, 200, text);
      assert.equal(sample(text, "weft_stage_processed_total", { stage: "dispatch" }), 1);
      assert.equal(sample(text, "weft_stage_processed_total", { stage: "sentiment" }), 1);
      assert.equal(sample(text, "weft_stage_processed_total", { stage: "topics" }), 1);
      assert.equal(sample(text, "weft_stage_dead_lettered_total", { stage: "sentiment" }), 1);
      assert.equal(sample(text, "weft_stage_dead_lettered_total", { stage: "state" }), 1);
      assert.equal(sample(text, "weft_stage_dead_lettered_total", { stage: "topics" }), undefined);
      assert.equal(sample(text, "weft_deadletter_pending"), 2, "JetStream's count");
      assert.equal(sample(text, "weft_stage_processed_total", { stage: "ghost" }), undefined);
      assert.equal(
        sample(text, "weft_item_end_to_end_seconds_count", {
          stage: "state",
          outcome: "processed",
        }),
        1,
        "the state writer's one item",
      );
      assert.equal(
        sample(text, "weft_item_end_to_end_seconds_count", { outcome: "processed" }),
        undefined,
        "no series of no stage",
      );
      assert.equal(sample(text, "weft_metrics_sources"), expected.length);
      assert.ok(
        (sample(text, "weft_metrics_refused_total", { service: "sentiment" }) ?? 0) >=
          FORGED.length,
        "each forged answer is counted as refused",
      );
      // Only its own subject reached it: it never saw another service's reply inbox.
      assert.deepEqual(Object.keys(heard), [metricsSubject("sentiment")]);
      const refusals = mesh.logs.filter((l) =>
        l.msg === "metrics answer refused" && l.service === "weft-gateway" &&
        l.source === "sentiment"
      );
      assert.ok(refusals.some((l) => /stage dispatch is dispatch's/.test(String(l.reason))));
      assert.ok(refusals.some((l) => /negative counter value -1/.test(String(l.reason))));
      assert.ok(
        refusals.some((l) => /weft_deadletter_pending is the gateway's/.test(String(l.reason))),
      );
      assert.ok(
        refusals.some((l) => /stage ghost is no stage of sentiment.s/.test(String(l.reason))),
      );
      assert.ok(refusals.some((l) => /a series of no stage of sentiment.s/.test(String(l.reason))));
    } finally {
      for (const s of subs) s.unsubscribe();
      await forger.close();
    }
  });
}
