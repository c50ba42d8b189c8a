import assert from "node:assert/strict";
import { createLlmStep } from "./llm_step.ts";
import { entryData } from "./flow.ts";
import { chat, startFakeOpenAI } from "../../tests/helpers/openai_server.ts";

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
