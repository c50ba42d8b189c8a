import { definePipeline } from "../../mod.ts";

const triaged = { type: "object", properties: { urgent: { type: "boolean" } } } as const;
const ticket = {
  type: "object",
  required: ["customer", "text"],
  properties: { customer: { type: "string" }, text: { type: "string" } },
} as const;
export const tickets = definePipeline({
  name: "tickets",
  input: { schema: ticket },
  start: "triage",
  steps: {
    triage: { kind: "llm", prompt: "prompts/triage.md", output: triaged, next: "route" },
    route: { kind: "router", routes: { urgent: "approval", normal: "reply" } },
    approval: {
      kind: "wait",
      event: "approved",
      timeoutMs: 4 * 3600_000,
      onTimeout: "escalated",
      next: "reply",
    },
    reply: {
      kind: "task",
      output: { type: "object" },
      flow: { concurrency: { limit: 5, key: "customer" } },
      next: "sent",
    },
    sent: { kind: "end", outcome: "sent" },
    escalated: { kind: "end", outcome: "escalated" },
  },
}, {
  // Handlers, typed from the definition: `t` is what triage returns; `ctx.input`, a ticket.
  route: (t) => (t.urgent ? "urgent" : "normal"),
  reply: (_v, ctx) => ({ to: ctx.input.customer, body: "Thanks, on it." }),
});
