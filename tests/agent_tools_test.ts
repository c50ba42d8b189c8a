/**
 * An agent step against a real OpenAI-compatible server (tests/helpers/openai_server.ts) and
 * a real nats-server: what it does with the tool calls a model asks for.
 *
 * @module
 */
import assert from "node:assert/strict";
import { startNatsServer } from "../src/nats_server.ts";
import { Kvm } from "@nats-io/kv";
import {
  createAgent,
  MAX_NOTE_VALUE_BYTES,
  MAX_TOOL_CALLS_PER_TURN,
  openScratchpad,
  scratchpadBucketOf,
} from "../src/pipeline/agent_step.ts";
import type { AgentStep } from "../src/pipeline/definition.ts";
import { connectClient } from "./helpers/nats.ts";
import { chat, startFakeOpenAI } from "./helpers/openai_server.ts";
import { deadline } from "./helpers/wait.ts";
import { createBudget } from "../src/ai/llm/budget.ts";

Deno.test("an agent runs at most MAX_TOOL_CALLS_PER_TURN of one turn's tool calls; each one past them is answered with an error and not run", async () => {
  await using server = await startNatsServer();
  const nc = await connectClient(server.url, "agent-tools-test");
  const asked = 40;
  // A model (or a prompt injected through the item's text) asking for 40 calls at once.
  const llm = startFakeOpenAI([
    {
      kind: "tool_calls",
      calls: Array.from({ length: asked }, (_, i) => ({ name: "count", arguments: { i } })),
    },
    chat({ ok: true }),
  ]);
  const dir = await Deno.makeTempDir({ prefix: "weft-agent-tools-" });
  try {
    await Deno.writeTextFile(`${dir}/agent.md`, "Count. Reply with JSON matching {{schema}}.");
    let ran = 0;
    const step: AgentStep = {
      kind: "agent",
      prompt: "agent.md",
      maxTurns: 3,
      output: { type: "object", required: ["ok"], properties: { ok: { type: "boolean" } } },
      tools: {
        count: {
          description: "counts its calls",
          parameters: { type: "object" },
          run: () => ++ran,
        },
      },
    };
    const agent = createAgent(
      { file: `${dir}/def.ts`, def: { name: "counting" } },
      "counter",
      step,
      { nc, llm: { baseUrl: llm.baseUrl, apiKey: "test-key", model: "fake-model" } },
    );
    const out = await agent("go", {
      source: "test",
      message: { subject: "counting.submitted.i1", seq: 1, storedAt: 0, deliveryCount: 1 },
      now: () => new Date(0),
      signal: new AbortController().signal,
      item: "i1",
      input: {},
      results: {},
      runs: {},
      scratchpad: [],
      eventId: "e1",
    });

    assert.equal(ran, MAX_TOOL_CALLS_PER_TURN, "only the first calls ran");
    assert.deepEqual(out.result, { ok: true });
    const notes = out.notes.filter((n) => n.kind === "tool_call");
    assert.equal(notes.length, MAX_TOOL_CALLS_PER_TURN, "the scratchpad holds the calls that ran");
    // Every call the model made is answered (the API wants one tool message per call id).
    const answers = llm.requests[1]!.body.messages.filter((m) => m.role === "tool");
    assert.equal(answers.length, asked);
    const refused = answers.filter((m) =>
      /^too many tool calls in one turn/.test(JSON.parse(m.content).error ?? "")
    );
    assert.equal(refused.length, asked - MAX_TOOL_CALLS_PER_TURN);
    assert.deepEqual(
      refused.map((m) => m.tool_call_id),
      answers.slice(MAX_TOOL_CALLS_PER_TURN).map((m) => m.tool_call_id),
      "the calls past the bound are the ones refused",
    );
  } finally {
    await nc.close();
    await llm.close();
    await Deno.remove(dir, { recursive: true });
  }
});

/** A context for one agent run of item `i1`, aborted by `signal`. */
function runCtx(signal: AbortSignal) {
  return {
    source: "test",
    message: { subject: "counting.submitted.i1", seq: 1, storedAt: 0, deliveryCount: 1 },
    now: () => new Date(0),
    signal,
    item: "i1",
    input: {},
    results: {},
    runs: {},
    scratchpad: [],
    eventId: "e1",
  };
}

/** An agent step with one tool (`count`) and an `{ ok: boolean }` answer. */
const okStep: AgentStep = {
  kind: "agent",
  prompt: "agent.md",
  maxTurns: 3,
  output: { type: "object", required: ["ok"], properties: { ok: { type: "boolean" } } },
  tools: { count: { description: "counts", parameters: { type: "object" }, run: () => 1 } },
};

