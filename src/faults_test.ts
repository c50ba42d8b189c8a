import assert from "node:assert/strict";
import { InjectedFault, withFaults } from "./faults.ts";
import type { Stage } from "./stage.ts";

const stage: Stage<{ kind: "document"; name: "feedback.submit" }> = {
  name: "topics",
  filterSubject: "feedback.submit",
  stream: "FEEDBACK",
  failedType: "feedback.failed",
  input: { kind: "document", name: "feedback.submit" },
  handle: () => [],
};
const ctx = {
  source: "t",
  message: { subject: "s", seq: 1, storedAt: 0, deliveryCount: 1 },
  now: () => new Date(0),
  signal: new AbortController().signal,
};
const off = { failOn: "", failStage: "", slowMs: 0, slowStage: "" };

Deno.test("withFaults returns the stage itself when no fault is configured", () => {
  assert.equal(withFaults(stage, off), stage);
  assert.equal(withFaults(stage, { ...off, failOn: "crash", failStage: "sentiment" }), stage);
});

Deno.test("withFaults fails on matching text in any case, only in the named stage", async () => {
  const faulty = withFaults(stage, { ...off, failOn: "crash", failStage: "sentiment,topics" });
  await assert.rejects(async () => await faulty.handle({ text: "It CRASHED" }, ctx), InjectedFault);
  assert.deepEqual(await faulty.handle({ text: "all good" }, ctx), []);
});

Deno.test("withFaults fails a definition's step on its item's input text", async () => {
  // Found by probing: WEFT_FAIL_ON never fired on a definition's steps, whose events carry
  // the item's input under data.input.
  const faulty = withFaults(stage, { ...off, failOn: "crash", failStage: "topics" });
  const event = (text: string) => ({ data: { input: { text }, results: {}, value: {} } }) as never;
  await assert.rejects(async () => await faulty.handle(event("it crashed?"), ctx), InjectedFault);
  assert.deepEqual(await faulty.handle(event("fine"), ctx), []);
});

Deno.test("withFaults delays the handler by slowMs and stops waiting when aborted", async () => {
  const slow = withFaults(stage, { ...off, slowMs: 60, slowStage: "*" });
  const t0 = performance.now();
  await slow.handle({ text: "x" }, ctx);
  assert.ok(performance.now() - t0 >= 55);
  const abort = new AbortController();
  const long = withFaults(stage, { ...off, slowMs: 60_000 });
  const p = long.handle({ text: "x" }, { ...ctx, signal: abort.signal });
  abort.abort();
  assert.deepEqual(await p, []);
});
