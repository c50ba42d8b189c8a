/**
 * Types follow from a definition's schemas. These tests are checked by the compiler
 * (`deno test` type-checks them): each `@ts-expect-error` line must fail to compile, or the
 * test file itself does not compile.
 */
import assert from "node:assert/strict";
import { definePipeline, type Infer, type StepContext, type ValueOf } from "./definition.ts";

const ticket = {
  type: "object",
  required: ["customer", "text"],
  properties: { customer: { type: "string" }, text: { type: "string" } },
} as const;
const reply = {
  type: "object",
  required: ["to"],
  properties: { to: { type: "string" } },
  additionalProperties: false,
} as const;

Deno.test("Infer gives the type a schema describes", () => {
  const t: Infer<typeof ticket> = { customer: "c1", text: "the export crashes" };
  // @ts-expect-error: `text` is required
  const missing: Infer<typeof ticket> = { customer: "c1" };
  // @ts-expect-error: `customer` is a string
  const wrong: Infer<typeof ticket> = { customer: 1, text: "x" };
  assert.equal(t.customer, "c1");
  assert.ok(missing && wrong);
});

Deno.test("a task's handler returns what its output schema describes, or the definition does not compile", () => {
  const good = definePipeline({
    name: "typed",
    input: { schema: ticket },
    start: "reply",
    steps: {
      reply: {
        kind: "task",
        output: reply,
        handle: (_v: unknown, ctx: StepContext<Infer<typeof ticket>>) => ({
          to: ctx.input.customer,
        }),
        next: "done",
      },
      done: { kind: "end", outcome: "done" },
    },
  });
  assert.equal(good.hash.length, 16);
  const wrongResult = definePipeline({
    name: "typed",
    input: { schema: ticket },
    start: "reply",
    steps: {
      reply: {
        kind: "task",
        output: reply,
        // @ts-expect-error: `to` must be a string
        handle: () => ({ to: 5 }),
        next: "done",
      },
      done: { kind: "end", outcome: "done" },
    },
  });
  const wrongInput = definePipeline({
    name: "typed",
    input: { schema: ticket },
    start: "reply",
    steps: {
      reply: {
        kind: "task",
        output: reply,
        // @ts-expect-error: the input schema gives `customer` as a string, not a number
        handle: (_v: unknown, ctx: StepContext<{ customer: number }>) => ({
          to: `${ctx.input.customer}`,
        }),
        next: "done",
      },
      done: { kind: "end", outcome: "done" },
    },
  });
  // (Handlers are plain data to the runtime check: both pass it; only the compiler refuses.)
  assert.ok(wrongResult.hash && wrongInput.hash);
});

Deno.test("a task's handler is handed what the step before returns, or the definition does not compile", () => {
  const chain = definePipeline({
    name: "chain",
    input: { schema: ticket },
    start: "reply",
    steps: {
      reply: { kind: "task", output: reply, handle: () => ({ to: "ann" }), next: "send" },
      send: {
        kind: "task",
        output: { type: "object" },
        handle: (v: { to: string }) => ({ sent_to: v.to }),
        next: "done",
      },
      done: { kind: "end", outcome: "done" },
    },
  });
  // The first step is handed the input document; the second, the first's result.
  const first: ValueOf<typeof chain, "reply"> = { customer: "c1", text: "hi" };
  const second: ValueOf<typeof chain, "send"> = { to: "ann" };
  // @ts-expect-error: `reply` returns `to` as a string
  const wrong: ValueOf<typeof chain, "send"> = { to: 1 };
  assert.ok(first && second && wrong);
  const mismatched = definePipeline({
    name: "chain",
    input: { schema: ticket },
    start: "reply",
    steps: {
      reply: { kind: "task", output: reply, handle: () => ({ to: "ann" }), next: "send" },
      send: {
        kind: "task",
        output: { type: "object" },
        // @ts-expect-error: the step before hands on `{ to: string }`, not a number
        handle: (v: { to: number }) => ({ sent_to: v.to + 1 }),
        next: "done",
      },
      done: { kind: "end", outcome: "done" },
    },
  });
  assert.ok(mismatched.hash);
});
