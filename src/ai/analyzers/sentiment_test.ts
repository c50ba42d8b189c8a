import assert from "node:assert/strict";
import { defaultSentimentLexicon, sentimentAnalyzer, sentimentScore } from "./sentiment.ts";

const sentiment = sentimentAnalyzer();
const label = (text: string) => sentiment.analyze(text).label;

// Examples written for these tests (not taken from any evaluation set).
const CASES: Array<[string, "positive" | "negative" | "neutral"]> = [
  ["I love this app, it is wonderful", "positive"],
  ["Great support team, they sorted my issue in minutes", "positive"],
  ["Works perfectly on my tablet", "positive"],
  ["Absolutely fantastic update!!!", "positive"],
  ["Five stars, would recommend to anyone", "positive"],
  ["not bad at all", "positive"],
  ["The checkout flow is clunky and confusing", "negative"],
  ["This is the worst release so far", "negative"],
  ["Terrible. Waste of money.", "negative"],
  ["It keeps crashing and I lost my notes", "negative"],
  ["Don't waste your time on this", "negative"],
  ["Totally useless since the redesign", "negative"],
  ["1 star, do not buy", "negative"],
  ["The invoice arrived on Tuesday", "neutral"],
  ["I opened the settings page", "neutral"],
  ["The meeting is at 3pm in room 4", "neutral"],
];

for (const [text, expected] of CASES) {
  Deno.test(`sentimentAnalyzer() reads ${JSON.stringify(text)} as ${expected}`, () => {
    assert.equal(label(text), expected);
  });
}

Deno.test("sentimentAnalyzer() reads 'not good' as negative", () => {
  assert.equal(label("The food was not good"), "negative");
});

Deno.test("sentimentAnalyzer() reads 'never disappoints' as positive", () => {
  assert.equal(label("This app never disappoints"), "positive");
});

Deno.test("sentimentAnalyzer() weighs the clause after 'but' more", () => {
  const lex = defaultSentimentLexicon();
  assert.ok(sentimentScore("It looks nice but it is painfully slow and buggy", lex) < 0);
  assert.ok(sentimentScore("It is a bit slow but the results are excellent", lex) > 0);
});

Deno.test("sentimentAnalyzer() scores intensified praise above plain praise", () => {
  const lex = defaultSentimentLexicon();
  assert.ok(sentimentScore("very good", lex) > sentimentScore("good", lex));
  assert.ok(sentimentScore("GOOD app", lex) > sentimentScore("good app", lex));
});

Deno.test("sentimentAnalyzer() reads a balanced mixed review as neutral", () => {
  assert.equal(label("Great design, terrible battery life"), "neutral");
});

Deno.test("sentimentAnalyzer() keeps scores in [-1, 1] and names itself", () => {
  for (const text of ["", "!!!", "AWFUL AWFUL AWFUL HORRIBLE", "love love love love love"]) {
    const r = sentiment.analyze(text);
    assert.ok(r.score >= -1 && r.score <= 1);
    assert.equal(r.analyzer, "embedded:sentiment");
  }
});

Deno.test("sentimentAnalyzer() reads a plain 2/10 rating as negative", () => {
  assert.equal(label("My verdict: 2/10"), "negative");
});

Deno.test("sentimentAnalyzer() honours custom thresholds", () => {
  const strict = sentimentAnalyzer({ positiveThreshold: 0.99, name: "strict" });
  assert.equal(strict.analyze("good").label, "neutral");
  assert.equal(strict.name, "strict");
});

Deno.test("sentimentAnalyzer() reads a plain bug report as neutral", () => {
  assert.equal(label("The app crashes when I upload a photo"), "neutral");
});

Deno.test("sentimentAnalyzer() reads an angry bug report as negative", () => {
  assert.equal(
    label("Crashes constantly, I lost all my work. Absolutely awful, worst app ever!"),
    "negative",
  );
});

Deno.test("sentimentAnalyzer() reads a polite feature request as neutral", () => {
  assert.equal(label("It would be great to have an option to export to PDF"), "neutral");
  // Praise said outright ("Nice app.") is emotional wording the informational rule keeps.
  assert.equal(label("Nice app. It would be great to have an option to export to PDF"), "positive");
});

Deno.test("sentimentAnalyzer() with informational: false reads a bug report as negative", () => {
  const plain = sentimentAnalyzer({ informational: false });
  assert.equal(plain.analyze("The app crashes when I upload a photo").label, "negative");
});

