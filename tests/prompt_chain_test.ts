/**
 * A prompt chain from a definition (pipelines/examples/documents.ts): extract -> summarise ->
 * classify, three llm steps, each handed the step before's result, against the local server
 * that speaks the OpenAI format.
 */
import assert from "node:assert/strict";
import { chat, startFakeOpenAI } from "./helpers/openai_server.ts";
import { ONE_PROCESS, startMesh } from "./helpers/mesh.ts";
import { waitFor } from "./helpers/wait.ts";

Deno.test("a prompt chain: each llm step gets the previous step's result and the item ends filed", async () => {
  const llm = startFakeOpenAI((req) => {
    const system = req.body.messages[0]!.content;
    const user = JSON.parse(req.body.messages.at(-1)!.content);
    if (system.startsWith("Extract")) return chat({ sender: "ACME", amounts: [120.5] });
    if (system.startsWith("You are given the facts")) {
      return chat({ summary: `${user.sender} asks for ${user.amounts[0]}` });
    }
    return chat({ kind: /asks for/.test(user.summary) ? "invoice" : "other" });
  });
  try {
    await using mesh = await startMesh({
      ...ONE_PROCESS,
      WEFT_PIPELINES: "pipelines/examples/documents.ts",
      WEFT_LLM_BASE_URL: llm.baseUrl,
      WEFT_LLM_API_KEY: "test-key",
      WEFT_LLM_MODEL: "fake-model",
    });
    await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
    const res = await fetch(`${mesh.gatewayUrl}/pipelines/documents/items`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ text: "Invoice 17 from ACME: 120.50 EUR due 2027-01-31" }),
    });
    assert.equal(res.status, 202);
    const { id } = await res.json();
    const done = await waitFor(
      async () => {
        const s = await (await fetch(`${mesh.gatewayUrl}/pipelines/documents/items/${id}`)).json();
        return s.status === "done" ? s : undefined;
      },
      30_000,
      "the document filed",
    );
    assert.equal(done.outcome, "filed");
    assert.deepEqual(done.results.extract, { sender: "ACME", amounts: [120.5] });
    assert.deepEqual(done.results.summarise, { summary: "ACME asks for 120.5" });
    assert.deepEqual(done.results.classify, { kind: "invoice" });
    // Each step was asked once, in order, with what the step before produced.
    const users = llm.requests.map((r) => JSON.parse(r.body.messages.at(-1)!.content));
    assert.deepEqual(users, [
      { text: "Invoice 17 from ACME: 120.50 EUR due 2027-01-31" },
      { sender: "ACME", amounts: [120.5] },
      { summary: "ACME asks for 120.5" },
    ]);
  } finally {
    await llm.close();
  }
});

Deno.test("llm steps keep to WEFT_LLM_BUDGET_USD at the configured prices: past it no request is sent and the item fails", async () => {
  const llm = startFakeOpenAI((req) => {
    const system = req.body.messages[0]!.content;
    if (system.startsWith("Extract")) return chat({ sender: "ACME", amounts: [120.5] });
    if (system.startsWith("You are given the facts")) return chat({ summary: "ACME asks" });
    return chat({ kind: "invoice" });
  });
  try {
    await using mesh = await startMesh({
      ...ONE_PROCESS,
      WEFT_PIPELINES: "pipelines/examples/documents.ts",
      WEFT_LLM_BASE_URL: llm.baseUrl,
      WEFT_LLM_API_KEY: "test-key",
      WEFT_LLM_MODEL: "fake-model",
      // one call (100 prompt + 20 completion tokens) costs 0.0016 USD: each step's budget is
      // spent by its first call
      WEFT_LLM_PRICE_IN_PER_1K: "0.01",
      WEFT_LLM_PRICE_OUT_PER_1K: "0.03",
      WEFT_LLM_BUDGET_USD: "0.001",
      WEFT_MAX_ATTEMPTS: "1",
    });
    await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
    const ended = async (text: string) => {
      const res = await fetch(`${mesh.gatewayUrl}/pipelines/documents/items`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ text }),
      });
      assert.equal(res.status, 202);
      const { id } = await res.json();
      return await waitFor(
        async () => {
          const s = await (await fetch(`${mesh.gatewayUrl}/pipelines/documents/items/${id}`))
            .json();
          return s.status === "done" || s.status === "failed" ? s : undefined;
        },
        30_000,
        `${text} ended`,
      );
    };
    const first = await ended("Invoice 17 from ACME: 120.50 EUR due 2027-01-31");
    assert.equal(first.status, "done");
    assert.equal(llm.requests.length, 3);
    const second = await ended("Invoice 18 from ACME: 99.00 EUR due 2027-02-28");
    assert.equal(second.status, "failed", JSON.stringify(second));
    assert.match(JSON.stringify(second), /budget exceeded/, JSON.stringify(second));
    assert.equal(llm.requests.length, 3, "no request past the budget");
  } finally {
    await llm.close();
  }
});

Deno.test("llm steps keep to WEFT_LLM_RPS: a step's requests are spaced by its rate", async () => {
  const extracts: number[] = [];
  const llm = startFakeOpenAI((req) => {
    const system = req.body.messages[0]!.content;
    if (system.startsWith("Extract")) {
      extracts.push(Date.now());
      return chat({ sender: "ACME", amounts: [1] });
    }
    if (system.startsWith("You are given the facts")) return chat({ summary: "ACME asks" });
    return chat({ kind: "invoice" });
  });
  try {
    await using mesh = await startMesh({
      ...ONE_PROCESS,
      WEFT_PIPELINES: "pipelines/examples/documents.ts",
      WEFT_LLM_BASE_URL: llm.baseUrl,
      WEFT_LLM_API_KEY: "test-key",
      WEFT_LLM_MODEL: "fake-model",
      WEFT_LLM_RPS: "2",
    });
    await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
    const items = Array.from({ length: 6 }, (_, i) => ({ text: `Invoice ${i} from ACME` }));
    const res = await fetch(`${mesh.gatewayUrl}/pipelines/documents/items/batch`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ items }),
    });
    assert.equal(res.status, 202, await res.clone().text());
    await waitFor(() => extracts.length === 6, 60_000, "six extract requests");
    // A token bucket of 2 a second (burst 1): the sixth request comes 2.5 s after the first.
    const span = extracts[5]! - extracts[0]!;
    assert.ok(span >= 2_000, `six requests at 2 a second took ${span} ms`);
  } finally {
    await llm.close();
  }
});
