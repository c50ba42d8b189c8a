import assert from "node:assert/strict";
import { loadConfig } from "./config.ts";
import { bucketConfigs, streamConfigs } from "./topology.ts";
import { SERVICES, wiredServices } from "./supervisor.ts";
import {
  callerSchedulableSubjects,
  definedGraph,
  definedItems,
  definedStream,
  definedTimers,
  type PipelineWiring,
  schedulableSubjects,
  stepAccess,
  stepServices,
  wiredReads,
} from "./wiring.ts";
import { definePipeline } from "./pipeline/definition.ts";
import { ConfigError } from "./errors.ts";
import { pipelineGraph, stepConsumers } from "./pipeline/derive.ts";
import { TIMER_SUBJECTS } from "./subjects.ts";
import { SHIPPED_PIPELINES } from "../pipelines/shipped.ts";

/** A pipeline nobody ships: what a wiring alone makes of it. */
const ORDERS: PipelineWiring = {
  name: "orders",
  streams: [{ name: "ORDERS", description: "orders", subjects: ["orders.>"], atomicBatch: true }],
  buckets: [
    { name: "weft_orders_state", description: "state", ttl: "retention" },
    { name: "weft_orders_cache", description: "cache", ttl: 60_000 },
  ],
  objectStores: [{ name: "weft_orders_files", description: "files" }],
  services: [{
    name: "price",
    entry: "services/price.ts",
    access: stepAccess("ORDERS", ["price"], ["orders.priced"], "orders.failed"),
  }],
  gateway: { publishes: ["orders.>"], serves: ["weft.orders.>"], readsStreams: ["ORDERS"] },
  shadow: { readsStreams: ["ORDERS"], managesConsumers: ["ORDERS"] },
  schedulable: ["orders.submit"],
  timers: ["orders.payment_due.*"],
};

Deno.test("a wiring alone gives a pipeline its streams, buckets and services", async (t) => {
  const config = loadConfig({ env: () => undefined, args: [] });

  await t.step("its stream has the event streams' limits, beside the runtime's own", () => {
    const streams = streamConfigs(config, {}, [ORDERS]);
    assert.deepEqual(streams.map((s) => s.name), ["ORDERS", "DEADLETTER", "DIGEST", "SHADOW"]);
    const orders = streams[0]!;
    assert.deepEqual(orders.subjects, ["orders.>"]);
    assert.equal(orders.max_bytes, config.streamMaxBytes);
    assert.equal(orders.max_age, config.retentionMs * 1_000_000);
  });

  await t.step('its buckets live as long as asked: "retention" is the events\' retention', () => {
    const buckets = bucketConfigs(config, {}, [ORDERS]);
    assert.equal(buckets.find((b) => b.name === "weft_orders_state")?.ttl, config.retentionMs);
    assert.equal(buckets.find((b) => b.name === "weft_orders_cache")?.ttl, 60_000);
    assert.ok(!buckets.some((b) => b.name.includes("feedback")), "no shipped pipeline's bucket");
  });

  await t.step("its services run first; the gateway and shadow grow by what it needs", () => {
    const services = wiredServices([ORDERS]);
    assert.deepEqual(services.map((s) => s.name), ["price", "gateway", "scheduler", "shadow"]);
    const gateway = services.find((s) => s.name === "gateway")!;
    assert.ok(gateway.access.publishes!.includes("orders.>"));
    assert.ok(gateway.access.serves!.includes("weft.orders.>"));
    assert.ok(gateway.access.serves!.includes("weft.deadletters.>"), "keeps its own");
    const shadow = services.find((s) => s.name === "shadow")!;
    assert.deepEqual(shadow.access.managesConsumers, ["ORDERS"]);
  });

  await t.step(
    "callers may schedule its bus inputs; the scheduler fires those and its timers",
    () => {
      assert.deepEqual(callerSchedulableSubjects([ORDERS]), ["orders.submit"]);
      assert.deepEqual(schedulableSubjects([ORDERS]), [
        "orders.submit",
        "orders.payment_due.*",
        ...TIMER_SUBJECTS,
      ]);
      // Its NATS identity may publish the wiring's inputs and timers, not every `*._timer.*`
      // (a definition's are added per definition by the supervisor).
      const scheduler = wiredServices([ORDERS]).find((s) => s.name === "scheduler")!;
      assert.deepEqual(
        new Set(scheduler.access.publishes),
        new Set(["orders.submit", "orders.payment_due.*"]),
      );
    },
  );

  await t.step("operators read every stream, bucket and object store of it", () => {
    assert.deepEqual(wiredReads([ORDERS]), {
      readsStreams: ["ORDERS"],
      readsBuckets: ["weft_orders_state", "weft_orders_cache"],
      readsObjects: ["weft_orders_files"],
    });
  });
});

