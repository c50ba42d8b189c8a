/**
 * Customer support by agents: a router hands each request to a specialised agent (billing,
 * technical, general); agents call tools (look up an order in a KV bucket, search the FAQ)
 * and share the item's scratchpad; an agent may hand back to the router, which tries
 * another agent, at most three routings in all; the run ends with an answer, or with a
 * handoff to a human who has a day to reply (`waitFor`).
 *
 * Offline (no WEFT_LLM_BASE_URL) the router's rules and each agent's deterministic policy
 * decide; with an OpenAI-compatible endpoint the model routes (the rules are its fallback)
 * and the agents' model chooses the tool calls.
 * Orders live in KV, each with its customer; an agent only gets an order of the item's
 * customer. The ops identity (the README's nats context) may not write a bucket: put orders
 * with the admin one, from the repository,
 * `nats --nkey data/identities/admin.nk kv put weft_support_orders A100 '{"customer":"ann","status":"shipped"}'`.
 *
 * @module
 */
import { type AgentTurn, definePipeline, type ScratchEntry, type ToolContext } from "../../mod.ts";
import faq from "./faq.json" with { type: "json" };

/** The support request. */
export interface Request {
  customer: string;
  text: string;
  order_id?: string;
}

/** What an agent answers. */
export interface AgentAnswer {
  action: "answer" | "handback" | "human";
  answer?: string;
  reason?: string;
}

const ORDERS = "weft_support_orders";
/** Routings at most: after the third, a person takes over. */
export const MAX_ROUTINGS = 3;

/** The FAQ entries whose keywords the query mentions, best first. */
export function searchFaq(query: string): { id: string; answer: string }[] {
  const q = query.toLowerCase();
  return faq
    .map((f) => ({ f, hits: f.keywords.filter((k) => q.includes(k)).length }))
    .filter((x) => x.hits > 0)
    .sort((a, b) => b.hits - a.hits)
    .map(({ f }) => ({ id: f.id, answer: f.answer }));
}

/** The specialised agents, each a step of the same name and a route label of the router. */
export type Desk = "billing" | "technical" | "general";

/** Which agent takes a request: keywords, skipping agents that already handed it back. */
export function routeRequest(text: string, scratchpad: readonly ScratchEntry[]): Desk {
  const tried = new Set(
    scratchpad.filter((e) =>
      e.kind === "answer" && (e.result as AgentAnswer)?.action === "handback"
    )
      .map((e) => e.step),
  );
  const t = text.toLowerCase();
  const wanted: Desk = /refund|charge|invoice|bill|order|payment/.test(t)
    ? "billing"
    : /crash|error|bug|login|password|freez/.test(t)
    ? "technical"
    : "general";
  const desks: Desk[] = [wanted, "general", "technical", "billing"];
  return desks.find((a) => !tried.has(a)) ?? "general";
}

const tools = {
  lookup_order: {
    description: "Look up one of the customer's orders by its id: its status and items, " +
      "or an error when the customer has no such order",
    parameters: {
      type: "object",
      required: ["order_id"],
      properties: { order_id: { type: "string", pattern: "^[A-Za-z0-9_-]{1,64}$" } },
      additionalProperties: false,
    },
    // Only an order of the item's own customer (each order records its `customer`): the item's
    // text may ask the model for anyone's order, and what a tool returns reaches the answer, the
    // scratchpad, the item's state and its events. Another's order and an unknown one answer
    // the same error, so the agent cannot tell whether it exists.
    run: async (a: { order_id: string }, ctx: ToolContext) => {
      const order = await ctx.kv(ORDERS, a.order_id) as Record<string, unknown> | null;
      if (
        order === null || typeof order !== "object" ||
        order.customer !== (ctx.input as Request).customer
      ) throw new Error(`this customer has no order ${a.order_id}`);
      const { customer: _, ...rest } = order;
      return rest;
    },
  },
  search_faq: {
    description: "Search the FAQ; returns the matching answers, best first",
    parameters: {
      type: "object",
      required: ["query"],
      properties: { query: { type: "string", minLength: 1, maxLength: 500 } },
      additionalProperties: false,
    },
    run: (a: { query: string }) => searchFaq(a.query),
  },
};

