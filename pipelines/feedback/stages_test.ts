import assert from "node:assert/strict";
import {
  busSubmissionId,
  dispatchStage,
  ingestStage,
  sentimentStage,
  topicsStage,
} from "./stages.ts";
import { feedbackAnalyzers } from "./analyzers.ts";
import { loadConfig } from "../../src/config.ts";
import { createEvent } from "../../src/events.ts";
import type { StageContext } from "../../src/stage.ts";
import { validateEvent } from "../../src/schemas.ts";

const rules = await feedbackAnalyzers({
  ...loadConfig({ env: () => undefined, args: [] }),
  analyzers: "rules",
  rulesPath: new URL("../../rules/reference.json", import.meta.url).pathname,
});
const TRACE = "0af7651916cd43dd8448eb211c80319c";
const ctx = (over: Partial<StageContext["message"]> = {}): StageContext => ({
  source: "test",
  now: () => new Date("2026-01-01T00:00:00Z"),
  signal: new AbortController().signal,
  message: { subject: "s", seq: 7, storedAt: 1_700_000_000_000, deliveryCount: 1, ...over },
});
const ingested = createEvent({
  type: "feedback.ingested",
  itemId: "FB001",
  traceId: TRACE,
  source: "test",
  data: { text: "The new feature is great, but I found a small bug when saving settings." },
});

Deno.test("the ingest stage keeps a submission's own id", async () => {
  const [e] = await ingestStage().handle({ id: "FB9", text: "hi", channel: "web" }, ctx());
  assert.equal(e!.type, "feedback.ingested");
  assert.equal(e!.item_id, "FB9");
  assert.deepEqual(e!.data, { text: "hi", channel: "web" });
});

Deno.test("the ingest stage derives the same id for a redelivered submission, and another for another message", async () => {
  const first = await ingestStage().handle({ text: "hi" }, ctx({ deliveryCount: 1 }));
  const again = await ingestStage().handle({ text: "hi" }, ctx({ deliveryCount: 2 }));
  const other = await ingestStage().handle({ text: "hi" }, ctx({ seq: 8 }));
  assert.equal(first[0]!.item_id, again[0]!.item_id);
  assert.equal(first[0]!.id, again[0]!.id, "same event id, so the stream drops the second publish");
  assert.notEqual(first[0]!.item_id, other[0]!.item_id);
  assert.equal(first[0]!.item_id, busSubmissionId({ seq: 7, storedAt: 1_700_000_000_000 }));
});

Deno.test("the ingest stage continues the trace of the message's traceparent", async () => {
  const [e] = await ingestStage().handle({ text: "hi" }, ctx({ traceId: TRACE }));
  assert.equal(e!.trace_id, TRACE);
});

Deno.test("the sentiment stage adds sentiment and carries the item forward in the same trace", async () => {
  const [e] = await sentimentStage(rules.sentiment).handle(ingested, ctx());
  assert.equal(e!.type, "feedback.sentiment_analyzed");
  assert.equal(e!.item_id, "FB001");
  assert.equal(e!.trace_id, TRACE);
  assert.equal(e!.data.text, ingested.data.text);
  assert.deepEqual(e!.data.sentiment, { label: "positive", score: 0.8, analyzer: "rules" });
  validateEvent(e, ["feedback.sentiment_analyzed"]);
});

Deno.test("stage outputs are deterministic: the same input yields the same event ids", async () => {
  const a = await sentimentStage(rules.sentiment).handle(ingested, ctx());
  const b = await sentimentStage(rules.sentiment).handle(ingested, ctx({ deliveryCount: 3 }));
  assert.deepEqual(a, b);
});

Deno.test("the topics and dispatch stages route FB001 to the Product Development Team and finish it", async () => {
  const analyzed = validateEvent(
    (await sentimentStage(rules.sentiment).handle(ingested, ctx()))[0],
    ["feedback.sentiment_analyzed"],
  );
  const extracted = validateEvent(
    (await topicsStage(rules.topics).handle(analyzed, ctx()))[0],
    ["feedback.topics_extracted"],
  );
  assert.deepEqual(extracted.data.topics.topics, ["technical_issue", "feature_request"]);
  const out = await dispatchStage(rules.route).handle(extracted, ctx());
  assert.deepEqual(out.map((e) => e.type), ["feedback.dispatched", "feedback.processed"]);
  const processed = validateEvent(out[1], ["feedback.processed"]);
  assert.deepEqual(processed.data.routing, { team: "Product Development Team", rule: 1 });
  assert.equal(processed.data.sentiment.label, "positive");
  assert.notEqual(out[0]!.id, out[1]!.id);
});

Deno.test("the topics stage marks abusive text with the abuse topic and its categories", async () => {
  const { toxicityAnalyzer } = await import("../../src/ai/analyzers/mod.ts");
  const stage = topicsStage(rules.topics, toxicityAnalyzer());
  const analyzed = createEvent({
    type: "feedback.sentiment_analyzed",
    itemId: "T1",
    traceId: TRACE,
    source: "test",
    data: {
      text: "You are a worthless idiot",
      sentiment: { label: "negative", score: -0.9, analyzer: "x" },
    },
  });
  const out = validateEvent((await stage.handle(analyzed, ctx()))[0], [
    "feedback.topics_extracted",
  ]);
  assert.equal(out.data.topics.topics[0], "abuse");
  assert.ok((out.data.topics.evidence.abuse ?? []).length > 0);
  const clean = validateEvent(
    (await stage.handle({
      ...analyzed,
      data: { ...analyzed.data, text: "kill the process and restart" },
    }, ctx()))[0],
    ["feedback.topics_extracted"],
  );
  assert.ok(!clean.data.topics.topics.includes("abuse"));
});