Deno.test("the mesh's services are the shipped pipelines' and the runtime's, each once", () => {
  const names = SERVICES.map((s) => s.name);
  assert.equal(new Set(names).size, names.length);
  for (const w of SHIPPED_PIPELINES) {
    for (const s of w.services) assert.ok(names.includes(s.name), s.name);
  }
  assert.deepEqual(names.slice(-3), ["gateway", "scheduler", "shadow"]);
});

Deno.test("every shipped service loads by its name (for one process), and runs as that service", async () => {
  const { SHIPPED_SERVICES } = await import("../pipelines/shipped_services.ts");
  const names = SHIPPED_PIPELINES.flatMap((w) => w.services.map((s) => s.name));
  assert.deepEqual([...SHIPPED_SERVICES.keys()], names);
  for (const [name, load] of SHIPPED_SERVICES) assert.equal((await load()).name, name);
});

Deno.test("a wiring's shadowable steps are the ones its pipeline says how to shadow", async () => {
  const { SHIPPED_SHADOW_STEPS } = await import("../pipelines/shipped_shadows.ts");
  for (const w of SHIPPED_PIPELINES) {
    assert.deepEqual(Object.keys(SHIPPED_SHADOW_STEPS[w.name] ?? {}), [...w.shadowSteps ?? []]);
  }
});

/** A definition nobody ships, with a branch: what a hand-wired pipeline derives from it. */
const obj = { type: "object" } as const;
const RETURNS = definePipeline({
  name: "returns",
  input: { schema: obj, event: "requested" },
  start: "inspect",
  steps: {
    inspect: {
      kind: "task",
      description: "inspection",
      output: obj,
      durable: "inspect",
      next: "decide",
    },
    decide: {
      kind: "router",
      route: () => "refund" as const,
      routes: { refund: "refund", reject: "rejected" },
    },
    refund: { kind: "task", output: obj, next: "refunded" },
    refunded: { kind: "end", outcome: "refunded" },
    rejected: { kind: "end", outcome: "rejected" },
  },
});

Deno.test("a hand-wired pipeline's step services take their consumers and events from its definition", () => {
  const [checks, money] = stepServices(RETURNS, [
    { name: "checks", entry: "checks.ts", steps: ["inspect", "decide"] },
    {
      name: "money",
      entry: "money.ts",
      steps: ["refund"],
      access: { readsBuckets: ["weft_returns_ledger"] },
    },
  ]);
  assert.deepEqual(checks!.access.consumes, [
    { stream: "RETURNS", durable: "inspect" },
    { stream: "RETURNS", durable: "returns-decide" },
  ]);
  // Its own events, the end event a branch leads to, failures and its dead letters.
  assert.deepEqual(
    new Set(checks!.access.publishes),
    new Set([
      "returns.inspect.*",
      "returns.decide.*",
      "returns.rejected.*",
      "returns.failed.*",
      "deadletter.inspect.*",
      "deadletter.returns-decide.*",
    ]),
  );
  assert.deepEqual(money!.access.readsBuckets, ["weft_returns_ledger"]);
  assert.ok(money!.access.publishes!.includes("returns.refunded.*"));
  // What each consumes is what the definition's consumers read.
  assert.deepEqual(
    stepConsumers(RETURNS, { ackWaitMs: 1, maxAttempts: 1 }).map((c) => c.durable_name),
    ["inspect", "returns-decide", "returns-refund"],
  );
  assert.deepEqual(definedStream(RETURNS, "returns"), {
    name: "RETURNS",
    description: "returns",
    subjects: ["returns.>"],
  });
  const drawn = definedGraph(RETURNS, "Returns", { after: [["state", "state writer"]] });
  assert.deepEqual(drawn.graph, pipelineGraph(RETURNS));
  assert.deepEqual({ ...drawn, graph: undefined }, {
    title: "Returns",
    graph: undefined,
    stages: [
      ["inspect", "inspection"],
      ["returns-decide", "decide"],
      ["returns-refund", "refund"],
      ["state", "state writer"],
    ],
  });
});

