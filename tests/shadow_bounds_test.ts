/**
 * What bounds a live shadow and its replay, on a real nats-server: a candidate's call that
 * never answers is cut at its deadline and counted failed (live and replayed), a shadow with
 * such a call in flight still stops when detached, and the other shadows' attaches and
 * detaches go on meanwhile; a step with many result values; promotions at once.
 */
import assert from "node:assert/strict";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { advance, compileFlow, completion, entryData, flowEvent, type TaskStep } from "../mod.ts";
import { replayShadow, runShadow } from "../src/shadow/live.ts";
import { fitStatus, hostShadows } from "../src/shadow/host.ts";
import { loadPipelines, pipelineTopology } from "../src/pipeline/runtime.ts";
import { parseShadowSpec } from "../src/shadow/spec.ts";
import { SHADOW_BUCKET, STEP_VERSION_BUCKET } from "../src/subjects.ts";
import { createShadowControl } from "../src/shadow/control.ts";
import { ensureTopology } from "../src/topology.ts";
import { createLogger } from "../src/observability/log.ts";
import { type MetricsJson, WeftMetrics } from "../src/observability/metrics.ts";
import { registerMicroService } from "../src/observability/micro.ts";
import type { Config } from "../src/config.ts";
import type { WeftError } from "../src/errors.ts";
import { startTestNats } from "./helpers/nats.ts";
import { meshTempDir } from "./helpers/mesh.ts";
import { deadline, waitFor } from "./helpers/wait.ts";
import { chat, startFakeOpenAI } from "./helpers/openai_server.ts";

const MOD = new URL("../mod.ts", import.meta.url).href;

/**
 * A one-step definition whose `grade` step labels a text; `hangs` makes its handler never
 * answer (nor heed its signal) for a text with "hang" in it.
 */
function definition(hangs = false): string {
  return `import { definePipeline } from "${MOD}";
export const bounded = definePipeline({
  name: "bounded",
  input: { schema: { type: "object", required: ["text"], properties: { text: { type: "string" } } } },
  start: "grade",
  steps: {
    grade: {
      kind: "task",
      output: { type: "object" },
      handle: (v: { text: string }) =>
        ${
    hangs ? `v.text.includes("hang") ? new Promise<never>(() => {}) :` : ""
  } ({ label: v.text.length > 4 ? "long" : "short" }),
      next: "done",
    },
    done: { kind: "end", outcome: "done" },
  },
});
`;
}

/** A server with the `bounded` pipeline's topology, its definitions in a folder of their own. */
async function setUp(
  overrides: Partial<Config>,
  files: Record<string, string> = { "pipeline.ts": definition(), "hang.ts": definition(true) },
) {
  const dir = await meshTempDir("weft-shadow-bounds-");
  for (const [name, text] of Object.entries(files)) {
    await Deno.writeTextFile(`${dir}/${name}`, text);
  }
  const t = await startTestNats({ pipelines: [`${dir}/pipeline.ts`], ...overrides });
  const pipelines = await loadPipelines([`${dir}/pipeline.ts`]);
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology(pipelines, t.config.retentionMs));
  const flow = compileFlow(pipelines[0]!.def);
  const js = jetstream(t.nc);
  const ctx = { source: "test", now: new Date() };
  /**
   * Submits an item: its entry event, the `grade` step's input; with `decided`, production's
   * completion too, as its handler decides it.
   */
  const submit = async (id: string, text: string, decided = false) => {
    const e = flowEvent(
      flow,
      "submitted",
      { id: `e-${id}`, item_id: id, trace_id: "0".repeat(32) },
      entryData({ text }),
      ctx,
    );
    await js.publish(`${e.type}.${e.item_id}`, JSON.stringify(e));
    if (!decided) return;
    const grade = pipelines[0]!.def.steps.grade as TaskStep;
    const result = await grade.handle!({ text }, {} as never);
    for (const c of completion(flow, "grade", e, advance(e.data, "grade", result, result), ctx)) {
      await js.publish(`${c.type}.${c.item_id}`, JSON.stringify(c));
    }
  };
  return {
    t,
    dir,
    pipelines,
    submit,
    async [Symbol.asyncDispose]() {
      await t[Symbol.asyncDispose]();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };
}

