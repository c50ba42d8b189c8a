/**
 * CLI: `deno task eval FILE.jsonl` evaluates the matching embedded analyzer on a
 * labelled JSONL file and prints metrics overall and per source, plus throughput.
 *
 * @module
 */

import { benchAnalyzer } from "./analyzers/bench.ts";
import { sentimentAnalyzer } from "./analyzers/sentiment.ts";
import { topicsAnalyzer } from "./analyzers/topics.ts";
import { toxicityAnalyzer } from "./analyzers/toxicity.ts";
import { EvalTask, evaluate, formatEvaluation, parseRows, topicEvalClass } from "./evaluation.ts";

/** Predictions (as scoring classes) and the analyzer used, for one task. */
function predictor(
  task: EvalTask,
): {
  name: string;
  predict: (text: string) => string;
  analyzer: { name: string; analyze(text: string): unknown };
} {
  switch (task) {
    case EvalTask.sentiment: {
      const a = sentimentAnalyzer();
      return { name: a.name, analyzer: a, predict: (t) => a.analyze(t).label };
    }
    case EvalTask.topics: {
      const a = topicsAnalyzer();
      return { name: a.name, analyzer: a, predict: (t) => topicEvalClass(a.analyze(t).topics) };
    }
    case EvalTask.toxicity: {
      const a = toxicityAnalyzer();
      return {
        name: a.name,
        analyzer: a,
        predict: (t) => (a.analyze(t).flagged ? "flagged" : "not_flagged"),
      };
    }
  }
}

async function main(args: string[]): Promise<number> {
  const file = args[0];
  if (!file) {
    // deno-lint-ignore no-console
    console.error("usage: deno task eval FILE.jsonl");
    return 2;
  }
  const { task, rows } = parseRows(await Deno.readTextFile(file));
  const p = predictor(task);
  const predicted = rows.map((r) => p.predict(r.text));
  const result = evaluate(task, rows, predicted);
  const texts = rows.map((r) => r.text);
  const speed = benchAnalyzer(p.analyzer, texts, { minMillis: 500 });
  const lines = [
    formatEvaluation(result, p.name),
    "",
    "== throughput",
    `${speed.analyzer} items=${speed.items} ms=${speed.millis.toFixed(0)} items_per_s=${
      Math.round(speed.itemsPerSecond)
    }`,
  ];
  if (task === EvalTask.topics) {
    lines.push(
      "",
      "note: predicted topics map to the first of technical_issue/feature_request present, else other",
    );
  }
  // deno-lint-ignore no-console
  console.log(lines.join("\n"));
  return 0;
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
