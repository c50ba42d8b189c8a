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
  /** True when a sentence break (`.!?` or a line break) comes between this word and the previous one, or it is the first word. */
  sentenceStart: boolean;
  /** True when the word's sentence ends with a question mark. */
  question: boolean;
}

const NON_ASCII_WORD_CHAR = /[\p{L}\p{N}\p{M}]/u;

/** Tells whether the UTF-16 unit at `i` belongs to a word (letters, digits, marks). */
function isWordChar(text: string, i: number): boolean {
  const c = text.charCodeAt(i);
  if (c < 128) return (c >= 97 && c <= 122) || (c >= 65 && c <= 90) || (c >= 48 && c <= 57);
  if (c >= 0xd800 && c <= 0xdfff) return false; // astral: emoji and rare scripts
  return NON_ASCII_WORD_CHAR.test(text[i]!);
}

/** Tells whether a character code ends a sentence: `. ! ?` or a line break. */
function isSentenceBreak(c: number): boolean {
  return c === 46 || c === 33 || c === 63 || c === 10;
}

/** Tells whether a character code breaks a clause: `. , ; : ! ?` or a line break. */
function isBreak(c: number): boolean {
  return c === 46 || c === 44 || c === 59 || c === 58 || c === 33 || c === 63 || c === 10;
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
  const n = text.length;
  let brk = true;
  let sentence = true;
  let sentenceFrom = 0;
  let i = 0;
  while (i < n) {
    if (!isWordChar(text, i)) {
      const c = text.charCodeAt(i);
      if (c === 63) { for (let k = sentenceFrom; k < out.length; k++) out[k]!.question = true; }
      if (isBreak(c)) {
        brk = true;
        // A dot followed directly by a word character ("2.5", "e.g") ends no sentence.
        if (isSentenceBreak(c) && !(c === 46 && i + 1 < n && isWordChar(text, i + 1))) {
          sentence = true;
        }
      }
      i++;
      continue;
    }
    const start = i;
    i++;
    while (i < n) {
      if (isWordChar(text, i)) {
        i++;
        continue;
      }
      const c = text.charCodeAt(i);
      // An apostrophe between letters stays inside the word: don't, it's, o'clock.
      if ((c === 39 || c === 0x2019) && i + 1 < n && isWordChar(text, i + 1)) {
        i += 2;
        continue;
      }
      break;
    }
    const raw = text.slice(start, i);
    const lower = raw.toLowerCase();
    out.push({
      word: lower.includes("’") ? lower.replaceAll("’", "'") : lower,
      shouted: raw.length > 1 && raw !== lower && raw === raw.toUpperCase(),
      clauseStart: brk,
      sentenceStart: sentence,
      question: false,
    });
    if (sentence) sentenceFrom = out.length - 1;
    brk = false;
    sentence = false;
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

/** Words that shift the weight onto what follows them: "slow, but it works". */
export const CONTRAST_WORDS: ReadonlySet<string> = new Set([
  "but",
  "however",
  "nevertheless",
  "nonetheless",
  "except",
]);
/** Words opening a conceded clause, which weighs less: "although it is slow, ...". */
const CONCESSION_WORDS: ReadonlySet<string> = new Set(["although", "though", "despite"]);

/**
 * Irrealis markers: what follows them in their clause is wished, supposed or asked for,
 * not reported ("it would be great if...", "I wish it was faster", "if it worked...").
 */
const IRREALIS_WORDS: ReadonlySet<string> = new Set([
  "would",
  "could",
  "should",
  "might",
  "wish",
  "wished",
  "wishing",
  "hope",
  "hoping",
  "if",
  "unless",
  "would've",
  "could've",
  "should've",
  "i'd",
  "it'd",
  "wud",
]);

/** Hedges: what follows them in their clause is said with less certainty ("maybe it's good"). */
const HEDGE_WORDS: ReadonlySet<string> = new Set([
  "maybe",
  "perhaps",
  "probably",
  "possibly",
  "apparently",
  "seemingly",
  "supposedly",
  "seems",
  "seemed",
  "guess",
  "suppose",
]);

/** Marks the tokens after any of `markers` up to the end of the marker's clause. */
function clauseScope(
  tokens: readonly Token[],
  markers: ReadonlySet<string>,
): Uint8Array | undefined {
  let scope: Uint8Array | undefined;
  let open = false;
  for (let k = 0; k < tokens.length; k++) {
    const t = tokens[k]!;
    if (t.clauseStart) open = false;
    if (open) (scope ??= new Uint8Array(tokens.length))[k] = 1;
    if (markers.has(t.word)) open = true;
  }
  return scope;
}

/**
 * Marks the tokens inside the scope of an irrealis marker (to the end of its clause);
 * undefined when the text has none.
 *
 * @example
 * ```ts
 * irrealisScope(tokenize("it would be great")); // Uint8Array [0, 0, 1, 1]
 * ```
 */
export function irrealisScope(tokens: readonly Token[]): Uint8Array | undefined {
  return clauseScope(tokens, IRREALIS_WORDS);
}

/**
 * Marks the tokens inside the scope of a hedge ("maybe", "probably", "seems"), to the end
 * of its clause; undefined when the text has none.
 *
 * @example
 * ```ts
 * hedgeScope(tokenize("maybe it is fine")); // Uint8Array [0, 1, 1, 1]
 * ```
 */
export function hedgeScope(tokens: readonly Token[]): Uint8Array | undefined {
  return clauseScope(tokens, HEDGE_WORDS);
}

/**
 * Marks the tokens after a comparison's "than", to the end of its clause: what the subject
 * is compared with ("much better than the flimsy old case"), whose own wording says nothing
 * of the subject. Undefined when the text has none.
 *
 * @example
 * ```ts
 * comparedScope(tokenize("better than the bad one")); // Uint8Array [0, 0, 1, 1, 1]
 * ```
 */
export function comparedScope(tokens: readonly Token[]): Uint8Array | undefined {
  return clauseScope(tokens, COMPARISON_WORDS);
}

const COMPARISON_WORDS: ReadonlySet<string> = new Set(["than"]);

/**
 * The weight of each token under contrast and concession, sentence by sentence: before a
 * "but" 0.5, after it 1.5, up to the end of its sentence (a sentence that opens with "But"
 * weighs down the sentence before it); a clause opened by "although" 0.5. Undefined when
 * the text has no such word (every weight 1).
 *
 * @example
 * ```ts
 * contrastWeights(tokenize("slow but good")); // Float64Array [0.5, 1, 1.5]
 * ```
 */
export function contrastWeights(tokens: readonly Token[]): Float64Array | undefined {
  const n = tokens.length;
  let weights: Float64Array | undefined;
  let sentenceFrom = 0;
  let previousFrom = 0;
  for (let k = 0; k < n; k++) {
    const t = tokens[k]!;
    if (t.sentenceStart && k > 0) {
      previousFrom = sentenceFrom;
      sentenceFrom = k;
    }
    const contrast = CONTRAST_WORDS.has(t.word);
    if (!contrast && !CONCESSION_WORDS.has(t.word)) continue;
    weights ??= new Float64Array(n).fill(1);
    let end = k + 1;
    if (contrast) {
      while (end < n && !tokens[end]!.sentenceStart) end++;
      const from = t.sentenceStart ? previousFrom : sentenceFrom;
      for (let j = from; j < k; j++) weights[j] = 0.5;
      for (let j = k + 1; j < end; j++) weights[j] = 1.5;
    } else {
      while (end < n && !tokens[end]!.clauseStart) end++;
      for (let j = k + 1; j < end; j++) weights[j] = 0.5;
    }
  }
  return weights;
}
