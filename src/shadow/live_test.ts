import assert from "node:assert/strict";
import { WeftMetrics } from "../observability/metrics.ts";
import {
  formatLiveShadowReport,
  labelledAccuracy,
  liveShadowReport,
  parseItemLabels,
  registerShadowMetrics,
  type ShadowDecision,
  ShadowTally,
} from "./live.ts";
import { ValidationError } from "../errors.ts";
import { candidateConfig, parseShadowSpec } from "./spec.ts";
import { agreementOf } from "../ai/agreement.ts";
import { loadConfig } from "../config.ts";

const spec = parseShadowSpec({ id: "t", step: "sentiment", candidate: { analyzers: "rules" } });

Deno.test("ShadowTally's agreement and kappa equal the replay report's on the same labels", () => {
  const prod = ["positive", "negative", "neutral", "negative", "positive", "neutral", "negative"];
  const cand = ["positive", "negative", "negative", "negative", "neutral", "neutral", "positive"];
  const tally = new ShadowTally(spec);
  prod.forEach((p, i) => tally.record({ sentiment: p }, { sentiment: cand[i]! }));
  const want = agreementOf(prod, cand);
  const got = tally.figures().sentiment!;
  assert.equal(got.compared, prod.length);
  assert.equal(got.agreement, want.agreement);
  assert.ok(Math.abs(got.kappa - want.kappa) < 1e-12);
});

Deno.test("registerShadowMetrics exports the tallies, and a removed shadow's series go with it", async () => {
  const m = new WeftMetrics();
  const tallies = new Map<string, ShadowTally>();
  registerShadowMetrics(m.registry, () => tallies.values());
  const t = new ShadowTally(spec);
  t.up = true;
  t.record({ sentiment: "positive" }, { sentiment: "positive" });
  t.record({ sentiment: "negative" }, { sentiment: "positive" });
  tallies.set("t", t);
  const text = await m.text();
  assert.match(
    text,
    /weft_shadow_agreement_ratio\{shadow="t",pipeline="feedback",step="sentiment",field="sentiment"\} 0\.5/,
  );
  assert.match(
    text,
    /weft_shadow_compared_total\{[^}]*production="negative",candidate="positive"\} 1/,
  );
  assert.match(text, /weft_shadow_items_total\{[^}]*outcome="compared"\} 2/);
  assert.match(text, /weft_shadow_up\{[^}]*candidate="rules"\} 1/);
  tallies.delete("t");
  assert.doesNotMatch(await m.text(), /shadow="t"/);
});

Deno.test("candidateConfig changes only what the candidate names, and a prompt only for its step", () => {
  const base = loadConfig({ env: () => undefined, args: [] });
  const c = candidateConfig(base, {
    step: "topics",
    candidate: { analyzers: "llm", model: "m2", prompt: "v2" },
  }, { fallback: false, budgetUsd: 0.5 });
  assert.equal(c.analyzers, "llm");
  assert.equal(c.llmModel, "m2");
  assert.equal(c.rulesPath, base.rulesPath);
  assert.deepEqual(c.llmPromptVersions, { topics: "v2" });
  assert.equal(c.llmBudgetUsd, 0.5);
  assert.equal(c.llmFallback, false);
});

Deno.test("labels by item: each field's accuracy for production and candidate, on the items both can be judged", () => {
  const labels = parseItemLabels(
    [
      '{"item_id":"a","label":"pos","urgent":true}',
      "",
      '{"item_id":"b","label":"neg"}',
      '{"item_id":"c","label":"pos"}',
      '{"item_id":"gone","label":"pos"}',
    ].join("\n"),
  );
  assert.deepEqual(labels.get("a"), { label: "pos", urgent: "true" });
  const d = (
    item_id: string,
    decision: Record<string, string>,
    production: typeof decision | null,
  ) => ({ item_id, decision, production });
  const r = labelledAccuracy([
    d("a", { label: "pos", urgent: "true" }, { label: "neg", urgent: "true" }),
    d("b", { label: "neg" }, { label: "neg" }),
    d("c", { label: "neg" }, null), // no production output: not judged
    d("x", { label: "pos" }, { label: "pos" }), // no label
  ], labels);
  assert.deepEqual(r, {
    label: { items: 2, production_accuracy: 0.5, candidate_accuracy: 1 },
    urgent: { items: 1, production_accuracy: 1, candidate_accuracy: 1 },
  });
  for (
    const [text, field] of [["{nope", "/1"], ['{"label":"pos"}', "/1/item_id"], [
      '\n["a"]',
      "/2/item_id",
    ]]
  ) {
    assert.throws(
      () => parseItemLabels(text!),
      (e) => e instanceof ValidationError && e.field === field,
    );
  }
});

/** A decision of shadow `s` on item `i`: production said `p`, the candidate `c`. */
function decided(i: string, p: string, c: string, more: Partial<ShadowDecision> = {}) {
  return {
    shadow: "s",
    pipeline: "feedback",
    step: "sentiment",
    item_id: i,
    candidate: "rules",
    time: "2026-12-06T00:00:00.000Z",
    input_seq: 1,
    ms: 1,
    decision: { sentiment: c },
    production: { sentiment: p },
    agrees: { sentiment: p === c },
    event: {} as ShadowDecision["event"],
    ...more,
  } as ShadowDecision;
}

Deno.test("a shadow's report covers its latest attachment only, not an earlier one under its id", () => {
  const first = { attached_at: "2026-12-06T10:00:00.000Z", candidate: "rules" };
  const again = { attached_at: "2026-12-06T11:00:00.000Z", candidate: "embedded:sentiment" };
  const r = liveShadowReport("s", [
    decided("a", "positive", "negative", first),
    decided("b", "positive", "negative", first),
    decided("c", "positive", "positive", again),
    decided("d", "negative", "negative", again),
  ]);
  assert.equal(r.items, 2);
  assert.equal(r.candidate, "embedded:sentiment");
  assert.equal(r.fields.sentiment!.agreement, 1);
});

Deno.test("the terminal report prints labels whole, so two long ones never read the same", () => {
  const long1 = '{"by":"rules","label":"billing"}';
  const long2 = '{"by":"rules","label":"technical"}';
  const text = formatLiveShadowReport(liveShadowReport("s", [
    decided("a", long1, long1),
    decided("b", long2, long1),
  ]));
  const matrix = text.slice(text.indexOf("confusion"), text.indexOf("disagreements"));
  for (const label of [long1, long2]) assert.ok(matrix.includes(label), text);
});

Deno.test("the terminal report's heading names a live shadow by its id, a replay once", () => {
  const r = liveShadowReport("s1", [decided("a", "x", "x")]);
  assert.match(formatLiveShadowReport(r), /^== live shadow s1: /);
  const replayed = liveShadowReport("replay", [decided("a", "x", "x")]);
  assert.match(formatLiveShadowReport(replayed, "replay"), /^== replay: /);
});