Deno.test("a hand-wired pipeline's items and timers follow from its definition", async () => {
  const items = definedItems(RETURNS, {
    what: "return",
    state: SHIPPED_PIPELINES[0]!.items!.state,
    statusField: "returns",
  });
  assert.equal(items.entryType, "returns.requested");
  assert.deepEqual(
    items.finalTypes,
    new Set(["returns.refunded", "returns.rejected", "returns.failed"]),
  );
  assert.deepEqual(definedTimers(RETURNS), []);
  // The shipped ones: the same items and timers as their own constants say.
  const { FINAL_EVENT_TYPES, FeedbackEventType } = await import("../pipelines/feedback/events.ts");
  const { CONTENT_FINAL_EVENT_TYPES, ContentEventType } = await import(
    "../pipelines/moderation/events.ts"
  );
  const [feedback, content] = SHIPPED_PIPELINES;
  assert.equal(feedback!.items!.entryType, FeedbackEventType.Ingested);
  assert.deepEqual(feedback!.items!.finalTypes, FINAL_EVENT_TYPES);
  assert.equal(content!.items!.entryType, ContentEventType.Uploaded);
  assert.deepEqual(content!.items!.finalTypes, CONTENT_FINAL_EVENT_TYPES);
  // The review wait's timeout is the SLA timer the review service sets.
  assert.deepEqual(content!.timers, [`${ContentEventType.SlaExpired}.*`]);
});

Deno.test("a definition's work step no service runs, or two run, or a service running a non-step, is refused", () => {
  const refused = (services: Parameters<typeof stepServices>[1], words: string) =>
    assert.throws(
      () => stepServices(RETURNS, services),
      (e) => e instanceof ConfigError && e.message.includes(words),
    );
  refused(
    [{ name: "checks", entry: "c.ts", steps: ["inspect", "decide"] }],
    "no service runs step refund",
  );
  refused(
    [
      { name: "a", entry: "a.ts", steps: ["inspect", "decide", "refund"] },
      { name: "b", entry: "b.ts", steps: ["refund"] },
    ],
    "step refund is run by both a and b",
  );
  refused(
    [{ name: "a", entry: "a.ts", steps: ["inspect", "decide", "refund", "refunded"] }],
    "runs refunded, not a work step",
  );
});

Deno.test("the shipped pipelines' step services and consumers are their definitions'", async () => {
  const { FEEDBACK_PIPELINE } = await import("../pipelines/feedback/pipeline.ts");
  const { moderationPipeline } = await import("../pipelines/moderation/pipeline.ts");
  for (const def of [FEEDBACK_PIPELINE, moderationPipeline()]) {
    const wiring = SHIPPED_PIPELINES.find((w) => w.name === def.name)!;
    assert.deepEqual(wiring.streams.map((s) => s.subjects), [[`${def.name}.>`]]);
    const consumed = wiring.services.flatMap((s) => s.access.consumes ?? []).map((c) => c.durable);
    for (const c of stepConsumers(def, { ackWaitMs: 1, maxAttempts: 1 })) {
      assert.equal(consumed.filter((d) => d === c.durable_name).length, 1, c.durable_name);
    }
  }
});
