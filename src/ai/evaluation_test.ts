import assert from "node:assert/strict";
import {
  detectTask,
  EvalError,
  evaluate,
  formatEvaluation,
  parseRows,
  topicEvalClass,
} from "./evaluation.ts";
import { benchAnalyzer, benchAnalyzers } from "./analyzers/bench.ts";

Deno.test("detectTask() tells the task from the label field", () => {
  assert.equal(detectTask({ text: "a", sentiment: "positive" }), "sentiment");
  assert.equal(detectTask({ text: "a", topics: ["billing"] }), "topics");
  assert.equal(detectTask({ text: "a", flagged: true }), "toxicity");
  assert.throws(() => detectTask({ text: "a" }), EvalError);
  assert.throws(() => detectTask({ sentiment: "positive" }), EvalError);
});

Deno.test("topicEvalClass() maps other topics to other and keeps rank order", () => {
  assert.equal(topicEvalClass(["praise", "feature_request", "technical_issue"]), "feature_request");
  assert.equal(topicEvalClass(["performance", "technical_issue"]), "technical_issue");
  assert.equal(topicEvalClass(["billing", "general_inquiry"]), "other");
});

Deno.test("parseRows() reads JSONL, skipping blank lines", () => {
  const { task, rows } = parseRows(
    '{"text":"x","flagged":true,"source":"s1"}\n\n{"text":"y","flagged":false}\n',
  );
  assert.equal(task, "toxicity");
  assert.deepEqual(rows, [
    { text: "x", gold: "flagged", source: "s1" },
    { text: "y", gold: "not_flagged" },
  ]);
});

Deno.test("parseRows() rejects mixed tasks and bad JSON", () => {
  assert.throws(
    () => parseRows('{"text":"x","flagged":true}\n{"text":"y","sentiment":"neutral"}'),
    EvalError,
  );
  assert.throws(() => parseRows("{nope"), EvalError);
  assert.throws(() => parseRows(""), EvalError);
});

Deno.test("evaluate() reports overall and per source", () => {
  const rows = [
    { text: "a", gold: "positive", source: "s2" },
    { text: "b", gold: "negative", source: "s1" },
    { text: "c", gold: "neutral", source: "s1" },
  ];
  const r = evaluate("sentiment", rows, ["positive", "negative", "positive"]);
  assert.equal(r.overall.total, 3);
  assert.deepEqual(r.bySource.map((s) => s.source), ["s1", "s2"]);
  assert.equal(r.bySource[0]?.report.accuracy, 0.5);
  const text = formatEvaluation(r, "test");
  assert.match(text, /^task=sentiment analyzer=test\n\n== overall\nn=3 /);
  assert.match(text, /== source=s1\nn=2 accuracy=0\.5000/);
});

Deno.test("benchAnalyzer() measures items per second", () => {
  const r = benchAnalyzer({ name: "noop", analyze: (t: string) => t.length }, ["a", "b"], {
    minMillis: 5,
  });
  assert.equal(r.analyzer, "noop");
  assert.ok(r.items >= 2 && r.itemsPerSecond > 0);
  assert.ok(r.cpuMillis >= 0 && r.itemsPerCpuSecond >= 0);
});

Deno.test("benchAnalyzers() measures the three embedded analyzers", () => {
  const r = benchAnalyzers(["the app crashes", "please add dark mode"], { minMillis: 5 });
  assert.deepEqual(r.map((x) => x.analyzer), [
    "embedded:sentiment",
    "embedded:topics",
    "embedded:toxicity",
  ]);
  assert.ok(r.every((x) => x.itemsPerSecond > 0));
});

Deno.test("deno task eval --folds prints a cross-validation of the thresholds", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const file = `${dir}/rows.jsonl`;
    const texts = [
      ["you are a worthless idiot", true],
      ["I will find you and hurt you", true],
      ["what a stupid clown you are", true],
      ["the meeting moved to Tuesday", false],
      ["kill the process and restart it", false],
      ["thanks for the quick reply", false],
    ] as const;
    await Deno.writeTextFile(
      file,
      texts.map(([text, flagged]) => JSON.stringify({ text, flagged, source: "made_up" })).join(
        "\n",
      ),
    );
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--allow-read", "src/ai/eval.ts", file, "--folds", "3"],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(out.stdout);
    assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
    assert.match(text, /== cross-validation folds=3 seed=1/);
    assert.match(text, /tuned_held_out f1_flagged mean=\d\.\d{4} sd=\d\.\d{4}/);
    assert.match(text, /default_held_out f1_flagged/);
    const bad = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--allow-read", "src/ai/eval.ts", file, "--folds", "1"],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.equal(bad.code, 2);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("deno task eval on a file it cannot score says why in one line, without a stack trace", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const file = `${dir}/mixed.jsonl`;
    await Deno.writeTextFile(
      file,
      '{"text":"a","sentiment":"positive"}\n{"text":"b","topics":["billing"]}\n',
    );
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--allow-read", "src/ai/eval.ts", file],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const err = new TextDecoder().decode(out.stderr).trim();
    assert.equal(out.code, 2);
    assert.equal(err, "eval: line 2 is a topics row in a sentiment set");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
