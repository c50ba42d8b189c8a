/**
 * Replay shadow: run a candidate (other analyzers, an LLM with another model or prompt, another
 * ruleset) against the feedback pipeline's stored history and report what it would have
 * decided, before it decides anything. Reads the FEEDBACK stream's `feedback.dispatched`
 * events (each carries the text and production's sentiment, topics and team); never
 * publishes and never changes an item (run it with the ops identity, which may not).
 *
 * The comparison is pure ({@link shadowReport}); {@link runShadow} does the reading.
 *
 * @module
 */
import { jetstream } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/nats-core";
import type { FeedbackAnalyzers } from "./analyzers.ts";
import type { LlmStatsSnapshot } from "../../src/ai/llm/stats.ts";
import { FEEDBACK_STREAM } from "./subjects.ts";
import { readStream } from "../../src/stream_reader.ts";
import { sampled } from "../../src/shadow/spec.ts";
import { LlmError, LlmErrorCode } from "../../src/ai/llm/errors.ts";
import { errorCode } from "../../src/errors.ts";
import { topicEvalClass } from "../../src/ai/evaluation.ts";
import { agreementOf, type FieldAgreement } from "../../src/ai/agreement.ts";

/** One item's production decisions, from its `feedback.dispatched` event. */
export interface ProductionDecision {
  item: string;
  time: string;
  text: string;
  sentiment: string;
  topics: string[];
  team: string;
}

/** What the candidate decided for the same item, and how long it took. */
export interface CandidateDecision {
  sentiment: string;
  topics: string[];
  team: string;
  ms: number;
}

/**
 * What the candidate made of the items it was given: the items it decided with its decisions
 * (in the same order), and how many it failed on.
 */
export interface CandidateRun {
  /** The items decided. */
  items: ProductionDecision[];
  /** The candidate's decisions, one per item of `items`. */
  decided: CandidateDecision[];
  /** Items an analyzer failed on (an LLM unreachable, timed out, answering nonsense). */
  failed: number;
  /** Items refused because the candidate's LLM budget was spent. */
  overBudget: number;
  /** The first failure, `code: message`. */
  firstFailure?: string;
}

/** The report of a shadow run. */
export interface ShadowReport {
  candidate: string;
  /** Items compared: those the candidate decided. */
  items: number;
  /** Items the candidate failed on, not compared (as a live shadow counts `failed`). */
  failed: number;
  /** Items not decided because the candidate's LLM budget was spent (`over_budget`). */
  overBudget: number;
  /** The first failure, `code: message`. */
  firstFailure?: string;
  fields: { sentiment: FieldAgreement; topic: FieldAgreement; team: FieldAgreement };
  /** Items the candidate would route to another team. */
  routingChanges: {
    count: number;
    examples: { item: string; text: string; from: string; to: string }[];
  };
  /** The candidate's speed. */
  candidateMs: { p50: number; p99: number; itemsPerSecond: number };
  /** LLM tokens and cost, when the candidate calls one. */
  llm?: Pick<LlmStatsSnapshot, "calls" | "total_tokens" | "cost_usd">;
  /**
   * With labelled rows: each side's accuracy on the items they cover (matched by text); null
   * when no item replayed is in the labels, rather than an accuracy of 0 on nothing.
   */
  labelled?: {
    task: "sentiment" | "topics";
    items: number;
    productionAccuracy: number | null;
    candidateAccuracy: number | null;
  };
}

const quantile = (xs: number[], q: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? 0 : s[Math.min(s.length - 1, Math.floor(s.length * q))]!;
};

