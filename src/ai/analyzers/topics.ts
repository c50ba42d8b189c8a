/**
 * Embedded topic analyzer: multi-label scoring over a data-driven taxonomy
 * (rules/topics.taxonomy.json) of weighted keywords, phrases and regular expressions, with
 * negation ("no crashes") and a fallback label when nothing applies.
 *
 * @module
 */

import defaultTaxonomyJson from "../../../rules/topics.taxonomy.json" with { type: "json" };
import type { TopicsResult } from "../analysis.ts";
import { contrastWeights, isNegator, normalize, type Token, tokenize } from "./text.ts";

/** One weighted regular expression of a taxonomy label. */
export interface TaxonomyPattern {
  /** JavaScript regular expression source, matched against the lower-cased text. */
  pattern: string;
  /** Score added when it matches. */
  weight: number;
}

/** One label of a topic taxonomy. */
export interface TaxonomyLabel {
  /** The topic name reported, e.g. `"technical_issue"`. */
  label: string;
  /** Human description. */
  description?: string;
  /** Score at which the label applies; default the taxonomy's `defaultThreshold`. */
  threshold?: number;
  /** Whether a negator just before a keyword or phrase cancels it. Default true. */
  negatable?: boolean;
  /**
   * Whether the label is a request, so that modal and desire words ("would", "could",
   * "should", "need", "want") count only where they ask for something: not where the writer
   * speaks of themself ("I would recommend it", "I should be walking more"; "I would like"
   * still asks) nor in a free relative naming what the product already gives ("everything I
   * need", "anything you could want"). Default false.
   */
  request?: boolean;
  /** Labels that also apply whenever this one does. */
  implies?: string[];
  /** Single words to weights; a trailing `*` matches any ending. */
  keywords?: Record<string, number>;
  /** Word sequences to weights. */
  phrases?: Record<string, number>;
  /** Regular expressions with weights. */
  patterns?: TaxonomyPattern[];
  /**
   * Words that count only when they open a sentence (after an optional "please"), to weights:
   * the imperative mood, as in "Make the font bigger." or "Please bring back the old menu".
   */
  imperatives?: Record<string, number>;
}

/** A topic taxonomy: data, normally read from rules/topics.taxonomy.json. */
export interface Taxonomy {
  /** Label reported when no label reaches its threshold. */
  fallback: string;
  /** Threshold of labels that set none. Default 1. */
  defaultThreshold?: number;
  /** The labels, in tie-breaking order. */
  labels: TaxonomyLabel[];
}

