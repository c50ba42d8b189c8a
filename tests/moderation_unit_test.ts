/**
 * The pure parts of content moderation: review transitions, the content state fold, the
 * rules-based toxicity analyzer, schedule arithmetic and API-key checks.
 */
import assert from "node:assert/strict";
import { toxicityAnalyzer } from "../src/ai/analyzers/mod.ts";
import { describeConfig, loadConfig, parseApiKeys } from "../src/config.ts";
import { applyContentEvent } from "../pipelines/moderation/state.ts";
import { ConflictError, ValidationError, type WeftError } from "../src/errors.ts";
import { createEvent } from "../src/events.ts";
import { createAuth, hashKey } from "../src/gateway/auth.ts";
import {
  claimReview,
  decideReview,
  escalateReview,
  type ReviewEntry,
} from "../pipelines/moderation/review_queue.ts";
import { afterFiring, newScheduleEntry } from "../src/scheduler/store.ts";
import { moderationStage } from "../pipelines/moderation/stages.ts";
import type { ContentEvent } from "../pipelines/moderation/events.ts";

const T0 = new Date("2026-01-01T00:00:00.000Z");
const at = (ms: number) => new Date(T0.getTime() + ms);
const entry: ReviewEntry = {
  id: "c1",
  status: "pending",
  trace_id: "0af7651916cd43dd8448eb211c80319c",
  queued_at: T0.toISOString(),
  escalation_level: 0,
  content: { text: "you idiot" },
  moderation: {
    verdict: "flagged",
    categories: ["insult"],
    score: 0.6,
    analyzer: "rules",
    reasons: [],
  },
};

Deno.test("claimReview refuses a live claim by someone else and allows it once lapsed", () => {
  const claimed = claimReview(entry, "alice", T0, 1000);
  assert.throws(() => claimReview(claimed, "bob", at(999), 1000), ConflictError);
  assert.equal(claimReview(claimed, "bob", at(1001), 1000).claim?.reviewer, "bob");
  assert.equal(claimReview(claimed, "alice", at(500), 1000).claim?.reviewer, "alice");
});

Deno.test("decideReview decides once, replays the same decision and refuses any other", () => {
  const { entry: decided } = decideReview(entry, {
    decision: "approve",
    reason: "ok",
    reviewer: "alice",
    automatic: false,
  }, T0);
  assert.equal(decided.status, "decided");
  const replay = decideReview(decided, {
    decision: "approve",
    reason: "ok",
    reviewer: "alice",
    automatic: false,
  }, at(5));
  assert.equal(replay.replayed, true);
  assert.throws(
    () =>
      decideReview(
        decided,
        { decision: "reject", reason: "no", reviewer: "bob", automatic: false },
        at(5),
      ),
    ConflictError,
  );
  assert.throws(() => claimReview(decided, "bob", at(5), 1000), ConflictError);
});

Deno.test("decideReview refuses a reviewer without the live claim, but the SLA default overrides", () => {
  const claimed = claimReview(entry, "alice", T0, 60_000);
  assert.throws(
    () =>
      decideReview(
        claimed,
        { decision: "reject", reason: "x", reviewer: "bob", automatic: false },
        at(1),
      ),
    ConflictError,
  );
  const auto = decideReview(claimed, {
    decision: "reject",
    reason: "sla",
    reviewer: "weft-sla",
    automatic: true,
  }, at(1));
  assert.equal(auto.entry.decision?.automatic, true);
});

Deno.test("escalateReview moves only pending items", () => {
  const escalated = escalateReview(entry, at(1000))!;
  assert.equal(escalated.status, "escalated");
  assert.equal(escalated.due_at, at(1000).toISOString());
  assert.equal(escalateReview(escalated, at(2000)), null);
});

function ev<K extends ContentEvent["type"]>(
  type: K,
  data: Extract<ContentEvent, { type: K }>["data"],
  ms: number,
): ContentEvent {
  return createEvent({
    type,
    itemId: "c1",
    traceId: entry.trace_id,
    source: "test",
    data,
    id: `${type}-${ms}`,
    time: at(ms),
  } as never) as ContentEvent;
}

/** `events` (event i stored at stream sequence i + 1) folded in the order `order` gives. */
function foldInOrder(events: readonly ContentEvent[], order: readonly number[]) {
  return order.reduce<ReturnType<typeof applyContentEvent> | undefined>(
    (s, i) => applyContentEvent(s, events[i]!, i + 1),
    undefined,
  )!;
}