Deno.test("a candidate's call that never answers is cut at WEFT_HANDLER_TIMEOUT_MS and counted failed; the shadow stops", async () => {
  await using s = await setUp({ handlerTimeoutMs: 300 });
  const spec = parseShadowSpec({
    id: "hang",
    pipeline: "bounded",
    step: "grade",
    candidate: { definition: `${s.dir}/hang.ts` },
    limits: { rps: 100, concurrency: 4 },
  });
  const runner = await runShadow({
    nc: s.t.nc,
    spec,
    config: s.t.config,
    log: s.t.log,
    pipelines: s.pipelines,
    root: "",
    matchWaitMs: 200,
  });
  try {
    for (const [id, text] of [["a", "short"], ["b", "hang on"], ["c", "fine day"]]) {
      await s.submit(id!, text!);
    }
    await waitFor(
      () => runner.tally.counts.failed === 1 && runner.tally.counts.decided === 2,
      20_000,
      `one call timed out, two decided (${JSON.stringify(runner.tally.counts)})`,
    );
    assert.ok(
      s.t.lines.some((l) => l.includes("did not answer within 300 ms")),
      "the failure says why",
    );
  } finally {
    await deadline(runner.stop(), 10_000, "the shadow to stop");
  }
  const ci = await s.t.jsm.consumers.info("BOUNDED", "shadow_hang");
  assert.equal(ci.num_ack_pending, 0, "nothing held: the timed-out item was terminated");
});

Deno.test("a shadow detached while its candidate's call hangs stops, and other shadows attach meanwhile", async () => {
  // A deadline far beyond the test: the stop itself must not wait for the call.
  await using s = await setUp({ handlerTimeoutMs: 600_000, drainMs: 200 });
  const lines: Record<string, unknown>[] = [];
  const log = createLogger("test", "debug", (l) => lines.push(JSON.parse(l)));
  const logged = (msg: string, shadow: string) =>
    waitFor(
      () => lines.some((l) => l.msg === msg && l.shadow === shadow),
      20_000,
      `${msg}: ${shadow}`,
    );
  const host = await hostShadows({
    nc: s.t.nc,
    config: s.t.config,
    log,
    metrics: new WeftMetrics(),
  });
  const kv = await new Kvm(s.t.nc).open(SHADOW_BUCKET);
  const attach = (id: string) =>
    kv.create(
      id,
      JSON.stringify({
        id,
        pipeline: "bounded",
        step: "grade",
        candidate: { definition: `${s.dir}/hang.ts` },
        attached_at: new Date().toISOString(),
      }),
    );
  try {
    await attach("stuck");
    await logged("shadow started", "stuck");
    await s.submit("h1", "hang here");
    await waitFor(
      async () => (await s.t.jsm.consumers.info("BOUNDED", "shadow_stuck")).num_ack_pending === 1,
      20_000,
      "the hanging call in flight",
    );
    await kv.delete("stuck");
    await logged("shadow stopped", "stuck");
    await logged("shadow detached", "stuck");
    await assert.rejects(s.t.jsm.consumers.info("BOUNDED", "shadow_stuck"), "consumer deleted");
    // Another shadow's attach is not held up by it.
    await attach("next");
    await logged("shadow started", "next");
  } finally {
    await deadline(host.stop(), 10_000, "the shadow host to stop");
  }
});

Deno.test("a replay's candidate call that never answers is cut at its deadline and reported", async () => {
  await using s = await setUp({ handlerTimeoutMs: 300 });
  for (const [id, text] of [["a", "short"], ["b", "hang on"], ["c", "fine day"]]) {
    await s.submit(id!, text!);
  }
  const spec = parseShadowSpec({
    id: "replay",
    pipeline: "bounded",
    step: "grade",
    candidate: { definition: `${s.dir}/hang.ts` },
  });
  const replay = await deadline(
    replayShadow({
      nc: s.t.nc,
      spec,
      config: s.t.config,
      log: s.t.log,
      pipelines: s.pipelines,
      root: "",
    }),
    20_000,
    "the replay to end",
  );
  assert.equal(replay.decisions.length, 2);
  assert.equal(replay.failed, 1);
  assert.equal(replay.timedOut, 1);
});