Deno.test("sentimentAnalyzer() reads 'used to love it' as negative", () => {
  assert.equal(label("I used to love this service"), "negative");
});

// Method rules: contrast and concession scope, irrealis, questions, informational damping
// (sentences written for these tests).
Deno.test("sentimentAnalyzer() weighs down a clause opened by 'although'", () => {
  const lex = defaultSentimentLexicon();
  assert.ok(sentimentScore("Although the app is slow, I love it", lex) > 0.4);
  assert.ok(
    sentimentScore("Although I loved the old design, the new one is awful", lex) <
      sentimentScore("I loved the old design, the new one is awful", lex),
  );
});

Deno.test("sentimentAnalyzer() keeps 'but' inside its sentence, or the one before for 'But ...'", () => {
  const lex = defaultSentimentLexicon();
  // The first sentence's praise is not halved by a 'but' two sentences later.
  const alone = sentimentScore("Lovely shop.", lex);
  assert.ok(sentimentScore("Lovely shop. The courier was late but polite.", lex) > alone * 0.9);
  // A sentence that opens with 'But' outweighs the sentence before it.
  assert.ok(sentimentScore("It looked great at first. But it broke after a week.", lex) < 0);
});

Deno.test("sentimentAnalyzer() damps what is only wished or supposed (irrealis)", () => {
  const lex = defaultSentimentLexicon();
  assert.ok(
    sentimentScore("It would be perfect if the export worked", lex) <
      sentimentScore("It is perfect and the export works", lex),
  );
  assert.ok(
    sentimentScore("I wish the search was better", lex) <
      sentimentScore("The search is better", lex),
  );
});

Deno.test("sentimentAnalyzer() damps praise inside a question but keeps a complaint", () => {
  const lex = defaultSentimentLexicon();
  const plain = sentimentAnalyzer({ informational: false });
  assert.equal(plain.analyze("Why is the sync so slow and unreliable?").label, "negative");
  assert.ok(
    sentimentScore("Is the new editor any good?", lex) <
      sentimentScore("The new editor is good", lex),
  );
});

Deno.test("sentimentAnalyzer() keeps strong words in bug reports while damping plain ones", () => {
  assert.equal(label("The app crashes every time I open a photo"), "neutral");
  assert.equal(label("Awful. The app crashes every time I open a photo"), "negative");
  // An intensified word is emotional wording as well.
  assert.equal(label("The sync keeps failing, annoying"), "neutral");
  assert.equal(label("The sync keeps failing, really annoying"), "negative");
});

Deno.test("defaultSentimentLexicon() fills words AFINN lacks from VADER's lexicon", () => {
  const lex = defaultSentimentLexicon();
  assert.ok((lex.valences.get("gorgeous") ?? 0) > 0);
  assert.equal(label("The photos look gorgeous"), "positive");
});

Deno.test("sentimentAnalyzer() reads stretched words like 'loooove' and 'baaaad'", () => {
  assert.equal(label("I loooovvve the new widgets"), "positive");
  assert.equal(label("sooo baaaad, worst update"), "negative");
  const lex = defaultSentimentLexicon();
  assert.ok(sentimentScore("soooo goooood", lex) > 0);
});

Deno.test("sentimentAnalyzer() weighs hedged praise and blame less ('maybe', 'probably')", () => {
  const lex = defaultSentimentLexicon();
  assert.ok(sentimentScore("It is probably great", lex) < sentimentScore("It is great", lex));
  assert.ok(sentimentScore("Maybe it is awful", lex) > sentimentScore("It is awful", lex));
});

Deno.test("sentimentAnalyzer() reads British spellings as their American entries", () => {
  // Each word is in the lexicon only in its American spelling.
  assert.equal(label("My favourite app, the colours are lovely"), "positive");
  assert.equal(label("The cast is mesmerising"), "positive");
  assert.equal(label("Waiting was agonising"), "negative");
  const lex = defaultSentimentLexicon();
  assert.equal(sentimentScore("mesmerising", lex), sentimentScore("mesmerizing", lex));
  assert.equal(sentimentScore("humour", lex), sentimentScore("humor", lex));
});

Deno.test("sentimentAnalyzer() does not count what the subject is compared with", () => {
  // "than ..." describes the other thing: the sentence praises this one.
  // (To the end of its clause: a comma ends the comparison.)
  assert.equal(label("Much better than the flimsy awful case I had before"), "positive");
  const lex = defaultSentimentLexicon();
  assert.equal(
    sentimentScore("Worse than the lovely old one", lex),
    sentimentScore("Worse than the old one", lex),
  );
});
