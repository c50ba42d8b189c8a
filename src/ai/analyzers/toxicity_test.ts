import assert from "node:assert/strict";
import { toxicityAnalyzer } from "./toxicity.ts";

const toxicity = toxicityAnalyzer();

// Examples written for these tests (not taken from any evaluation set).
const FLAGGED: Array<[string, string]> = [
  ["you are a worthless idiot", "insult"],
  ["shut up, moron", "insult"],
  ["what a pathetic loser", "insult"],
  ["I will kill you if you come back here", "threat"],
  ["someone should shoot them all", "threat"],
  ["hope you die", "threat"],
  ["immigrants are vermin and should be deported", "hate"],
  ["those people are animals", "hate"],
  ["this is fucking ridiculous", "profanity"],
  ["what a load of shit", "profanity"],
  ["you f*cking clown", "profanity"],
];

for (const [text, category] of FLAGGED) {
  Deno.test(`toxicityAnalyzer() flags ${JSON.stringify(text)} as ${category}`, () => {
    const r = toxicity.analyze(text);
    assert.equal(r.flagged, true, `score ${r.score}`);
    assert.ok(r.categories.includes(category), `categories ${r.categories.join(",")}`);
  });
}

const CLEAN = [
  "kill the process and restart the server",
  "the build was killed by the OOM killer",
  "shoot me an email when you are free",
  "this update is a killer feature",
  "I hate waiting for the bus",
  "Muslims and Christians gathered for the charity run",
  "my cat is an animal lover",
  "the app crashes when I upload a photo",
  "thanks, the support team was great",
  "please add a dark mode",
  "Scunthorpe is a town in England",
  "",
];

for (const text of CLEAN) {
  Deno.test(`toxicityAnalyzer() does not flag ${JSON.stringify(text)}`, () => {
    const r = toxicity.analyze(text);
    assert.equal(r.flagged, false, `score ${r.score} ${r.categories.join(",")}`);
  });
}

Deno.test("toxicityAnalyzer() scores in [0, 1] and names itself", () => {
  for (const text of ["", "you idiot", "fuck fuck fuck shit shit die idiot moron"]) {
    const r = toxicity.analyze(text);
    assert.ok(r.score >= 0 && r.score <= 1);
    assert.equal(r.analyzer, "embedded:toxicity");
  }
});

Deno.test("toxicityAnalyzer() scores two insults above one", () => {
  assert.ok(toxicity.analyze("idiot moron").score > toxicity.analyze("idiot").score);
});

Deno.test("toxicityAnalyzer() honours a custom threshold", () => {
  const lenient = toxicityAnalyzer({ threshold: 0.95 });
  assert.equal(lenient.analyze("you idiot").flagged, false);
});

Deno.test("toxicityAnalyzer() finds obfuscated profanity only with the matcher", () => {
  assert.equal(toxicityAnalyzer({ obscenity: "never" }).analyze("sh1t").flagged, false);
  assert.equal(toxicityAnalyzer({ obscenity: "always" }).analyze("sh1t").flagged, true);
});

Deno.test("toxicityAnalyzer() sees through stretched words like 'iiidiooot'", () => {
  assert.equal(toxicity.analyze("you iiidiooot").flagged, true);
  assert.equal(toxicity.analyze("sooo good, I loooove it").flagged, false);
});

// Attacks on a group with no slur, and their look-alikes (written for these tests).
const GROUP_ATTACKS = [
  "Those foreigners are a disease on this country",
  "Atheists are disgusting and corrupt",
  "I despise Catholics",
  "Refugees should be deported, every single one",
  "filthy immigrants everywhere you look",
  "Albanians will always be liars",
  "They are vermin, every one of them",
  "filthy caucasian, go home",
];
for (const text of GROUP_ATTACKS) {
  Deno.test(`toxicityAnalyzer() flags the group attack ${JSON.stringify(text)} as hate`, () => {
    const r = toxicity.analyze(text);
    assert.equal(r.flagged, true, `score ${r.score}`);
    assert.ok(r.categories.includes("hate"), `categories ${r.categories.join(",")}`);
  });
}

const NOT_ATTACKS = [
  "Nigerians are not bad people at all",
  "Many refugees were killed in the attack last night",
  "Our Korean neighbours are lovely",
  "This app is garbage since the update",
  "the sequel was pathetic and the ending was stupid",
  "Don't ever kill yourself, you matter to us",
  "They were sick for a week",
  "these criminals were arrested on Monday",
  "the caucasian guy at the desk was helpful",
];
for (const text of NOT_ATTACKS) {
  Deno.test(`toxicityAnalyzer() does not flag ${JSON.stringify(text)}`, () => {
    const r = toxicity.analyze(text);
    assert.equal(r.flagged, false, `score ${r.score} ${JSON.stringify(r.evidence)}`);
  });
}

Deno.test("toxicityAnalyzer() counts a thing-insult when it is aimed at a person", () => {
  assert.equal(toxicity.analyze("you are garbage").flagged, true);
  assert.equal(toxicity.analyze("this update is garbage").flagged, false);
});

Deno.test("toxicityAnalyzer() finds respellings the word lists lack through the obscenity matcher", () => {
  // Written for this test: sound-alike spellings with no symbol in them.
  assert.equal(toxicity.analyze("shut up you fukker").flagged, true);
  assert.deepEqual(toxicity.analyze("fuk off").categories, ["profanity"]);
  // Words that merely open like one are left alone.
  assert.equal(toxicity.analyze("the button is broken, best price in town though").flagged, false);
  assert.equal(toxicityAnalyzer({ obscenity: "never" }).analyze("fuk off").flagged, false);
});

Deno.test("toxicityAnalyzer() takes an insult as an attack on a group only near the group", () => {
  const far = toxicity.analyze(
    "My Korean neighbours invited us to dinner last night and we all had a lovely time, " +
      "but the taxi driver on the way home was an idiot",
  );
  assert.ok(!far.categories.includes("hate"), far.categories.join(","));
  assert.ok(far.categories.includes("insult"));
  assert.ok(toxicity.analyze("those Korean idiots again").categories.includes("hate"));
});
