/**
 * Small shared text utilities for the embedded analyzers: a fast word tokenizer that
 * keeps apostrophes, normalization, and negation detection.
 *
 * @module
 */

/** One word of a text, lower-cased, with whether it was written in capitals. */
export interface Token {
  /** The word, lower-cased, curly apostrophes made straight. */
  word: string;
  /** True when the word was written in capitals and is at least two letters long. */
  shouted: boolean;
  /** True when a clause break (`.,;:!?` or a line break) comes between this word and the previous one. */
  clauseStart: boolean;
}

const WORD = /[\p{L}\p{N}]+(?:['’][\p{L}]+)*/gu;

/** Tells whether `text[from, to)` holds a clause break. */
function hasBreak(text: string, from: number, to: number): boolean {
  for (let i = from; i < to; i++) {
    const c = text.charCodeAt(i);
    // . , ; : ! ? \n
    if (c === 46 || c === 44 || c === 59 || c === 58 || c === 33 || c === 63 || c === 10) {
      return true;
    }
  }
  return false;
}

/**
 * Splits a text into word tokens (letters and digits, inner apostrophes kept).
 *
 * @example
 * ```ts
 * tokenize("It DOESN'T work!").map((t) => t.word); // ["it", "doesn't", "work"]
 * ```
 */
export function tokenize(text: string): Token[] {
  const out: Token[] = [];
  let last = 0;
  for (const match of text.matchAll(WORD)) {
    const raw = match[0];
    const lower = raw.toLowerCase();
    const start = match.index;
    out.push({
      word: lower.includes("’") ? lower.replaceAll("’", "'") : lower,
      shouted: raw.length > 1 && raw !== lower && raw === raw.toUpperCase(),
      clauseStart: out.length === 0 || hasBreak(text, last, start),
    });
    last = start + raw.length;
  }
  return out;
}

/**
 * Lower-cases a text, straightens apostrophes and collapses whitespace, for phrase and
 * pattern matching. Keeps punctuation.
 *
 * @example
 * ```ts
 * normalize("Can’t   LOG in"); // "can't log in"
 * ```
 */
export function normalize(text: string): string {
  return text.toLowerCase().replace(/[’‘`]/g, "'").replace(/\s+/g, " ").trim();
}

/** Words that negate what follows (contractions ending in n't are caught separately). */
const NEGATORS: ReadonlySet<string> = new Set([
  "not",
  "no",
  "never",
  "none",
  "nobody",
  "nothing",
  "neither",
  "nor",
  "nowhere",
  "without",
  "hardly",
  "barely",
  "scarcely",
  "cannot",
  "cant",
  "dont",
  "doesnt",
  "didnt",
  "isnt",
  "wasnt",
  "arent",
  "werent",
  "wont",
  "wouldnt",
  "shouldnt",
  "couldnt",
  "havent",
  "hasnt",
  "hadnt",
  "aint",
  "nope",
  "lacks",
  "lacking",
]);

/**
 * Tells whether a lower-cased word negates what follows ("not", "never", "don't", "cant").
 *
 * @example
 * ```ts
 * isNegator("doesn't"); // true
 * isNegator("good"); // false
 * ```
 */
export function isNegator(word: string): boolean {
  return NEGATORS.has(word) || word.endsWith("n't");
}
