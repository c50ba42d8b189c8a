/**
 * A definition's batched task (`flow.batch` with `handleBatch`) on a real nats-server, with
 * the shared runner and the gateway's batch intake: a failed batch is retried item by item,
 * each item with its own attempts.
 */
import assert from "node:assert/strict";
import { definePipeline } from "../src/pipeline/definition.ts";
import { compileFlow } from "../src/pipeline/flow.ts";
import { createBatcher } from "../src/pipeline/flow_control.ts";
import {
  type LoadedPipeline,
  pipelineStateSpec,
  pipelineTopology,
  workStage,
} from "../src/pipeline/runtime.ts";
import { runStage } from "../src/runner.ts";
import { runStateWriter } from "../src/state_writer.ts";
import { ensureTopology } from "../src/topology.ts";
import { startTestNats } from "./helpers/nats.ts";
import { definitionsApp } from "./helpers/pipeline.ts";
import { waitFor } from "./helpers/wait.ts";

Deno.test("a failed batch is retried item by item: the good items complete, the bad one fails after its own attempts", async () => {
  // Found by a new user's probe: a batch of three whose handleBatch threw for one item was
  // called again five times with the same three items (the three redeliveries came back
  // together and were batched again), and all three failed with the bad one's error.
  await using t = await startTestNats({ maxAttempts: 3 });
  const calls: string[][] = [];
  const def = definePipeline({
    name: "batched",
    input: {
      schema: {
        type: "object",
        required: ["name"],
        properties: { name: { type: "string" }, fail: { type: "string" } },
      },
    },
    start: "enrich",
    steps: {
      enrich: {
        kind: "task",
        output: { type: "object", required: ["name"] },
        flow: { batch: { maxItems: 8, maxWaitMs: 200 } },
        handleBatch: (_values: unknown[], ctxs: { input: { name: string; fail?: string } }[]) => {
          calls.push(ctxs.map((c) => c.input.name));
          if (ctxs.some((c) => c.input.fail === c.input.name)) throw new Error("batch exploded");
          return ctxs.map((c) => ({ name: c.input.name }));
        },
        next: "done",
      },
      done: { kind: "end", outcome: "done" },
    },
  });
  const p: LoadedPipeline = { file: "inline", def, flow: compileFlow(def) };
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const runners = [
    await runStateWriter({ ...deps, spec: pipelineStateSpec(p) }),
    await runStage({ ...deps, stage: workStage(p, "enrich") }),
  ];
  try {
    const app = await definitionsApp(t, [p]);
    const res = await app.request("/pipelines/batched/items/batch", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        items: [{ name: "a" }, { name: "b", fail: "b" }, { name: "c" }],
      }),
    });
    assert.equal(res.status, 202, await res.clone().text());
    const ids = ((await res.json()) as { items: { id: string }[] }).items.map((i) => i.id);
    const statuses = () =>
      Promise.all(ids.map(async (id) => {
        const r = await app.request(`/pipelines/batched/items/${id}`);
        return r.status === 200 ? ((await r.json()) as { status?: string }).status : undefined;
      }));
    const final = await waitFor(
      async () => {
        const s = await statuses();
        return s.every((x) => x === "done" || x === "failed") && s;
      },
      20_000,
      "every item done or failed",
    );
    assert.deepEqual(
      final,
      ["done", "failed", "done"],
      `handleBatch calls: ${JSON.stringify(calls)}`,
    );
    // One batch of the three, then each alone: a and c once, b until its attempts ran out.
    assert.deepEqual(calls[0], ["a", "b", "c"]);
    assert.deepEqual(
      calls.slice(1).map((c) => c.join()).sort(),
      ["a", "b", "b", "c"],
      `handleBatch calls: ${JSON.stringify(calls)}`,
    );
  } finally {
    for (const r of runners) await r.stop();
  }
});

Deno.test("a batch is handed over in stream order, whatever order its calls arrived in", async () => {
  // Found by CI: a step's calls reach the batcher after each item's own entry read, so a
  // batch of a, b, c (stream order) was handed to handleBatch as a, c, b.
  const seen: number[][] = [];
  const double = createBatcher(
    { maxItems: 3, maxWaitMs: 10_000, order: (ctx: { seq: number }) => ctx.seq },
    (values: number[]) => {
      seen.push(values);
      return values.map((v) => v * 2);
    },
  );
  const results = await Promise.all([
    double(3, { seq: 30 }),
    double(1, { seq: 10 }),
    double(2, { seq: 20 }),
  ]);
  assert.deepEqual(seen, [[1, 2, 3]]);
  assert.deepEqual(results, [6, 2, 4], "each caller still gets its own result");
});

Deno.test("a batched step's concurrency limit without a key counts handleBatch calls, not items", async () => {
  // Found auditing issue 12 on a real mesh: `batch: { maxItems: 5, maxWaitMs: 500 }` with
  // `concurrency: { limit: 1 }` handed ten items over in ten batches of one, each held back
  // for maxWaitMs: the limit counted items, so a batch could never hold more than one.
  await using t = await startTestNats();
  const sizes: number[] = [];
  let running = 0;
  let most = 0;
  const def = definePipeline({
    name: "embeds",
    input: { schema: { type: "object", required: ["n"], properties: { n: { type: "number" } } } },
    start: "embed",
    steps: {
      embed: {
        kind: "task",
        output: { type: "object", required: ["n", "size"] },
        flow: { batch: { maxItems: 5, maxWaitMs: 3_000 }, concurrency: { limit: 1 } },
        handleBatch: async (_values: unknown[], ctxs: { input: { n: number } }[]) => {
          running++;
          most = Math.max(most, running);
          sizes.push(ctxs.length);
          // A call that takes a while, so the next batch fills while this one runs.
          await new Promise((r) => setTimeout(r, 100));
          running--;
          return ctxs.map((c) => ({ n: c.input.n, size: ctxs.length }));
        },
        next: "done",
      },
      done: { kind: "end", outcome: "done" },
    },
  });
  const p: LoadedPipeline = { file: "inline", def, flow: compileFlow(def) };
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const runners = [
    await runStateWriter({ ...deps, spec: pipelineStateSpec(p) }),
    await runStage({ ...deps, stage: workStage(p, "embed") }),
  ];
  try {
    const app = await definitionsApp(t, [p]);
    const res = await app.request("/pipelines/embeds/items/batch", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ items: Array.from({ length: 10 }, (_, n) => ({ n })) }),
    });
    assert.equal(res.status, 202, await res.clone().text());
    const ids = ((await res.json()) as { items: { id: string }[] }).items.map((i) => i.id);
    const states = await waitFor(
      async () => {
        const s = await Promise.all(ids.map(async (id) => {
          const r = await app.request(`/pipelines/embeds/items/${id}`);
          return r.status === 200
            ? (await r.json()) as { status?: string; results?: { embed?: { n: number } } }
            : undefined;
        }));
        return s.every((x) => x?.status === "done") && s;
      },
      60_000,
      "every item done",
    );
    assert.deepEqual(states.map((s) => s!.results?.embed?.n), ids.map((_, n) => n));
    assert.equal(most, 1, "one handleBatch call at a time");
    assert.equal(sizes.reduce((a, b) => a + b, 0), 10, `batches: ${JSON.stringify(sizes)}`);
    // Ten items arrive at once: batches fill to maxItems rather than one item each.
    assert.ok(sizes.length <= 3, `at most 3 batches of 10 items, got ${JSON.stringify(sizes)}`);
  } finally {
    for (const r of runners) await r.stop();
  }
});
