import assert from "node:assert/strict";
import { definePipeline } from "./definition.ts";
import { applyPipelineEvent, type FoldEvent, foldPipelineEvents, refusal } from "./fold.ts";
import { awaitedEventId } from "./flow.ts";
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
/** An event of the run: each carries every result so far (flow.ts's FlowData). */
let results: Record<string, unknown> = {};
let runs: Record<string, number> = {};
const ev = (seq: number, type: string, step?: string, result?: unknown): FoldEvent => {
  if (seq === 1) (results = {}, runs = {});
  if (step) {
    results = { ...results, [step]: result };
    runs = { ...runs, [step]: (runs[step] ?? 0) + 1 };
  }
  return {
    seq,
    type: `tickets.${type}`,
    time: t(seq),
    item_id: "T1",
    definition: spec.hash,
    data: { input: { text: "hi" }, value: result, results, runs },
  };
};

/** An urgent item's whole run: a wait, a fan-out, a join, its end. */
const wholeRun = () => [
  ev(1, "submitted"),
  ev(2, "triage", "triage", { label: "urgent" }),
  ev(3, "approved"), // the awaited event itself: the wait's own event follows
  ev(4, "approve", "approve", { by: "alice" }),
  ev(5, "fan", "fan", {}),
  ev(6, "a", "a", { x: 1 }),
  ev(7, "b", "b", { y: 2 }),
  ev(8, "join", "join", {}),
  ev(9, "done"),
];

Deno.test("the fold records a wait with its event and deadline, then fan-out, join and outcome", () => {
  const events = wholeRun();
  const started = foldPipelineEvents(spec, events.slice(0, 1))!;
  assert.deepEqual(started.current, ["triage"]);
  assert.deepEqual(started.input, { text: "hi" });
  assert.equal(started.id, "T1");

  const waiting = foldPipelineEvents(spec, events.slice(0, 3))!;
  assert.equal(waiting.status, "waiting");
  assert.deepEqual(waiting.current, ["approve"]);
  assert.deepEqual(waiting.waiting, { step: "approve", event: "tickets.approved", until: t(62) });
  assert.equal(waiting.definition, spec.hash);

  const fanned = foldPipelineEvents(spec, events.slice(0, 5))!;
  assert.equal(fanned.status, "running");
  assert.equal(fanned.waiting, undefined);
  assert.deepEqual(fanned.current.sort(), ["a", "b"]);

  const half = foldPipelineEvents(spec, events.slice(0, 6))!;
  assert.deepEqual(half.current.sort(), ["b", "join"], "the join waits with its first input in");
  const joined = foldPipelineEvents(spec, events.slice(0, 8))!;
  assert.deepEqual(joined.current, [], "the join leads to the end step: nothing current");

  const done = foldPipelineEvents(spec, events)!;
  assert.equal(done.status, "done");
  assert.equal(done.outcome, "done");
  assert.deepEqual(done.current, []);
  assert.deepEqual(done.results.a, { x: 1 });
  assert.deepEqual(done.runs, { triage: 1, approve: 1, fan: 1, a: 1, b: 1, join: 1 });
  assert.equal(done.created_at, t(1));
  assert.equal(done.updated_at, t(9));
  assert.equal(done.first_seq, 1);
});

Deno.test("the fold orders by stream sequence and ignores redelivered events", () => {
  const events = [
    ev(1, "submitted"),
    ev(2, "triage", "triage", { label: "normal" }),
    ev(3, "fan", "fan", {}),
    ev(4, "a", "a", {}),
  ];
  const inOrder = foldPipelineEvents(spec, events);
  const shuffled = foldPipelineEvents(spec, [events[3]!, events[0]!, events[2]!, events[1]!]);
  assert.deepEqual(shuffled, inOrder);
  const again = applyPipelineEvent(spec, inOrder, events[1]!);
  assert.equal(again, inOrder, "an event at or below last_seq returns the same state");
});

Deno.test("a wait's timeout event takes the default action and a failed event ends the item", () => {
  const s = foldPipelineEvents(spec, [
    ev(1, "submitted"),
    ev(2, "triage", "triage", { label: "urgent" }),
    ev(3, "approve_timed_out", "approve", { timed_out: true }),
  ])!;
  assert.deepEqual(s.current, ["fan"]);
  assert.deepEqual(s.results.approve, { timed_out: true });
  const failed: FoldEvent = {
    seq: 3,
    type: "tickets.failed",
    time: t(3),
    data: { stage: "fan", code: "handler_failed", reason: "boom" },
  };
  const f = foldPipelineEvents(spec, [ev(1, "submitted"), ev(2, "triage", "triage", {}), failed])!;
  assert.equal(f.status, "failed");
  assert.deepEqual(f.error, { stage: "fan", code: "handler_failed", reason: "boom" });
});

