import assert from "node:assert/strict";
import { formatShadowReport, shadowReport } from "./replay.ts";

Deno.test("the report lists the items whose team would change, and reads as text", () => {
  const production = [
    {
      item: "1",
      time: "t",
      text: "slow app",
      sentiment: "negative",
      topics: ["performance"],
      team: "Tech",
    },
    {
      item: "2",
      time: "t",
      text: "charged twice",
      sentiment: "negative",
      topics: ["billing"],
      team: "Billing",
    },
  ];
  const decided = [
    { sentiment: "negative", topics: ["billing"], team: "Billing", ms: 2 },
    { sentiment: "negative", topics: ["billing"], team: "Billing", ms: 4 },
  ];
  const r = shadowReport("candidate", production, decided, { wallMs: 10 });
  assert.equal(r.routingChanges.count, 1);
  assert.deepEqual(r.routingChanges.examples[0], {
    item: "1",
    text: "slow app",
    from: "Tech",
    to: "Billing",
  });
  assert.equal(r.fields.team.agreement, 0.5);
  assert.equal(r.candidateMs.itemsPerSecond, 200);
  const text = formatShadowReport(r);
  assert.match(text, /routing changes: 1 of 2/);
  assert.match(text, /1: Tech -> Billing {2}"slow app"/);
});

Deno.test("shadowReport() with labels that match no item reports no accuracy, not 0% of nothing", () => {
  const production = [
    { item: "1", time: "t", text: "slow app", sentiment: "negative", topics: [], team: "Tech" },
  ];
  const decided = [{ sentiment: "neutral", topics: [], team: "Tech", ms: 1 }];
  const none = shadowReport("candidate", production, decided, {
    labels: { task: "sentiment", byText: new Map([["another text", "negative"]]) },
  });
  assert.deepEqual(none.labelled, {
    task: "sentiment",
    items: 0,
    productionAccuracy: null,
    candidateAccuracy: null,
  });
  const text = formatShadowReport(none);
  assert.doesNotMatch(text, /production 0\.0%/);
  assert.match(text, /labelled \(sentiment\): none of the 1 items replayed is in the labels file/);
  // One that matches is scored as before.
  const one = shadowReport("candidate", production, decided, {
    labels: { task: "sentiment", byText: new Map([["slow app", "negative"]]) },
  });
  assert.deepEqual(
    { ...one.labelled },
    { task: "sentiment", items: 1, productionAccuracy: 1, candidateAccuracy: 0 },
  );
  assert.match(
    formatShadowReport(one),
    /labelled \(sentiment, 1 items\): production 100\.0%, candidate 0\.0%/,
  );
});
