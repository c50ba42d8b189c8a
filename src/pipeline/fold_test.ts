import assert from "node:assert/strict";
import { definePipeline } from "./definition.ts";
import { applyPipelineEvent, type FoldEvent, foldPipelineEvents } from "./fold.ts";
import { pipelineGraph, stepPermissions } from "./derive.ts";

const obj = { type: "object" } as const;
const spec = definePipeline({
  name: "tickets",
  input: { schema: obj },
  start: "triage",
  steps: {
    triage: { kind: "router", routes: { urgent: "approve", normal: "fan" } },
    approve: { kind: "wait", event: "approved", timeoutMs: 60_000, onTimeout: "fan", next: "fan" },
    fan: { kind: "task", output: obj, next: ["a", "b"] },
    a: { kind: "task", output: obj, next: "join" },
    b: { kind: "task", output: obj, next: "join" },
    join: { kind: "join", after: ["a", "b"], deadlineMs: 5000, onDeadline: "done", next: "done" },
    done: { kind: "end", outcome: "done" },
  },
});
const t = (s: number) => new Date(Date.UTC(2026, 0, 1, 0, 0, s)).toISOString();
const ev = (seq: number, type: string, data?: unknown): FoldEvent => ({
  seq,
  type: `tickets.${type}`,
  time: t(seq),
  definition: spec.hash,
  data,
});

Deno.test("the fold records a wait with its event and deadline, then fan-out, join and outcome", () => {
  const events = [
    ev(1, "triage", { label: "urgent" }),
    ev(2, "approved", { by: "alice" }),
    ev(3, "fan", {}),
    ev(4, "a", { x: 1 }),
    ev(5, "b", { y: 2 }),
    ev(6, "join", {}),
    ev(7, "done", {}),
  ];
  const waiting = foldPipelineEvents(spec, events.slice(0, 1))!;
  assert.equal(waiting.status, "waiting");
  assert.deepEqual(waiting.current, ["approve"]);
  assert.deepEqual(waiting.waiting, { step: "approve", event: "tickets.approved", until: t(61) });
  assert.equal(waiting.definition, spec.hash);

  const fanned = foldPipelineEvents(spec, events.slice(0, 3))!;
  assert.equal(fanned.status, "running");
  assert.equal(fanned.waiting, undefined);
  assert.deepEqual(fanned.current.sort(), ["a", "b"]);

  const half = foldPipelineEvents(spec, events.slice(0, 4))!;
  assert.deepEqual(half.current, ["b"], "the join is not current until both inputs are in");
  const joined = foldPipelineEvents(spec, events.slice(0, 5))!;
  assert.deepEqual(joined.current, ["join"]);

  const done = foldPipelineEvents(spec, events)!;
  assert.equal(done.status, "done");
  assert.equal(done.outcome, "done");
  assert.deepEqual(done.current, []);
  assert.deepEqual(done.results.a, { x: 1 });
  assert.deepEqual(done.runs, { triage: 1, fan: 1, a: 1, b: 1, join: 1 });
  assert.equal(done.createdAt, t(1));
  assert.equal(done.updatedAt, t(7));
});

Deno.test("the fold orders by stream sequence and ignores redelivered events", () => {
  const events = [ev(1, "triage", { label: "normal" }), ev(2, "fan", {}), ev(3, "a", {})];
  const inOrder = foldPipelineEvents(spec, events);
  const shuffled = foldPipelineEvents(spec, [events[2]!, events[0]!, events[1]!]);
  assert.deepEqual(shuffled, inOrder);
  const again = applyPipelineEvent(spec, inOrder, events[1]!);
  assert.equal(again, inOrder, "an event at or below lastSeq returns the same state");
});

Deno.test("a wait's timeout event takes the default action and a failed event ends the item", () => {
  const s = foldPipelineEvents(spec, [
    ev(1, "triage", { label: "urgent" }),
    ev(2, "approve_timed_out"),
  ])!;
  assert.deepEqual(s.current, ["fan"]);
  assert.deepEqual(s.results.approve, { timedOut: true });
  const f = foldPipelineEvents(spec, [ev(1, "triage", { label: "normal" }), ev(2, "failed")])!;
  assert.equal(f.status, "failed");
});

Deno.test("the dashboard graph and permissions follow from the definition", () => {
  const g = pipelineGraph(spec);
  assert.ok(g.edges.some((e) => e.from === "triage" && e.to === "approve" && e.label === "urgent"));
  assert.ok(g.edges.some((e) => e.from === "approve" && e.to === "fan" && e.label === "onTimeout"));
  const p = new Map(stepPermissions(spec).map((x) => [x.step, x]));
  assert.deepEqual(p.get("join")!.subscribe, ["tickets.*.*"]);
  assert.ok(p.get("triage")!.publish.includes("tickets.approve_timed_out.*"));
});