Deno.test("the dashboard graph and permissions follow from the definition", () => {
  const g = pipelineGraph(spec);
  assert.ok(g.edges.some((e) => e.from === "triage" && e.to === "approve" && e.label === "urgent"));
  assert.ok(g.edges.some((e) => e.from === "approve" && e.to === "fan" && e.label === "onTimeout"));
  const p = new Map(stepPermissions(spec).map((x) => [x.step, x]));
  assert.equal(p.get("join"), undefined, "a join is held by the control service, not a step");
  assert.deepEqual(p.get("fan")!.subscribe, ["tickets.*.*"], "after the wait, or its timeout");
  assert.deepEqual(p.get("a")!.subscribe, ["tickets.fan.*"]);
  assert.ok(p.get("a")!.publish.includes("tickets.a.*"));
  assert.ok(!p.get("a")!.publish.includes("tickets.b.*"));
});

Deno.test("an event delivered late (after the item's later events) still adds its notes and results, and moves nothing back", () => {
  const note = (id: string, step: string, s: number) => ({
    id,
    step,
    at: t(s),
    kind: "answer" as const,
    result: { step },
  });
  const first = [ev(1, "submitted"), ev(2, "triage", "triage", { label: "normal" })];
  const fan = ev(3, "fan", "fan", {});
  const a = ev(4, "a", "a", { x: 1 });
  (a.data as { notes: unknown[] }).notes = [note("n-a", "a", 4)];
  const events = [...first, fan, a, ev(5, "b", "b", { y: 2 })];
  // b's event carries its branch's results only: a's are on a's event alone.
  (events[4]!.data as { results: Record<string, unknown> }).results = {
    triage: { label: "normal" },
    fan: {},
    b: { y: 2 },
  };
  const inOrder = foldPipelineEvents(spec, events)!;
  // The state writer restarted: a's event comes back after b's was written.
  let late: ReturnType<typeof applyPipelineEvent>;
  for (const e of [events[0]!, events[1]!, events[2]!, events[4]!, events[3]!]) {
    late = applyPipelineEvent(spec, late, e);
  }
  assert.deepEqual(late!.scratchpad, inOrder.scratchpad);
  assert.deepEqual(late!.results, inOrder.results);
  assert.equal(late!.runs.a, 1);
  assert.equal(late!.last_seq, 5);
  assert.deepEqual(late!.current, inOrder.current);
  // Applied again, it changes nothing (the same object).
  assert.equal(applyPipelineEvent(spec, late, events[3]!), late);
});

Deno.test("whatever order a run's events are delivered in, once all are in the state is the in-order one", () => {
  const events = wholeRun();
  // Parallel branches carry their own results only; the join carries both.
  for (const [i, own] of [[5, "a"], [6, "b"]] as const) {
    const r = { ...(events[i]!.data as { results: Record<string, unknown> }).results };
    delete r[own === "a" ? "b" : "a"];
    (events[i]!.data as { results: unknown }).results = r;
  }
  const inOrder = foldPipelineEvents(spec, events)!;
  const partial = foldPipelineEvents(spec, events.slice(0, 7))!;
  let seed = 7;
  const random = () => (seed = (seed * 48271) % 2147483647) / 2147483647;
  for (let round = 0; round < 300; round++) {
    // The stream delivers in order; a restart redelivers some of what was not written yet.
    const order = [...events].sort(() => random() - 0.5);
    for (
      const [all, expected] of [[order, inOrder], [
        order.filter((e) => e.seq <= 7),
        partial,
      ]] as const
    ) {
      // As the state writer does: an event the item's history does not lead to yet (its
      // step's input not folded yet) is retried after the rest, not folded.
      let s: ReturnType<typeof applyPipelineEvent>;
      const queue = [...all];
      for (let e = queue.shift(), tries = 0; e && tries < 100; e = queue.shift(), tries++) {
        if (s && refusal(spec, s, e) !== undefined) queue.push(e);
        else s = applyPipelineEvent(spec, s, e) ?? s;
      }
      assert.equal(queue.length, 0);
      const pick = (x: typeof s) => ({
        status: x?.status,
        outcome: x?.outcome,
        results: x?.results,
        runs: x?.runs,
        current: [...x?.current ?? []].sort(),
        waiting: x?.waiting,
        last_seq: x?.last_seq,
        first_seq: x?.first_seq,
        created_at: x?.created_at,
        input: x?.input,
        definition: x?.definition,
        id: x?.id,
      });
      assert.deepEqual(pick(s), pick(expected), all.map((e) => e.seq).join(","));
    }
  }
});