/**
 * A step whose result has many top-level values: 20 with the same names on every item, 200
 * named after the item (new names on every item), all with long names; `shift` changes the
 * candidate's values of every third field.
 */
function wide(shift: number): string {
  return `import { definePipeline } from "${MOD}";
export const bounded = definePipeline({
  name: "bounded",
  input: { schema: { type: "object", required: ["text"], properties: { text: { type: "string" } } } },
  start: "grade",
  steps: {
    grade: {
      kind: "task",
      output: { type: "object" },
      handle: (v: { text: string }) => {
        const out: Record<string, string> = {};
        const long = "${"n".repeat(90)}";
        for (let i = 0; i < 20; i++) out["a_" + i + long] = v.text + (i % 3 ? 0 : ${shift});
        for (let i = 0; i < 200; i++) out["z_" + v.text + "_" + i + long] = v.text + i;
        return out;
      },
      next: "done",
    },
    done: { kind: "end", outcome: "done" },
  },
});
`;
}

Deno.test("a shadow of a step with many result values compares at most 16 fields; the metrics and status answers stay whole", async () => {
  await using s = await setUp({}, {
    "pipeline.ts": wide(0),
    "wide.ts": wide(1),
    "same.ts": wide(0),
  });
  const log = createLogger("test", "debug", (l) => s.t.lines.push(l));
  const metrics = new WeftMetrics();
  const host = await hostShadows({ nc: s.t.nc, config: s.t.config, log, metrics });
  const service = await registerMicroService({
    nc: s.t.nc,
    name: "shadow",
    description: "test",
    metrics,
    status: () => (host.stats ?? {}) as Record<string, unknown>,
    log,
  });
  const kv = await new Kvm(s.t.nc).open(SHADOW_BUCKET);
  try {
    for (const [id, file] of [["wide", "wide.ts"], ["same", "same.ts"]]) {
      await kv.create(
        id!,
        JSON.stringify({
          id,
          pipeline: "bounded",
          step: "grade",
          candidate: { definition: `${s.dir}/${file}` },
          limits: { rps: 100 },
          attached_at: new Date().toISOString(),
        }),
      );
    }
    await waitFor(
      () => s.t.lines.filter((l) => l.includes('"shadow started"')).length === 2,
      20_000,
      "both shadows started",
    );
    const n = 30;
    for (let i = 0; i < n; i++) await s.submit(`w${i}`, `item${i}`, true);
    type Status = { shadows: Record<string, Record<string, unknown>> };
    const status = await waitFor(
      async () => {
        const m = await s.t.nc.request("weft.shadow.status", "", { timeout: 5_000 });
        const st = m.json<Status>();
        return ["wide", "same"].every((id) => st.shadows?.[id]?.compared === n)
          ? { st, bytes: m.data.length }
          : undefined;
      },
      30_000,
      `both shadows to compare ${n} items`,
    );
    const max = s.t.nc.info!.max_payload;
    assert.ok(status.bytes <= max);
    for (const id of ["wide", "same"]) {
      const one = status.st.shadows[id]!;
      const fields = one.fields as Record<string, { agreement: number }>;
      assert.equal(Object.keys(fields).length, 16, id);
      assert.ok((one.fields_dropped as number) > 0, id);
      assert.ok(Object.keys(fields).every((f) => f.length <= 64), "names cut");
      assert.ok("result" in fields);
    }
    const wideFields = status.st.shadows.wide!.fields as Record<string, { agreement: number }>;
    assert.equal(wideFields[`a_0${"n".repeat(61)}`]?.agreement, 0, "the shifted field disagrees");
    assert.equal(wideFields[`a_1${"n".repeat(61)}`]?.agreement, 1);
    // Every shadow's series are in the metrics answer.
    const m = await s.t.nc.request("weft.shadow.metrics", "", { timeout: 5_000 });
    assert.ok(m.data.length <= max);
    const families = m.json<MetricsJson>();
    const items = families.find((f) => f.name === "weft_shadow_items_total")!;
    for (const id of ["wide", "same"]) {
      assert.equal(
        items.values.find((v) => v.labels.shadow === id && v.labels.outcome === "compared")?.value,
        n,
        id,
      );
    }
  } finally {
    await service.stop();
    await deadline(host.stop(), 10_000, "the shadow host to stop");
  }
});

