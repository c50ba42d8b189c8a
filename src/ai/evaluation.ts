/**
 * Evaluation of the embedded analyzers on labelled JSONL rows: detects the task from the
 * rows, runs the matching analyzer, and reports metrics overall and per `source`. Pure
 * apart from the analyzers it is given; the CLI in src/ai/eval.ts does the I/O.
 *
 * @module
 */

import {
  type ClassificationReport,
  classificationReport,
  formatReport,
} from "./classification_metrics.ts";

/**
 * The evaluation tasks, detected from the rows' label field.
 *
 * @example
 * ```ts
 * EvalTask.topics; // "topics"
 * ```
 */
export const EvalTask = {
  sentiment: "sentiment",
  topics: "topics",
  toxicity: "toxicity",
} as const;
/** One evaluation task. */
export type EvalTask = typeof EvalTask[keyof typeof EvalTask];

/** One labelled row after parsing. */
export interface EvalRow {
  /** The text to analyze. */
  text: string;
  /** The gold class as a string (for toxicity `"flagged"` or `"not_flagged"`). */
  gold: string;
  /** Where the row came from, when the row says. */
  source?: string;
}

/** Raised when rows cannot be evaluated. */
export class EvalError extends Error {
  /** Always `"EvalError"`. */
  override name = "EvalError";
  /** Creates the error; pass `{ cause }` to keep the underlying error. */
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

/**
 * Classes the topics set is scored on; every other topic counts as `other`.
 *
 * @example
 * ```ts
 * TOPIC_EVAL_CLASSES.includes("other"); // true
 * ```
 */
export const TOPIC_EVAL_CLASSES = ["technical_issue", "feature_request", "other"] as const;

function isRecord(x: unknown): x is Record<string, unknown> {
  return typeof x === "object" && x !== null && !Array.isArray(x);
}

/**
 * Tells which task a parsed row belongs to: a string `sentiment`, an array `topics`, or a
 * boolean `flagged`.
 *
 * @example
 * ```ts
 * detectTask({ text: "hi", flagged: false }); // "toxicity"
 * ```
 */
export function detectTask(row: unknown): EvalTask {
  if (!isRecord(row) || typeof row.text !== "string") {
    throw new EvalError("row has no text field");
  }
  if (typeof row.sentiment === "string") return EvalTask.sentiment;
  if (Array.isArray(row.topics)) return EvalTask.topics;
  if (typeof row.flagged === "boolean") return EvalTask.toxicity;
  throw new EvalError("row has none of sentiment (string), topics (array), flagged (boolean)");
}

/**
 * Maps a topic list (gold or predicted, most relevant first) to one scoring class:
 * the first of technical_issue / feature_request present, else `other`.
 *
 * @example
 * ```ts
 * topicEvalClass(["praise", "feature_request"]); // "feature_request"
 * topicEvalClass(["billing"]); // "other"
 * ```
 */
export function topicEvalClass(topics: readonly string[]): string {
  for (const t of topics) if (t === "technical_issue" || t === "feature_request") return t;
  return "other";
}

/**
 * Parses JSONL text into a task and rows. Every row must belong to the same task.
 *
 * @example
 * ```ts
 * parseRows('{"text":"ok","sentiment":"neutral","source":"a"}\n').task; // "sentiment"
 * ```
 */
export function parseRows(jsonl: string): { task: EvalTask; rows: EvalRow[] } {
  let task: EvalTask | undefined;
  const rows: EvalRow[] = [];
  const lines = jsonl.split("\n");
  for (const [i, line] of lines.entries()) {
    if (line.trim() === "") continue;
    let parsed: unknown;
    try {
      parsed = JSON.parse(line);
    } catch (cause) {
      throw new EvalError(`line ${i + 1} is not JSON`, { cause });
    }
    const rowTask = detectTask(parsed);
    task ??= rowTask;
    if (rowTask !== task) throw new EvalError(`line ${i + 1} is a ${rowTask} row in a ${task} set`);
    const r = parsed as Record<string, unknown>;
    const gold = task === EvalTask.sentiment
      ? String(r.sentiment)
      : task === EvalTask.topics
      ? topicEvalClass((r.topics as unknown[]).map(String))
      : r.flagged
      ? "flagged"
      : "not_flagged";
    rows.push({
      text: r.text as string,
      gold,
      ...(typeof r.source === "string" ? { source: r.source } : {}),
    });
  }
  if (!task) throw new EvalError("no rows");
  return { task, rows };
}

/**
 * The classes reported for a task, in report order.
 *
 * @example
 * ```ts
 * taskLabels("toxicity"); // ["flagged", "not_flagged"]
 * ```
 */
export function taskLabels(task: EvalTask): string[] {
  switch (task) {
    case EvalTask.sentiment:
      return ["positive", "negative", "neutral"];
    case EvalTask.topics:
      return [...TOPIC_EVAL_CLASSES];
    case EvalTask.toxicity:
      return ["flagged", "not_flagged"];
  }
}

/** Reports overall and per source. */
export interface EvalResult {
  /** The task evaluated. */
  task: EvalTask;
  /** Report over all rows. */
  overall: ClassificationReport;
  /** Reports per `source`, sorted by source name (empty when rows have no source). */
  bySource: Array<{ source: string; report: ClassificationReport }>;
}

/**
 * Scores predictions against rows, overall and per source.
 *
 * @example
 * ```ts
 * const rows = [{ text: "x", gold: "positive", source: "a" }];
 * evaluate("sentiment", rows, ["positive"]).overall.accuracy; // 1
 * ```
 */
export function evaluate(
  task: EvalTask,
  rows: readonly EvalRow[],
  predicted: readonly string[],
): EvalResult {
  const labels = taskLabels(task);
  const overall = classificationReport(rows.map((r) => r.gold), predicted, labels);
  const sources = [...new Set(rows.flatMap((r) => (r.source ? [r.source] : [])))].sort();
  const bySource = sources.map((source) => {
    const idx = rows.flatMap((r, i) => (r.source === source ? [i] : []));
    return {
      source,
      report: classificationReport(
        idx.map((i) => rows[i]!.gold),
        idx.map((i) => predicted[i]!),
        labels,
      ),
    };
  });
  return { task, overall, bySource };
}

/**
 * Renders an evaluation as stable plain text: a `task=... analyzer=...` line, then an
 * `== overall` block and one `== source=NAME` block per source.
 *
 * @example
 * ```ts
 * formatEvaluation(evaluate("toxicity", rows, predicted), "embedded:toxicity");
 * ```
 */
export function formatEvaluation(result: EvalResult, analyzerName: string): string {
  const parts = [
    `task=${result.task} analyzer=${analyzerName}`,
    "",
    "== overall",
    formatReport(result.overall),
  ];
  for (const { source, report } of result.bySource) {
    parts.push("", `== source=${source}`, formatReport(report));
  }
  return parts.join("\n");
}
