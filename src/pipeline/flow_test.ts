import assert from "node:assert/strict";
import { definePipeline } from "./definition.ts";
import {
  advance,
  compileFlow,
  completion,
  decodeFlowEvent,
  entryData,
  flowEvent,
  targetsOf,
} from "./flow.ts";

const obj = { type: "object" } as const;
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
    redo: { kind: "router", routes: { again: "extract", done: "paid" } },
    paid: { kind: "end", outcome: "paid" },
    filed: { kind: "end", outcome: "filed" },
  },
  loops: [{ from: "redo", to: "extract", maxIterations: 2 }],
});
const flow = compileFlow(def);
const ctx = { source: "test", now: new Date("2026-01-01T00:00:00Z") };
const start = flowEvent(
  flow,
  "submitted",
  { id: "e0", item_id: "D1", trace_id: "t".repeat(32) },
  entryData({ n: 1 }),
  ctx,
);

Deno.test("an entry event hands the item to the first step; a router's event to its label's step only", () => {
  assert.deepEqual(targetsOf(flow, "submitted", start.data), ["extract"]);
  const routed = advance(start.data, "kind", { label: "invoice" }, start.data.value);
  assert.deepEqual(targetsOf(flow, "kind", routed), ["pay"]);
  assert.deepEqual(targetsOf(flow, "pay", routed), ["check", "book"], "fan-out");
  assert.deepEqual(targetsOf(flow, "both_timed_out", routed), ["filed"], "a join's deadline");
  assert.deepEqual(targetsOf(flow, "filed", routed), [], "an end");
});

Deno.test("a step leading to an end step publishes the end event too, with ids derived from the cause", () => {
  const data = advance(start.data, "kind", { label: "other" }, start.data.value);
  const events = completion(flow, "kind", start, data, ctx);
  assert.deepEqual(events.map((e) => e.type), ["docs.kind", "docs.filed"]);
  assert.ok(events.every((e) => e.item_id === "D1" && e.definition === def.hash));
  const again = completion(flow, "kind", start, data, ctx);
  assert.deepEqual(again.map((e) => e.id), events.map((e) => e.id), "a redelivery: same ids");
});

Deno.test("a loop runs at most its bound: the next turn is refused with loop_limit", () => {
  let data = start.data;
  data = advance(data, "extract", {}, {});
  data = advance(data, "extract", {}, {}); // extract ran twice: the bound
  const back = advance(data, "redo", { label: "again" }, {});
  assert.throws(
    () => completion(flow, "redo", start, back, ctx),
    (err) => (err as { code?: string }).code === "loop_limit",
  );
  const once = advance(advance(start.data, "extract", {}, {}), "redo", { label: "again" }, {});
  assert.equal(completion(flow, "redo", start, once, ctx)[0]!.type, "docs.redo");
});

Deno.test("an event is refused when its body names another item or type than its subject", () => {
  assert.equal(decodeFlowEvent(flow, start, "docs.submitted.D1").item_id, "D1");
  assert.throws(
    () => decodeFlowEvent(flow, start, "docs.submitted.VICTIM"),
    (err) => (err as { code?: string }).code === "subject_mismatch",
  );
  assert.throws(
    () => decodeFlowEvent(flow, start, "docs.extract.D1"),
    (err) => (err as { field?: string }).field === "/type",
  );
  assert.throws(() => decodeFlowEvent(flow, { ...start, data: 5 }, "docs.submitted.D1"));
});