for (
  const [what, reply, code] of [
    ["a model that never answers", { kind: "hang" }, "timeout"],
    [
      "a Retry-After longer than the timeout",
      { kind: "error", status: 429, message: "slow down", headers: { "retry-after": "60" } },
      "rate_limited",
    ],
  ] as const
) {
  Deno.test(`an agent's model call has the LLM timeout (WEFT_LLM_TIMEOUT_MS): ${what} fails the attempt with ${code}`, async () => {
    await using server = await startNatsServer();
    const nc = await connectClient(server.url, "agent-timeout-test");
    const llm = startFakeOpenAI(() => reply);
    const dir = await Deno.makeTempDir({ prefix: "weft-agent-timeout-" });
    const abort = new AbortController();
    try {
      await Deno.writeTextFile(`${dir}/agent.md`, "Answer with JSON matching {{schema}}.");
      const agent = createAgent({ file: `${dir}/def.ts`, def: { name: "timing" } }, "a", okStep, {
        nc,
        llm: { baseUrl: llm.baseUrl, apiKey: "test-key", model: "fake-model", timeoutMs: 300 },
      });
      const started = Date.now();
      // The step's own signal (the handler timeout, minutes) is not what ends the call.
      const err = await deadline(
        agent("go", runCtx(abort.signal)).then(() => undefined, (e: unknown) => e),
        5_000,
        "the agent's model call to end at its timeout",
      ) as { code?: string };
      assert.equal(err?.code, code);
      assert.ok(Date.now() - started < 5_000);
      assert.equal(abort.signal.aborted, false);
    } finally {
      abort.abort();
      await nc.close();
      await llm.close();
      await Deno.remove(dir, { recursive: true });
    }
  });
}

