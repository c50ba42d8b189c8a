import assert from "node:assert/strict";
import { pipelineGraph, stepConsumers } from "../../mod.ts";
import { tickets } from "./tickets.ts";

Deno.test("the README's tickets example is a valid definition with the consumers it promises", () => {
  const consumers = stepConsumers(tickets, { ackWaitMs: 30_000, maxAttempts: 5 });
  assert.deepEqual(consumers.map((c) => [c.durable_name, c.filter_subject]), [
    ["tickets-triage", "tickets.submitted.*"],
    ["tickets-route", "tickets.triage.*"],
    ["tickets-reply", "tickets.*.*"],
  ]);
  assert.equal(pipelineGraph(tickets).nodes.length, 7);
});
