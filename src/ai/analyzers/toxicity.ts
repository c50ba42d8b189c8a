/**
 * Embedded toxicity analyzer: the `obscenity` package's English profanity matcher (which
 * sees through spacing and look-alike characters) plus hand-curated word lists
 * (rules/toxicity.lexicon.json) for insults, slurs, threats and attacks on groups of people.
 *
 * @module
 */

import { englishDataset, englishRecommendedTransformers, RegExpMatcher } from "obscenity";
import lexiconJson from "../../../rules/toxicity.lexicon.json" with { type: "json" };
import type { ToxicityResult } from "../analysis.ts";
import { groupAttacks, type GroupSpan } from "./group_attack.ts";
import { isNegator, tokenize } from "./text.ts";

/**
 * Toxicity categories the analyzer reports.
 *
 * @example
 * ```ts
 * toxicityAnalyzer().analyze("I will kill you").categories.includes(ToxicityCategory.threat); // true
 * ```
 */
export const ToxicityCategory = {
  hate: "hate",
  threat: "threat",
  insult: "insult",
  profanity: "profanity",
  sexual: "sexual",
} as const;
/** One toxicity category. */
export type ToxicityCategory = typeof ToxicityCategory[keyof typeof ToxicityCategory];

/**
 * The default score at or above which {@link toxicityAnalyzer} flags a text.
 *
 * @example
 * ```ts
 * TOXICITY_DEFAULT_THRESHOLD; // 0.5
 * ```
 */
export const TOXICITY_DEFAULT_THRESHOLD = 0.5;

/** Options for {@link toxicityAnalyzer}. */
export interface ToxicityOptions {
  /** Score at or above which a text is flagged. Default 0.5. */
  threshold?: number;
  /**
   * When to run the obscenity matcher, which sees through obfuscated spellings but is
   * slow: `"auto"` (default) only on text that looks obfuscated, `"always"`, or `"never"`.
   */
  obscenity?: "auto" | "always" | "never";
  /** Name recorded on results. Default `"embedded:toxicity"`. */
  name?: string;
}

/** An embedded, synchronous toxicity analyzer. */
export interface EmbeddedToxicityAnalyzer {
  /** Stable name recorded on events. */
  readonly name: string;
  /** Analyzes one text. */
  analyze(text: string): ToxicityResult;
}

type Kind =
  | "hate"
  | "insult"
  | "profanity"
  | "mild_profanity"
  | "sexual"
  | "threat"
  | "identity"
  | "dehumanizing";

interface Lexicon {
  weights: Record<string, number>;
  words: Map<string, Kind[]>;
  /** Every proper prefix of a multi-word entry, so phrase lookups stop early. */
  prefixes: Set<string>;
  maxPhraseWords: number;
  threatPhrases: Set<string>;
  threatVerbs: Set<string>;
  threatTargets: Set<string>;
  obscenityKinds: Map<string, Kind>;
  thingInsults: Set<string>;
  persons: Set<string>;
  /**
   * Whether a word may be a respelling of a word of the obscenity dataset that the word
   * lists lack ("niggah", "fukker"): not listed, and it opens like a dataset word (same first
   * three letters, or the same sounds: "fuk" as "fuc").
   */
  isVariantCandidate: (word: string) => boolean;
  /**
   * The group and dehumanizing kinds of a word's other number ("caucasian" for the listed
   * "caucasians", "devil" for "devils"), so the lists need not spell both.
   */
  groupNumber: (word: string) => Kind[] | undefined;
}

const NUMBER_KINDS: readonly Kind[] = ["identity", "dehumanizing"];

function otherNumber(words: ReadonlyMap<string, Kind[]>): (word: string) => Kind[] | undefined {
  return (word) => {
    if (word.length < 4) return undefined;
    const other = word.endsWith("s") ? word.slice(0, -1) : `${word}s`;
    const kinds = words.get(other)?.filter((k) => NUMBER_KINDS.includes(k));
    return kinds && kinds.length > 0 ? kinds : undefined;
  };
}

