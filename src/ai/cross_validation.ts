/**
 * K-fold cross-validation of an analyzer's tunable parameters on labelled rows: the rows
 * are split into K stratified folds; for each fold the parameters are chosen on the other
 * K-1 folds only (a grid search for the best target metric), then scored on the held-out
 * fold. The report gives the mean and spread of the held-out scores, the parameters each
 * fold chose, and the default parameters' per-fold scores for comparison. Pure; the CLI in
 * src/ai/eval.ts does the I/O.
 *
 * @module
 */

import { type ClassificationReport, classificationReport } from "./classification_metrics.ts";
import { EvalError, type EvalRow, type EvalTask, taskLabels } from "./evaluation.ts";

/** One parameter setting of an analyzer, e.g. `{ threshold: 0.5 }`. */
export type Params = Readonly<Record<string, number>>;

/** The predictions of one parameter setting for every row, in row order. */
export interface Candidate {
  /** The setting. */
  params: Params;
  /** One predicted class per row. */
  predicted: readonly string[];
}

/** Held-out result of one fold. */
export interface FoldResult {
  /** Fold number, from 0. */
  fold: number;
  /** Rows held out. */
  size: number;
  /** The parameters chosen on the other folds. */
  params: Params;
  /** Target metric of the chosen parameters on the training folds. */
  trainScore: number;
  /** Target metric of the chosen parameters on the held-out fold. */
  heldOutScore: number;
  /** Target metric of the default parameters on the held-out fold. */
  defaultScore: number;
}

/** Mean and spread of a list of numbers. */
export interface Spread {
  /** Arithmetic mean. */
  mean: number;
  /** Sample standard deviation (n - 1); 0 for one value. */
  sd: number;
  /** Smallest value. */
  min: number;
  /** Largest value. */
  max: number;
}

/** The result of {@link crossValidate}. */
export interface CrossValidation {
  /** The task, which decides the target metric. */
  task: EvalTask;
  /** Number of folds. */
  folds: number;
  /** Seed of the fold shuffle. */
  seed: number;
  /** How many parameter settings were searched. */
  candidates: number;
  /** One result per fold. */
  perFold: FoldResult[];
  /** Held-out scores with parameters tuned on the training folds. */
  tuned: Spread;
  /** Held-out scores with the default parameters (no tuning at all). */
  defaults: Spread;
  /** The held-out prediction of every row (each row is held out exactly once). */
  outOfFold: string[];
}

/**
 * The metric a task is judged by: macro-F1 for sentiment and topics, F1 of `flagged` for
 * toxicity.
 *
 * @example
 * ```ts
 * targetMetric("toxicity", classificationReport(["flagged"], ["flagged"], ["flagged", "not_flagged"])); // 1
 * ```
 */
export function targetMetric(task: EvalTask, report: ClassificationReport): number {
  if (task === "toxicity") {
    return report.perClass.find((c) => c.label === "flagged")?.f1 ?? 0;
  }
  return report.macroF1;
}

/** The name of {@link targetMetric} for a task, for printing. */
export function targetMetricName(task: EvalTask): string {
  return task === "toxicity" ? "f1_flagged" : "macro_f1";
}

/** mulberry32: a small seeded PRNG, so folds are the same on every run. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * Assigns each row to one of `k` folds, stratified by gold class (and by source within a
 * class), after a seeded shuffle: every fold gets about the same mix of classes.
 *
 * @example
 * ```ts
 * stratifiedFolds([{ text: "a", gold: "x" }, { text: "b", gold: "x" }], 2); // [1, 0] or [0, 1]
 * ```
 */
export function stratifiedFolds(rows: readonly EvalRow[], k: number, seed = 1): number[] {
  if (!Number.isInteger(k) || k < 2) throw new EvalError(`folds must be an integer >= 2, not ${k}`);
  if (rows.length < k) throw new EvalError(`${rows.length} rows cannot make ${k} folds`);
  const random = prng(seed);
  const groups = new Map<string, number[]>();
  rows.forEach((r, i) => {
    const key = `${r.gold}\u0000${r.source ?? ""}`;
    const list = groups.get(key) ?? [];
    list.push(i);
    groups.set(key, list);
  });
  const fold = new Array<number>(rows.length).fill(0);
  let next = 0;
  for (const key of [...groups.keys()].sort()) {
    const list = groups.get(key)!;
    for (let i = list.length - 1; i > 0; i--) {
      const j = Math.floor(random() * (i + 1));
      [list[i], list[j]] = [list[j]!, list[i]!];
    }
    // Deal the group round-robin, carrying on where the previous group stopped.
    for (const idx of list) fold[idx] = next++ % k;
  }
  return fold;
}

/**
 * Mean, sample standard deviation, min and max.
 *
 * @example
 * ```ts
 * spread([1, 2, 3]).sd; // 1
 * ```
 */
export function spread(values: readonly number[]): Spread {
  const n = values.length;
  if (n === 0) return { mean: 0, sd: 0, min: 0, max: 0 };
  const mean = values.reduce((a, b) => a + b, 0) / n;
  const variance = n > 1 ? values.reduce((a, v) => a + (v - mean) ** 2, 0) / (n - 1) : 0;
  return { mean, sd: Math.sqrt(variance), min: Math.min(...values), max: Math.max(...values) };
}

/** Options for {@link crossValidate}. */
export interface CrossValidateOptions {
  /** Number of folds, >= 2. */
  folds: number;
  /** Seed of the fold shuffle. Default 1. */
  seed?: number;
  /** Index in `candidates` of the default parameters. Default 0. */
  defaultIndex?: number;
}