Deno.test("applyContentEvent folds in any order to the furthest step, idempotently", () => {
  const events = [
    ev("content.uploaded", { text: "hi" }, 0),
    ev("content.moderated", { content: { text: "hi" }, moderation: entry.moderation }, 1),
    ev("content.review_requested", {
      content: { text: "hi" },
      moderation: entry.moderation,
      queued_at: at(1).toISOString(),
      due_at: at(100).toISOString(),
    }, 2),
    ev("content.decided", {
      content: { text: "hi" },
      decision: "reject",
      reason: "no",
      reviewer: "bob",
      automatic: false,
    }, 3),
    ev("content.archived", { content: { text: "hi" }, reason: "rejected" }, 4),
  ];
  const forward = events.reduce<ReturnType<typeof applyContentEvent> | undefined>(
    (s, e, i) => applyContentEvent(s, e, i + 1),
    undefined,
  )!;
  const backward = [...events].reverse().reduce<ReturnType<typeof applyContentEvent> | undefined>(
    (s, e) => applyContentEvent(s, e, events.indexOf(e) + 1),
    undefined,
  )!;
  assert.equal(forward.status, "archived");
  assert.deepEqual(backward, forward);
  assert.equal(applyContentEvent(forward, events[2]!, 3), forward, "a redelivery changes nothing");
  assert.equal(forward.review?.reviewer, "bob");
});

Deno.test("applyContentEvent: a failure stored after the item's outcome leaves the outcome, in any order", () => {
  const events = [
    ev("content.uploaded", { text: "hi" }, 0),
    ev("content.moderated", { content: { text: "hi" }, moderation: entry.moderation }, 1),
    ev("content.published", { content: { text: "hi" }, via: "moderation" }, 2),
    // A poison or forged copy of an event of it, read after it was published.
    ev("content.failed", {
      stage: "moderation",
      code: "invalid_event",
      reason: "/text is required",
      attempts: 1,
    }, 3),
  ];
  const fold = (order: number[]) => foldInOrder(events, order);
  const forward = fold([0, 1, 2, 3]);
  assert.equal(forward.status, "published");
  assert.equal(forward.error, undefined);
  assert.deepEqual(fold([3, 2, 1, 0]), forward);
  assert.deepEqual(fold([1, 3, 0, 2]), forward);
  // A failure before the outcome (then redriven) is replaced by it, error and all.
  const redriven = [0, 1, 3, 2].map((i) => events[i]!).reduce<
    ReturnType<typeof applyContentEvent> | undefined
  >((s, e, seq) => applyContentEvent(s, e, seq + 1), undefined)!;
  assert.equal(redriven.status, "published");
  assert.equal(redriven.error, undefined);
});

Deno.test("applyContentEvent: of two failures, the first redriven, the later stands, in any order", () => {
  const failure = (stage: string, reason: string, ms: number) =>
    ev("content.failed", { stage, code: "handler_failed", reason, attempts: 3 }, ms);
  const events = [
    ev("content.uploaded", { text: "hi" }, 0),
    failure("moderation", "first", 1),
    // The first failure redriven: moderation runs again, then the item fails again.
    ev("content.moderated", { content: { text: "hi" }, moderation: entry.moderation }, 2),
    failure("review", "second", 3),
  ];
  const fold = (order: number[]) => foldInOrder(events, order);
  const forward = fold([0, 1, 2, 3]);
  assert.equal(forward.status, "failed");
  assert.equal(forward.error?.reason, "second", "the item's error is its latest failure's");
  assert.equal(forward.stages.failed?.seq, 4);
  // A writer that put the first failure off for its letter, or a writer's replica, folds it
  // last: it changes nothing, so the state equals a rebuild's.
  assert.deepEqual(fold([0, 2, 3, 1]), forward);
  assert.deepEqual(fold([3, 2, 1, 0]), forward);
});

Deno.test("applyContentEvent: an item's first outcome stands, and a decision on an item moderation found safe shows nowhere, in any order", () => {
  const events = [
    ev("content.uploaded", { text: "hi" }, 0),
    ev("content.moderated", {
      content: { text: "hi" },
      moderation: { ...entry.moderation, verdict: "safe" },
    }, 1),
    ev("content.published", { content: { text: "hi" }, via: "moderation" }, 2),
    // Forged: a rejection of an item nobody reviewed, and the archive it would lead to.
    ev("content.decided", {
      content: { text: "forged" },
      decision: "reject",
      reason: "forged",
      reviewer: "mallory",
      automatic: false,
    }, 3),
    ev("content.archived", { content: { text: "forged" }, reason: "rejected" }, 4),
  ];
  const fold = (order: number[]) => foldInOrder(events, order);
  const forward = fold([0, 1, 2, 3, 4]);
  assert.equal(forward.status, "published");
  assert.equal(forward.review, undefined);
  assert.equal(forward.content?.text, "hi");
  assert.deepEqual(fold([4, 3, 2, 1, 0]), forward);
  assert.deepEqual(fold([1, 4, 2, 0, 3]), forward);
});

