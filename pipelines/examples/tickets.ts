import { definePipeline } from "../../mod.ts";

const obj = { type: "object" } as const;

/** Support tickets: LLM triage, a human approves urgent replies, then the reply goes out. */
export const tickets = definePipeline({
  name: "tickets",
  input: { schema: { type: "object", required: ["customer", "text"] } },
  start: "triage",
  steps: {
    triage: { kind: "llm", prompt: "prompts/triage.md", output: obj, next: "route" },
    route: {
      kind: "router",
      route: (t: { urgent: boolean }) => (t.urgent ? "urgent" : "normal"),
      routes: { urgent: "approval", normal: "reply" },
    },
    approval: {
      kind: "wait",
      event: "approved",
      timeoutMs: 4 * 3600_000,
      onTimeout: "escalated",
      next: "reply",
    },
    reply: {
      kind: "task",
      output: obj,
      handle: (_v: unknown, ctx: { input: { customer: string } }) => ({
        to: ctx.input.customer,
        body: "Thanks, on it.",
      }),
      flow: { concurrency: { limit: 5, key: "customer" } },
      next: "sent",
    },
    sent: { kind: "end", outcome: "sent" },
    escalated: { kind: "end", outcome: "escalated" },
  },
});
