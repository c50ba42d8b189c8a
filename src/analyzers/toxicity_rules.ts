/**
 * A small rules-based {@link ToxicityAnalyzer}: weighted term lists per category
 * (rules/toxicity.json). It stands in until the embedded model is merged; stages code
 * against the interface only. Written here rather than taken from npm because the
 * packages measured (e.g. `obscenity`) cover profanity only, not insults, threats or spam.
 *
 * @module
 */
import type { ToxicityAnalyzer, ToxicityResult } from "../analysis.ts";
import { ConfigError } from "../errors.ts";

/** The toxicity rules file. */
export interface ToxicityRules {
  /** Score at or above which a text is flagged, in (0, 1]. */
  threshold: number;
  /** Per category: its weight in the score and its terms (words or phrases). */
  categories: Record<string, { weight: number; terms: string[] }>;
}

/** A toxicity result with the human-readable reasons reviewers see. */
export interface ExplainedToxicity extends ToxicityResult {
  /** Human-readable reasons, e.g. `insult: "idiot"`. */
  reasons: string[];
}

/** The rules analyzer: a {@link ToxicityAnalyzer} that answers at once, with reasons. */
export interface RulesToxicityAnalyzer extends ToxicityAnalyzer {
  /** Analyzes one text, synchronously. */
  analyze(text: string): ExplainedToxicity;
}

/** Checks a parsed rules file; a {@link ConfigError} naming the first problem. */
export function parseToxicityRules(value: unknown): ToxicityRules {
  const v = value as Partial<ToxicityRules> | null;
  if (!v || typeof v.threshold !== "number" || v.threshold <= 0 || v.threshold > 1) {
    throw new ConfigError("toxicity rules: threshold must be a number in (0, 1]");
  }
  if (!v.categories || typeof v.categories !== "object") {
    throw new ConfigError("toxicity rules: categories must be an object");
  }
  for (const [name, c] of Object.entries(v.categories)) {
    if (typeof c?.weight !== "number" || c.weight < 0 || !Array.isArray(c.terms)) {
      throw new ConfigError(`toxicity rules: category ${name} needs a weight and terms`);
    }
  }
  return v as ToxicityRules;
}

function escape(term: string): string {
  return term.replace(/[.*+?^${}()|[\]\\]/g, "\\$&").replace(/\s+/g, "\\s+");
}

/**
 * Creates the rules-based analyzer.
 *
 * @example
 * ```ts
 * import { toxicityRulesAnalyzer } from "./toxicity_rules.ts";
 * const a = toxicityRulesAnalyzer({
 *   threshold: 0.5,
 *   categories: { insult: { weight: 0.6, terms: ["idiot"] } },
 * });
 * console.assert(a.analyze("you idiot").flagged);
 * console.assert(!a.analyze("lovely day").flagged);
 * ```
 */
export function toxicityRulesAnalyzer(rules: ToxicityRules): RulesToxicityAnalyzer {
  const compiled = Object.entries(rules.categories).map(([name, c]) => ({
    name,
    weight: c.weight,
    pattern: new RegExp(
      `(?<![\\p{L}\\p{N}])(?:${c.terms.map(escape).join("|")})(?![\\p{L}\\p{N}])`,
      "giu",
    ),
  }));
  return {
    name: "rules",
    analyze(text: string): ExplainedToxicity {
      const categories: string[] = [];
      const reasons: string[] = [];
      let score = 0;
      for (const c of compiled) {
        const found = [...new Set([...text.matchAll(c.pattern)].map((m) => m[0].toLowerCase()))];
        if (found.length === 0) continue;
        categories.push(c.name);
        reasons.push(`${c.name}: ${found.slice(0, 5).map((f) => JSON.stringify(f)).join(", ")}`);
        // Each category counts once, more matches add a little: 1 - prod(1 - w).
        const w = Math.min(1, c.weight * (1 + 0.25 * (found.length - 1)));
        score = 1 - (1 - score) * (1 - w);
      }
      score = Math.round(score * 1000) / 1000;
      return {
        flagged: score >= rules.threshold,
        categories,
        score,
        analyzer: "rules",
        reasons,
      };
    },
  };
}

/** Reads and checks the rules file at `path`. */
export async function loadToxicityRules(path: string): Promise<ToxicityRules> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (cause) {
    throw new ConfigError(`cannot read toxicity rules ${path}`, { cause });
  }
  try {
    return parseToxicityRules(JSON.parse(text));
  } catch (cause) {
    if (cause instanceof ConfigError) throw cause;
    throw new ConfigError(`toxicity rules ${path} are not JSON`, { cause });
  }
}