Deno.test("a failed item resumes when the event it failed on is redriven, and ends with the redriven try's outcome", () => {
  // Found by redriving a definition's dead letter after fixing its step: the item ran on to
  // its end, but its state stayed `failed` (the fold ignored everything after a failure).
  const fanEvent = { ...ev(3, "fan", "fan", {}), id: "fan-event" };
  const failure: FoldEvent = {
    seq: 5,
    type: "tickets.failed",
    time: t(5),
    item_id: "T1",
    data: {
      stage: "tickets-a",
      code: "handler_failed",
      reason: "down",
      event_id: "fan-event",
    },
  };
  const events = [
    ev(1, "submitted"),
    ev(2, "triage", "triage", { label: "normal" }),
    fanEvent,
    ev(4, "b", "b", { y: 2 }),
    failure,
  ];
  const failed = foldPipelineEvents(spec, events)!;
  assert.equal(failed.status, "failed");
  assert.deepEqual(failed.error, {
    stage: "tickets-a",
    code: "handler_failed",
    reason: "down",
    event: "fan-event",
  });
  // Another event after the failure (not a redrive) changes nothing.
  const still = applyPipelineEvent(spec, failed, { ...ev(6, "b", "b", { y: 3 }), id: "other" })!;
  assert.equal(still.status, "failed");

  // The redrive stores the failed event again, with its id: the item runs from it.
  const resumed = applyPipelineEvent(spec, still, { ...fanEvent, seq: 7, time: t(7) })!;
  assert.equal(resumed.status, "running");
  assert.equal(resumed.error, undefined);
  assert.equal(resumed.outcome, undefined);
  assert.deepEqual(resumed.redriven, [
    { stage: "tickets-a", code: "handler_failed", reason: "down", seq: 7 },
  ]);
  assert.ok(resumed.current.includes("a"), JSON.stringify(resumed.current));

  const done = [ev(8, "a", "a", { x: 1 }), ev(9, "join", "join", {}), ev(10, "done")]
    .reduce((s, e) => applyPipelineEvent(spec, s, e)!, resumed);
  assert.equal(done.status, "done");
  assert.equal(done.outcome, "done");
  assert.deepEqual(done.results.a, { x: 1 });
  assert.equal(
    foldPipelineEvents(spec, [
      ...events,
      { ...fanEvent, seq: 7, time: t(7) },
      ev(8, "a", "a", { x: 1 }),
      ev(9, "join", "join", {}),
      ev(10, "done"),
    ])!.status,
    "done",
    "deno task rebuild-state folds the same",
  );
});

Deno.test("a failed item resumes when the awaited event it failed on comes again (a person's JSON has no id: known by its subject)", () => {
  const failure: FoldEvent = {
    seq: 4,
    type: "tickets.failed",
    time: t(4),
    item_id: "T1",
    data: {
      stage: "tickets-control",
      code: "definition_changed",
      reason: "gone",
      subject: "tickets.approved.T1",
      original: { approve: true, id: "a person's own field" },
    },
  };
  const failed = foldPipelineEvents(spec, [
    ev(1, "submitted"),
    ev(2, "triage", "triage", { label: "urgent" }),
    { ...ev(3, "approved"), id: awaitedEventId("tickets.approved.T1") },
    failure,
  ])!;
  assert.equal(failed.status, "failed");
  assert.equal(failed.error?.event, awaitedEventId("tickets.approved.T1"));
  // The same subject with another body (not the message it failed on): no redrive.
  const other = applyPipelineEvent(spec, failed, {
    ...ev(5, "approved"),
    id: awaitedEventId("tickets.approved.T1"),
    body: { approve: false },
  })!;
  assert.equal(other.status, "failed");
  const resumed = applyPipelineEvent(spec, other, {
    ...ev(6, "approved"),
    id: awaitedEventId("tickets.approved.T1"),
    body: { id: "a person's own field", approve: true },
  })!;
  assert.equal(resumed.status, "running");
  const done = [ev(7, "approve", "approve", {}), ev(8, "fan", "fan", {})]
    .reduce((s, e) => applyPipelineEvent(spec, s, e)!, resumed);
  assert.deepEqual(done.current.sort(), ["a", "b"]);
});