/** Spellings that sound alike, folded: k and q to c, z to s, ph to f, digits to letters. */
function soundAlike(opening: string): string {
  return opening.replace(/[kq]/g, "c").replace(/z/g, "s").replace(/ph/g, "f").replace(/0/g, "o")
    .replace(/[1!]/g, "i").replace(/3/g, "e").replace(/4/g, "a");
}

function variantCandidates(
  words: ReadonlyMap<string, Kind[]>,
  obscenityKinds: ReadonlyMap<string, Kind>,
): (word: string) => boolean {
  const openings3 = new Set<string>();
  for (const w of obscenityKinds.keys()) {
    if (!w.includes(" ") && w.length >= 3) openings3.add(w.slice(0, 3));
  }
  const cache = new Map<string, boolean>();
  return (word) => {
    let yes = cache.get(word);
    if (yes !== undefined) return yes;
    yes = word.length >= 3 && !words.has(word) &&
      (openings3.has(word.slice(0, 3)) || openings3.has(soundAlike(word.slice(0, 3))));
    if (cache.size < 50_000) cache.set(word, yes);
    return yes;
  };
}

function buildLexicon(): Lexicon {
  const words = new Map<string, Kind[]>();
  const prefixes = new Set<string>();
  let maxPhraseWords = 1;
  const addPrefixes = (key: string) => {
    const parts = key.split(" ");
    for (let k = 1; k < parts.length; k++) prefixes.add(parts.slice(0, k).join(" "));
    maxPhraseWords = Math.max(maxPhraseWords, parts.length);
  };
  const add = (entry: string, kind: Kind) => {
    const key = tokenize(entry).map((t) => t.word).join(" ");
    addPrefixes(key);
    const list = words.get(key) ?? [];
    if (!list.includes(kind)) list.push(kind);
    words.set(key, list);
  };
  for (const [kind, list] of Object.entries(lexiconJson.words as Record<string, string[]>)) {
    for (const w of list) add(w, kind as Kind);
  }
  const threatPhrases = new Set<string>();
  for (const p of lexiconJson.threat.phrases) {
    const key = tokenize(p).map((t) => t.word).join(" ");
    threatPhrases.add(key);
    addPrefixes(key);
  }
  const obscenityKinds = new Map<string, Kind>();
  for (const [kind, list] of Object.entries(lexiconJson.obscenity as Record<string, string[]>)) {
    for (const w of list) {
      obscenityKinds.set(w, kind as Kind);
      // Plain spellings go on the fast path; the matcher is kept for obfuscated ones.
      add(w, kind as Kind);
      if (!w.includes(" ")) {
        add(w.endsWith("sh") || w.endsWith("ch") ? `${w}es` : `${w}s`, kind as Kind);
      }
    }
  }
  return {
    weights: lexiconJson.weights as Record<string, number>,
    words,
    prefixes,
    maxPhraseWords,
    threatPhrases,
    threatVerbs: new Set(
      lexiconJson.threat.verbs.map((v) => tokenize(v).map((t) => t.word).join(" ")),
    ),
    threatTargets: new Set(lexiconJson.threat.targets),
    obscenityKinds,
    isVariantCandidate: variantCandidates(words, obscenityKinds),
    groupNumber: otherNumber(words),
    thingInsults: new Set(lexiconJson.thingInsults.words),
    persons: new Set(lexiconJson.thingInsults.persons),
  };
}

/**
 * Text that may hide a word from the word lists: a symbol or digit inside a word
 * ("f*ck", "sh1t") or spaced-out letters ("f u c k"). Stretched words ("fuuuck") are
 * handled on the fast path by squeezing repeated letters.
 */
