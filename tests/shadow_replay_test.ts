/**
 * `deno task shadow --pipeline NAME --step STEP --definition FILE`: a definition step's
 * stored history replayed through the same step of another version of the definition, on a
 * real nats-server. The history is made with the runtime's own pure flow functions, so the
 * answer is known: the report's agreement, disagreements and unmatched count are checked,
 * and the replay publishes nothing and leaves no consumer behind.
 */
import assert from "node:assert/strict";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import {
  advance,
  compileFlow,
  completion,
  entryData,
  flowEvent,
  type ScratchEntry,
  type TaskStep,
} from "../mod.ts";
import { liveShadowReport, liveShadowReportHtml, replayShadow } from "../src/shadow/live.ts";
import { loadPipelines, pipelineTopology } from "../src/pipeline/runtime.ts";
import { parseShadowSpec } from "../src/shadow/spec.ts";
import { SHADOW_STREAM } from "../src/subjects.ts";
import { ensureTopology } from "../src/topology.ts";
import { startTestNats } from "./helpers/nats.ts";
import { meshTempDir, taskArgs } from "./helpers/mesh.ts";

const MOD = new URL("../mod.ts", import.meta.url).href;

/** A one-step definition whose `grade` step calls a text positive when it has one of `words`. */
function definition(words: string[]): string {
  return `import { definePipeline } from "${MOD}";
export const grading = definePipeline({
  name: "grading",
  input: { schema: { type: "object", required: ["text"], properties: { text: { type: "string" } } } },
  start: "grade",
  steps: {
    grade: {
      kind: "task",
      output: { type: "object", required: ["label"], properties: { label: { enum: ["pos", "neg"] } } },
      handle: (v: { text: string }) =>
        ({ label: ${
    JSON.stringify(words)
  }.some((w) => v.text.includes(w)) ? "pos" : "neg" }) as const,
      next: "done",
    },
    done: { kind: "end", outcome: "done" },
  },
});
`;
}

