/**
 * Sketch of the agent pipeline (issue 12): a router hands a request to a specialised agent
 * (billing, technical, general); agents share the item's scratchpad and may call tools; an
 * agent may hand back to the router, at most 3 times in all; the run ends with an answer or
 * a human handoff with a deadline. Data only: no executor runs agents yet.
 *
 * @module
 */
import { definePipeline } from "../../src/pipeline/definition.ts";

const obj = { type: "object" } as const;
const tools = {
  lookup_order: {
    description: "Look up an order by id in the orders bucket",
    parameters: {
      type: "object",
      required: ["order_id"],
      properties: { order_id: { type: "string" } },
    },
  },
  search_faq: {
    description: "Search the FAQ",
    parameters: { type: "object", required: ["query"], properties: { query: { type: "string" } } },
  },
} as const;

/** The support agent pipeline's definition. */
export const supportPipeline = definePipeline({
  name: "support",
  description: "Customer support: router -> specialised agents -> answer or human",
  input: {
    schema: { type: "object", required: ["text"], properties: { text: { type: "string" } } },
  },
  start: "route",
  steps: {
    route: {
      kind: "router",
      routes: { billing: "billing", technical: "technical", general: "general" },
    },
    billing: {
      kind: "agent",
      prompt: "prompts/billing.md",
      tools,
      maxTurns: 4,
      output: obj,
      next: "check",
    },
    technical: {
      kind: "agent",
      prompt: "prompts/technical.md",
      tools,
      maxTurns: 4,
      output: obj,
      next: "check",
    },
    general: {
      kind: "agent",
      prompt: "prompts/general.md",
      tools,
      maxTurns: 4,
      output: obj,
      next: "check",
    },
    check: { kind: "router", routes: { answer: "answered", handback: "route", human: "handoff" } },
    handoff: {
      kind: "wait",
      event: "human_replied",
      timeoutMs: 24 * 3600_000,
      onTimeout: "unanswered",
      next: "answered",
    },
    answered: { kind: "end", outcome: "answered" },
    unanswered: { kind: "end", outcome: "unanswered" },
  },
  loops: [{ from: "check", to: "route", maxIterations: 3 }],
});
