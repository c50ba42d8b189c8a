import assert from "node:assert/strict";
import { parseTaxonomy, type Taxonomy, TaxonomyError, topicsAnalyzer } from "./topics.ts";

const topics = topicsAnalyzer();
const top = (text: string) => topics.analyze(text).topics;

// Examples written for these tests (not taken from any evaluation set).
const CASES: Array<[string, string]> = [
  ["The app crashes every time I open the camera", "technical_issue"],
  ["Getting an error message when I save a draft", "technical_issue"],
  ["Since the update the export button doesn't work", "technical_issue"],
  ["It keeps freezing on the loading screen, please fix", "technical_issue"],
  ["Please add a dark mode", "feature_request"],
  ["It would be nice to have an option to export to CSV", "feature_request"],
  ["I wish it had a calendar widget", "feature_request"],
  ["Could you add support for multiple accounts?", "feature_request"],
  ["I was charged twice this month, I want a refund", "billing"],
  ["How do I cancel my subscription before the renewal?", "billing"],
  ["I can't log in, the reset password email never arrives", "account_access"],
  ["Locked out of my account after enabling two-factor", "account_access"],
  ["The dashboard is so slow, pages take forever to load", "performance"],
  ["Scrolling is laggy and the app drains my battery", "performance"],
  ["Love it, great app, thank you!", "praise"],
  ["Hello, I have a question about your company", "general_inquiry"],
  ["Hello there", "general_inquiry"],
];

for (const [text, expected] of CASES) {
  Deno.test(`topicsAnalyzer() finds ${expected} in ${JSON.stringify(text)}`, () => {
    assert.ok(top(text).includes(expected), `got ${top(text).join(",")}`);
  });
}

Deno.test("topicsAnalyzer() reports the evidence that triggered each topic", () => {
  const r = topics.analyze("The app crashes and I wish it had dark mode");
  assert.ok(r.evidence.technical_issue?.includes("crashes"));
  assert.ok(r.evidence.feature_request?.includes("dark mode"));
});

Deno.test("topicsAnalyzer() ignores negated problems like 'no crashes'", () => {
  assert.deepEqual(top("No crashes, no bugs, works great"), ["praise"]);
});

Deno.test("topicsAnalyzer() takes a modal or a want as a request only where it asks", async (t) => {
  // Written for this test: the writer speaking of themself, and free relatives naming what
  // the app already gives, once counted as feature requests on their "would"/"should"/"need".
  const notRequests = [
    "I would recommend it to anyone, five stars",
    "I would be lost without this app",
    "It reminds me I should be drinking more water",
    "I should have switched years ago",
    "It has everything I need for my workouts",
    "You get anything you could want in one place",
  ];
  for (const text of notRequests) {
    await t.step(JSON.stringify(text), () => {
      assert.ok(!top(text).includes("feature_request"), `got ${top(text).join(",")}`);
    });
  }
  const requests = [
    "I would like a dark theme",
    "I would love an export button",
    "You should add a calendar widget",
    "We need an offline mode",
    "It would be nice to sync with my watch",
    "The app should allow two accounts",
  ];
  for (const text of requests) {
    await t.step(`${JSON.stringify(text)} still asks`, () => {
      assert.ok(top(text).includes("feature_request"), `got ${top(text).join(",")}`);
    });
  }
});

Deno.test("parseTaxonomy() refuses a request or negatable flag that is not a boolean", () => {
  assert.throws(
    () => parseTaxonomy({ fallback: "x", labels: [{ label: "a", request: "yes" }] }),
    TaxonomyError,
  );
});

Deno.test("topicsAnalyzer() counts slowness as a technical issue too", () => {
  const r = top("Everything is so slow, it takes forever");
  assert.equal(r[0], "performance");
  assert.ok(r.includes("technical_issue"));
});

Deno.test("topicsAnalyzer() falls back to general_inquiry with empty evidence", () => {
  const r = topics.analyze("");
  assert.deepEqual(r.topics, ["general_inquiry"]);
  assert.deepEqual(r.evidence, { general_inquiry: [] });
  assert.equal(r.analyzer, "embedded:topics");
});

Deno.test("topicsAnalyzer() uses a custom taxonomy given as data", () => {
  const taxonomy: Taxonomy = {
    fallback: "misc",
    labels: [
      { label: "shipping", keywords: { parcel: 1, deliver: 0.5 }, phrases: { "not arrived": 1 } },
      { label: "returns", patterns: [{ pattern: "\\breturn(ed|ing)?\\b", weight: 1 }] },
    ],
  };
  const custom = topicsAnalyzer({ taxonomy });
  assert.deepEqual(custom.analyze("my parcel has not arrived").topics, ["shipping"]);
  assert.deepEqual(custom.analyze("I returned it").evidence, { returns: ["returned"] });
  assert.deepEqual(custom.analyze("hello").topics, ["misc"]);
  assert.deepEqual(custom.labels, ["shipping", "returns", "misc"]);
});

Deno.test("parseTaxonomy() rejects a bad regular expression", () => {
  assert.throws(
    () =>
      parseTaxonomy({
        fallback: "x",
        labels: [{ label: "a", patterns: [{ pattern: "(", weight: 1 }] }],
      }),
    TaxonomyError,
  );
});

Deno.test("parseTaxonomy() rejects an implied label that does not exist", () => {
  assert.throws(
    () => parseTaxonomy({ fallback: "x", labels: [{ label: "a", implies: ["b"] }] }),
    TaxonomyError,
  );
});

Deno.test("the default taxonomy has the labels routing relies on", () => {
  for (
    const label of [
      "technical_issue",
      "feature_request",
      "billing",
      "account_access",
      "performance",
      "praise",
      "general_inquiry",
    ]
  ) {
    assert.ok(topics.labels.includes(label), label);
  }
});

Deno.test("topicsAnalyzer() takes per-label thresholds that override the taxonomy's", () => {
  const text = "The app crashes every time I open the camera";
  assert.deepEqual(topicsAnalyzer({ thresholds: { technical_issue: 100 } }).analyze(text).topics, [
    "general_inquiry",
  ]);
  assert.equal(
    topicsAnalyzer({ thresholds: { technical_issue: 0.5 } }).analyze(text).topics[0],
    "technical_issue",
  );
});

// Sentences written for these tests.
Deno.test("topicsAnalyzer() reads a sentence that opens with a verb as a request (imperative)", () => {
  assert.equal(top("Separate the music and podcast tabs.")[0], "feature_request");
  assert.equal(top("Great player. Please unlock landscape mode on phones")[0], "feature_request");
  // The same verb inside a sentence is no request.
  assert.deepEqual(top("I separate my playlists by mood"), ["general_inquiry"]);
});

Deno.test("topicsAnalyzer() weighs evidence after 'but' over evidence before it", () => {
  assert.equal(
    top("It freezes now and then, but I really wish it had a calendar view")[0],
    "feature_request",
  );
  assert.equal(
    top("Although I wish it had a calendar view, the real problem is that it freezes on launch")[0],
    "technical_issue",
  );
});
