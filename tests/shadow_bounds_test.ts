/**
 * What bounds a live shadow and its replay, on a real nats-server: a candidate's call that
 * never answers is cut at its deadline and counted failed (live and replayed), a shadow with
 * such a call in flight still stops when detached, and the other shadows' attaches and
 * detaches go on meanwhile.
 */
import assert from "node:assert/strict";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { compileFlow, entryData, flowEvent } from "../mod.ts";
import { replayShadow, runShadow } from "../src/shadow/live.ts";
import { hostShadows } from "../src/shadow/host.ts";
import { loadPipelines, pipelineTopology } from "../src/pipeline/runtime.ts";
import { parseShadowSpec } from "../src/shadow/spec.ts";
import { SHADOW_BUCKET } from "../src/subjects.ts";
import { ensureTopology } from "../src/topology.ts";
import { createLogger } from "../src/observability/log.ts";
import { WeftMetrics } from "../src/observability/metrics.ts";
import type { Config } from "../src/config.ts";
import { startTestNats } from "./helpers/nats.ts";
import { meshTempDir } from "./helpers/mesh.ts";
import { deadline, waitFor } from "./helpers/wait.ts";

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
async function setUp(overrides: Partial<Config>) {
  const dir = await meshTempDir("weft-shadow-bounds-");
  await Deno.writeTextFile(`${dir}/pipeline.ts`, definition());
  await Deno.writeTextFile(`${dir}/hang.ts`, definition(true));
  const t = await startTestNats({ pipelines: [`${dir}/pipeline.ts`], ...overrides });
  const pipelines = await loadPipelines([`${dir}/pipeline.ts`]);
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology(pipelines, t.config.retentionMs));
  const flow = compileFlow(pipelines[0]!.def);
  const js = jetstream(t.nc);
  /** Submits an item: its entry event, the `grade` step's input. */
  const submit = async (id: string, text: string) => {
    const e = flowEvent(
      flow,
      "submitted",
      { id: `e-${id}`, item_id: id, trace_id: "0".repeat(32) },
      entryData({ text }),
      { source: "test", now: new Date() },
    );
    await js.publish(`${e.type}.${e.item_id}`, JSON.stringify(e));
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