Deno.test("fitStatus drops the largest shadows' field figures first and keeps every shadow listed", () => {
  const fields = (n: number) =>
    Object.fromEntries(
      Array.from({ length: n }, (_, i) => [`f${i}`, { compared: 1, agreement: 1, kappa: 1 }]),
    );
  const shadows = {
    big: { up: true, compared: 9, fields: fields(2000) },
    small: { up: true, compared: 3, fields: fields(2) },
  };
  assert.equal(fitStatus(shadows, 10_000_000), shadows);
  const fitted = fitStatus(shadows, 4096);
  assert.deepEqual(fitted.big, { up: true, compared: 9, fields_truncated: true });
  assert.deepEqual(fitted.small, shadows.small);
  const many = Object.fromEntries(
    Array.from({ length: 500 }, (_, i) => [`s${i}`, { up: true, compared: i, candidate: "x" }]),
  );
  const tight = fitStatus(many, 16 * 1024);
  assert.equal(Object.keys(tight).length, 500);
  assert.deepEqual(tight.s7, { up: true, compared: 7, fields_truncated: true });
});

Deno.test("two promotions of one shadow at once: one succeeds, the other finds it gone", async () => {
  await using s = await setUp({}, { "pipeline.ts": definition(), "v2.ts": definition() });
  const log = createLogger("test", "debug", (l) => s.t.lines.push(l));
  const metrics = new WeftMetrics();
  const host = await hostShadows({ nc: s.t.nc, config: s.t.config, log, metrics });
  const service = await registerMicroService({
    nc: s.t.nc,
    name: "shadow",
    description: "test",
    metrics,
    status: () => (host.stats ?? {}) as Record<string, unknown>,
    log,
  });
  try {
    const control = createShadowControl(s.t.nc, [], { pipelines: s.pipelines, root: "" });
    await control.attach({
      id: "twice",
      pipeline: "bounded",
      step: "grade",
      candidate: { definition: `${s.dir}/v2.ts` },
    }, "test");
    await waitFor(
      () => s.t.lines.some((l) => l.includes('"shadow started"')),
      20_000,
      "the shadow started",
    );
    await s.submit("p1", "hello there", true);
    await waitFor(
      async () => {
        const m = await s.t.nc.request("weft.shadow.status", "", { timeout: 5_000 });
        return m.json<{ shadows: Record<string, { compared?: number }> }>().shadows?.twice
          ?.compared === 1;
      },
      20_000,
      "the shadow to compare an item",
    );
    const results = await Promise.allSettled([
      control.promote("twice", "a"),
      control.promote("twice", "b"),
    ]);
    assert.equal(results.filter((r) => r.status === "fulfilled").length, 1);
    const refused = results.find((r) => r.status === "rejected") as PromiseRejectedResult;
    assert.equal(refused.reason.code, "not_found", String(refused.reason));
    const kv = await new Kvm(s.t.nc).open(STEP_VERSION_BUCKET);
    const history = [];
    for await (const e of await kv.history({ key: "bounded.grade" })) history.push(e);
    assert.equal(history.length, 1, "one promotion recorded");
  } finally {
    await service.stop();
    await deadline(host.stop(), 10_000, "the shadow host to stop");
  }
});

