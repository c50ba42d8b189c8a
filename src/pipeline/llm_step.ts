/**
 * A definition's `llm` step: its prompt file (relative to the definition) as the system
 * message, the value it is handed as the user message (JSON), and its output schema as the
 * structured output, on the LLM client every analyzer uses (JSON mode, schema validation
 * and one repair, cache, budget, retries with backoff).
 *
 * @module
 */
import { createLlmAnalyzer, type LlmResultMeta } from "../ai/llm/analyzers.ts";
import type { Budget, BudgetOptions } from "../ai/llm/budget.ts";
import type { LlmPricing } from "../ai/llm/usage.ts";
import type { LlmStats } from "../ai/llm/stats.ts";
import type { RateLimitOptions } from "../ai/llm/rate_limit.ts";
import { LlmInvalidOutputError } from "../ai/llm/errors.ts";
import { ValidationError } from "../errors.ts";
import type { FlowData } from "./flow.ts";
import type { LlmStep } from "./definition.ts";

/** Where and how an llm step calls. */
export interface LlmStepOptions {
  baseUrl: string;
  apiKey: string;
  model: string;
  timeoutMs?: number;
  concurrency?: number;
  /** Requests per second of the step's service (`WEFT_LLM_RPS`); none without it. */
  rateLimit?: RateLimitOptions;
  /** Prices for `usage.cost_usd` and cost budgets (`WEFT_LLM_PRICE_*_PER_1K`). */
  pricing?: LlmPricing;
  /** Spend limit (`WEFT_LLM_BUDGET_USD`); past it a call fails with `over_budget`. */
  budget?: BudgetOptions | Budget;
  /** Counters of its calls, tokens and cost (a live shadow's or a replay's figures). */
  stats?: LlmStats;
}

/** The call of one llm step: the value in, the schema-valid result out (usage on `_llm`). */
export function createLlmStep(
  p: { file: string; def: { hash: string } },
  id: string,
  step: LlmStep,
  opts: LlmStepOptions,
): (value: unknown, data: FlowData, signal: AbortSignal) => Promise<unknown> {
  let analyzer:
    | Promise<{ analyze(text: string, o: { signal: AbortSignal }): Promise<unknown> }>
    | undefined;
  // A failed load (the prompt file unreadable) is not kept: the next item tries again.
  const load = () =>
    analyzer ??= (async () => {
      const text = await Deno.readTextFile(new URL(step.prompt, `file://${p.file}`));
      return createLlmAnalyzer<Record<string, unknown>, Record<string, unknown>>({
        ...opts,
        prompt: { kind: id, version: p.def.hash.slice(0, 8), text },
      }, {
        kind: id,
        schema: step.output as Record<string, unknown>,
        vars: {},
        toResult: (payload) => payload,
      });
    })().catch((err) => {
      analyzer = undefined;
      throw err;
    });
  return async (value, _data, signal) => {
    const analyzer = await load();
    let r: Record<string, unknown> & LlmResultMeta;
    try {
      r = await analyzer.analyze(JSON.stringify(value), { signal }) as typeof r;
    } catch (err) {
      // A wrong shape after the repair fails the item for good, as an agent's answer does:
      // retrying would pay for the same answer again. No JSON at all is retried.
      if (err instanceof LlmInvalidOutputError && err.retryable === false) {
        throw new ValidationError(`llm step ${id}: ${err.message}`, {
          field: err.field ?? "/",
          permanent: true,
          cause: err,
        });
      }
      throw err;
    }
    const { analyzer: _a, prompt_version: _p, usage: _u, cached: _c, repaired: _r, ...result } = r;
    return result;
  };
}