Deno.test("moderation screens with the toxicity analyzer and gives reviewers the words that fired", async () => {
  const stage = moderationStage(toxicityAnalyzer());
  const ctx = {
    source: "test",
    now: () => T0,
    signal: new AbortController().signal,
    message: { subject: "content.uploaded.c1", seq: 1, storedAt: 0, deliveryCount: 1 },
  };
  const uploaded = (text: string) =>
    createEvent({
      type: "content.uploaded",
      itemId: "c1",
      traceId: "0af7651916cd43dd8448eb211c80319c",
      source: "test",
      data: { text },
    });
  const [flagged] = await stage.handle(uploaded("You IDIOT, I will kill you"), ctx);
  const m = (flagged as {
    data: { moderation: { verdict: string; categories: string[]; reasons: string[] } };
  }).data.moderation;
  assert.equal(m.verdict, "flagged");
  assert.deepEqual(m.categories.sort(), ["insult", "threat"]);
  assert.ok(
    m.reasons.some((r) => r.startsWith("insult:") && r.includes("idiot")),
    m.reasons.join("; "),
  );
  const [safe] = await stage.handle(uploaded("Lovely service, thank you"), ctx);
  assert.equal(
    (safe as { data: { moderation: { verdict: string } } }).data.moderation.verdict,
    "safe",
  );
});

Deno.test("newScheduleEntry takes exactly one of at and cron; afterFiring moves cron forward", () => {
  assert.throws(() => newScheduleEntry({ subject: "a.b", payload: {} }, T0), ValidationError);
  assert.throws(
    () => newScheduleEntry({ subject: "a.b", payload: {}, cron: "not a cron" }, T0),
    ValidationError,
  );
  const cron = newScheduleEntry({ id: "d", subject: "a.b", payload: {}, cron: "*/5 * * * *" }, T0);
  assert.equal(cron.next_at, at(5 * 60_000).toISOString());
  const next = afterFiring(cron, at(5 * 60_000), at(5 * 60_000 + 10));
  assert.equal(next.next_at, at(10 * 60_000).toISOString());
  assert.equal(next.fired, 1);
  const once = newScheduleEntry({ subject: "a.b", payload: {}, at: at(1000).toISOString() }, T0);
  const fired = afterFiring(once, at(1000), at(1001));
  assert.equal(fired.status, "done");
  assert.equal(fired.next_at, null);
});

Deno.test("auth refuses missing and unknown keys (401) and wrong roles (403)", () => {
  const auth = createAuth([{ sha256: hashKey("k1"), role: "ingest", name: "up" }]);
  const code = (f: () => unknown) => {
    try {
      f();
    } catch (err) {
      return (err as WeftError).code;
    }
    return "ok";
  };
  assert.equal(code(() => auth.authorize(undefined, ["ingest"])), "unauthorized");
  assert.equal(code(() => auth.authorize("Bearer nope", ["ingest"])), "unauthorized");
  assert.equal(code(() => auth.authorize("Basic k1", ["ingest"])), "unauthorized");
  assert.equal(code(() => auth.authorize("Bearer k1", ["reviewer"])), "forbidden");
  assert.equal(auth.authorize("Bearer k1", ["ingest"]).name, "up");
  assert.equal(createAuth([]).authorize(undefined, ["reviewer"]).role, "admin");
});

Deno.test("parseApiKeys accepts hashes with roles and refuses anything else", () => {
  const ok = parseApiKeys(
    JSON.stringify([{ sha256: "A".repeat(64), role: "admin", name: "root" }]),
  );
  assert.deepEqual(ok, [{ sha256: "a".repeat(64), role: "admin", name: "root" }]);
  assert.equal(
    parseApiKeys(JSON.stringify([{ sha256: "plain", role: "admin", name: "x" }])),
    undefined,
  );
  assert.equal(
    parseApiKeys(JSON.stringify([{ sha256: "a".repeat(64), role: "god", name: "x" }])),
    undefined,
  );
  assert.equal(parseApiKeys("not json"), undefined);
  // Every caller's name with authentication off: a key so named escaped the `by` checks.
  assert.equal(
    parseApiKeys(JSON.stringify([{ sha256: "a".repeat(64), role: "reviewer", name: "anonymous" }])),
    undefined,
  );
});

Deno.test("describeConfig never prints API key hashes", () => {
  const hash = hashKey("top-secret");
  const config = loadConfig({
    env: (k) =>
      k === "WEFT_API_KEYS"
        ? JSON.stringify([{ sha256: hash, role: "admin", name: "root" }])
        : undefined,
    args: [],
  });
  const printed = JSON.stringify(describeConfig(config));
  assert.ok(!printed.includes(hash));
  assert.match(printed, /1 configured/);
});
