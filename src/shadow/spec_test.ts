import assert from "node:assert/strict";
import { ValidationError } from "../errors.ts";
import { parseShadowSpec, parseShadowSpecs, sampled, SHADOWS_MAX } from "./spec.ts";

Deno.test("parseShadowSpec fills the default pipeline and limits", () => {
  const s = parseShadowSpec({ id: "r1", step: "topics", candidate: { analyzers: "embedded" } });
  assert.deepEqual(s, {
    id: "r1",
    pipeline: "feedback",
    step: "topics",
    candidate: { analyzers: "embedded" },
    limits: { rps: 20, concurrency: 4, sample: 1, budgetUsd: 1 },
  });
});

Deno.test("parseShadowSpec names the first bad field", () => {
  const bad: [unknown, string][] = [
    [{ id: "Bad Id", step: "sentiment", candidate: { analyzers: "rules" } }, "/id"],
    [{ id: "a", step: "ingest", candidate: { analyzers: "rules" } }, "/step"],
    [{ id: "a", pipeline: "Not A Name", step: "sentiment", candidate: {} }, "/pipeline"],
    [{ id: "a", pipeline: "tickets", step: "triage", candidate: {} }, "/candidate/definition"],
    [
      {
        id: "a",
        pipeline: "tickets",
        step: "triage",
        candidate: { definition: "pipelines/x/v2.ts", analyzers: "rules" },
      },
      "/candidate/analyzers",
    ],
    [
      { id: "a", step: "sentiment", candidate: { analyzers: "rules", definition: "p/x.ts" } },
      "/candidate/definition",
    ],
    [{ id: "a", step: "sentiment", candidate: { analyzers: "gpt" } }, "/candidate/analyzers"],
    [
      { id: "a", step: "sentiment", candidate: { analyzers: "rules", rules: "../etc/x.json" } },
      "/candidate/rules",
    ],
    [
      { id: "a", step: "sentiment", candidate: { analyzers: "rules", model: "m" } },
      "/candidate/model",
    ],
    [
      { id: "a", step: "sentiment", candidate: { analyzers: "rules" }, limits: { rps: 0 } },
      "/limits/rps",
    ],
    [
      {
        id: "a",
        step: "sentiment",
        candidate: { analyzers: "rules" },
        limits: { concurrency: 2.5 },
      },
      "/limits/concurrency",
    ],
    [{ id: "a", step: "sentiment", candidate: { analyzers: "rules" }, extra: 1 }, "/extra"],
  ];
  for (const [value, field] of bad) {
    assert.throws(
      () => parseShadowSpec(value),
      (err) => err instanceof ValidationError && err.field === field,
      field,
    );
  }
});

Deno.test("parseShadowSpecs takes one shadow or a list, and refuses a repeated id", () => {
  const one = '{"id":"a","step":"sentiment","candidate":{"analyzers":"rules"}}';
  assert.equal(parseShadowSpecs(one).length, 1);
  assert.equal(parseShadowSpecs(`[${one}]`).length, 1);
  const refused = (raw: string, field: string | undefined) =>
    assert.throws(
      () => parseShadowSpecs(raw),
      (err) => err instanceof ValidationError && err.field === field,
      raw,
    );
  refused(`[${one},${one}]`, "/1/id");
  refused("not json", undefined);
  // At most SHADOWS_MAX (8), as the API attaches them: a ninth is refused at start-up.
  const list = (n: number) =>
    `[${Array.from({ length: n }, (_, i) => one.replace('"id":"a"', `"id":"s${i}"`)).join(",")}]`;
  assert.equal(parseShadowSpecs(list(SHADOWS_MAX)).length, SHADOWS_MAX);
  refused(list(SHADOWS_MAX + 1), `/${SHADOWS_MAX}`);
});

Deno.test("parseShadowSpecs names the bad field, under its index in a list", () => {
  const bad = '{"id":"a","step":"ingest","candidate":{"analyzers":"rules"}}';
  const good = '{"id":"b","step":"sentiment","candidate":{"analyzers":"rules"}}';
  for (const [raw, field] of [[bad, "/step"], [`[${good},${bad}]`, "/1/step"], ["[1]", "/0"]]) {
    assert.throws(
      () => parseShadowSpecs(raw!),
      (err) => err instanceof ValidationError && err.field === field,
      raw,
    );
  }
});

Deno.test("sampled keeps about the given share of items, the same ones every time", () => {
  const ids = Array.from({ length: 10_000 }, (_, i) => `fb_${i}`);
  const kept = ids.filter((id) => sampled(id, 0.1));
  assert.ok(kept.length > 800 && kept.length < 1200, String(kept.length));
  assert.deepEqual(ids.filter((id) => sampled(id, 0.1)), kept);
  assert.ok(ids.every((id) => sampled(id, 1)));
});

Deno.test("sampled takes about its share of sequential ids, short and long", () => {
  for (const prefix of ["SM", "item-", "t"]) {
    const ids = Array.from({ length: 1000 }, (_, i) => `${prefix}${i}`);
    const half = ids.filter((id) => sampled(id, 0.5)).length;
    assert.ok(half > 450 && half < 550, `${prefix}: ${half} of 1000 at 0.5`);
    const tenth = ids.filter((id) => sampled(id, 0.1)).length;
    assert.ok(tenth > 70 && tenth < 130, `${prefix}: ${tenth} of 1000 at 0.1`);
  }
  // The probe's case: 40 ids, half of them (was 10).
  const forty = Array.from({ length: 40 }, (_, i) => `SM${i}`).filter((id) => sampled(id, 0.5));
  assert.ok(forty.length >= 14 && forty.length <= 26, String(forty.length));
});

Deno.test("a pipeline named like an Object property is a definition's, not a shipped one", () => {
  // `"constructor" in {}` is true: a lookup by `in` took it for a shipped pipeline and threw
  // a TypeError (a 500) instead of naming the field.
  for (const pipeline of ["constructor"]) {
    assert.throws(
      () => parseShadowSpec({ id: "a", pipeline, step: "x", candidate: { analyzers: "rules" } }),
      (err) => err instanceof ValidationError && err.field === "/candidate/definition",
      pipeline,
    );
  }
});
