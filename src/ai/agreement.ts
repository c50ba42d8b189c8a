/**
 * Agreement between two labelings of the same items (production's and a candidate's, or two
 * raters'): the share that agree, Cohen's kappa, and the confusion matrix. Live and replay
 * shadows report it per decided field.
 *
 * @module
 */

/** Agreement on one field. */
export interface FieldAgreement {
  /** Share of items where candidate and production agree. */
  agreement: number;
  /** Cohen's kappa: agreement beyond what the two label distributions give by chance. */
  kappa: number;
  /** Rows: production's label; columns: the candidate's; cells: item counts. */
  confusion: Record<string, Record<string, number>>;
}

/**
 * Cohen's kappa and the confusion matrix of two labelings.
 *
 * @example
 * ```ts
 * import { agreementOf } from "./agreement.ts";
 * const a = agreementOf(["pos", "neg", "pos"], ["pos", "neg", "neg"]);
 * console.assert(Math.abs(a.agreement - 2 / 3) < 1e-9);
 * ```
 */
export function agreementOf(a: readonly string[], b: readonly string[]): FieldAgreement {
  const n = a.length;
  const confusion: Record<string, Record<string, number>> = {};
  let same = 0;
  const pa = new Map<string, number>();
  const pb = new Map<string, number>();
  for (let i = 0; i < n; i++) {
    const x = a[i]!, y = b[i]!;
    (confusion[x] ??= {})[y] = (confusion[x]![y] ?? 0) + 1;
    if (x === y) same++;
    pa.set(x, (pa.get(x) ?? 0) + 1);
    pb.set(y, (pb.get(y) ?? 0) + 1);
  }
  if (n === 0) return { agreement: 0, kappa: 0, confusion };
  const po = same / n;
  let pe = 0;
  for (const [label, ca] of pa) pe += (ca / n) * ((pb.get(label) ?? 0) / n);
  const kappa = pe === 1 ? (po === 1 ? 1 : 0) : (po - pe) / (1 - pe);
  return { agreement: po, kappa, confusion };
}
