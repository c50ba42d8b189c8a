import assert from "node:assert/strict";
import { headers } from "@nats-io/nats-core";
import { SHIPPED_PIPELINES } from "../pipelines/shipped.ts";
import {
  gatherServiceMetrics,
  meshMetrics,
  MetricsCache,
  metricsSources,
  refusalOf,
} from "../src/gateway/mesh_metrics.ts";
import { loadPipelines } from "../src/pipeline/runtime.ts";
import { listedPipelines, meshPermissions, meshServices } from "../src/supervisor.ts";
import { INSTANCE_HEADER, metricsSubject } from "../src/observability/micro.ts";
import { type MetricsJson, WeftMetrics } from "../src/observability/metrics.ts";
import { startTestNats } from "./helpers/nats.ts";
import { waitFor } from "./helpers/wait.ts";

const ROOT = new URL("../", import.meta.url);

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
  const sub = t.nc.subscribe(metricsSubject("dispatch"), {
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
    const sources = [{ service: "dispatch", stages: ["dispatch"] }];
    const opts = { sources, cache, maxWaitMs: 300, stallMs: 100 };
    assert.equal(count(await gatherServiceMetrics(t.nc, opts)), 1, "answered in time");
    const second = await gatherServiceMetrics(t.nc, opts);
    assert.equal(calls, 2);
    assert.deepEqual(second, [answer(5)], "the late instance counts with its last answer");

    // Without the cache the same late instance drops out of the sum.
    calls = 1;
    assert.equal(
      count(await gatherServiceMetrics(t.nc, { sources, maxWaitMs: 300, stallMs: 100 })),
      0,
    );
    await late;
  } finally {
    sub.unsubscribe();
  }
});

Deno.test("an instance's last answer is kept only so long, then only its counters count", () => {
  const cache = new MetricsCache(1_000);
  const gauge = [{
    ...answer(7)[0]!,
    name: "weft_sse_clients",
    type: "gauge",
  }] as unknown as MetricsJson;
  const both = [...answer(1), ...gauge] as MetricsJson;
  assert.deepEqual(cache.merge([{ instance: "a", value: both }], 0), [both]);
  assert.deepEqual(cache.merge([], 500), [both], "missing once: its last answer");
  assert.deepEqual(cache.merge([], 1_600), [answer(1)], "gone too long: its counters, retired");
  assert.deepEqual(
    cache.merge([{ value: answer(2) }], 1_700),
    [answer(2), answer(1)],
    "an unnamed answer passes",
  );
  assert.deepEqual(cache.merge([], 1_800), [answer(1)], "and is not kept");
  // Back after all (it was slow): its own answer counts, not the retired one as well.
  assert.deepEqual(cache.merge([{ instance: "a", value: answer(3) }], 1_900), [answer(3)]);
});

Deno.test("the mesh's counters never fall when a service's process dies and its restart answers; the service counts once", async () => {
  // Found by an operator's probe: after a kill -9 of weft-sentiment under load, /metrics
  // counted the dead process's last answer for 15 s beside the new one's, then dropped it:
  // weft_stage_processed_total{stage=sentiment} fell from 524 to 110 (a counter reset to
  // Prometheus), and weft_metrics_sources went 17, 19, 17.
  await using t = await startTestNats();
  const processed = (n: number) =>
    [{
      name: "weft_stage_processed_total",
      help: "",
      type: "counter",
      aggregator: "sum",
      values: [{ value: n, labels: { stage: "sentiment" } }],
    }] as unknown as MetricsJson;
  // Real responders on the bus, as two processes of the service, one after the other.
  const instance = (id: string, n: number) =>
    t.nc.subscribe(metricsSubject("sentiment"), {
      callback: (_err, m) => {
        const h = headers();
        h.set(INSTANCE_HEADER, id);
        m.respond(JSON.stringify(processed(n)), { headers: h });
      },
    });
  const keepMs = 100;
  const opts = {
    sources: [{ service: "sentiment", stages: ["sentiment"] }],
    cache: new MetricsCache(keepMs),
    maxWaitMs: 2_000,
    stallMs: 50,
  };
  const scrape = async () => {
    const json = await (await meshMetrics(t.nc, t.jsm, new WeftMetrics(), opts))
      .getMetricsAsJSON();
    const value = (name: string) =>
      json.find((f) => f.name === name)?.values.reduce((a, v) => a + v.value, 0);
    return {
      processed: value("weft_stage_processed_total"),
      sources: value("weft_metrics_sources"),
    };
  };
  const dead = instance("first", 524);
  assert.deepEqual(await scrape(), { processed: 524, sources: 1 });
  const restarted = instance("second", 110);
  dead.unsubscribe();
  try {
    const switched = Date.now();
    const seen: { processed?: number; sources?: number }[] = [];
    // Scrapes until well past the time the dead process's answer is kept.
    await waitFor(
      async () => {
        seen.push(await scrape());
        return Date.now() - switched > 3 * keepMs && seen.length >= 3;
      },
      20_000,
      "scrapes past the keep time",
    );
    for (const s of seen) assert.deepEqual(s, { processed: 634, sources: 1 }, JSON.stringify(seen));
  } finally {
    restarted.unsubscribe();
  }
});