Deno.test("an agent's note records at most MAX_NOTE_VALUE_BYTES of a call's arguments and of its result, marking the cut, so a turn's calls fit in the scratchpad", async () => {
  await using server = await startNatsServer();
  const nc = await connectClient(server.url, "agent-notes-test");
  // 16 calls to a tool that does not exist, each with a 100 KB argument (1.6 MB in all), and
  // one to a real tool whose result is 100 KB.
  const big = "x".repeat(100_000);
  const llm = startFakeOpenAI([
    {
      kind: "tool_calls",
      calls: [
        ...Array.from(
          { length: MAX_TOOL_CALLS_PER_TURN - 1 },
          () => ({ name: "nope", arguments: { big } }),
        ),
        { name: "echo", arguments: { n: 100_000 } },
      ],
    },
    chat({ ok: true }),
  ]);
  const dir = await Deno.makeTempDir({ prefix: "weft-agent-notes-" });
  try {
    await Deno.writeTextFile(`${dir}/agent.md`, "Answer with JSON matching {{schema}}.");
    await new Kvm(nc).create(scratchpadBucketOf("noting"));
    const step: AgentStep = {
      ...okStep,
      tools: {
        echo: {
          description: "n characters",
          parameters: { type: "object" },
          run: (a: { n: number }) => ({ text: "y".repeat(a.n) }),
        },
      },
    };
    const agent = createAgent({ file: `${dir}/def.ts`, def: { name: "noting" } }, "a", step, {
      nc,
      llm: { baseUrl: llm.baseUrl, apiKey: "test-key", model: "fake-model" },
    });
    const abort = new AbortController();
    const out = await agent("go", runCtx(abort.signal));
    assert.deepEqual(out.result, { ok: true });
    const calls = out.notes.filter((n) => n.kind === "tool_call");
    assert.equal(calls.length, MAX_TOOL_CALLS_PER_TURN);
    for (const n of calls.slice(0, -1)) {
      const args = n.args as { cut: boolean; bytes: number; head: string };
      assert.equal(args.cut, true);
      assert.equal(args.bytes, JSON.stringify({ big }).length);
      assert.equal(args.head, JSON.stringify({ big }).slice(0, MAX_NOTE_VALUE_BYTES));
      assert.match((n.result as { error: string }).error, /^no tool nope/, "short: kept whole");
    }
    const echo = calls.at(-1)!;
    assert.deepEqual(echo.args, { n: 100_000 }, "short arguments are kept whole");
    assert.equal((echo.result as { cut: boolean }).cut, true);
    // The model itself got the whole result.
    const answered = llm.requests[1]!.body.messages.filter((m) => m.role === "tool").at(-1)!;
    assert.equal(JSON.parse(answered.content).text.length, 100_000);
    // The notes fit in the scratchpad.
    await openScratchpad(nc, "noting").append("i1", out.notes);
    assert.equal((await openScratchpad(nc, "noting").read("i1")).length, out.notes.length);
  } finally {
    await nc.close();
    await llm.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a scratchpad write the server refuses as too large fails for good, saying so; it is not a compare-and-set conflict to retry", async () => {
  await using server = await startNatsServer();
  const nc = await connectClient(server.url, "scratchpad-size-test");
  try {
    await new Kvm(nc).create(scratchpadBucketOf("sizing"));
    const pad = openScratchpad(nc, "sizing");
    const entry = (i: number, text: string) => ({
      id: `e1:a:${i}`,
      step: "a",
      at: new Date(0).toISOString(),
      kind: "note" as const,
      text,
    });
    await pad.append("i1", [entry(0, "small")]);
    // Past the server's max_payload (1 MB).
    const err = await pad.append("i1", [entry(1, "z".repeat(2_000_000))]).then(
      () => undefined,
      (e: unknown) => e,
    ) as { code?: string; permanent?: boolean; message?: string };
    assert.equal(err?.code, "payload_too_large", err?.message);
    assert.equal(err.permanent, true);
    assert.match(err.message!, /scratchpad of i1 .*too large/);
    assert.deepEqual((await pad.read("i1")).map((e) => e.id), ["e1:a:0"], "nothing was written");
  } finally {
    await nc.close();
  }
});

Deno.test("a scratchpad key holding what no agent wrote fails the step for good, naming the key, rather than a parse error retried to exhaustion or a forged shape handed on", async () => {
  await using server = await startNatsServer();
  const nc = await connectClient(server.url, "scratchpad-shape-test");
  try {
    const kv = await new Kvm(nc).create(scratchpadBucketOf("shaping"));
    const pad = openScratchpad(nc, "shaping");
    for (
      const [item, stored, why] of [
        ["i1", "not json at all", /not JSON/],
        ["i2", '{"kind":"answer"}', /not a JSON array/],
        [
          "i3",
          '[{"kind":"answer","step":"billing","result":{"action":"handback"}}]',
          /entry 0 needs/,
        ],
      ] as const
    ) {
      await kv.put(item, stored);
      const err = await pad.read(item).then(() => undefined, (e: unknown) => e) as {
        code?: string;
        permanent?: boolean;
        message?: string;
      };
      assert.equal(err?.code, "invalid_scratchpad", `${item}: ${err?.message}`);
      assert.equal(err.permanent, true);
      assert.match(err.message!, why);
      assert.match(err.message!, new RegExp(`key ${item} of ${scratchpadBucketOf("shaping")}`));
    }
  } finally {
    await nc.close();
  }
});

Deno.test("an agent's answer is recorded in its note cut like a tool call's value; the step's result keeps it whole", async () => {
  await using server = await startNatsServer();
  const nc = await connectClient(server.url, "agent-answer-note-test");
  const dir = await Deno.makeTempDir({ prefix: "weft-agent-answer-note-" });
  try {
    await Deno.writeTextFile(`${dir}/agent.md`, "Answer.");
    const reason = "r".repeat(300_000); // e.g. an input field echoed back
    const step: AgentStep = {
      ...okStep,
      output: { type: "object" },
      offline: () => ({ final: { ok: true, reason } }),
    };
    const agent = createAgent({ file: `${dir}/def.ts`, def: { name: "answering" } }, "a", step, {
      nc,
    });
    const out = await agent("go", runCtx(new AbortController().signal));
    assert.equal((out.result as { reason: string }).reason.length, reason.length);
    const answer = out.notes.find((n) => n.kind === "answer")!;
    const noted = answer.result as { cut: boolean; bytes: number; head: string };
    assert.equal(noted.cut, true);
    assert.equal(noted.bytes, JSON.stringify({ ok: true, reason }).length);
    assert.equal(noted.head.length, MAX_NOTE_VALUE_BYTES);
  } finally {
    await nc.close();
    await Deno.remove(dir, { recursive: true });
  }
});

/** Runs `okStep` once against `script`; the answer or the error, and the requests. */
async function runOnce(script: Parameters<typeof startFakeOpenAI>[0]) {
  await using server = await startNatsServer();
  const nc = await connectClient(server.url, "agent-answer-test");
  const llm = startFakeOpenAI(script);
  const dir = await Deno.makeTempDir({ prefix: "weft-agent-answer-" });
  try {
    await Deno.writeTextFile(`${dir}/agent.md`, "Answer with JSON matching {{schema}}.");
    const agent = createAgent({ file: `${dir}/def.ts`, def: { name: "answering" } }, "a", okStep, {
      nc,
      llm: { baseUrl: llm.baseUrl, apiKey: "test-key", model: "fake-model" },
    });
    const out = await agent("go", runCtx(new AbortController().signal)).then(
      (o) => ({ result: o.result, notes: o.notes, error: undefined }),
      (e: { code?: string; permanent?: boolean; message: string }) => ({
        result: undefined,
        notes: [],
        error: e,
      }),
    );
    return { ...out, requests: llm.requests };
  } finally {
    await nc.close();
    await llm.close();
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("an agent's answer in a code fence is unwrapped, as an llm step's is", async () => {
  const out = await runOnce([chat('```json\n{"ok": true}\n```')]);
  assert.equal(out.error, undefined, out.error?.message);
  assert.deepEqual(out.result, { ok: true });
  assert.equal(out.requests.length, 1);
});

Deno.test("an agent's wrong-shape answer gets one repair request quoting the error; the repaired answer stands", async () => {
  const out = await runOnce([chat({ ok: "yes" }), chat({ ok: true })]);
  assert.equal(out.error, undefined, out.error?.message);
  assert.deepEqual(out.result, { ok: true });
  assert.equal(out.requests.length, 2);
  const [bad, repair] = out.requests[1]!.body.messages.slice(-2);
  assert.deepEqual([bad!.role, JSON.parse(bad!.content)], ["assistant", { ok: "yes" }]);
  assert.equal(repair!.role, "user");
  assert.match(repair!.content, /invalid: .*\/ok must be boolean/);
  assert.deepEqual(out.notes.map((n) => [n.kind, n.result]), [["answer", { ok: true }]]);
});

Deno.test("an agent's answer that is no JSON gets one repair request too", async () => {
  const out = await runOnce([chat("Sure! The answer is ok."), chat({ ok: false })]);
  assert.equal(out.error, undefined, out.error?.message);
  assert.deepEqual(out.result, { ok: false });
  assert.match(out.requests[1]!.body.messages.at(-1)!.content, /invalid: not valid JSON/);
});

Deno.test("an agent's answer still wrong after its one repair fails as before: permanently for a wrong shape, no third request", async () => {
  const out = await runOnce([chat({ ok: "yes" }), chat({ ok: "still" }), chat({ ok: true })]);
  assert.equal(out.error?.code, "invalid_field");
  assert.equal(out.error?.permanent, true);
  assert.match(out.error!.message, /does not match its output schema: \/ok must be boolean/);
  assert.equal(out.requests.length, 2);
  const none = await runOnce([chat("no"), chat("still no"), chat({ ok: true })]);
  assert.equal(none.error?.code, "handler_failed");
  assert.match(none.error!.message, /answered with no JSON object/);
  assert.equal(none.requests.length, 2);
});

Deno.test("an agent keeps to its step's budget at the configured prices: past it no request is sent and the attempt fails with over_budget", async () => {
  // Found by a probe: agents recorded no usage or cost and spent without limit, while the
  // analyzers (and since, llm steps) stop at WEFT_LLM_BUDGET_USD.
  await using server = await startNatsServer();
  const nc = await connectClient(server.url, "agent-budget-test");
  const llm = startFakeOpenAI(() => chat({ ok: true }));
  const dir = await Deno.makeTempDir({ prefix: "weft-agent-budget-" });
  try {
    await Deno.writeTextFile(`${dir}/agent.md`, "Answer with JSON matching {{schema}}.");
    // 100 + 20 tokens a call at 1 USD per 1k: 0.12 USD a call, against a 0.2 USD budget.
    const agent = createAgent({ file: `${dir}/def.ts`, def: { name: "spending" } }, "a", okStep, {
      nc,
      llm: {
        baseUrl: llm.baseUrl,
        apiKey: "test-key",
        model: "fake-model",
        pricing: { inputPer1k: 1, outputPer1k: 1 },
        budget: createBudget({ maxCostUsd: 0.2 }),
      },
    });
    const ctx = runCtx(new AbortController().signal);
    assert.deepEqual((await agent("one", ctx)).result, { ok: true });
    assert.deepEqual((await agent("two", ctx)).result, { ok: true });
    await assert.rejects(agent("three", ctx), (e: { code?: string }) => e.code === "over_budget");
    assert.equal(llm.requests.length, 2, "the third call was never sent");
  } finally {
    await nc.close();
    await llm.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("an agent's KV tool reads an entry holding a number it cannot keep as an error to the agent, never as the number rounded or null", async () => {
  await using server = await startNatsServer();
  const nc = await connectClient(server.url, "agent-kv-numbers-test");
  const kv = await new Kvm(nc).create("weft_orders_accounts");
  await kv.put("A100", '{"customer":"ann","total":1e400}');
  await kv.put("A200", '{"customer":"ann","ref":12345678901234567890123}');
  await kv.put("A300", '{"customer":"ann","total":12.5}');
  const llm = startFakeOpenAI([
    {
      kind: "tool_calls",
      calls: ["A100", "A200", "A300"].map((key) => ({ name: "lookup", arguments: { key } })),
    },
    chat({ ok: true }),
  ]);
  const dir = await Deno.makeTempDir({ prefix: "weft-agent-kv-" });
  try {
    await Deno.writeTextFile(`${dir}/agent.md`, "Look up. Reply with JSON matching {{schema}}.");
    const step: AgentStep = {
      kind: "agent",
      prompt: "agent.md",
      maxTurns: 3,
      reads: ["weft_orders_accounts"],
      output: { type: "object", required: ["ok"], properties: { ok: { type: "boolean" } } },
      tools: {
        lookup: {
          description: "an account",
          parameters: { type: "object", required: ["key"] },
          run: (args, ctx) => ctx.kv("weft_orders_accounts", (args as { key: string }).key),
        },
      },
    };
    const agent = createAgent(
      { file: `${dir}/def.ts`, def: { name: "orders" } },
      "lookup",
      step,
      { nc, llm: { baseUrl: llm.baseUrl, apiKey: "test-key", model: "fake-model" } },
    );
    await agent("go", {
      source: "test",
      message: { subject: "orders.submitted.i1", seq: 1, storedAt: 0, deliveryCount: 1 },
      now: () => new Date(0),
      signal: new AbortController().signal,
      item: "i1",
      input: {},
      results: {},
      runs: {},
      scratchpad: [],
      eventId: "e1",
    });
    const answers = llm.requests[1]!.body.messages.filter((m) => m.role === "tool")
      .map((m) => JSON.parse(m.content));
    assert.match(
      answers[0].error,
      /weft_orders_accounts A100: \/total: the number 1e400 cannot be kept/,
    );
    assert.match(
      answers[1].error,
      /A200: \/ref: the number 12345678901234567890123 cannot be kept/,
    );
    assert.deepEqual(answers[2], { customer: "ann", total: 12.5 });
  } finally {
    await llm.close();
    await Deno.remove(dir, { recursive: true });
    await nc.close();
  }
});

Deno.test("an agent whose prompt could not be read reads it again on the next item, as an llm step does", async () => {
  await using server = await startNatsServer();
  const nc = await connectClient(server.url, "agent-prompt-test");
  const llm = startFakeOpenAI(() => chat({ ok: true }));
  const dir = await Deno.makeTempDir({ prefix: "weft-agent-prompt-" });
  try {
    const step: AgentStep = {
      kind: "agent",
      prompt: "agent.md",
      maxTurns: 2,
      output: { type: "object", required: ["ok"], properties: { ok: { type: "boolean" } } },
      tools: {},
    };
    const agent = createAgent({ file: `${dir}/def.ts`, def: { name: "prompted" } }, "a", step, {
      nc,
      llm: { baseUrl: llm.baseUrl, apiKey: "test-key", model: "fake-model" },
    });
    const run = (item: string) =>
      agent("go", {
        source: "test",
        message: { subject: `prompted.submitted.${item}`, seq: 1, storedAt: 0, deliveryCount: 1 },
        now: () => new Date(0),
        signal: new AbortController().signal,
        item,
        input: {},
        results: {},
        runs: {},
        scratchpad: [],
        eventId: `e-${item}`,
      });
    await assert.rejects(run("i1"), Deno.errors.NotFound);
    await Deno.writeTextFile(`${dir}/agent.md`, "Answer. Reply with JSON matching {{schema}}.");
    assert.deepEqual((await run("i2")).result, { ok: true });
    assert.match(llm.requests[0]!.body.messages[0]!.content, /^Answer\./);
  } finally {
    await nc.close();
    await llm.close();
    await Deno.remove(dir, { recursive: true });
  }
});