/** Raised when a taxonomy is malformed. */
export class TaxonomyError extends Error {
  /** Always `"TaxonomyError"`. */
  override name = "TaxonomyError";
  /** Creates the error; pass `{ cause }` to keep the underlying error. */
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

/** Options for {@link topicsAnalyzer}. */
export interface TopicsOptions {
  /** Taxonomy to use; default rules/topics.taxonomy.json. */
  taxonomy?: Taxonomy;
  /** Name recorded on results. Default `"embedded:topics"`. */
  name?: string;
  /** Per-label score thresholds that override the taxonomy's, e.g. `{ feature_request: 1.5 }`. */
  thresholds?: Readonly<Record<string, number>>;
}

/** An embedded, synchronous topic analyzer. */
export interface EmbeddedTopicsAnalyzer {
  /** Stable name recorded on events. */
  readonly name: string;
  /** The labels this analyzer can report, fallback included. */
  readonly labels: readonly string[];
  /** The score threshold of each taxonomy label, overrides applied. */
  readonly thresholds: Readonly<Record<string, number>>;
  /** Analyzes one text. */
  analyze(text: string): TopicsResult;
}

interface Hit {
  label: number;
  weight: number;
  evidence: string;
}

interface PhraseHit extends Hit {
  words: string[];
}

interface Compiled {
  names: string[];
  thresholds: number[];
  negatable: boolean[];
  request: boolean[];
  implies: number[][];
  exact: Map<string, Hit[]>;
  prefixes: Array<Hit & { prefix: string }>;
  phrases: Map<string, PhraseHit[]>;
  patterns: Array<Hit & { re: RegExp }>;
  imperatives: Map<string, Hit[]>;
  fallback: string;
}

function isRecord(x: unknown): x is Record<string, unknown> {
  return typeof x === "object" && x !== null && !Array.isArray(x);
}

/**
 * Checks that parsed JSON is a usable taxonomy and returns it typed.
 *
 * @example
 * ```ts
 * const taxonomy = parseTaxonomy(JSON.parse(await Deno.readTextFile("rules/topics.taxonomy.json")));
 * ```
 */
export function parseTaxonomy(json: unknown): Taxonomy {
  if (!isRecord(json)) throw new TaxonomyError("taxonomy must be an object");
  if (typeof json.fallback !== "string" || json.fallback === "") {
    throw new TaxonomyError("taxonomy.fallback must be a non-empty string");
  }
  if (!Array.isArray(json.labels) || json.labels.length === 0) {
    throw new TaxonomyError("taxonomy.labels must be a non-empty array");
  }
  const seen = new Set<string>();
  for (const [i, l] of json.labels.entries()) {
    if (!isRecord(l) || typeof l.label !== "string" || l.label === "") {
      throw new TaxonomyError(`taxonomy.labels[${i}].label must be a non-empty string`);
    }
    if (seen.has(l.label)) throw new TaxonomyError(`duplicate label ${l.label}`);
    seen.add(l.label);
    for (const key of ["negatable", "request"] as const) {
      if (l[key] !== undefined && typeof l[key] !== "boolean") {
        throw new TaxonomyError(`${l.label}.${key} must be a boolean`);
      }
    }
    for (const key of ["keywords", "phrases", "imperatives"] as const) {
      const table = l[key];
      if (table === undefined) continue;
      if (!isRecord(table) || Object.values(table).some((w) => typeof w !== "number")) {
        throw new TaxonomyError(`${l.label}.${key} must map strings to numbers`);
      }
    }
    if (l.patterns !== undefined) {
      if (!Array.isArray(l.patterns)) {
        throw new TaxonomyError(`${l.label}.patterns must be an array`);
      }
      for (const p of l.patterns) {
        if (!isRecord(p) || typeof p.pattern !== "string" || typeof p.weight !== "number") {
          throw new TaxonomyError(`${l.label}.patterns entries need pattern and weight`);
        }
        try {
          new RegExp(p.pattern);
        } catch (cause) {
          throw new TaxonomyError(`${l.label}: bad pattern ${p.pattern}`, { cause });
        }
      }
    }
  }
  for (const l of json.labels as TaxonomyLabel[]) {
    for (const implied of l.implies ?? []) {
      if (!seen.has(implied)) throw new TaxonomyError(`${l.label} implies unknown ${implied}`);
    }
  }
  return json as unknown as Taxonomy;
}

function compile(taxonomy: Taxonomy): Compiled {
  const names = taxonomy.labels.map((l) => l.label);
  const index = new Map(names.map((n, i) => [n, i]));
  const c: Compiled = {
    names,
    thresholds: taxonomy.labels.map((l) => l.threshold ?? taxonomy.defaultThreshold ?? 1),
    negatable: taxonomy.labels.map((l) => l.negatable ?? true),
    request: taxonomy.labels.map((l) => l.request ?? false),
    implies: taxonomy.labels.map((l) => (l.implies ?? []).map((n) => index.get(n)!)),
    exact: new Map(),
    prefixes: [],
    phrases: new Map(),
    patterns: [],
    imperatives: new Map(),
    fallback: taxonomy.fallback,
  };
  taxonomy.labels.forEach((l, label) => {
    for (const [key, weight] of Object.entries(l.keywords ?? {})) {
      const k = key.toLowerCase();
      if (k.endsWith("*")) c.prefixes.push({ prefix: k.slice(0, -1), label, weight, evidence: "" });
      else {
        const list = c.exact.get(k) ?? [];
        list.push({ label, weight, evidence: k });
        c.exact.set(k, list);
      }
    }
    for (const [phrase, weight] of Object.entries(l.phrases ?? {})) {
      const words = tokenize(phrase).map((t) => t.word);
      if (words.length === 0) continue;
      if (words.length === 1) {
        const list = c.exact.get(words[0]!) ?? [];
        list.push({ label, weight, evidence: words[0]! });
        c.exact.set(words[0]!, list);
        continue;
      }
      const list = c.phrases.get(words[0]!) ?? [];
      list.push({ label, weight, evidence: words.join(" "), words });
      c.phrases.set(words[0]!, list);
    }
    for (const [word, weight] of Object.entries(l.imperatives ?? {})) {
      const k = word.toLowerCase();
      const list = c.imperatives.get(k) ?? [];
      list.push({ label, weight, evidence: `${k} (imperative)` });
      c.imperatives.set(k, list);
    }
    for (const p of l.patterns ?? []) {
      c.patterns.push({ label, weight: p.weight, evidence: "", re: new RegExp(p.pattern, "i") });
    }
  });
  return c;
}

const WORD_CACHE_LIMIT = 50_000;

/** Words that may come before an imperative verb at the start of a sentence. */
const IMPERATIVE_OPENERS: ReadonlySet<string> = new Set(["please", "pls", "plz", "kindly", "just"]);

/** Modals that, after "I", speak of the writer ("I would say", "I should be moving"). */
const SELF_MODALS: ReadonlySet<string> = new Set(["would", "should", "could"]);
/** Words of wanting, which a free relative turns into a description ("everything I need"). */
const DESIRES: ReadonlySet<string> = new Set(["need", "needs", "want", "wants", "would", "could"]);
/** Verbs after "I would" that still ask for something ("I would like", "I would love"). */
const WISH_VERBS: ReadonlySet<string> = new Set([
  "like",
  "love",
  "prefer",
  "appreciate",
  "want",
  "suggest",
]);
/** Words that open a free relative: "what I need", "everything you could want". */
const FREE_RELATIVES: ReadonlySet<string> = new Set([
  "what",
  "whatever",
  "anything",
  "everything",
  "something",
  "all",
]);
const SUBJECTS: ReadonlySet<string> = new Set(["i", "you", "we", "they", "one"]);

let defaultCompiled: Compiled | undefined;

/**
 * Creates an embedded topic analyzer over a taxonomy (default: rules/topics.taxonomy.json).
 * Topics come most relevant (highest score) first; the fallback label when none applies.
 *
 * @example
 * ```ts
 * const topics = topicsAnalyzer();
 * topics.analyze("The app crashes every time I open it").topics; // ["technical_issue"]
 * ```
 */
export function topicsAnalyzer(options: TopicsOptions = {}): EmbeddedTopicsAnalyzer {
  const c = options.taxonomy
    ? compile(parseTaxonomy(options.taxonomy))
    : (defaultCompiled ??= compile(parseTaxonomy(defaultTaxonomyJson)));
  const name = options.name ?? "embedded:topics";
  const thresholds = c.names.map((n, i) => options.thresholds?.[n] ?? c.thresholds[i]!);
  const wordCache = new Map<string, Hit[]>();
  const labels = c.names.includes(c.fallback) ? [...c.names] : [...c.names, c.fallback];

  function wordHits(word: string): Hit[] {
    let hits = wordCache.get(word);
    if (hits) return hits;
    hits = [...(c.exact.get(word) ?? [])];
    for (const p of c.prefixes) {
      if (word.startsWith(p.prefix)) {
        hits.push({ label: p.label, weight: p.weight, evidence: word });
      }
    }
    if (wordCache.size < WORD_CACHE_LIMIT) wordCache.set(word, hits);
    return hits;
  }

  /** Whether the modal or desire word at `i` does not ask for anything (see `request`). */
  function notARequest(tokens: Token[], i: number): boolean {
    const w = tokens[i]!.word;
    if (!SELF_MODALS.has(w) && !DESIRES.has(w)) return false;
    // "I would recommend", "I should be moving": the writer about themself, not a request;
    // "I would like", "I would love" stay requests.
    if (SELF_MODALS.has(w) && i > 0 && !tokens[i]!.clauseStart && tokens[i - 1]!.word === "i") {
      const next = tokens[i + 1];
      if (!next || next.clauseStart || !WISH_VERBS.has(next.word)) return true;
    }
    // "everything I need", "anything you could want": a free relative names what the app has.
    for (let d = 1; d <= 4; d++) {
      const j = i - d;
      if (j < 0 || tokens[j + 1]!.clauseStart) break;
      if (FREE_RELATIVES.has(tokens[j]!.word)) {
        return d >= 2 && SUBJECTS.has(tokens[j + 1]!.word);
      }
    }
    return false;
  }

  function negatedAt(tokens: Token[], i: number): boolean {
    for (let d = 1; d <= 2; d++) {
      const j = i - d;
      if (j < 0 || tokens[j + 1]!.clauseStart) return false;
      if (isNegator(tokens[j]!.word)) return true;
    }
    return false;
  }

  return {
    name,
    labels,
    thresholds: Object.fromEntries(c.names.map((n, i) => [n, thresholds[i]!])),
    analyze(text: string): TopicsResult {
      const tokens = tokenize(text);
      const n = c.names.length;
      const scores = new Array<number>(n).fill(0);
      const evidence: Array<string[] | undefined> = new Array(n);
      // Evidence weighs less before a "but" or inside an "although" clause, more after "but".
      const contrast = contrastWeights(tokens);
      const add = (hit: Hit, found: string, at = -1) => {
        const list = evidence[hit.label] ??= [];
        if (list.includes(found)) return;
        list.push(found);
        scores[hit.label]! += hit.weight * (contrast && at >= 0 ? contrast[at]! : 1);
      };
      for (let i = 0; i < tokens.length; i++) {
        const word = tokens[i]!.word;
        let negated: boolean | undefined;
        const phrases = c.phrases.get(word);
        if (phrases) {
          for (const p of phrases) {
            if (i + p.words.length > tokens.length) continue;
            let ok = true;
            for (let k = 1; k < p.words.length; k++) {
              const t = tokens[i + k]!;
              if (t.word !== p.words[k] || t.clauseStart) {
                ok = false;
                break;
              }
            }
            if (!ok) continue;
            if (c.negatable[p.label] && (negated ??= negatedAt(tokens, i))) continue;
            if (c.request[p.label] && p.words.some((_, k) => notARequest(tokens, i + k))) continue;
            add(p, p.evidence, i);
          }
        }
        for (const hit of wordHits(word)) {
          if (c.negatable[hit.label] && (negated ??= negatedAt(tokens, i))) continue;
          if (c.request[hit.label] && notARequest(tokens, i)) continue;
          add(hit, hit.evidence, i);
        }
        if (c.imperatives.size > 0) {
          const t = tokens[i]!;
          const opens = t.sentenceStart ||
            (i > 0 && tokens[i - 1]!.sentenceStart && IMPERATIVE_OPENERS.has(tokens[i - 1]!.word));
          if (opens) { for (const hit of c.imperatives.get(word) ?? []) add(hit, hit.evidence); }
        }
      }
      if (c.patterns.length > 0) {
        const lower = normalize(text);
        for (const p of c.patterns) {
          const m = p.re.exec(lower);
          if (m) add(p, m[0]);
        }
      }
      for (let l = 0; l < n; l++) {
        if (scores[l]! < thresholds[l]!) continue;
        for (const j of c.implies[l]!) {
          // The implied label ranks just below the one implying it, unless it scores higher.
          scores[j] = Math.max(scores[j]!, thresholds[j]!, scores[l]! - 1e-9);
          const list = evidence[j] ??= [];
          for (const e of evidence[l]!) if (!list.includes(e)) list.push(e);
        }
      }
      const chosen: number[] = [];
      for (let l = 0; l < n; l++) if (scores[l]! >= thresholds[l]!) chosen.push(l);
      chosen.sort((a, b) => scores[b]! - scores[a]! || a - b);
      if (chosen.length === 0) {
        return { topics: [c.fallback], evidence: { [c.fallback]: [] }, analyzer: name };
      }
      const out: Record<string, string[]> = {};
      for (const l of chosen) out[c.names[l]!] = evidence[l] ?? [];
      return { topics: chosen.map((l) => c.names[l]!), evidence: out, analyzer: name };
    },
  };
}
