import assert from "node:assert/strict";
import { compileRules, loadRules } from "./rules.ts";
import { ValidationError } from "../../src/errors.ts";

const loaded = await loadRules(new URL("../../rules/reference.json", import.meta.url).pathname);
assert.ok(loaded.sentiment && loaded.topics, "the reference ruleset has keyword rules");
const reference = { sentiment: loaded.sentiment, topics: loaded.topics, route: loaded.route };

/** The reference decisions every equal ruleset must reproduce exactly. */
const REFERENCE_CASES = [
  {
    id: "FB001",
    text: "The new feature is great, but I found a small bug when saving settings.",
    sentiment: "positive",
    topics: ["technical_issue", "feature_request"],
    team: "Product Development Team",
  },
  {
    id: "FB002",
    text: "I love the new design! Could you add an option for dark mode?",
    sentiment: "positive",
    topics: ["general_inquiry"],
    team: "General Support",
  },
  {
    id: "FB003",
    text: "This app is so bad, constant issues, fix it!",
    sentiment: "negative",
    topics: ["general_inquiry"],
    team: "General Support",
  },
  {
    id: "FB004",
    text: "Just a general inquiry about subscription plans.",
    sentiment: "neutral",
    topics: ["general_inquiry"],
    team: "General Support",
  },
] as const;

for (const c of REFERENCE_CASES) {
  Deno.test(`the reference ruleset decides ${c.id} as ${c.sentiment}, [${c.topics}], ${c.team}`, async () => {
    const sentiment = await reference.sentiment.analyze(c.text);
    const topics = await reference.topics.analyze(c.text);
    assert.equal(sentiment.label, c.sentiment);
    assert.deepEqual(topics.topics, [...c.topics]);
    assert.equal(reference.route(sentiment.label, topics.topics).team, c.team);
  });
}

Deno.test("the reference routing table sends negative technical issues to Urgent Technical Support", () => {
  assert.equal(reference.route("negative", ["technical_issue"]).team, "Urgent Technical Support");
  assert.equal(reference.route("neutral", ["feature_request"]).team, "Product Ideas Team");
  assert.equal(reference.route("negative", ["feature_request"]).team, "Product Ideas Team");
  assert.equal(reference.route("positive", ["technical_issue"]).team, "General Support");
});

Deno.test("keyword matching is case-insensitive substring matching", async () => {
  assert.equal((await reference.sentiment.analyze("GREATEST app")).label, "positive");
  assert.deepEqual((await reference.topics.analyze("ERRORS everywhere")).topics, [
    "technical_issue",
  ]);
});

Deno.test("topics record the keywords that triggered them as evidence", async () => {
  const t = await reference.topics.analyze("a bug and an error; I suggest a feature");
  assert.deepEqual(t.evidence, {
    technical_issue: ["bug", "error"],
    feature_request: ["feature", "suggest"],
  });
});

Deno.test("the first matching sentiment rule wins: positive keywords beat negative ones", async () => {
  assert.equal((await reference.sentiment.analyze("great but bad")).label, "positive");
});

Deno.test("compileRules() refuses a ruleset that does not match its schema, naming the field", () => {
  assert.throws(
    () =>
      compileRules({
        version: 1,
        sentiment: { rules: [{ label: "happy", any: ["x"] }], default: "neutral" },
        topics: { rules: [], default: "general_inquiry" },
        routing: [{ team: "General Support" }],
      }),
    (err) => err instanceof ValidationError && err.field === "/sentiment/rules/0/label",
  );
});

Deno.test("a ruleset with other keywords and teams changes decisions without code", async () => {
  const rules = compileRules({
    version: 1,
    sentiment: { rules: [{ label: "negative", any: ["refund"] }], default: "neutral" },
    topics: { rules: [{ topic: "billing", any: ["refund", "invoice"] }], default: "other" },
    routing: [{ when: { topic: "billing" }, team: "Billing" }, { team: "Support" }],
  });
  const s = await rules.sentiment!.analyze("I want a refund");
  const t = await rules.topics!.analyze("I want a refund");
  assert.equal(s.label, "negative");
  assert.deepEqual(t.topics, ["billing"]);
  assert.deepEqual(rules.route(s.label, t.topics), { team: "Billing", rule: 0 });
});

Deno.test("a ruleset may hold only a routing table, for use with other analyzers", () => {
  const rules = compileRules({ version: 1, routing: [{ team: "General Support" }] });
  assert.equal(rules.sentiment, undefined);
  assert.equal(rules.route("neutral", ["general_inquiry"]).team, "General Support");
});