Deno.test("a failed item resumes when the timer it failed on is redriven, and ends with the timeout's outcome", () => {
  // Found by renaming a wait step while items were held at it and back: their timers were
  // dead-lettered `definition_changed`, and redriving them ran each item on to its timeout's
  // outcome, but its state stayed `failed` (the fold skipped every timer event, the redriven
  // one too).
  const timer: FoldEvent = {
    seq: 3,
    id: "armed:approve:timer",
    type: "tickets._timer",
    time: t(3),
    item_id: "T1",
    data: { step: "approve", due: t(3), carry: { input: { text: "hi" }, results, runs } },
  };
  const failure: FoldEvent = {
    seq: 4,
    type: "tickets.failed",
    time: t(4),
    item_id: "T1",
    data: {
      stage: "tickets-control",
      code: "definition_changed",
      reason: "a timer of step approve, which definition x of tickets no longer has",
      subject: "tickets._timer.T1",
      event_id: "armed:approve:timer",
    },
  };
  const events = [ev(1, "submitted"), ev(2, "triage", "triage", { label: "urgent" })];
  assert.equal(foldPipelineEvents(spec, events)!.status, "waiting");
  const failed = foldPipelineEvents(spec, [...events, timer, failure])!;
  assert.equal(failed.status, "failed");
  assert.equal(failed.error?.event, "armed:approve:timer");
  // Another timer (not the one it failed on: a postponed one) changes nothing.
  const other = { ...timer, seq: 5, time: t(5), id: "armed:approve:timer:postponed" };
  assert.equal(applyPipelineEvent(spec, failed, other), failed);

  const redriven = { ...timer, seq: 6, time: t(6) };
  const resumed = applyPipelineEvent(spec, failed, redriven)!;
  assert.equal(resumed.status, "running");
  assert.equal(resumed.error, undefined);
  assert.equal(resumed.outcome, undefined);
  assert.deepEqual(resumed.current, ["approve"], "at the step whose timer fires");
  assert.deepEqual(resumed.redriven, [
    {
      stage: "tickets-control",
      code: "definition_changed",
      reason: "a timer of step approve, which definition x of tickets no longer has",
      seq: 6,
    },
  ]);
  const after = [ev(7, "approve_timed_out", "approve", { timed_out: true })];
  const moved = after.reduce((s, e) => applyPipelineEvent(spec, s, e)!, resumed);
  assert.deepEqual(moved.current, ["fan"]);
  assert.deepEqual(moved.results.approve, { timed_out: true });
  assert.deepEqual(
    foldPipelineEvents(spec, [...events, timer, failure, other, redriven, ...after]),
    moved,
    "deno task rebuild-state folds the same",
  );
});

Deno.test("an end stored before a failure stands, whichever of the two the state writer is handed first", () => {
  // Found in review: an item can hold both (a failure stored after its end, when the step's
  // look-up of the item's end could not answer). In order, the end stands; handed the failure
  // first (a redelivery, a second writer on the durable), the fold kept `failed`, and the live
  // state differed from `deno task rebuild-state`.
  const run = wholeRun();
  const events: FoldEvent[] = [
    ...run,
    {
      seq: 10,
      type: "tickets.failed",
      time: t(10),
      item_id: "T1",
      data: { stage: "tickets-a", code: "handler_failed", reason: "late", event_id: "x" },
    },
  ];
  const inOrder = foldPipelineEvents(spec, events)!;
  assert.equal(inOrder.status, "done");
  let late: ReturnType<typeof applyPipelineEvent>;
  for (const e of [...run.slice(0, 8), events[9]!, events[8]!]) {
    late = applyPipelineEvent(spec, late, e) ?? late;
  }
  assert.equal(late!.status, inOrder.status);
  assert.equal(late!.outcome, inOrder.outcome);
  assert.equal(late!.error, undefined);
  assert.deepEqual(late!.current, inOrder.current);
  assert.equal(late!.last_seq, 10);
});