/** Compares production with the candidate, item by item. */
export function shadowReport(
  candidate: string,
  production: readonly ProductionDecision[],
  decided: readonly CandidateDecision[],
  opts: {
    wallMs?: number;
    /** What the candidate failed on (from {@link decideAll}); none by default. */
    failures?: Pick<CandidateRun, "failed" | "overBudget" | "firstFailure">;
    llm?: ShadowReport["llm"];
    labels?: { task: "sentiment" | "topics"; byText: Map<string, string> };
    maxExamples?: number;
  } = {},
): ShadowReport {
  const changes = production.flatMap((p, i) =>
    p.team !== decided[i]!.team
      ? [{ item: p.item, text: p.text.slice(0, 200), from: p.team, to: decided[i]!.team }]
      : []
  );
  const ms = decided.map((d) => d.ms);
  const report: ShadowReport = {
    candidate,
    items: production.length,
    failed: opts.failures?.failed ?? 0,
    overBudget: opts.failures?.overBudget ?? 0,
    ...(opts.failures?.firstFailure ? { firstFailure: opts.failures.firstFailure } : {}),
    fields: {
      sentiment: agreementOf(production.map((p) => p.sentiment), decided.map((d) => d.sentiment)),
      topic: agreementOf(
        production.map((p) => p.topics[0] ?? "none"),
        decided.map((d) => d.topics[0] ?? "none"),
      ),
      team: agreementOf(production.map((p) => p.team), decided.map((d) => d.team)),
    },
    routingChanges: { count: changes.length, examples: changes.slice(0, opts.maxExamples ?? 10) },
    candidateMs: {
      p50: quantile(ms, 0.5),
      p99: quantile(ms, 0.99),
      itemsPerSecond: opts.wallMs && opts.wallMs > 0 ? production.length / (opts.wallMs / 1000) : 0,
    },
  };
  if (opts.llm) report.llm = opts.llm;
  if (opts.labels) {
    const { task, byText } = opts.labels;
    let n = 0, prod = 0, cand = 0;
    production.forEach((p, i) => {
      const want = byText.get(p.text);
      if (want === undefined) return;
      n++;
      // Topics are scored by their evaluation class, as `deno task eval` does.
      const pick = (s: string, t: string[]) => (task === "sentiment" ? s : topicEvalClass(t));
      if (pick(p.sentiment, p.topics) === want) prod++;
      if (pick(decided[i]!.sentiment, decided[i]!.topics) === want) cand++;
    });
    report.labelled = {
      task,
      items: n,
      productionAccuracy: n ? prod / n : null,
      candidateAccuracy: n ? cand / n : null,
    };
  }
  return report;
}

/**
 * Production's decisions from the FEEDBACK stream, oldest first: by time range, count, sample.
 * Read with {@link readStream}, whose consumer is deleted when the read ends, early or not (a
 * stopped one stays on the server for minutes).
 */
export async function readProduction(
  nc: NatsConnection,
  opts: { since?: Date; until?: Date; count?: number; sample?: number } = {},
): Promise<ProductionDecision[]> {
  const js = jetstream(nc);
  const out: ProductionDecision[] = [];
  for await (
    const m of readStream(js, FEEDBACK_STREAM, {
      filter: "feedback.dispatched.*",
      ...(opts.since ? { startTime: opts.since } : {}),
    })
  ) {
    // What the stream holds on the subject, not only what dispatch published: anything else
    // (junk a key holder stored there) is no decision to compare, and is passed over.
    let e: {
      item_id: string;
      time: string;
      data: {
        text: string;
        sentiment: { label: string };
        topics: { topics: string[] };
        routing: { team: string };
      };
    };
    try {
      e = m.json();
      if (
        typeof e.item_id !== "string" || typeof e.time !== "string" ||
        typeof e.data?.text !== "string" || typeof e.data.sentiment?.label !== "string" ||
        !Array.isArray(e.data.topics?.topics) || typeof e.data.routing?.team !== "string"
      ) continue;
    } catch {
      continue;
    }
    if (opts.until && Date.parse(e.time) > opts.until.getTime()) break;
    // By item id, as live shadows and a definition's replay sample: the same items each time.
    if (opts.sample === undefined || sampled(e.item_id, opts.sample)) {
      out.push({
        item: e.item_id,
        time: e.time,
        text: e.data.text,
        sentiment: e.data.sentiment.label,
        topics: e.data.topics.topics,
        team: e.data.routing.team,
      });
    }
    if (opts.count !== undefined && out.length >= opts.count) break;
  }
  return out;
}

/**
 * Runs the candidate on each item's text, as production's stages would. An item the candidate
 * fails on (build it without a fallback: its failure must not pass for a decision) is counted,
 * not compared, and the run goes on, as a live shadow's does.
 */
export async function decideAll(
  candidate: FeedbackAnalyzers,
  items: readonly ProductionDecision[],
): Promise<CandidateRun> {
  const run: CandidateRun = { items: [], decided: [], failed: 0, overBudget: 0 };
  for (const p of items) {
    const at = performance.now();
    try {
      const sentiment = await candidate.sentiment.analyze(p.text);
      const topics = await candidate.topics.analyze(p.text);
      const team = candidate.route(sentiment.label, topics.topics).team;
      run.items.push(p);
      run.decided.push({
        sentiment: sentiment.label,
        topics: topics.topics,
        team,
        ms: performance.now() - at,
      });
    } catch (err) {
      const code = err instanceof LlmError ? err.code : errorCode(err);
      if (code === LlmErrorCode.OverBudget) run.overBudget++;
      else run.failed++;
      run.firstFailure ??= `${code}: ${err instanceof Error ? err.message : String(err)}`;
    }
  }
  return run;
}