/** Whether NATS subject pattern `pattern` matches the literal subject `subject`. */
function matches(pattern: string, subject: string): boolean {
  const p = pattern.split("."), s = subject.split(".");
  for (let i = 0; i < p.length; i++) {
    if (p[i] === ">") return s.length > i;
    if (i >= s.length || (p[i] !== "*" && p[i] !== s[i])) return false;
  }
  return p.length === s.length;
}

Deno.test("no identity but a service's own may subscribe to its metrics subject, and the gateway asks every service the supervisor runs", async () => {
  const loaded = await loadPipelines(await listedPipelines(ROOT), ROOT.pathname);
  const mesh = meshServices(loaded);
  const services = mesh.services.map((s) => s.name);
  // The gateway's registry is the supervisor's: every service but the gateway, with its stages.
  assert.deepEqual(
    metricsSources(SHIPPED_PIPELINES, loaded).map((s) => [s.service, [...s.stages]]).sort(),
    mesh.services.filter((s) => s.name !== "gateway")
      .map((s) => [s.name, (s.access.consumes ?? []).map((c) => c.durable)]).sort(),
  );
  for (const { name, permissions } of meshPermissions(mesh)) {
    if (name === "admin") continue;
    for (const service of services) {
      const hears = permissions.subscribe.allow.some((p) => matches(p, metricsSubject(service)));
      // The gateway serves its pipelines' `weft.<pipeline>.>`: it is the requester anyway.
      if (name !== "gateway") assert.equal(hears, name === service, `${name} on ${service}`);
    }
    assert.ok(
      !permissions.subscribe.allow.some((p) => matches(p, "weft.metrics")),
      `${name} may not subscribe to the old shared weft.metrics`,
    );
  }
});