const answer = {
  type: "object",
  required: ["action"],
  properties: {
    action: { enum: ["answer", "handback", "human"] },
    answer: { type: "string" },
    reason: { type: "string" },
  },
} as const;

/** The FAQ first; a hit answers, a miss hands back (or, `last`, goes to a person). */
function faqPolicy(t: AgentTurn, onMiss: AgentAnswer) {
  if (t.turn === 1) return { call: "search_faq", args: { query: (t.input as Request).text } };
  const hits = t.calls[0]!.result as { answer: string }[];
  return { final: hits.length > 0 ? { action: "answer", answer: hits[0]!.answer } : onMiss };
}

/** The support pipeline's definition. */
export const supportPipeline = definePipeline({
  name: "support",
  description: "Customer support: router -> specialised agents -> answer or human",
  input: {
    schema: {
      type: "object",
      required: ["customer", "text"],
      properties: {
        customer: { type: "string", minLength: 1 },
        text: { type: "string", minLength: 1, maxLength: 4000 },
        order_id: { type: "string" },
      },
    },
  },
  buckets: [ORDERS],
  start: "route",
  steps: {
    route: {
      kind: "router",
      // With an LLM endpoint the model routes; these rules are the offline way and its fallback.
      prompt: "prompts/route.md",
      route: (_v: unknown, ctx) => routeRequest((ctx.input as Request).text, ctx.scratchpad),
      routes: { billing: "billing", technical: "technical", general: "general" },
    },
    billing: {
      kind: "agent",
      prompt: "prompts/billing.md",
      tools,
      reads: [ORDERS],
      maxTurns: 4,
      output: answer,
      // Offline: the order when one is named, else the FAQ.
      offline: (t) => {
        const order = (t.input as Request).order_id;
        if (!order) return faqPolicy(t, { action: "handback", reason: "no order named" });
        if (t.turn === 1) return { call: "lookup_order", args: { order_id: order } };
        const found = t.calls[0]!.result as { status?: string } | null;
        return {
          final: found?.status
            ? { action: "answer", answer: `Order ${order} is ${found.status}.` }
            : { action: "handback", reason: `no order ${order}` },
        };
      },
      next: "check",
    },
    technical: {
      kind: "agent",
      prompt: "prompts/technical.md",
      tools,
      // Its lookup_order reads the orders too (a request names an order wherever it is routed).
      reads: [ORDERS],
      maxTurns: 4,
      output: answer,
      offline: (t) => faqPolicy(t, { action: "handback", reason: "not in the FAQ" }),
      next: "check",
    },
    general: {
      kind: "agent",
      prompt: "prompts/general.md",
      tools,
      reads: [ORDERS],
      maxTurns: 4,
      output: answer,
      offline: (t) => faqPolicy(t, { action: "handback", reason: "not in the FAQ" }),
      next: "check",
    },
    check: {
      kind: "router",
      route: (a: AgentAnswer, ctx) =>
        a.action === "answer"
          ? "answer"
          : a.action === "handback" && (ctx.runs.route ?? 0) < MAX_ROUTINGS
          ? "handback"
          : "human",
      routes: { answer: "answered", handback: "route", human: "handoff" },
    },
    handoff: {
      kind: "wait",
      event: "human_replied",
      // The person's reply: refused (422, or a dead letter on the bus) without an answer.
      schema: {
        type: "object",
        required: ["answer"],
        properties: {
          answer: { type: "string", minLength: 1, maxLength: 5000 },
          by: { type: "string", maxLength: 200 },
        },
      },
      timeoutMs: 24 * 3600_000,
      onTimeout: "unanswered",
      next: "answered",
    },
    answered: { kind: "end", outcome: "answered" },
    unanswered: { kind: "end", outcome: "unanswered" },
  },
  loops: [{ from: "check", to: "route", maxIterations: MAX_ROUTINGS }],
});