Deno.test("only so many live shadows are attached at once: one more is refused 409 until one is detached; WEFT_SHADOW's count", async () => {
  // Found by probing: 60 shadows of the sentiment step (60 requests) made 2,000 items take
  // 18.7 s to process instead of 10.5: each reads every item of its step, whatever its limits.
  await using s = await setUp({}, { "pipeline.ts": definition(), "v2.ts": definition() });
  const spec = (id: string) => ({
    id,
    pipeline: "bounded",
    step: "grade",
    candidate: { definition: `${s.dir}/v2.ts` },
  });
  const configured = [parseShadowSpec(spec("from-config"))];
  const control = createShadowControl(
    s.t.nc,
    configured,
    { pipelines: s.pipelines, root: "" },
    undefined,
    { maxShadows: 3 },
  );
  await control.attach(spec("a"), "test");
  await control.attach(spec("b"), "test");
  await assert.rejects(
    control.attach(spec("c"), "test"),
    (err: WeftError) => err.code === "conflict" && /3 live shadows/.test(err.message),
  );
  const listed = async () => (await control.list()).shadows.map((x) => x.id);
  assert.deepEqual(await listed(), ["a", "b", "from-config"], "the refused one is not kept");
  await control.detach("a", "test");
  await control.attach(spec("c"), "test");
  assert.deepEqual(await listed(), ["b", "c", "from-config"]);
});

Deno.test("a shadow attached again under its id starts from zero, not from the earlier attachment's backlog", async () => {
  await using s = await setUp({}, { "pipeline.ts": definition(), "v2.ts": definition() });
  const spec = (attached_at: string) =>
    parseShadowSpec({
      id: "again",
      pipeline: "bounded",
      step: "grade",
      candidate: { definition: `${s.dir}/v2.ts` },
      attached_at,
    });
  const run = (attached_at: string) =>
    runShadow({
      nc: s.t.nc,
      spec: spec(attached_at),
      config: s.t.config,
      log: s.t.log,
      pipelines: s.pipelines,
      root: "",
      matchWaitMs: 200,
    });
  const first = await run("2026-12-01T00:00:00.000Z");
  await deadline(first.stop(), 10_000, "the first attachment to stop");
  // Detached while the shadow service was down: its consumer stayed, and items came.
  for (const id of ["x1", "x2", "x3"]) await s.submit(id, "backlog item");
  const before = await s.t.jsm.consumers.info("BOUNDED", "shadow_again");
  // Pending, or handed to a pull the stopped attachment left open until it expires.
  assert.equal(before.num_pending + before.num_ack_pending, 3);
  const second = await run("2026-12-02T00:00:00.000Z");
  try {
    const ci = await s.t.jsm.consumers.info("BOUNDED", "shadow_again");
    assert.equal(ci.num_pending + ci.num_ack_pending + ci.delivered.consumer_seq, 0);
    assert.match(ci.config.description ?? "", /attached 2026-12-02T00:00:00.000Z$/);
    await s.submit("x4", "a new one");
    await waitFor(() => second.tally.counts.decided === 1, 20_000, "the new item decided");
  } finally {
    await deadline(second.stop(), 10_000, "the second attachment to stop");
  }
  assert.equal(second.tally.counts.decided, 1, "the earlier backlog was not decided");
});

/** A one-step definition whose `grade` step is an llm step (prompt `grade.md` beside it). */
function llmDefinition(): string {
  return `import { definePipeline } from "${MOD}";
export const bounded = definePipeline({
  name: "bounded",
  input: { schema: { type: "object", required: ["text"], properties: { text: { type: "string" } } } },
  start: "grade",
  steps: {
    grade: {
      kind: "llm",
      prompt: "grade.md",
      output: { type: "object", required: ["label"], properties: { label: { type: "string" } } },
      next: "done",
    },
    done: { kind: "end", outcome: "done" },
  },
});
`;
}