const MAYBE_OBFUSCATED = /\p{L}[*@$#!|0-9]+\p{L}|\b\p{L} \p{L} \p{L}\b/u;
const STRETCHED = /(.)\1\1+/g;

/**
 * Auxiliaries that make a violent verb a report of what happened ("were killed", "got
 * shot") rather than a wish or a call ("must be hanged", "kill them").
 */
const REPORTED: ReadonlySet<string> = new Set([
  "were",
  "was",
  "been",
  "got",
  "gets",
  "are",
  "is",
  "being",
]);

/**
 * Dehumanizing words that are metaphors (vermin, disease, beasts) rather than judgements a
 * text may fairly make ("criminals", "sick"): said of "they" or "those", an attack.
 */
const DEHUMANIZING_METAPHORS: ReadonlySet<string> = new Set([
  "animals",
  "savages",
  "vermin",
  "parasites",
  "subhumans",
  "cockroaches",
  "rats",
  "pigs",
  "apes",
  "monkeys",
  "plague",
  "disease",
  "cancer",
  "leeches",
  "mongrels",
  "mutts",
  "beasts",
  "demons",
  "devils",
  "filth",
  "scum",
  "abominations",
]);

/** How far (in words) an insult may stand from a group it is taken to attack. */
const ATTACK_WINDOW = 12;
/** Words that name a group of people without naming which. */
const PLURAL_PERSONS: ReadonlySet<string> = new Set([
  "they",
  "them",
  "those",
  "these",
  "theyre",
  "they're",
]);

/** Whether a plural pronoun or demonstrative stands within four words of `at`, same clause. */
function pluralPersonNear(
  words: readonly string[],
  tokens: readonly { clauseStart: boolean }[],
  at: number,
): boolean {
  for (let j = at - 1; j >= Math.max(0, at - 4); j--) {
    if (PLURAL_PERSONS.has(words[j]!)) return true;
    if (tokens[j]!.clauseStart) break;
  }
  for (let j = at + 1; j <= Math.min(words.length - 1, at + 4); j++) {
    if (tokens[j]!.clauseStart) break;
    if (PLURAL_PERSONS.has(words[j]!)) return true;
  }
  return false;
}

let sharedLexicon: Lexicon | undefined;
let sharedMatcher: RegExpMatcher | undefined;

const respellings = new Map<string, string | undefined>();

/** The dataset word one word respells, per the obscenity matcher; cached. */
function respelled(word: string): string | undefined {
  if (respellings.has(word)) return respellings.get(word);
  let original: string | undefined;
  for (const m of matcher().getAllMatches(word)) {
    original = englishDataset.getPayloadWithPhraseMetadata(m).phraseMetadata?.originalWord;
    if (original) break;
  }
  if (respellings.size < 50_000) respellings.set(word, original);
  return original;
}

function matcher(): RegExpMatcher {
  return sharedMatcher ??= new RegExpMatcher({
    ...englishDataset.build(),
    ...englishRecommendedTransformers,
  });
}

/**
 * Creates an embedded toxicity analyzer. Each hit has a category weight; the score is
 * `1 - product(1 - weight)` over hits (at most two per category), and a text is flagged
 * when the score reaches the threshold. Attacks on groups (a group word plus an insult,
 * a dehumanizing word or a threat) count as hate.
 *
 * @example
 * ```ts
 * const toxicity = toxicityAnalyzer();
 * toxicity.analyze("you are a worthless idiot").flagged; // true
 * toxicity.analyze("kill the process and restart it").flagged; // false
 * ```
 */
export function toxicityAnalyzer(options: ToxicityOptions = {}): EmbeddedToxicityAnalyzer {
  const lex = sharedLexicon ??= buildLexicon();
  const threshold = options.threshold ?? TOXICITY_DEFAULT_THRESHOLD;
  const obscenityMode = options.obscenity ?? "auto";
  const name = options.name ?? "embedded:toxicity";
  const w = (k: string) => lex.weights[k] ?? 0;

  return {
    name,
    analyze(text: string): ToxicityResult {
      const tokens = tokenize(text);
      const words = tokens.map((t) => {
        const w = t.word;
        if (!STRETCHED.test(w)) return w;
        STRETCHED.lastIndex = 0;
        // "fuuuck" -> "fuck", "sooo" -> "so": try one letter, then two, keep a listed one.
        const one = w.replace(STRETCHED, "$1");
        if (lex.words.has(one)) return one;
        const two = w.replace(STRETCHED, "$1$1");
        return lex.words.has(two) ? two : one;
      });
      const counts = new Map<Kind, number>();
      const found = new Map<Kind | "threat", string[]>();
      const note = (k: Kind | "threat", what: string) => {
        const list = found.get(k) ?? [];
        if (!list.includes(what)) list.push(what);
        found.set(k, list);
      };
      const bump = (k: Kind, what?: string) => {
        counts.set(k, (counts.get(k) ?? 0) + 1);
        if (what !== undefined) note(k, what);
      };
      let threat = false;
      let verbAt = -10;
      const groups: GroupSpan[] = [];
      const dehumanizing: number[] = [];
      const attackAt: number[] = [];
      /** Whether a negator comes up to two words before `i` in its clause ("don't ever kill..."). */
      const negatedBefore = (i: number): boolean => {
        for (let j = i - 1; j >= Math.max(0, i - 2); j--) {
          if (tokens[j + 1]!.clauseStart) return false;
          if (isNegator(words[j]!)) return true;
        }
        return false;
      };
      /** Whether an insult at [start, end] is said of a person, when it may judge a thing. */
      const aimedAtPerson = (start: number, end: number, insult: string): boolean => {
        if (!lex.thingInsults.has(insult)) return true;
        for (let j = start - 1; j >= Math.max(0, start - 3); j--) {
          if (tokens[j + 1]!.clauseStart) break;
          if (lex.persons.has(words[j]!) || lex.words.get(words[j]!)?.includes("identity")) {
            return true;
          }
        }
        for (let j = end + 1; j <= Math.min(words.length - 1, end + 2); j++) {
          if (tokens[j]!.clauseStart) break;
          if (lex.persons.has(words[j]!) || lex.words.get(words[j]!)?.includes("identity")) {
            return true;
          }
        }
        return false;
      };

      for (let i = 0; i < words.length; i++) {
        const word = words[i]!;
        let phrase = word;
        for (let len = 1; len <= lex.maxPhraseWords && i + len <= words.length; len++) {
          if (len > 1) phrase += " " + words[i + len - 1]!;
          const kinds = lex.words.get(phrase) ?? (len === 1 ? lex.groupNumber(word) : undefined);
          if (kinds) {
            for (const k of kinds) {
              bump(
                k === "insult" && !aimedAtPerson(i, i + len - 1, phrase) ? "mild_profanity" : k,
                phrase,
              );
            }
            if (kinds.includes("identity")) groups.push({ start: i, end: i + len - 1 });
            if (kinds.some((k) => k === "insult" || k === "dehumanizing" || k === "hate")) {
              attackAt.push(i);
            }
            if (kinds.includes("dehumanizing") && DEHUMANIZING_METAPHORS.has(word)) {
              dehumanizing.push(i);
            }
          }
          if (lex.threatPhrases.has(phrase) && !negatedBefore(i)) {
            threat = true;
            note("threat", phrase);
          }
          if (!lex.prefixes.has(phrase)) break;
        }
        if (lex.threatVerbs.has(word) && !negatedBefore(i) && !REPORTED.has(words[i - 1] ?? "")) {
          verbAt = i;
          // A target shortly before the verb ("those people must be hanged").
          for (let j = Math.max(0, i - 5); j < i && !threat; j++) {
            const before = words[j]!;
            const kinds = lex.words.get(before);
            if (
              (before !== "you" && before !== "u" && lex.threatTargets.has(before)) ||
              kinds?.includes("identity") || kinds?.includes("hate")
            ) {
              threat = true;
              note("threat", `${before} ... ${word}`);
            }
          }
        } else if (i - verbAt <= 3 && i > verbAt && !tokens[i]!.clauseStart) {
          const kinds = lex.words.get(word);
          if (
            lex.threatTargets.has(word) ||
            (kinds && (kinds.includes("identity") || kinds.includes("hate") ||
              kinds.includes("insult")))
          ) {
            threat = true;
            note("threat", `${words[verbAt]!} ${word}`);
          }
        }
      }

      const seen = new Set<string>();
      const takeObscenity = (original: string | undefined) => {
        if (!original || seen.has(original)) return;
        seen.add(original);
        const kind = lex.obscenityKinds.get(original);
        if (kind && !counts.has(kind)) bump(kind, original);
      };
      if (
        obscenityMode === "always" ||
        (obscenityMode === "auto" && MAYBE_OBFUSCATED.test(text))
      ) {
        for (const m of matcher().getAllMatches(text)) {
          takeObscenity(
            englishDataset.getPayloadWithPhraseMetadata(m).phraseMetadata?.originalWord,
          );
        }
      } else if (obscenityMode === "auto") {
        // Respellings the word lists lack ("niggah", "fukker"): the matcher on the word alone.
        for (const w of words) if (lex.isVariantCandidate(w)) takeObscenity(respelled(w));
      }

      const categories: ToxicityCategory[] = [];
      let clean = 1;
      const take = (k: Kind, category: ToxicityCategory | undefined, weight = w(k)) => {
        const n = Math.min(counts.get(k) ?? 0, 2);
        if (n === 0) return;
        clean *= (1 - weight) ** n;
        if (category && !categories.includes(category)) categories.push(category);
      };
      take("hate", "hate");
      if (threat) {
        clean *= 1 - w("threat");
        categories.push("threat");
      }
      take("insult", "insult");
      take("profanity", "profanity");
      take("mild_profanity", undefined);
      take("sexual", "sexual");
      const identity = counts.get("identity") ?? 0;
      if (identity > 0) {
        const structural = groupAttacks(words, tokens, groups, (word) => {
          const kinds = lex.words.get(word);
          return kinds !== undefined &&
            (kinds.includes("insult") || kinds.includes("dehumanizing") || kinds.includes("hate"));
        });
        for (const e of structural) note("identity", e);
        const near = attackAt.filter((a) =>
          groups.some((g) =>
            a >= g.start - ATTACK_WINDOW && a <= g.end + ATTACK_WINDOW
          )
        ).length;
        const attack = near + (threat ? 1 : 0) + structural.length;
        if (attack > 0) {
          clean *= 1 - w("identity_attack");
          if (!categories.includes("hate")) categories.push("hate");
        }
      } else if ((counts.get("dehumanizing") ?? 0) > 0) {
        // "they are vermin", "those ... cockroaches": said of people named by a plural
        // pronoun or demonstrative in the same clause, it is an attack on a group.
        const said = dehumanizing.some((d) => pluralPersonNear(words, tokens, d));
        if (said) {
          clean *= 1 - w("identity_attack");
          if (!categories.includes("hate")) categories.push("hate");
        } else clean *= 1 - w("dehumanizing") * 0.3;
      }
      const score = 1 - clean;
      const evidence: Record<string, string[]> = {};
      for (const c of categories) {
        const words = c === "hate"
          ? [
            ...(found.get("hate") ?? []),
            ...(found.get("identity") ?? []),
            ...(found.get("dehumanizing") ?? []),
          ]
          : found.get(c) ?? [];
        if (words.length > 0) evidence[c] = words;
      }
      return { flagged: score >= threshold, categories, score, evidence, analyzer: name };
    },
  };
}
