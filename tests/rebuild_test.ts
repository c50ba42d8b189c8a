/**
 * The state of every item can be rebuilt from the event stream alone, and the rebuild
 * equals the live state the state writer keeps: processed items, failed items, items
 * redriven after failing, and poison events on the bus.
 */
import assert from "node:assert/strict";
import { FEEDBACK_STATE_SPEC } from "../pipelines/feedback/state.ts";
import { compareStates, rebuildStates, type StateDiff } from "../src/rebuild.ts";
import { redrive } from "../src/redrive.ts";
import { rebuildStateTask, SERVICES_IN_ONE_PROCESS, startServices } from "./helpers/mesh.ts";
import { countsByItem, pushItems, readStates } from "./helpers/nats.ts";
import { startTestNats } from "./helpers/nats.ts";
import { waitFor, waitUntil } from "./helpers/wait.ts";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { definePipeline } from "../src/pipeline/definition.ts";
import { compileFlow } from "../src/pipeline/flow.ts";
import {
  controlStage,
  type LoadedPipeline,
  pipelineStateSpec,
  pipelineTopology,
  readItem,
  stateBucketOf,
  submitItem,
} from "../src/pipeline/runtime.ts";
import { runStage } from "../src/runner.ts";
import { runStateWriter, type StateSpec } from "../src/state_writer.ts";
import { ensureTopology } from "../src/topology.ts";

const TRACE = "0af7651916cd43dd8448eb211c80319c";

Deno.test("rebuilding state from the FEEDBACK stream equals the live state, and deno task rebuild-state says so", async () => {
  await using mesh = await startServices({
    ...SERVICES_IN_ONE_PROCESS,
    env: { WEFT_FAIL_ON: "crash", WEFT_FAIL_STAGE: "topics" },
  });
  const items = Array.from({ length: 300 }, (_, i) => ({
    id: `rb-${i}`,
    text: i % 10 === 0 ? `app crash number ${i}` : `great support, slow billing ${i}`,
  }));
  await pushItems(mesh.js, items);
  await mesh.js.publish(
    "feedback.ingested.rb-poison",
    JSON.stringify({ type: "feedback.ingested", version: 1, item_id: "rb-poison" }),
  );
  const finals = async () =>
    (await countsByItem(mesh.jsm, "feedback.processed.*")).size +
    (await countsByItem(mesh.jsm, "feedback.failed.*")).size;
  await waitUntil(
    async () => (await finals()) >= 301,
    30_000,
    async () => `${await finals()} final`,
  );

  // Redrive some failed items after fixing the stage: they fail first, then complete.
  await mesh.kill("topics", "SIGTERM");
  await mesh.start("topics", { WEFT_FAIL_ON: "" });
  const { redriven } = await redrive(mesh.js, { filter: { stage: "topics" } });
  assert.equal(redriven.length, 30);
  await waitUntil(
    async () => (await countsByItem(mesh.jsm, "feedback.processed.*")).size === 300,
    30_000,
  );

  let diff: StateDiff | undefined;
  await waitUntil(
    async () => {
      const { states } = await rebuildStates(mesh.js, FEEDBACK_STATE_SPEC);
      diff = compareStates(states, await readStates(mesh.js));
      return diff.different.length + diff.missingLive.length + diff.missingRebuilt.length === 0;
    },
    20_000,
    () => JSON.stringify(diff),
  );
  const live = await readStates(mesh.js);
  assert.equal([...live.values()].filter((s) => s.status === "processed").length, 300);
  assert.equal(live.get("rb-10")?.stages.failed !== undefined, true, "history keeps the failure");
  assert.equal(live.get("rb-poison")?.status, "failed", "a poison event fails its item");

  const { code, figures, output } = await rebuildStateTask({ NATS_URL: mesh.nats.url });
  assert.equal(code, 0, output);
  assert.equal(figures.different, 0);
  assert.equal(figures.missing_in_bucket, 0);
  assert.equal(figures.equal, live.size);
});

Deno.test("comparing states holding a lone UTF-16 surrogate (accepted over HTTP) does not throw", () => {
  const live = new Map([["a", { text: "x\ud800" }], ["b", { text: "y" }]]);
  const rebuilt = new Map([["a", { text: "x\ud800" }], ["b", { text: "y\udc00" }]]);
  const diff = compareStates(rebuilt, live);
  assert.equal(diff.equal, 1);
  assert.deepEqual(diff.different, ["b"]);
});