/**
 * Cross-validates a grid of parameter settings. For each fold, the candidate with the best
 * target metric on the other folds is chosen (ties go to the earlier candidate, so list
 * the default first) and scored on the held-out fold; the held-out rows never influence
 * the choice that is scored on them.
 *
 * @example
 * ```ts
 * const cv = crossValidate("toxicity", rows, [
 *   { params: { threshold: 0.5 }, predicted: atHalf },
 *   { params: { threshold: 0.4 }, predicted: atFourTenths },
 * ], { folds: 5 });
 * cv.tuned.mean; cv.tuned.sd;
 * ```
 */
export function crossValidate(
  task: EvalTask,
  rows: readonly EvalRow[],
  candidates: readonly Candidate[],
  options: CrossValidateOptions,
): CrossValidation {
  if (candidates.length === 0) throw new EvalError("no candidates to cross-validate");
  for (const c of candidates) {
    if (c.predicted.length !== rows.length) {
      throw new EvalError(
        `a candidate has ${c.predicted.length} predictions for ${rows.length} rows`,
      );
    }
  }
  const k = options.folds;
  const seed = options.seed ?? 1;
  const defaultIndex = options.defaultIndex ?? 0;
  const labels = taskLabels(task);
  const fold = stratifiedFolds(rows, k, seed);
  const score = (idx: readonly number[], predicted: readonly string[]) =>
    targetMetric(
      task,
      classificationReport(idx.map((i) => rows[i]!.gold), idx.map((i) => predicted[i]!), labels),
    );
  const perFold: FoldResult[] = [];
  const outOfFold = new Array<string>(rows.length);
  for (let f = 0; f < k; f++) {
    const train: number[] = [];
    const test: number[] = [];
    fold.forEach((g, i) => (g === f ? test : train).push(i));
    let best = 0;
    let bestScore = -1;
    candidates.forEach((c, ci) => {
      const s = score(train, c.predicted);
      if (s > bestScore) {
        bestScore = s;
        best = ci;
      }
    });
    const chosen = candidates[best]!;
    for (const i of test) outOfFold[i] = chosen.predicted[i]!;
    perFold.push({
      fold: f,
      size: test.length,
      params: chosen.params,
      trainScore: bestScore,
      heldOutScore: score(test, chosen.predicted),
      defaultScore: score(test, candidates[defaultIndex]!.predicted),
    });
  }
  return {
    task,
    folds: k,
    seed,
    candidates: candidates.length,
    perFold,
    tuned: spread(perFold.map((r) => r.heldOutScore)),
    defaults: spread(perFold.map((r) => r.defaultScore)),
    outOfFold,
  };
}

/**
 * Every combination of the given parameter values, the first value of each list first
 * (so put the defaults first).
 *
 * @example
 * ```ts
 * paramGrid({ a: [1, 2], b: [0] }); // [{ a: 1, b: 0 }, { a: 2, b: 0 }]
 * ```
 */
export function paramGrid(values: Readonly<Record<string, readonly number[]>>): Params[] {
  let out: Record<string, number>[] = [{}];
  for (const [name, list] of Object.entries(values)) {
    out = list.flatMap((v) => out.map((p) => ({ ...p, [name]: v })));
  }
  return out;
}

/**
 * Renders a cross-validation as stable plain text.
 *
 * @example
 * ```ts
 * formatCrossValidation(cv);
 * ```
 */
export function formatCrossValidation(cv: CrossValidation): string {
  const f = (x: number) => x.toFixed(4);
  const metric = targetMetricName(cv.task);
  const line = (name: string, s: Spread) =>
    `${name} ${metric} mean=${f(s.mean)} sd=${f(s.sd)} min=${f(s.min)} max=${f(s.max)}`;
  const params = (p: Params) => Object.entries(p).map(([k, v]) => `${k}=${v}`).join(" ");
  return [
    `== cross-validation folds=${cv.folds} seed=${cv.seed} candidates=${cv.candidates}`,
    "(parameters chosen on the training folds only, scored on the held-out fold)",
    ...cv.perFold.map((r) =>
      `fold=${r.fold} n=${r.size} train=${f(r.trainScore)} held_out=${f(r.heldOutScore)} ` +
      `default=${f(r.defaultScore)} ${params(r.params)}`
    ),
    line("tuned_held_out", cv.tuned),
    line("default_held_out", cv.defaults),
  ].join("\n");
}

/**
 * Summarizes repeated cross-validations (the same folds count, other shuffles): one line
 * per repeat, then the mean and spread over every held-out fold of every repeat.
 *
 * @example
 * ```ts
 * formatRepeated([cvSeed1, cvSeed2, cvSeed3]);
 * ```
 */
export function formatRepeated(runs: readonly CrossValidation[]): string {
  const f = (x: number) => x.toFixed(4);
  const first = runs[0];
  if (!first) return "";
  const metric = targetMetricName(first.task);
  const tuned = spread(runs.flatMap((r) => r.perFold.map((p) => p.heldOutScore)));
  const defaults = spread(runs.flatMap((r) => r.perFold.map((p) => p.defaultScore)));
  return [
    `== repeated cross-validation repeats=${runs.length} folds=${first.folds}`,
    ...runs.map((r) =>
      `seed=${r.seed} tuned_mean=${f(r.tuned.mean)} default_mean=${f(r.defaults.mean)}`
    ),
    `all_folds_tuned_held_out ${metric} mean=${f(tuned.mean)} sd=${f(tuned.sd)} ` +
    `min=${f(tuned.min)} max=${f(tuned.max)}`,
    `all_folds_default_held_out ${metric} mean=${f(defaults.mean)} sd=${f(defaults.sd)} ` +
    `min=${f(defaults.min)} max=${f(defaults.max)}`,
  ].join("\n");
}