Deno.test("an end, or a step's run, that the item's history does not lead to changes nothing: a step's key cannot end an item waiting for a decision", () => {
  // Found by probing: the reply step's key published its end for an item waiting at its human
  // approval, and the item read as done, the approval skipped.
  const waiting = foldPipelineEvents(spec, wholeRun().slice(0, 3))!;
  assert.equal(waiting.status, "waiting");
  const data = (results: Record<string, unknown>, runs: Record<string, number>) => ({
    input: { text: "hi" },
    value: {},
    results: { triage: { label: "urgent" }, ...results },
    runs: { triage: 1, ...runs },
  });
  const forged = (seq: number, type: string, d: unknown): FoldEvent => ({
    seq,
    type: `tickets.${type}`,
    time: t(seq),
    item_id: "T1",
    data: d,
  });
  // The end the join leads to, carrying a join's run the item never had.
  const end = forged(5, "done", data({ join: {} }, { join: 1 }));
  assert.match(refusal(spec, waiting, end)!, /holds no completion that leads to its end "done"/);
  const after = applyPipelineEvent(spec, waiting, end)!;
  assert.deepEqual({ ...after, last_seq: waiting.last_seq }, waiting);
  assert.equal(after.last_seq, 5);
  // A run of a step the item has not reached: the fan-out, as if the approval had passed.
  const fan = forged(6, "fan", data({ fan: {} }, { fan: 1 }));
  assert.match(refusal(spec, waiting, fan)!, /has not reached step "fan"/);
  assert.deepEqual(applyPipelineEvent(spec, waiting, fan)!.current, ["approve"]);
  // Nor by naming a route the item did not take.
  const rerouted = forged(7, "fan", { ...data({ fan: {} }, { fan: 1 }) });
  (rerouted.data as { results: Record<string, unknown> }).results.triage = { label: "normal" };
  assert.ok(refusal(spec, waiting, rerouted));
  // Once the approval is in, the same step's run counts, and so does the end after the join.
  const all = foldPipelineEvents(spec, wholeRun())!;
  assert.equal(all.status, "done");
  for (const e of wholeRun()) {
    const before = foldPipelineEvents(spec, wholeRun().filter((x) => x.seq < e.seq));
    if (before) assert.equal(refusal(spec, before, e), undefined, e.type);
  }
});

Deno.test("a step a changed definition added after a completion the item holds counts, though the item is not at it", () => {
  // Its consumer, new to the stream, reads the stream's history and runs for the item.
  const v1 = definePipeline({
    name: "orders",
    input: { schema: obj },
    start: "a",
    steps: {
      a: { kind: "task", output: obj, next: "b" },
      b: { kind: "task", output: obj, next: "done" },
      done: { kind: "end", outcome: "done" },
    },
  });
  const v2 = definePipeline({
    name: "orders",
    input: { schema: obj },
    start: "a",
    steps: {
      a: { kind: "task", output: obj, next: "x" },
      x: { kind: "task", output: obj, next: "b" },
      b: { kind: "task", output: obj, next: "done" },
      done: { kind: "end", outcome: "done" },
    },
  });
  const e = (seq: number, type: string, results: Record<string, unknown>, runs = {}) => ({
    seq,
    type: `orders.${type}`,
    time: t(seq),
    item_id: "O1",
    data: { input: {}, value: {}, results, runs },
  });
  const s = foldPipelineEvents(v1, [e(1, "submitted", {}), e(2, "a", { a: 1 }, { a: 1 })])!;
  assert.deepEqual(s.current, ["b"]);
  const x = e(3, "x", { a: 1, x: 2 }, { a: 1, x: 1 });
  assert.equal(refusal(v2, s, x), undefined);
  assert.deepEqual(applyPipelineEvent(v2, s, x)!.current.sort(), ["b"]);
  // With another result of a than the item's, it does not count.
  assert.ok(refusal(v2, s, e(3, "x", { a: 9, x: 2 }, { a: 1, x: 1 })));
});

