import assert from "node:assert/strict";
import { llmAnalyzers } from "./configured_analyzers.ts";
import { AnalyzerKind } from "../config.ts";
import { chat, startFakeOpenAI } from "../../tests/helpers/openai_server.ts";

const settings = (baseUrl: string, limits: { llmRps?: number; llmBudgetUsd?: number }) => ({
  analyzers: AnalyzerKind.Llm,
  rulesPath: "rules/routing.json",
  llmBaseUrl: baseUrl,
  llmModel: "m",
  llmApiKey: "k",
  llmTimeoutMs: 10_000,
  llmConcurrency: 4,
  llmRps: limits.llmRps ?? 0,
  llmBudgetUsd: limits.llmBudgetUsd ?? 0,
  // 100 prompt and 20 completion tokens: 0.00014 USD a request
  llmPriceInPer1k: 0.001,
  llmPriceOutPer1k: 0.002,
});

const answer = (system: string) =>
  system.startsWith("You extract the topics")
    ? chat({ topics: ["billing"], evidence: { billing: ["charged"] } })
    : chat({ flagged: false, categories: [], score: 0 });

Deno.test("llmAnalyzers share one WEFT_LLM_BUDGET_USD among a process's analyzers (topics and toxicity)", async () => {
  const llm = startFakeOpenAI((req) => answer(req.body.messages[0]!.content));
  try {
    // Two requests (0.00028 USD) spend it.
    const a = await llmAnalyzers(settings(llm.baseUrl, { llmBudgetUsd: 0.0002 }));
    for (const text of ["charged twice", "charged three times", "charged again"]) {
      await a.topics.analyze(text);
      await a.toxicity.analyze(text);
    }
    assert.equal(llm.requests.length, 2, "no request past the process's budget");
    assert.equal(a.llmStats.snapshot().over_budget, 4);
  } finally {
    await llm.close();
  }
});

Deno.test("llmAnalyzers share one WEFT_LLM_RPS among a process's analyzers (topics and toxicity)", async () => {
  const at: number[] = [];
  const llm = startFakeOpenAI((req) => {
    at.push(Date.now());
    return answer(req.body.messages[0]!.content);
  });
  try {
    const a = await llmAnalyzers(settings(llm.baseUrl, { llmRps: 2 }));
    await Promise.all(
      ["one", "two", "three"].flatMap((t) => [a.topics.analyze(t), a.toxicity.analyze(t)]),
    );
    assert.equal(at.length, 6);
    // 2 a second, burst 1, for the process: the sixth request 2.5 s after the first.
    const span = Math.max(...at) - Math.min(...at);
    assert.ok(span >= 2_000, `six requests at 2 a second took ${span} ms`);
  } finally {
    await llm.close();
  }
});

Deno.test("a burst of calls keeps to WEFT_LLM_BUDGET_USD: a queued request is checked against the budget again when its turn comes", async () => {
  const llm = startFakeOpenAI(() => chat({ label: "negative", score: -0.5 }));
  try {
    // Two requests (0.00028 USD) spend it; one request in flight at a time.
    const a = await llmAnalyzers({
      ...settings(llm.baseUrl, { llmBudgetUsd: 0.0002 }),
      llmConcurrency: 1,
    });
    // Six items at once, as a stage hands its in-flight messages to the analyzer.
    const results = await Promise.all(
      ["a", "b", "c", "d", "e", "f"].map((t) => a.sentiment.analyze(`text ${t}`)),
    );
    assert.equal(llm.requests.length, 2, "no request sent past the budget");
    const fellBack = results.filter((r) => (r as { fallback_reason?: string }).fallback_reason);
    assert.equal(fellBack.length, 4);
    assert.ok(
      fellBack.every((r) => (r as { fallback_reason?: string }).fallback_reason === "over_budget"),
    );
  } finally {
    await llm.close();
  }
});
