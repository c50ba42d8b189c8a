/**
 * Classification metrics for evaluating analyzers: accuracy, per-class precision, recall
 * and F1, macro-F1 and a confusion matrix. Pure functions, no I/O.
 *
 * @module
 */

/** Precision, recall and F1 of one class, with its gold count (support). */
export interface ClassScores {
  /** The class label. */
  label: string;
  /** Of the items predicted as this class, the share that are. */
  precision: number;
  /** Of the items of this class, the share predicted as it. */
  recall: number;
  /** Harmonic mean of precision and recall (0 when both are 0). */
  f1: number;
  /** How many gold items have this class. */
  support: number;
}

/** A full report over one list of gold and predicted labels. */
export interface ClassificationReport {
  /** The classes, in report order. */
  labels: string[];
  /** How many items were scored. */
  total: number;
  /** Share of items whose prediction equals the gold label. */
  accuracy: number;
  /** Scores per class, in the order of `labels`. */
  perClass: ClassScores[];
  /**
   * Unweighted mean of the per-class F1 over the classes that occur in gold (classes with
   * no gold item are listed but not averaged, as when one source has no neutral rows).
   */
  macroF1: number;
  /** `confusion[g][p]`: how many items of gold class `labels[g]` were predicted `labels[p]`. */
  confusion: number[][];
}

/** Raised when gold and predicted lists cannot be compared. */
export class MetricsError extends Error {
  /** Always `"MetricsError"`. */
  override name = "MetricsError";
  /** Creates the error; pass `{ cause }` to keep the underlying error. */
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

/** Divides, answering 0 when the denominator is 0. */
function ratio(numerator: number, denominator: number): number {
  return denominator === 0 ? 0 : numerator / denominator;
}

/**
 * Computes accuracy, per-class precision/recall/F1, macro-F1 and the confusion matrix.
 * Classes are `labels` when given, else every label seen in gold then predictions, sorted.
 *
 * @example
 * ```ts
 * const report = classificationReport(["a", "b", "b"], ["a", "b", "a"]);
 * report.accuracy; // 0.666...
 * report.macroF1; // 0.666...
 * ```
 */
export function classificationReport(
  gold: readonly string[],
  predicted: readonly string[],
  labels?: readonly string[],
): ClassificationReport {
  if (gold.length !== predicted.length) {
    throw new MetricsError(
      `gold has ${gold.length} items but predicted has ${predicted.length}`,
    );
  }
  const classes = labels ? [...labels] : [...new Set([...gold, ...predicted])].sort();
  const index = new Map(classes.map((label, i) => [label, i]));
  const confusion = classes.map(() => classes.map(() => 0));
  let correct = 0;
  for (let i = 0; i < gold.length; i++) {
    const g = index.get(gold[i]!);
    const p = index.get(predicted[i]!);
    if (g === undefined || p === undefined) {
      throw new MetricsError(`label outside the classes: ${gold[i]} / ${predicted[i]}`);
    }
    confusion[g]![p]! += 1;
    if (g === p) correct++;
  }
  const perClass = classes.map((label, c): ClassScores => {
    const tp = confusion[c]![c]!;
    const support = confusion[c]!.reduce((a, b) => a + b, 0);
    const predictedCount = confusion.reduce((a, row) => a + row[c]!, 0);
    const precision = ratio(tp, predictedCount);
    const recall = ratio(tp, support);
    return {
      label,
      precision,
      recall,
      f1: ratio(2 * precision * recall, precision + recall),
      support,
    };
  });
  return {
    labels: classes,
    total: gold.length,
    accuracy: ratio(correct, gold.length),
    perClass,
    macroF1: ratio(
      perClass.reduce((a, s) => a + (s.support > 0 ? s.f1 : 0), 0),
      perClass.filter((s) => s.support > 0).length,
    ),
    confusion,
  };
}

/**
 * Renders a report as stable plain text: one header line, one line per class, then the
 * confusion matrix (rows gold, columns predicted).
 *
 * @example
 * ```ts
 * formatReport(classificationReport(["a"], ["a"]));
 * // "n=1 accuracy=1.0000 macro_f1=1.0000\n..."
 * ```
 */
export function formatReport(report: ClassificationReport): string {
  const f = (x: number) => x.toFixed(4);
  const width = Math.max(10, ...report.labels.map((l) => l.length));
  const lines = [
    `n=${report.total} accuracy=${f(report.accuracy)} macro_f1=${f(report.macroF1)}`,
    `${"class".padEnd(width)} precision recall    f1        support`,
  ];
  const absent = report.perClass.filter((s) => s.support === 0).map((s) => s.label);
  if (absent.length > 0) {
    lines.push(`(macro_f1 leaves out classes absent from gold: ${absent.join(", ")})`);
  }
  for (const s of report.perClass) {
    lines.push(
      `${s.label.padEnd(width)} ${f(s.precision).padEnd(9)} ${f(s.recall).padEnd(9)} ` +
        `${f(s.f1).padEnd(9)} ${s.support}`,
    );
  }
  lines.push(`confusion (rows=gold, cols=predicted)`);
  lines.push(`${"".padEnd(width)} ${report.labels.map((l) => l.padStart(width)).join(" ")}`);
  report.labels.forEach((label, g) => {
    lines.push(
      `${label.padEnd(width)} ${
        report.confusion[g]!.map((n) => String(n).padStart(width)).join(" ")
      }`,
    );
  });
  return lines.join("\n");
}
