/**
 * The LLM analyzers in the real mesh: services started by `deno task start` call a local
 * OpenAI-compatible server (the real wire format), record which analyzer decided with
 * its token usage and cost, and fall back to the embedded analyzers when it fails.
 */
import assert from "node:assert/strict";
import { Kvm } from "@nats-io/kv";
import type { FeedbackState } from "../pipelines/feedback/events.gen.ts";
import { chat, type FakeReply, startFakeOpenAI } from "./helpers/openai_server.ts";
import { ONE_PROCESS, startMesh } from "./helpers/mesh.ts";
import { waitFor } from "./helpers/wait.ts";
import { connectClient } from "./helpers/nats.ts";

/** Answers each analyzer's prompt; fails every request for texts containing "outage". */
function llmScript(req: { body: { messages: { role: string; content: string }[] } }): FakeReply {
  const all = req.body.messages.map((m) => m.content).join("\n");
  if (/outage/i.test(all)) {
    return { kind: "error", status: 500, message: "upstream overloaded", type: "server_error" };
  }
  const usage = { prompt_tokens: 200, completion_tokens: 30 };
  if (/sentiment/i.test(req.body.messages[0]!.content)) {
    return chat({ label: "negative", score: -0.6 }, usage);
  }
  if (/toxic/i.test(req.body.messages[0]!.content)) {
    return chat({ flagged: false, categories: [], score: 0.01 }, usage);
  }
  return chat({ topics: ["billing"], evidence: { billing: ["charged twice"] } }, usage);
}

Deno.test("with WEFT_ANALYZERS=llm the stages record the LLM's decision, usage and cost, and fall back when it fails", async () => {
  const llm = startFakeOpenAI(llmScript);
  try {
    await using mesh = await startMesh({
      ...ONE_PROCESS,
      WEFT_ANALYZERS: "llm",
      WEFT_LLM_BASE_URL: llm.baseUrl,
      WEFT_LLM_MODEL: "test-model",
      WEFT_LLM_API_KEY: "sk-test-secret",
      WEFT_LLM_PRICE_IN_PER_1K: "0.5",
      WEFT_LLM_PRICE_OUT_PER_1K: "1.5",
      WEFT_LLM_TIMEOUT_MS: "5000",
      WEFT_RETRY_BASE_MS: "50",
    });
    for (
      const [id, text] of [["L1", "I was charged twice this month"], [
        "L2",
        "Total outage, nothing loads and it crashes with an error",
      ]]
    ) {
      const res = await fetch(`${mesh.gatewayUrl}/feedback`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ id, text }),
      });
      assert.equal(res.status, 202);
      await res.body?.cancel();
    }
    const nc = await connectClient(mesh.natsUrl, "llm-test", mesh.credentials("ops"));
    try {
      const kv = await new Kvm(nc).open("weft_feedback_state");
      const done = (id: string) =>
        waitFor(
          async () => {
            const s = (await kv.get(id))?.json<FeedbackState>();
            return s?.status === "processed" ? s : undefined;
          },
          20_000,
          `${id} processed`,
        );

      const l1 = await done("L1");
      assert.equal(l1.sentiment?.analyzer, "llm:test-model");
      assert.equal(l1.sentiment?.label, "negative");
      assert.deepEqual(l1.topics?.topics, ["billing"]);
      assert.equal(l1.routing?.team, "Billing");
      assert.deepEqual(l1.sentiment?.usage, {
        prompt_tokens: 200,
        completion_tokens: 30,
        total_tokens: 230,
        cost_usd: 0.2 * 0.5 + 0.03 * 1.5,
      });
      assert.equal(l1.sentiment?.prompt_version, "v1");

      const l2 = await done("L2");
      assert.equal(l2.sentiment?.analyzer, "embedded:sentiment", "the embedded analyzer decided");
      assert.equal(l2.sentiment?.fallback_from, "llm:test-model");
      assert.ok(l2.sentiment?.fallback_reason);
      assert.equal(l2.topics?.analyzer, "embedded:topics");
      assert.equal(l2.routing?.team, "Urgent Technical Support");
    } finally {
      await nc.close();
    }
    // The gateway's /metrics gathers the stages' LLM counters: one successful sentiment call.
    const metrics = await (await fetch(`${mesh.gatewayUrl}/metrics`)).text();
    const tokens = metrics.match(
      /^weft_llm_tokens_total\{stage="sentiment",kind="prompt"\} (\d+)/m,
    );
    assert.equal(
      tokens?.[1],
      "200",
      metrics.split("\n").filter((l) => l.startsWith("weft_llm")).join("\n"),
    );
    const cost = metrics.match(/^weft_llm_cost_usd_total\{stage="sentiment"\} ([\d.e-]+)/m);
    assert.ok(Math.abs(Number(cost?.[1]) - 0.145) < 1e-9, `sentiment cost ${cost?.[1]}`);
    assert.ok(llm.requests.every((r) => r.authorization === "Bearer sk-test-secret"));
    assert.ok(
      !mesh.logs.some((l) => JSON.stringify(l).includes("sk-test-secret")),
      "the key is never logged",
    );
  } finally {
    await llm.close();
  }
});
