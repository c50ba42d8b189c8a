/**
 * Makes the screenshots and command outputs of docs/SHADOW.md: a real mesh (`deno task
 * start`, its own nats-server), a local OpenAI-compatible server standing in for the
 * candidate model, the replay report of a candidate prompt (`prompts/sentiment.v2.md`), the
 * same candidate as a live shadow on the dashboard, then its promotion. Not a test; run by
 * hand when the pages change:
 *
 * ```sh
 * deno run --allow-run --allow-net=127.0.0.1,localhost --allow-read --allow-write \
 *   --allow-env --allow-sys=cpus,homedir scripts/shadow_screenshots.ts docs/img
 * ```
 *
 * The stand-in model labels sentiment with the reference ruleset's keyword rules and topics
 * with the embedded analyzer, so the figures are reproducible; they say nothing about a
 * real model.
 *
 * @module
 */
import { topicsAnalyzer, toxicityAnalyzer } from "../src/ai/analyzers/mod.ts";
import { loadRules } from "../pipelines/feedback/rules.ts";
import { chat, startFakeOpenAI } from "../tests/helpers/openai_server.ts";
import { startMesh, taskArgs } from "../tests/helpers/mesh.ts";
import { waitFor } from "../tests/helpers/wait.ts";
import { SAMPLE_FEEDBACK } from "../tests/helpers/texts.ts";

const out = Deno.args[0] ?? "docs/img";
const CHROMIUM = "/usr/bin/chromium";
const say = (s: string) => Deno.stdout.writeSync(new TextEncoder().encode(s + "\n"));

const TEXTS = SAMPLE_FEEDBACK;

const reference = await loadRules("rules/reference.json");
const topics = topicsAnalyzer();
const toxicity = toxicityAnalyzer();
const llm = startFakeOpenAI(async (req) => {
  const system = req.body.messages[0]!.content;
  const text = req.body.messages.at(-1)!.content;
  const usage = { prompt_tokens: 180, completion_tokens: 12 };
  if (/sentiment/i.test(system)) {
    const r = await reference.sentiment!.analyze(text);
    return chat({ label: r.label, score: r.score }, usage);
  }
  if (/toxic/i.test(system)) {
    const r = await toxicity.analyze(text);
    return chat({ flagged: r.flagged, categories: r.categories, score: r.score }, usage);
  }
  const r = await topics.analyze(text);
  return chat({ topics: r.topics, evidence: r.evidence }, usage);
});

const env = {
  WEFT_LLM_BASE_URL: llm.baseUrl,
  WEFT_LLM_MODEL: "candidate-model",
  WEFT_LLM_API_KEY: "local-stand-in",
  WEFT_LLM_PRICE_IN_PER_1K: "0.00015",
  WEFT_LLM_PRICE_OUT_PER_1K: "0.0006",
};
const root = new URL("../", import.meta.url);

async function run(args: string[], extraEnv: Record<string, string>) {
  const r = await new Deno.Command("deno", {
    args,
    cwd: root,
    env: extraEnv,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(r.stdout) + new TextDecoder().decode(r.stderr);
  if (!r.success) throw new Error(text);
  return text;
}

async function submit(base: string, prefix: string, n: number) {
  const ids = Array.from({ length: n }, (_, i) => `${prefix}${i}`);
  for (let i = 0; i < n; i += 50) {
    const items = ids.slice(i, i + 50).map((id, j) => ({
      id,
      text: TEXTS[(i + j) % TEXTS.length],
    }));
    const r = await fetch(`${base}/feedback/batch`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ items }),
    });
    if (r.status !== 202) throw new Error(await r.text());
    await r.body?.cancel();
  }
  await waitFor(
    async () => {
      const last = await (await fetch(`${base}/feedback/${ids.at(-1)}`)).json();
      return last.status === "processed" || undefined;
    },
    60_000,
    "items processed",
  );
  return ids;
}

try {
  await Deno.mkdir(out, { recursive: true });
  await using mesh = await startMesh(env);
  await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
  const ops = { NATS_URL: mesh.natsUrl, WEFT_NATS_NKEY: mesh.credentials("ops").nkeySeedFile! };
  await submit(mesh.gatewayUrl, "H", 150);

  // 1. Replay: the candidate prompt on stored history.
  const replay = await run([
    ...await taskArgs("shadow"),
    "--analyzers",
    "llm",
    "--prompt",
    "sentiment=v2",
    "--out",
    `${mesh.storeDir}/replay`,
  ], { ...ops, ...env });
  say("$ deno task shadow --analyzers llm --prompt sentiment=v2 --out data/shadow-v2\n" + replay);

  Deno.env.set("__IS_WSL_TEST__", "1");
  const { chromium } = await import("playwright-core");
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 900, height: 400 } });
    await page.goto(`file://${mesh.storeDir}/replay.html`);
    await page.screenshot({ path: `${out}/shadow-replay.png`, fullPage: true });

    // 2. Live: the same candidate attached to the running sentiment step.
    const attach = await run([
      ...await taskArgs("shadow"),
      "attach",
      "--id",
      "sentiment-v2",
      "--step",
      "sentiment",
      "--analyzers",
      "llm",
      "--prompt",
      "v2",
      "--rps",
      "20",
      "--budget-usd",
      "1",
    ], ops);
    say(
      "$ deno task shadow attach --id sentiment-v2 --step sentiment --analyzers llm --prompt v2 --rps 20 --budget-usd 1\n" +
        attach,
    );
    await mesh.waitForLog(
      (l) => l.msg === "shadow started" && l.shadow === "sentiment-v2",
      20_000,
      "shadow started",
    );
    const dash = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    await dash.goto(`${mesh.gatewayUrl}/dashboard`);
    await submit(mesh.gatewayUrl, "L", 120);
    await waitFor(
      async () => {
        const m = await (await fetch(`${mesh.gatewayUrl}/metrics`)).text();
        return /weft_shadow_items_total\{[^}]*outcome="compared"[^}]*\} 120\b/.test(m) ||
          /outcome="compared"\} 120\b/.test(m) || undefined;
      },
      60_000,
      "the shadow to compare the live items",
    );
    await dash.locator('#shadows tr[data-shadow="sentiment-v2"] td:nth-child(6)')
      .filter({ hasText: /^120$/ }).waitFor({ timeout: 15_000 });
    await dash.locator("#shadows").locator("xpath=..").screenshot({
      path: `${out}/shadow-live.png`,
    });
    const metrics = (await (await fetch(`${mesh.gatewayUrl}/metrics`)).text()).split("\n")
      .filter((l) => /^weft_shadow_(agreement_ratio|kappa|items_total|llm_cost)/.test(l));
    say("$ curl -s localhost:8000/metrics | grep ^weft_shadow_\n" + metrics.join("\n"));
    say("$ deno task shadow list\n" + await run([...await taskArgs("shadow"), "list"], ops));

    // 3. Promote.
    const promote = await run([...await taskArgs("shadow"), "promote", "sentiment-v2"], ops);
    say("$ deno task shadow promote sentiment-v2\n" + promote);
    await mesh.waitForLog(
      (l) => l.msg === "promoted step version applied",
      20_000,
      "the promotion applied",
    );
    await submit(mesh.gatewayUrl, "P", 3);
    const after = await (await fetch(`${mesh.gatewayUrl}/feedback/P0`)).json();
    say(
      "$ curl -s localhost:8000/feedback/P0 | jq .sentiment\n" +
        JSON.stringify(after.sentiment, null, 2),
    );
  } finally {
    await browser.close();
  }
} finally {
  await llm.close();
}