Deno.test("a definition item's awaited events are folded at their stored time: the rebuild equals the live state", async () => {
  await using t = await startTestNats();
  const obj = { type: "object" } as const;
  const def = definePipeline({
    name: "asks",
    input: { schema: obj },
    start: "ask",
    steps: {
      ask: { kind: "wait", event: "answer", timeoutMs: 3_600_000, onTimeout: "late", next: "ok" },
      ok: { kind: "end", outcome: "ok" },
      late: { kind: "end", outcome: "late" },
    },
  });
  const p: LoadedPipeline = { file: "inline", def, flow: compileFlow(def) };
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const spec = pipelineStateSpec(p);
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const runners = [
    await runStateWriter({ ...deps, spec }),
    await runStage({ ...deps, stage: controlStage(p, t.nc) }),
  ];
  const js = jetstream(t.nc);
  const kv = await new Kvm(t.nc).open(stateBucketOf("asks"));
  /** The item's live state once it has folded the message stored at `seq`. */
  const folded = (id: string, seq: number) =>
    waitFor(
      async () => {
        const s = await readItem(kv, id);
        return s !== null && s.last_seq >= seq && s;
      },
      10_000,
      `${id}'s state at ${seq}`,
    );
  try {
    // One item answered once; one answered again after it ended (the first answer counts):
    // its last event is an awaited one.
    for (const id of ["once", "twice"]) {
      await submitItem(t.nc, p, id, {}, { source: "test", traceId: TRACE });
      await js.publish(`asks.answer.${id}`, JSON.stringify({ yes: true }));
      await waitFor(async () => (await readItem(kv, id))?.status === "done", 10_000, id);
    }
    const again = await js.publish("asks.answer.twice", JSON.stringify({ yes: false }));
    const live = await folded("twice", again.seq);
    const stored = await t.jsm.streams.getMessage("ASKS", { seq: again.seq });
    assert.equal(live.updated_at, stored!.time.toISOString(), "the answer's stored time");
    assert.equal(live.outcome, "ok");

    const { states } = await rebuildStates(js, spec as StateSpec<unknown>);
    const diff = compareStates(
      states,
      new Map([["once", await readItem(kv, "once")], ["twice", live]]),
    );
    assert.deepEqual(diff, { equal: 2, different: [], missingLive: [], missingRebuilt: [] });
  } finally {
    for (const r of runners) await r.stop();
  }
});

Deno.test("deno task rebuild-state with no NATS at NATS_URL says so in one line, not an uncaught stack trace", async () => {
  // A mesh on another WEFT_NATS_PORT, NATS_URL left unset or mistyped: nothing listens there.
  const held = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (held.addr as Deno.NetAddr).port;
  held.close();
  const { code, output } = await rebuildStateTask({ NATS_URL: `nats://127.0.0.1:${port}` });
  assert.equal(code, 2, output);
  assert.match(
    output,
    new RegExp(`^rebuild-state: no NATS server answers at nats://127\\.0\\.0\\.1:${port}`),
  );
  assert.match(output, /NATS_URL/);
  assert.doesNotMatch(output, /\n\s+at /, "no stack trace");
});

Deno.test("deno task rebuild-state refuses a flag or argument it does not take, naming it, before it reads anything", async () => {
  // Nothing listens at NATS_URL: a run that went on would say so instead.
  const held = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (held.addr as Deno.NetAddr).port;
  held.close();
  const env = { NATS_URL: `nats://127.0.0.1:${port}` };
  const cases: [string[], RegExp][] = [
    // A typo of --pipeline was a rebuild of feedback, the default (with --write, its bucket).
    [
      ["--pipline", "orders"],
      /^rebuild-state: unknown flag: --pipline \(did you mean --pipeline\?\)/,
    ],
    [["--write", "--pipline", "orders"], /unknown flag: --pipline \(did you mean --pipeline\?\)/],
    [["--frobnicate"], /^rebuild-state: unknown flag: --frobnicate/],
    [
      ["orders"],
      /^rebuild-state: unexpected argument: orders \(a pipeline is named with --pipeline NAME\)/,
    ],
    [["--pipeline"], /^rebuild-state: --pipeline needs a pipeline's name/],
  ];
  for (const [flags, said] of cases) {
    const { code, output } = await rebuildStateTask(env, undefined, flags);
    assert.equal(code, 2, `${flags.join(" ")}: ${output}`);
    assert.match(output, said, flags.join(" "));
    assert.doesNotMatch(output, /no NATS server answers/, `${flags.join(" ")}: read nothing`);
    assert.equal(output.trim().split("\n").length, 1, `${flags.join(" ")}: one line`);
  }
  // What it takes still runs (and then finds no NATS there).
  for (
    const flags of [["--write"], ["--write", "--pipeline", "feedback"], ["--pipeline=content"]]
  ) {
    const { code, output } = await rebuildStateTask(env, undefined, flags);
    assert.equal(code, 2, output);
    assert.match(output, /no NATS server answers/, flags.join(" "));
  }
});
