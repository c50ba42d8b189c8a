/**
 * No secret leaks: with API keys and an LLM API key configured, a mesh started as
 * `deno task start` starts it is exercised (good requests, bad keys, bad input, failing LLM
 * calls), and every log line, the /metrics body, every error body and the dashboard page
 * are searched for the secrets.
 */
import assert from "node:assert/strict";
import { hashKey } from "../src/gateway/auth.ts";
import { chat, startFakeOpenAI } from "./helpers/openai_server.ts";
import { ONE_PROCESS, startMesh } from "./helpers/mesh.ts";

const API_KEY = "wk-live-0123456789abcdef-SECRET";
const LLM_KEY = "sk-llm-9876543210-SECRET";

Deno.test("no API key or LLM key appears in logs, /metrics, error bodies or the dashboard", async () => {
  let calls = 0;
  const llm = startFakeOpenAI(() =>
    ++calls % 2 === 0
      ? { kind: "error", status: 500, message: "upstream failed", type: "server_error" }
      : chat({ label: "negative", score: -0.5 }, { prompt_tokens: 10, completion_tokens: 5 })
  );
  try {
    await using mesh = await startMesh({
      ...ONE_PROCESS,
      WEFT_API_KEYS: JSON.stringify([{
        sha256: await hashKey(API_KEY),
        role: "admin",
        name: "ops",
      }]),
      WEFT_ANALYZERS: "llm",
      WEFT_LLM_BASE_URL: llm.baseUrl,
      WEFT_LLM_MODEL: "test-model",
      WEFT_LLM_API_KEY: LLM_KEY,
      WEFT_LOG_LEVEL: "debug",
    });
    const bodies: string[] = [];
    const call = async (path: string, init: RequestInit = {}) => {
      const res = await fetch(`${mesh.gatewayUrl}${path}`, init);
      const text = res.headers.get("content-type")?.startsWith("text/event-stream")
        ? (await res.body?.cancel(), "")
        : await res.text();
      bodies.push(text);
      return res.status;
    };
    const auth = { authorization: `Bearer ${API_KEY}` };
    const json = { "content-type": "application/json" };
    assert.equal(
      await call("/feedback", {
        method: "POST",
        headers: { ...json, ...auth },
        body: JSON.stringify({ id: "sec1", text: "The export crashes" }),
      }),
      202,
    );
    assert.equal(await call("/feedback", { method: "POST", headers: json, body: "{}" }), 401);
    assert.equal(
      await call("/feedback", {
        method: "POST",
        headers: { ...json, authorization: `Bearer ${API_KEY}x` },
        body: "{}",
      }),
      401,
    );
    assert.equal(
      await call("/feedback", { method: "POST", headers: { ...json, ...auth }, body: "{nope" }),
      400,
    );
    for (const path of ["/feedback/sec1", "/deadletters", "/metrics", "/dashboard", "/nowhere"]) {
      await call(path, { headers: auth });
    }
    await mesh.waitForLog(
      (l) => l.msg === "handled" && l.stage === "sentiment",
      30_000,
      "an LLM call",
    );
    const text = [
      ...mesh.logs.map((l) => JSON.stringify(l)),
      ...bodies,
    ].join("\n");
    assert.ok(text.includes("weft_"), "the metrics were read");
    for (const secret of [API_KEY, LLM_KEY]) {
      assert.equal(text.includes(secret), false, `${secret.slice(0, 6)}... leaked`);
    }
    assert.ok(llm.requests.length > 0, "the LLM was called with its key");
  } finally {
    await llm.close();
  }
});
