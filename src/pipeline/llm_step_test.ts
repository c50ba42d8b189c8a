import assert from "node:assert/strict";
import { createLlmStep } from "./llm_step.ts";
import { entryData } from "./flow.ts";
import { chat, startFakeOpenAI } from "../../tests/helpers/openai_server.ts";
import { MAX_CACHED_ANSWER_CHARS } from "../ai/llm/cache.ts";
import { LlmInvalidOutputError } from "../ai/llm/errors.ts";
import { ValidationError } from "../errors.ts";

Deno.test("an llm step whose prompt could not be read reads it again on the next item", async () => {
  const llm = startFakeOpenAI(() => chat({ urgent: true }));
  const dir = await Deno.makeTempDir();
  try {
    const step = createLlmStep(
      { file: `${dir}/tickets.ts`, def: { hash: "0123456789abcdef" } },
      "triage",
      {
        kind: "llm",
        prompt: "prompts/triage.md",
        output: { type: "object", properties: { urgent: { type: "boolean" } } },
      },
      { baseUrl: llm.baseUrl, apiKey: "k", model: "m" },
    );
    const signal = new AbortController().signal;
    await assert.rejects(
      step({ text: "x" }, entryData({ text: "x" }), signal),
      Deno.errors.NotFound,
    );
    await Deno.mkdir(`${dir}/prompts`);
    await Deno.writeTextFile(`${dir}/prompts/triage.md`, "Triage. Reply matching {{schema}}.");
    assert.deepEqual(await step({ text: "x" }, entryData({ text: "x" }), signal), { urgent: true });
    assert.equal(llm.requests.length, 1);
  } finally {
    await llm.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("an llm step does not cache an answer larger than MAX_CACHED_ANSWER_CHARS", async () => {
  const big = "x".repeat(MAX_CACHED_ANSWER_CHARS);
  const llm = startFakeOpenAI((req) =>
    chat(req.body.messages.at(-1)?.content === '{"n":1}' ? { summary: big } : { summary: "s" })
  );
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${dir}/summary.md`, "Summarise. Reply matching {{schema}}.");
    const step = createLlmStep(
      { file: `${dir}/summaries.ts`, def: { hash: "0123456789abcdef" } },
      "summary",
      {
        kind: "llm",
        prompt: "summary.md",
        output: { type: "object", properties: { summary: { type: "string" } } },
      },
      { baseUrl: llm.baseUrl, apiKey: "k", model: "m" },
    );
    const signal = new AbortController().signal;
    const run = (n: number) => step({ n }, entryData({ n }), signal);
    assert.deepEqual(await run(1), { summary: big }, "the large answer is the step's result");
    await run(1);
    assert.equal(llm.requests.length, 2, "the large answer was not cached");
    await run(2);
    await run(2);
    assert.equal(llm.requests.length, 3, "a small answer is cached");
  } finally {
    await llm.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("an llm step's answer of the wrong shape after its repair fails for good; one that is no JSON is retried", async () => {
  const llm = startFakeOpenAI((req) =>
    req.body.messages[1]?.content === '{"shape":true}' ? chat({ urgent: "very" }) : chat("not json")
  );
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${dir}/triage.md`, "Triage. Reply matching {{schema}}.");
    const step = createLlmStep(
      { file: `${dir}/tickets.ts`, def: { hash: "0123456789abcdef" } },
      "triage",
      {
        kind: "llm",
        prompt: "triage.md",
        output: { type: "object", properties: { urgent: { type: "boolean" } } },
      },
      { baseUrl: llm.baseUrl, apiKey: "k", model: "m" },
    );
    const signal = new AbortController().signal;
    const run = (v: unknown) => step(v, entryData(v), signal);
    await assert.rejects(run({ shape: true }), (err) => {
      assert.ok(err instanceof ValidationError);
      assert.equal(err.code, "invalid_field");
      assert.equal(err.permanent, true, "not retried: the same answer would be paid for again");
      assert.match(err.message, /llm step triage: triage output still invalid after one repair/);
      // The field at fault, as an agent's wrong answer names it (it was "/", the whole answer).
      assert.equal(err.field, "/urgent");
      return true;
    });
    assert.equal(llm.requests.length, 2, "the answer and its repair");
    await assert.rejects(run({ shape: false }), (err) => {
      assert.ok(err instanceof LlmInvalidOutputError);
      assert.equal(err.retryable, true);
      return true;
    });
  } finally {
    await llm.close();
    await Deno.remove(dir, { recursive: true });
  }
});