Deno.test("a definition step's history replays through another version of the step: known agreement, nothing published", async () => {
  // Under data/, which `deno task shadow` may read (as pipelines/).
  const dir = await meshTempDir("weft-replay-");
  await using t = await startTestNats();
  try {
    await Deno.writeTextFile(`${dir}/pipeline.ts`, definition(["good"]));
    await Deno.writeTextFile(`${dir}/v2.ts`, definition(["good", "fine"]));
    const pipelines = await loadPipelines([`${dir}/pipeline.ts`]);
    await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology(pipelines, t.config.retentionMs));
    const prod = pipelines[0]!.def;
    const flow = compileFlow(prod);
    const js = jetstream(t.nc);
    const ctx = { source: "production", now: new Date() };
    const publish = async (e: { type: string; item_id: string }) => {
      await js.publish(`${e.type}.${e.item_id}`, JSON.stringify(e));
    };
    // Production's history: six items graded by v1, and one whose grade never came.
    const texts = ["good day", "bad day", "fine day", "fine weather", "terrible", "good stuff"];
    for (const [i, text] of texts.entries()) {
      const cause = { id: `e${i}`, item_id: `item${i}`, trace_id: "0".repeat(32) };
      const entry = flowEvent(flow, "submitted", cause, entryData({ text }), ctx);
      await publish(entry);
      // What v1 decided: its handler, as the runtime called it.
      const grade = prod.steps.grade as TaskStep;
      const result = await grade.handle!({ text }, {} as never);
      for (
        const e of completion(
          flow,
          "grade",
          entry,
          advance(entry.data, "grade", result, result),
          ctx,
        )
      ) {
        await publish(e);
      }
    }
    await publish(
      flowEvent(
        flow,
        "submitted",
        { id: "e9", item_id: "item9", trace_id: "0".repeat(32) },
        entryData({ text: "fine" }),
        ctx,
      ),
    );
    const stored = (await t.jsm.streams.info("GRADING")).state.messages;

    const spec = parseShadowSpec({
      id: "replay",
      pipeline: "grading",
      step: "grade",
      candidate: { definition: `${dir}/v2.ts` },
    });
    const replay = await replayShadow({
      nc: t.nc,
      spec,
      config: t.config,
      log: t.log,
      pipelines,
      root: "",
    });
    assert.equal(replay.failed, 0);
    const r = liveShadowReport("replay", replay.decisions);
    assert.equal(r.items, 7, "every input the step consumed");
    assert.equal(r.unmatched, 1, "item9 has no production grade");
    assert.equal(r.fields.label!.agreement, 4 / 6);
    assert.deepEqual(r.fields.label!.confusion, { neg: { neg: 2, pos: 2 }, pos: { pos: 2 } });
    assert.deepEqual(
      r.disagreements.filter((d) => d.field === "label").map((
        d,
      ) => [d.item, d.production, d.candidate]).sort(),
      [["item2", "neg", "pos"], ["item3", "neg", "pos"]],
    );
    assert.match(liveShadowReportHtml(r, "replay"), /<td>label<\/td><td>66\.7%<\/td>/);

    // The same from the command line, with the report written as JSON and HTML, and labels:
    // item2 and item3 are positive (v1 said negative), item1 and item4 negative; item9 has no
    // production grade to compare, so it does not count.
    await Deno.writeTextFile(
      `${dir}/labels.jsonl`,
      ["item1:neg", "item2:pos", "item3:pos", "item4:neg", "item9:pos"]
        .map((r) => JSON.stringify({ item_id: r.split(":")[0], label: r.split(":")[1] }))
        .join("\n") + "\n",
    );
    const cli = await new Deno.Command("deno", {
      args: [
        ...await taskArgs("shadow"),
        "--pipeline",
        "grading",
        "--step",
        "grade",
        "--definition",
        `${dir}/v2.ts`,
        "--labels",
        `${dir}/labels.jsonl`,
        "--out",
        `${dir}/report`,
      ],
      cwd: new URL("../", import.meta.url),
      env: {
        NATS_URL: t.server.url,
        WEFT_PIPELINES: `${dir}/pipeline.ts`,
        WEFT_LOG_LEVEL: "error",
      },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const out = new TextDecoder().decode(cli.stdout);
    assert.equal(cli.code, 0, new TextDecoder().decode(cli.stderr));
    assert.match(
      out,
      /^== replay: definition:.* on grading\.grade, 7 items \(1 without production's output\)/m,
    );
    assert.match(out, /label +agreement 66\.7%/);
    assert.match(
      out,
      /label +against the labels \(4 items\): production 50\.0%, candidate 100\.0%/,
    );
    assert.match(out, /candidate: \d+ items\/s, [\d.]+ ms per item, 0 failed/);
    const json = JSON.parse(await Deno.readTextFile(`${dir}/report.json`));
    assert.equal(json.items, 7);
    assert.deepEqual(json.labelled, {
      label: { items: 4, production_accuracy: 0.5, candidate_accuracy: 1 },
    });
    const html = await Deno.readTextFile(`${dir}/report.html`);
    assert.match(html, /grading\.grade/);
    assert.match(html, /<td>label<\/td><td>4<\/td><td>50\.0%<\/td><td>100\.0%<\/td>/);

    // Read-only: the pipeline's stream is as it was, nothing on shadow.>, no consumer left.
    assert.equal((await t.jsm.streams.info("GRADING")).state.messages, stored);
    assert.equal((await t.jsm.streams.info(SHADOW_STREAM)).state.messages, 0);
    const consumers = [];
    for await (const c of t.jsm.consumers.list("GRADING")) consumers.push(c.name);
    assert.deepEqual(consumers, []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/**
 * A one-agent definition: `answer` looks order o1 up with its tool and answers with the
 * order's status (prefixed by `version`) and the ids of the scratchpad entries it saw.
 */
function agentDefinition(version: string): string {
  return `import { definePipeline } from "${MOD}";
export const helpdesk = definePipeline({
  name: "helpdesk",
  input: { schema: { type: "object", required: ["text"], properties: { text: { type: "string" } } } },
  start: "answer",
  buckets: ["weft_helpdesk_orders"],
  steps: {
    answer: {
      kind: "agent",
      prompt: "answer.md",
      reads: ["weft_helpdesk_orders"],
      maxTurns: 3,
      tools: {
        lookup: {
          description: "an order by id",
          parameters: { type: "object", required: ["id"], properties: { id: { type: "string" } } },
          run: (a: { id: string }, ctx) => ctx.kv("weft_helpdesk_orders", a.id),
        },
      },
      output: {
        type: "object",
        required: ["reply", "seen"],
        properties: { reply: { type: "string" }, seen: { type: "string" } },
      },
      offline: (turn) =>
        turn.calls.length === 0 ? { call: "lookup", args: { id: "o1" } } : {
          final: {
            reply: "${version}:" + (turn.calls[0]!.result as { status: string }).status,
            seen: turn.scratchpad.map((e) => e.id).join(","),
          },
        },
      next: "done",
    },
    done: { kind: "end", outcome: "done" },
  },
});
`;
}

Deno.test("an agent step replays too: its tools read the buckets, it sees the scratchpad as it was, and appends nothing", async () => {
  const dir = await meshTempDir("weft-replay-agent-");
  await using t = await startTestNats();
  try {
    await Deno.writeTextFile(`${dir}/pipeline.ts`, agentDefinition("v1"));
    await Deno.writeTextFile(`${dir}/v2.ts`, agentDefinition("v2"));
    await Deno.writeTextFile(`${dir}/answer.md`, "Answer the customer.\n");
    const pipelines = await loadPipelines([`${dir}/pipeline.ts`]);
    await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology(pipelines, t.config.retentionMs));
    const flow = compileFlow(pipelines[0]!.def);
    const js = jetstream(t.nc);
    const kvm = new Kvm(t.nc);
    await (await kvm.open("weft_helpdesk_orders")).put("o1", JSON.stringify({ status: "shipped" }));

    // Production's history of one item: its entry, production's answer, and its scratchpad,
    // which holds an entry from before the step, production's own notes and a later step's.
    const t0 = new Date("2026-12-01T10:00:00.000Z");
    const entry = flowEvent(
      flow,
      "submitted",
      { id: "c1", item_id: "i1", trace_id: "0".repeat(32) },
      entryData({ text: "where is my order?" }),
      { source: "production", now: t0 },
    );
    const at = (ms: number) => new Date(t0.getTime() + ms).toISOString();
    const scratchpad: ScratchEntry[] = [
      { id: "before:intake:0", step: "intake", at: at(-1000), kind: "note", text: "earlier" },
      { id: `${entry.id}:answer:0`, step: "answer", at: at(500), kind: "answer", text: "v1" },
      { id: "after:reply:0", step: "reply", at: at(2000), kind: "note", text: "later" },
    ];
    const pad = await kvm.open("weft_helpdesk_scratchpad");
    const revision = await pad.put("i1", JSON.stringify(scratchpad));
    const result = { reply: "v1:shipped", seen: "before:intake:0" };
    await js.publish(`${entry.type}.i1`, JSON.stringify(entry));
    for (
      const e of completion(flow, "answer", entry, advance(entry.data, "answer", result, result), {
        source: "production",
        now: new Date(t0.getTime() + 600),
      })
    ) {
      await js.publish(`${e.type}.i1`, JSON.stringify(e));
    }

    const replay = await replayShadow({
      nc: t.nc,
      spec: parseShadowSpec({
        id: "replay",
        pipeline: "helpdesk",
        step: "answer",
        candidate: { definition: `${dir}/v2.ts` },
      }),
      config: t.config,
      log: t.log,
      pipelines,
      root: "",
    });
    assert.equal(replay.failed, 0);
    const r = liveShadowReport("replay", replay.decisions);
    assert.equal(r.items, 1);
    // Its tool read the order; it saw only the entry written before its input.
    assert.deepEqual(replay.decisions[0]!.decision.reply, "v2:shipped");
    assert.equal(r.fields.reply!.agreement, 0);
    assert.equal(r.fields.seen!.agreement, 1);
    // Its notes are on its decision's event, not in the item's scratchpad.
    const notes = (replay.decisions[0]!.event.data as { notes?: ScratchEntry[] }).notes ?? [];
    assert.ok(notes.some((n) => n.kind === "tool_call" && n.tool === "lookup"));
    assert.equal((await pad.get("i1"))!.revision, revision);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a step that runs more than once per item is compared run by run, not every run with production's last", async () => {
  // Found on a fresh clone: replaying an identical copy of the support pipeline's router
  // agreed on 60% of its runs: each run after an agent's hand-back was compared with the
  // item's last routing.
  const dir = await meshTempDir("weft-replay-loop-");
  await using t = await startTestNats();
  try {
    const source = `import { definePipeline } from "${MOD}";
export const rounds = definePipeline({
  name: "rounds",
  input: { schema: { type: "object" } },
  start: "grade",
  steps: {
    grade: {
      kind: "task",
      output: { type: "object", required: ["round"], properties: { round: { type: "number" } } },
      handle: (_v: unknown, ctx) => ({ round: (ctx.runs.grade ?? 0) + 1 }),
      next: "check",
    },
    check: {
      kind: "router",
      route: (_v: unknown, ctx) => ((ctx.runs.grade ?? 0) < 2 ? "again" : "done"),
      routes: { again: "grade", done: "done" },
    },
    done: { kind: "end", outcome: "done" },
  },
  loops: [{ from: "check", to: "grade", maxIterations: 2 }],
});
`;
    await Deno.writeTextFile(`${dir}/pipeline.ts`, source);
    await Deno.writeTextFile(`${dir}/same.ts`, source);
    const pipelines = await loadPipelines([`${dir}/pipeline.ts`]);
    await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology(pipelines, t.config.retentionMs));
    const flow = compileFlow(pipelines[0]!.def);
    const js = jetstream(t.nc);
    const ctx = { source: "production", now: new Date() };
    const publish = async (events: { type: string; item_id: string }[]) => {
      for (const e of events) await js.publish(`${e.type}.${e.item_id}`, JSON.stringify(e));
    };
    // Production's history of three items, each graded twice (round 1, then round 2).
    for (const i of [1, 2, 3]) {
      const cause = { id: `e${i}`, item_id: `item${i}`, trace_id: "0".repeat(32) };
      const entry = flowEvent(flow, "submitted", cause, entryData({}), ctx);
      const g1 = completion(
        flow,
        "grade",
        entry,
        advance(entry.data, "grade", { round: 1 }, { round: 1 }),
        ctx,
      );
      const c1 = completion(
        flow,
        "check",
        g1[0]!,
        advance(g1[0]!.data, "check", { label: "again" }, g1[0]!.data.value),
        ctx,
      );
      const g2 = completion(
        flow,
        "grade",
        c1[0]!,
        advance(c1[0]!.data, "grade", { round: 2 }, { round: 2 }),
        ctx,
      );
      const c2 = completion(
        flow,
        "check",
        g2[0]!,
        advance(g2[0]!.data, "check", { label: "done" }, g2[0]!.data.value),
        ctx,
      );
      await publish([entry, ...g1, ...c1, ...g2, ...c2]);
    }
    const replay = await replayShadow({
      nc: t.nc,
      spec: parseShadowSpec({
        id: "same",
        pipeline: "rounds",
        step: "grade",
        candidate: { definition: `${dir}/same.ts` },
      }),
      config: t.config,
      log: t.log,
      pipelines,
      root: "",
    });
    const r = liveShadowReport("same", replay.decisions);
    assert.equal(r.items, 6, "two runs of three items");
    assert.equal(r.unmatched, 0);
    assert.equal(r.fields.round!.agreement, 1, JSON.stringify(r.disagreements));
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});