Deno.test("a definition llm step's shadow stops at its own budget and counts its cost; a replay reports its cost", async () => {
  // 100 prompt and 20 completion tokens a call: 0.0001 + 0.00004 USD at these prices.
  const fake = startFakeOpenAI(() => chat({ label: "long" }));
  try {
    await using s = await setUp({
      llmBaseUrl: fake.baseUrl,
      llmModel: "candidate-model",
      llmApiKey: "sk-test",
      llmPriceInPer1k: 0.001,
      llmPriceOutPer1k: 0.002,
    }, {
      "pipeline.ts": llmDefinition(),
      "v2.ts": llmDefinition(),
      "grade.md": "Grade the text. Reply with a JSON object matching {{schema}}.",
    });
    const spec = parseShadowSpec({
      id: "spend",
      pipeline: "bounded",
      step: "grade",
      candidate: { definition: `${s.dir}/v2.ts` },
      // Two calls spend 0.00028 USD: past this budget, so the third item is over it.
      limits: { rps: 100, concurrency: 1, budgetUsd: 0.0002 },
    });
    const runner = await runShadow({
      nc: s.t.nc,
      spec,
      config: s.t.config,
      log: s.t.log,
      pipelines: s.pipelines,
      root: "",
      matchWaitMs: 100,
    });
    try {
      for (const id of ["a", "b", "c", "d", "e"]) await s.submit(id, `text of ${id}`);
      await waitFor(
        () => runner.tally.counts.decided + runner.tally.counts.over_budget === 5,
        20_000,
        `five items seen (${JSON.stringify(runner.tally.counts)})`,
      );
    } finally {
      await deadline(runner.stop(), 10_000, "the shadow to stop");
    }
    assert.equal(fake.requests.length, 2, "no request past the budget");
    assert.equal(runner.tally.counts.decided, 2);
    assert.equal(runner.tally.counts.over_budget, 3);
    const spent = runner.tally.llm?.snapshot();
    assert.equal(spent?.total_tokens, 240, "its tokens are counted");
    assert.ok(Math.abs((spent?.cost_usd ?? 0) - 0.00028) < 1e-12, `its cost: ${spent?.cost_usd}`);

    // A replay of the same history with no budget reports its calls, tokens and cost.
    const replay = await deadline(
      replayShadow({
        nc: s.t.nc,
        spec: parseShadowSpec({ ...spec, id: "spend-replay", limits: { budgetUsd: 0 } }),
        config: s.t.config,
        log: s.t.log,
        pipelines: s.pipelines,
        root: "",
      }),
      20_000,
      "the replay to end",
    );
    assert.equal(replay.failed, 0);
    assert.equal(replay.llm?.calls, 5);
    assert.equal(replay.llm?.total_tokens, 600);
    assert.ok(Math.abs((replay.llm?.cost_usd ?? 0) - 0.0007) < 1e-12, `${replay.llm?.cost_usd}`);
  } finally {
    await fake.close();
  }
});

Deno.test("a live shadow whose consumer is deleted under it makes it again and goes on from where it was, saying so", async () => {
  await using s = await setUp({});
  const spec = parseShadowSpec({
    id: "gone",
    pipeline: "bounded",
    step: "grade",
    candidate: { definition: `${s.dir}/pipeline.ts` },
    limits: { rps: 100, concurrency: 4 },
  });
  const runner = await runShadow({
    nc: s.t.nc,
    spec,
    config: s.t.config,
    log: s.t.log,
    pipelines: s.pipelines,
    root: "",
    matchWaitMs: 5_000,
  });
  try {
    await s.submit("a", "short", true);
    await s.submit("b", "fine day", true);
    await waitFor(
      () => runner.tally.counts.decided === 2,
      30_000,
      `two decided (${JSON.stringify(runner.tally.counts)})`,
    );
    // Another identity that may delete consumers on the stream, given the shadow's id (its
    // consumer's name is `shadow_<id>`), deletes it: the shadow must not stop silently.
    assert.equal(await s.t.jsm.consumers.delete("BOUNDED", "shadow_gone"), true);
    await s.submit("c", "short", true);
    await s.submit("d", "a longer one", true);
    await waitFor(
      () => runner.tally.counts.decided === 4,
      60_000,
      `the items after the deletion decided too (${JSON.stringify(runner.tally.counts)})`,
    );
    assert.ok(
      s.t.lines.some((l) => l.includes("shadow consumer was missing: made again")),
      "the shadow says its consumer was made again",
    );
    const ci = await s.t.jsm.consumers.info("BOUNDED", "shadow_gone");
    assert.equal(ci.num_pending, 0, "nothing left behind");
  } finally {
    await deadline(runner.stop(), 10_000, "the shadow to stop");
  }
});
