import assert from "node:assert/strict";
import { definePipeline } from "./definition.ts";
import {
  endTypesOf,
  onceTypesOf,
  stepFilterSubject,
  stepFilterSubjects,
  stepInput,
} from "./derive.ts";

const obj = { type: "object" } as const;

Deno.test("an item has at most one of each event of a step on no loop and no two branches of a fan-out", () => {
  const def = definePipeline({
    name: "docs",
    input: { schema: obj },
    start: "extract",
    steps: {
      extract: { kind: "task", output: obj, next: "kind" },
      kind: { kind: "router", routes: { invoice: "pay", other: "filed" } },
      pay: { kind: "task", output: obj, next: ["check", "book"] },
      check: { kind: "task", output: obj, next: "both" },
      book: { kind: "task", output: obj, next: "both" },
      both: {
        kind: "join",
        after: ["check", "book"],
        deadlineMs: 1000,
        onDeadline: "filed",
        next: "redo",
      },
      redo: { kind: "router", routes: { again: "extract", done: "approve" } },
      approve: {
        kind: "wait",
        event: "approved",
        timeoutMs: 1000,
        onTimeout: "filed",
        next: "paid",
      },
      paid: { kind: "end", outcome: "paid" },
      filed: { kind: "end", outcome: "filed" },
    },
    loops: [{ from: "redo", to: "extract", maxIterations: 2 }],
  });
  assert.deepEqual([...endTypesOf(def)].sort(), ["docs.filed", "docs.paid"]);
  // extract .. redo are on the loop redo -> extract; approve is after it, and runs once.
  assert.deepEqual([...onceTypesOf(def)].sort(), [
    "docs.approve",
    "docs.approve_timed_out",
    "docs.filed",
    "docs.paid",
  ]);
});

Deno.test("a step two branches of one fan-out reach without a join runs once per branch", () => {
  const def = definePipeline({
    name: "fan",
    input: { schema: obj },
    start: "split",
    steps: {
      split: { kind: "task", output: obj, next: ["left", "right"] },
      left: { kind: "task", output: obj, next: ["notify", "both"] },
      right: { kind: "task", output: obj, next: ["notify", "both"] },
      notify: { kind: "task", output: obj, next: "noted" },
      noted: { kind: "end", outcome: "noted" },
      both: {
        kind: "join",
        after: ["left", "right"],
        deadlineMs: 1000,
        onDeadline: "late",
        next: "sent",
      },
      sent: { kind: "end", outcome: "sent" },
      late: { kind: "end", outcome: "late" },
    },
  });
  const once = onceTypesOf(def);
  for (const step of ["split", "left", "right", "both", "both_timed_out", "sent", "late"]) {
    assert.ok(once.has(`fan.${step}`), step);
  }
  assert.ok(!once.has("fan.notify"), "reached from both branches");
});

Deno.test("a work step's stage input names the pipeline's outcomes", () => {
  const def = definePipeline({
    name: "orders",
    input: { schema: obj, event: "placed" },
    start: "price",
    steps: {
      price: { kind: "task", output: obj, next: "done" },
      done: { kind: "end", outcome: "done" },
    },
  });
  assert.deepEqual([...stepInput(def, "price").finalTypes], ["orders.done"]);
});

Deno.test("a step with several inputs filters on each of their subjects; its wildcard is for older servers", () => {
  const p = definePipeline({
    name: "p",
    input: { schema: { type: "object" } },
    start: "a",
    steps: {
      a: { kind: "router", route: () => "x" as const, routes: { x: "b", y: "c" } },
      b: { kind: "task", output: { type: "object" }, handle: (v) => v, next: "c" },
      c: { kind: "task", output: { type: "object" }, handle: (v) => v, next: "done" },
      done: { kind: "end", outcome: "done" },
    },
  });
  assert.deepEqual(stepFilterSubjects(p, "c"), ["p.a.*", "p.b.*"]);
  assert.equal(stepFilterSubject(p, "c"), "p.*.*");
  assert.deepEqual(stepFilterSubjects(p, "b"), ["p.a.*"]);
  assert.equal(stepFilterSubjects(p, "done"), null);
});
