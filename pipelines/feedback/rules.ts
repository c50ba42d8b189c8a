/**
 * The feedback pipeline's rules engine: keyword sentiment and topic analyzers and a routing
 * table, all from a ruleset document (rules/*.json, schema schemas/rules.v1.json), so teams change rules
 * without changing code.
 *
 * @module
 */
import type { SentimentAnalyzer, SentimentLabel, TopicsAnalyzer } from "../../src/ai/analysis.ts";
import type { Routing } from "./events.gen.ts";
import { validateDocument } from "../../src/schemas.ts";
// Registers the ruleset's schema (a document of this pipeline).
import "./events.ts";

/** Routes an item to a team from its sentiment and topics. */
export type Router = (sentiment: SentimentLabel, topics: readonly string[]) => Routing;

/** A ruleset turned into a router and, when it has keyword rules, analyzers. */
export interface CompiledRules {
  /** Present when the ruleset has `sentiment` keyword rules. */
  sentiment?: SentimentAnalyzer;
  /** Present when the ruleset has `topics` keyword rules. */
  topics?: TopicsAnalyzer;
  /** The ruleset's routing table. */
  route: Router;
}

/**
 * Compiles a ruleset (validated against its schema first).
 *
 * @example
 * ```ts
 * import { compileRules } from "./rules.ts";
 * const rules = compileRules({
 *   version: 1,
 *   sentiment: { rules: [{ label: "positive", any: ["love"] }], default: "neutral" },
 *   topics: { rules: [{ topic: "praise", any: ["love"] }], default: "general_inquiry" },
 *   routing: [{ team: "General Support" }],
 * });
 * console.assert(rules.sentiment?.analyze("I LOVE it").label === "positive");
 * ```
 */
export function compileRules(document: unknown): CompiledRules {
  const ruleset = validateDocument("rules", document);
  const sentimentRules = (ruleset.sentiment?.rules ?? []).map((r) => ({
    ...r,
    any: r.any.map((k) => k.toLowerCase()),
  }));
  const topicRules = (ruleset.topics?.rules ?? []).map((r) => ({
    ...r,
    any: r.any.map((k) => k.toLowerCase()),
  }));
  const defaultScore = { positive: 0.5, negative: -0.5, neutral: 0 } as const;

  const sentiment: SentimentAnalyzer = {
    name: "rules",
    analyze(text) {
      const lower = text.toLowerCase();
      for (const rule of sentimentRules) {
        if (rule.any.some((k) => lower.includes(k))) {
          return {
            label: rule.label,
            score: rule.score ?? defaultScore[rule.label],
            analyzer: "rules",
          };
        }
      }
      const label = ruleset.sentiment!.default;
      return { label, score: label === "neutral" ? 0 : defaultScore[label], analyzer: "rules" };
    },
  };

  const topics: TopicsAnalyzer = {
    name: "rules",
    analyze(text) {
      const lower = text.toLowerCase();
      const found: string[] = [];
      const evidence: Record<string, string[]> = {};
      for (const rule of topicRules) {
        const hits = rule.any.filter((k) => lower.includes(k));
        if (hits.length === 0) continue;
        if (!found.includes(rule.topic)) found.push(rule.topic);
        (evidence[rule.topic] ??= []).push(...hits);
      }
      if (found.length === 0) found.push(ruleset.topics!.default);
      return { topics: found, evidence, analyzer: "rules" };
    },
  };

  const route: Router = (label, itemTopics) => {
    for (const [i, rule] of ruleset.routing.entries()) {
      const when = rule.when ?? {};
      if (when.sentiment !== undefined && when.sentiment !== label) continue;
      if (when.topic !== undefined && !itemTopics.includes(when.topic)) continue;
      return { team: rule.team, rule: i };
    }
    throw new Error("no routing rule matched: the ruleset needs a final rule without 'when'");
  };

  return {
    ...(ruleset.sentiment ? { sentiment } : {}),
    ...(ruleset.topics ? { topics } : {}),
    route,
  };
}

/** Reads and compiles a ruleset file. */
export async function loadRules(path: string): Promise<CompiledRules> {
  return compileRules(JSON.parse(await Deno.readTextFile(path)));
}