Deno.test("refusalOf takes a service's own metrics and refuses what it cannot have reported", async () => {
  const sources = [
    { service: "sentiment", stages: ["sentiment"] },
    { service: "dispatch", stages: ["dispatch"] },
    { service: "shadow", stages: [], families: ["weft_shadow_"] },
  ];
  const owners = new Map([["sentiment", "sentiment"], ["dispatch", "dispatch"]]);
  const own = new WeftMetrics();
  own.processed.inc({ stage: "sentiment" }, 3);
  own.handlerSeconds.observe({ stage: "sentiment" }, 0.2);
  const json = await own.json();
  const check = (answer: unknown, service = "sentiment") =>
    refusalOf(answer, sources.find((s) => s.service === service)!, owners, sources, new Map());
  assert.equal(check(json), undefined, "its own registry, every family (empty ones too)");
  const one = (type: string, values: unknown[], name = "weft_stage_processed_total") => [
    { name, help: "", type, aggregator: "sum", values },
  ];
  const cases: [unknown, RegExp][] = [
    [{}, /not a list/],
    [one("counter", [{ labels: { stage: "dispatch" }, value: 1 }]), /stage dispatch is dispatch's/],
    [one("counter", [{ labels: { stage: "sentiment" }, value: -1 }]), /negative counter/],
    [
      one("histogram", [{ labels: { stage: "sentiment", le: 1 }, value: -2, metricName: "x" }]),
      /negative histogram/,
    ],
    [
      one("counter", [{ labels: { stage: "sentiment" }, value: 1, metricName: "weft_other" }]),
      /series named weft_other/,
    ],
    [one("counter", [{ labels: { 'a="b"} 1\nx{y': "z" }, value: 1 }]), /bad label name/],
    [one("counter", [{ labels: {}, value: null }]), /not a number/],
    [one("counter", [{ labels: {}, value: 1 }], "bad name"), /bad name/],
    [one("summary", [{ labels: {}, value: 1 }]), /type summary/],
    [
      [{ name: "weft_x", help: "", type: "counter", aggregator: "max", values: [] }],
      /aggregator max/,
    ],
    [one("gauge", [{ labels: {}, value: 0 }], "weft_deadletter_pending"), /the gateway's/],
    [one("gauge", [{ labels: { shadow: "a" }, value: 1 }], "weft_shadow_up"), /is shadow's/],
    [
      [
        ...one("counter", [{ labels: { stage: "sentiment" }, value: 1 }], "weft_x"),
        ...one("gauge", [{ labels: { stage: "sentiment" }, value: 1 }], "weft_x"),
      ],
      /weft_x: gauge, not counter/,
    ],
    // A stage nobody has, and a series of no stage (found by probing with the sentiment key:
    // a ghost stage's count and the state writers' end-to-end histogram were taken).
    [one("counter", [{ labels: { stage: "ghost" }, value: 1 }]), /stage ghost is no stage of/],
    [
      one("histogram", [{
        labels: { outcome: "processed" },
        value: 1,
        metricName: "weft_item_end_to_end_seconds_count",
      }], "weft_item_end_to_end_seconds"),
      /a series of no stage of sentiment's/,
    ],
  ];
  for (const [answer, reason] of cases) assert.match(check(answer) ?? "taken", reason);
  // A gauge may be negative (Cohen's kappa), and the shadow service reports its own families.
  assert.equal(
    check(
      one("gauge", [{ labels: { shadow: "a", field: "f" }, value: -0.5 }], "weft_shadow_kappa"),
      "shadow",
    ),
    undefined,
  );
  // A type the gateway's own registry has for a family binds every answer.
  const types = new Map([["weft_stage_processed_total", "counter"]]);
  assert.match(
    refusalOf(
      one("gauge", [{ labels: { stage: "sentiment" }, value: 1 }]),
      sources[0]!,
      owners,
      sources,
      types,
    ) ?? "",
    /gauge, not counter/,
  );
});

Deno.test("each service is asked on its own subject, with a fresh random reply inbox per request", async () => {
  await using t = await startTestNats();
  const replies: Record<string, string[]> = {};
  const subs = ["topics", "dispatch"].map((service) =>
    t.nc.subscribe(metricsSubject(service), {
      callback: (_err, m) => {
        (replies[service] ??= []).push(m.reply ?? "");
        m.respond(JSON.stringify(answer(1)));
      },
    })
  );
  try {
    await t.nc.flush();
    const sources = [
      { service: "topics", stages: ["topics"] },
      { service: "dispatch", stages: ["dispatch"] },
    ];
    for (let i = 0; i < 2; i++) {
      const got = await gatherServiceMetrics(t.nc, { sources, maxWaitMs: 2000, stallMs: 100 });
      // topics' answer names dispatch's stage: refused; dispatch's own is taken.
      assert.equal(got.length, 1);
    }
    const all = [...replies.topics ?? [], ...replies.dispatch ?? []];
    assert.equal(all.length, 4, "each service asked once per gather");
    assert.equal(new Set(all).size, 4, "no inbox used twice");
    for (const r of all) assert.match(r, /^_INBOX\.[0-9a-f]{32}$/, "128 random bits");
  } finally {
    for (const s of subs) s.unsubscribe();
  }
});
