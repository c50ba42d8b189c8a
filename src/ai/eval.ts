/**
 * CLI: `deno task eval FILE.jsonl [--folds K [--seed S] [--repeats R]]` evaluates the matching embedded
 * analyzer on a labelled JSONL file and prints metrics overall and per source, plus
 * throughput. With `--folds K` it also cross-validates the analyzer's tunable parameters
 * (thresholds, damping): chosen on K-1 folds, scored on the held-out fold, mean and spread
 * over the K folds, and the pooled held-out predictions per source; `--repeats R` repeats
 * it with R shuffles (seeds S..S+R-1) and prints the mean and spread over all R*K folds.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { benchAnalyzer } from "./analyzers/bench.ts";
import {
  defaultSentimentLexicon,
  SENTIMENT_DEFAULTS,
  sentimentAnalyzer,
  sentimentLabel,
} from "./analyzers/sentiment.ts";
import { topicsAnalyzer } from "./analyzers/topics.ts";
import { TOXICITY_DEFAULT_THRESHOLD, toxicityAnalyzer } from "./analyzers/toxicity.ts";
import {
  type Candidate,
  crossValidate,
  formatCrossValidation,
  formatRepeated,
  paramGrid,
} from "./cross_validation.ts";
import {
  EvalError,
  EvalTask,
  evaluate,
  formatEvaluation,
  parseRows,
  topicEvalClass,
} from "./evaluation.ts";

/** A list of values with the default first (ties in the search go to the earlier one). */
function withDefault(value: number, others: number[]): number[] {
  return [value, ...others.filter((v) => v !== value)];
}

/** Values searched by the cross-validation, the default first. */
const SENTIMENT_GRID = {
  positiveThreshold: [SENTIMENT_DEFAULTS.positiveThreshold, 0.05, 0.1, 0.15, 0.25, 0.3, 0.35, 0.4],
  negativeThreshold: [
    SENTIMENT_DEFAULTS.negativeThreshold,
    -0.05,
    -0.1,
    -0.2,
    -0.25,
    -0.3,
    -0.35,
    -0.4,
  ],
  informationalDamping: [SENTIMENT_DEFAULTS.informationalDamping, 0.25, 0.5, 1],
  irrealisScalar: [defaultSentimentLexicon().irrealisScalar, 0, 0.25, 1],
};
const TOPICS_DEFAULTS = topicsAnalyzer().thresholds;
const TOPICS_GRID = {
  technical_issue: withDefault(TOPICS_DEFAULTS.technical_issue!, [0.5, 0.75, 1, 1.25, 1.5, 2]),
  feature_request: withDefault(TOPICS_DEFAULTS.feature_request!, [
    0.25,
    0.5,
    0.75,
    1,
    1.25,
    1.5,
    2,
  ]),
};
const TOXICITY_GRID = {
  threshold: [TOXICITY_DEFAULT_THRESHOLD, 0.3, 0.35, 0.4, 0.45, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8],
};

/**
 * The predictions of every parameter setting searched for a task, the defaults first.
 * Settings that only move a threshold reuse one scoring pass.
 */
function candidates(task: EvalTask, texts: readonly string[]): Candidate[] {
  switch (task) {
    case EvalTask.sentiment: {
      const lexicon = defaultSentimentLexicon();
      const scores = new Map<string, number[]>();
      for (const d of SENTIMENT_GRID.informationalDamping) {
        for (const irrealisScalar of SENTIMENT_GRID.irrealisScalar) {
          const a = sentimentAnalyzer({
            informationalDamping: d,
            lexicon: { ...lexicon, irrealisScalar },
          });
          scores.set(`${d} ${irrealisScalar}`, texts.map((t) => a.analyze(t).score));
        }
      }
      return paramGrid(SENTIMENT_GRID).map((p) => ({
        params: p,
        predicted: scores.get(`${p.informationalDamping} ${p.irrealisScalar}`)!.map((s) =>
          sentimentLabel(s, p.positiveThreshold!, p.negativeThreshold!)
        ),
      }));
    }
    case EvalTask.topics:
      return paramGrid(TOPICS_GRID).map((p) => {
        const a = topicsAnalyzer({ thresholds: p });
        return { params: p, predicted: texts.map((t) => topicEvalClass(a.analyze(t).topics)) };
      });
    case EvalTask.toxicity: {
      const a = toxicityAnalyzer();
      const scores = texts.map((t) => a.analyze(t).score);
      return paramGrid(TOXICITY_GRID).map((p) => ({
        params: p,
        predicted: scores.map((s) => (s >= p.threshold! ? "flagged" : "not_flagged")),
      }));
    }
  }
}

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

const USAGE = "usage: deno task eval FILE.jsonl [--folds K [--seed S] [--repeats R]]";

async function main(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      allowPositionals: true,
      options: {
        folds: { type: "string" },
        seed: { type: "string" },
        repeats: { type: "string" },
      },
    });
  } catch (e) {
    // deno-lint-ignore no-console
    console.error(`${e instanceof Error ? e.message : e}\n${USAGE}`);
    return 2;
  }
  const file = parsed.positionals[0];
  const folds = parsed.values.folds === undefined ? undefined : Number(parsed.values.folds);
  const seed = parsed.values.seed === undefined ? 1 : Number(parsed.values.seed);
  const repeats = parsed.values.repeats === undefined ? 1 : Number(parsed.values.repeats);
  if (
    !file || (folds !== undefined && !(Number.isInteger(folds) && folds >= 2)) ||
    !Number.isInteger(seed) || !(Number.isInteger(repeats) && repeats >= 1)
  ) {
    // deno-lint-ignore no-console
    console.error(USAGE);
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
    } cpu_ms=${speed.cpuMillis.toFixed(0)} items_per_cpu_s=${Math.round(speed.itemsPerCpuSecond)}`,
  ];
  if (folds !== undefined) {
    const grid = candidates(task, texts);
    const cv = crossValidate(task, rows, grid, { folds, seed });
    lines.push(
      "",
      formatCrossValidation(cv),
      "",
      "== pooled held-out predictions (each row predicted by the fold that held it out)",
      formatEvaluation(evaluate(task, rows, cv.outOfFold), p.name),
    );
    if (repeats > 1) {
      const runs = [cv];
      for (let r = 1; r < repeats; r++) {
        runs.push(crossValidate(task, rows, grid, { folds, seed: seed + r }));
      }
      lines.push("", formatRepeated(runs));
    }
  }
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
  try {
    Deno.exit(await main(Deno.args));
  } catch (e) {
    // A file that cannot be scored (unreadable, mixed tasks, a bad row): one line, no trace.
    if (!(e instanceof EvalError || e instanceof Deno.errors.NotFound)) throw e;
    // deno-lint-ignore no-console
    console.error(`eval: ${e.message}`);
    Deno.exit(2);
  }
}