Deno.test("applyPipelineEvent takes a step's completion once per run: a copy changes nothing, a loop's next run counts, and updated_at never moves back", () => {
  // Found by probing with a step's key: a copy of its completion for an item in flight set the
  // item's result to the copy's, named steps it was not at as current, and dated it 2000.
  const loop = definePipeline({
    name: "orders",
    input: { schema: obj },
    start: "work",
    steps: {
      work: { kind: "task", output: obj, next: "check" },
      check: { kind: "router", routes: { again: "work", ok: "done" } },
      done: { kind: "end", outcome: "done" },
    },
    loops: [{ from: "check", to: "work", maxIterations: 3 }],
  });
  const e = (
    seq: number,
    type: string,
    data: { results?: Record<string, unknown>; runs?: Record<string, number> } = {},
    time = t(seq),
  ): FoldEvent => ({
    seq,
    type: `orders.${type}`,
    time,
    item_id: "O1",
    data: { input: {}, value: {}, results: data.results ?? {}, runs: data.runs ?? {} },
  });
  const work1 = e(2, "work", { results: { work: { n: 1 } }, runs: { work: 1 } });
  const again = e(3, "check", {
    results: { work: { n: 1 }, check: { label: "again" } },
    runs: { work: 1, check: 1 },
  });
  const work2 = e(4, "work", {
    results: { work: { n: 2 }, check: { label: "again" } },
    runs: { work: 2, check: 1 },
  });
  const s4 = foldPipelineEvents(loop, [e(1, "submitted"), work1, again, work2])!;
  assert.deepEqual(s4.results.work, { n: 2 }, "the loop's second run counts");
  assert.deepEqual(s4.current, ["check"]);
  assert.equal(s4.runs.work, 2);
  // A copy of work's first run (another id, another result, dated 2000), then of its second.
  const copy1 = {
    ...work1,
    seq: 5,
    id: "again",
    time: "2000-01-01T00:00:00.000Z",
    data: { ...work1.data as object, results: { work: { n: "FORGED" } } },
  };
  const copy2 = { ...work2, seq: 6, id: "again-2", data: { ...work2.data as object, value: 1 } };
  const s5 = applyPipelineEvent(loop, s4, copy1)!;
  assert.deepEqual({ ...s5, last_seq: s4.last_seq }, s4, "the first run's copy changed nothing");
  const s6 = applyPipelineEvent(loop, s5, copy2)!;
  assert.deepEqual({ ...s6, last_seq: s4.last_seq }, s4, "the second run's copy changed nothing");
  // One claiming a third run, while the item is at check (not at work): nothing either.
  const s7 = applyPipelineEvent(loop, s6, {
    ...work2,
    seq: 7,
    id: "again-3",
    data: { ...work2.data as object, runs: { work: 3, check: 1 } },
  })!;
  assert.deepEqual({ ...s7, last_seq: s4.last_seq }, s4, "a claimed third run changed nothing");
  assert.equal(s7.last_seq, 7);
  const done = applyPipelineEvent(
    loop,
    s7,
    e(8, "check", {
      results: { work: { n: 2 }, check: { label: "ok" } },
      runs: { work: 2, check: 2 },
    }, "2000-01-01T00:00:00.000Z"),
  )!;
  assert.equal(done.current.length, 0);
  assert.equal(done.updated_at, s7.updated_at, "an earlier time leaves updated_at");
  assert.ok(done.updated_at >= done.created_at);
});

Deno.test("a join's timeout leaves the branch it went on without, and that branch's late run changes nothing", () => {
  const round = [
    ev(1, "submitted"),
    ev(2, "triage", "triage", { label: "normal" }),
    ev(3, "fan", "fan", {}),
    ev(4, "a", "a", { x: 1 }),
  ];
  const at = foldPipelineEvents(spec, round)!;
  assert.deepEqual(at.current.sort(), ["b", "join"]);
  // The control step counts b's run of this round on the timeout (runtime.ts, wentOnWithout).
  const timedOut: FoldEvent = {
    ...ev(5, "join_timed_out"),
    data: {
      input: { text: "hi" },
      value: { a: { x: 1 } },
      results: { ...results, join: { timed_out: true } },
      runs: { ...runs, b: 1, join: 1 },
    },
  };
  const after = applyPipelineEvent(spec, at, timedOut)!;
  assert.deepEqual(after.current, [], "not at b any more (its end follows the timeout)");
  assert.equal(after.runs.b, 1);
  // b's late run of that round: a copy of the run the item holds, with no result of its own.
  const lateB: FoldEvent = {
    ...ev(6, "b"),
    data: {
      input: { text: "hi" },
      value: { y: 2 },
      results: { triage: { label: "normal" }, fan: {}, b: { y: 2 } },
      runs: { triage: 1, fan: 1, b: 1 },
    },
  };
  const late = applyPipelineEvent(spec, after, lateB)!;
  assert.deepEqual(late.results.b, undefined);
  assert.deepEqual(late.current, []);
  assert.equal(late.updated_at, after.updated_at);
});