const pct = (x: number) => `${(x * 100).toFixed(1)}%`;

/** The report as text, for the terminal. */
export function formatShadowReport(r: ShadowReport): string {
  const lines = [
    `== shadow: ${r.candidate} on ${r.items} items`,
    ...(r.failed + r.overBudget > 0
      ? [
        `candidate failed on ${r.failed + r.overBudget} of ${
          r.items + r.failed + r.overBudget
        } items, not compared${r.overBudget ? ` (${r.overBudget} over budget)` : ""}${
          r.firstFailure ? `; first: ${r.firstFailure}` : ""
        }`,
      ]
      : []),
    ...(["sentiment", "topic", "team"] as const).map((f) =>
      `${f.padEnd(10)} agreement ${pct(r.fields[f].agreement)}  kappa ${
        r.fields[f].kappa.toFixed(3)
      }`
    ),
    "",
    "sentiment confusion (rows: production, columns: candidate)",
  ];
  const conf = r.fields.sentiment.confusion;
  const cols = [...new Set(Object.values(conf).flatMap((row) => Object.keys(row)))].sort();
  lines.push(["".padEnd(10), ...cols.map((c) => c.padStart(10))].join(""));
  for (const row of Object.keys(conf).sort()) {
    lines.push(
      [row.padEnd(10), ...cols.map((c) => String(conf[row]![c] ?? 0).padStart(10))].join(""),
    );
  }
  lines.push(
    "",
    `routing changes: ${r.routingChanges.count} of ${r.items}`,
    ...r.routingChanges.examples.map((e) => `  ${e.item}: ${e.from} -> ${e.to}  "${e.text}"`),
    "",
    `candidate: p50 ${r.candidateMs.p50.toFixed(2)} ms, p99 ${r.candidateMs.p99.toFixed(2)} ms, ${
      Math.round(r.candidateMs.itemsPerSecond)
    } items/s`,
  );
  if (r.llm) {
    lines.push(
      `llm: ${r.llm.calls} calls, ${r.llm.total_tokens} tokens, $${r.llm.cost_usd.toFixed(4)}`,
    );
  }
  const l = r.labelled;
  if (l && l.productionAccuracy !== null && l.candidateAccuracy !== null) {
    lines.push(
      `labelled (${l.task}, ${l.items} items): production ${pct(l.productionAccuracy)}, ` +
        `candidate ${pct(l.candidateAccuracy)}`,
    );
  } else if (l) {
    lines.push(
      `labelled (${l.task}): none of the ${r.items} items replayed is in the labels file ` +
        "(a row labels the item whose text it holds, exactly): no accuracy to report",
    );
  }
  return lines.join("\n");
}

const escape = (s: string) =>
  s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]!);

/** The report as a standalone HTML page. */
export function shadowReportHtml(r: ShadowReport): string {
  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Weft shadow: ${
    escape(r.candidate)
  }</title><style>body{font:14px system-ui;margin:2rem;max-width:60rem}td,th{padding:.2rem .6rem;border-bottom:1px solid #ddd;text-align:right}td:first-child,th:first-child{text-align:left}</style></head><body>
<h1>Shadow run: ${escape(r.candidate)}</h1><p>${r.items} items${
    r.failed + r.overBudget > 0 ? `; the candidate failed on ${r.failed + r.overBudget} more` : ""
  }</p>
<h2>Agreement with production</h2><table><tr><th>field</th><th>agreement</th><th>kappa</th></tr>${
    (["sentiment", "topic", "team"] as const).map((f) =>
      `<tr><td>${f}</td><td>${pct(r.fields[f].agreement)}</td><td>${
        r.fields[f].kappa.toFixed(3)
      }</td></tr>`
    ).join("")
  }</table>
<h2>Routing changes: ${r.routingChanges.count}</h2><table><tr><th>item</th><th>from</th><th>to</th><th>text</th></tr>${
    r.routingChanges.examples.map((e) =>
      `<tr><td>${escape(e.item)}</td><td>${escape(e.from)}</td><td>${escape(e.to)}</td><td>${
        escape(e.text)
      }</td></tr>`
    ).join("")
  }</table>
<pre>${escape(formatShadowReport(r))}</pre></body></html>
`;
}
