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

Deno.test("the README's 'Write your own pipeline' shows this file, whole, in 40 lines or fewer", async () => {
  const root = new URL("../../", import.meta.url);
  const readme = await Deno.readTextFile(new URL("README.md", root));
  const section = readme.slice(readme.indexOf("## Write your own pipeline"));
  const block = section.slice(section.indexOf("```ts\n") + 6, section.indexOf("```\n", 6));
  const file = await Deno.readTextFile(new URL("pipelines/examples/tickets.ts", root));
  assert.equal(block, file);
  assert.ok(file.trimEnd().split("\n").length <= 40);
});
