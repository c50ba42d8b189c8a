/**
 * Reading a model's answer: JSON, possibly fenced, checked against the schema.
 */
import assert from "node:assert/strict";
import { createOutputValidator } from "./output.ts";

Deno.test("an answer nested deeper than an event may hold is refused with the reason, not a stack overflow", () => {
  // Found by a probe: an answer with an extra field 100,000 levels deep failed llm steps and
  // agents with "Maximum call stack size exceeded" after every retry, paying the model again.
  const check = createOutputValidator<{ label: string }>({
    type: "object",
    required: ["label"],
    properties: { label: { type: "string" } },
  });
  const deep = `{"label":"x","extra":${"[".repeat(100_000)}${"]".repeat(100_000)}}`;
  const out = check(deep);
  assert.equal(out.ok, false);
  assert.match((out as { error: string }).error, /nests deeper than 64 levels/);
  assert.equal(check('```json\n{"label":"x"}\n```').ok, true, "a fenced answer is read");
});

Deno.test("a lone surrogate in an answer's strings is replaced with U+FFFD, so events and state stay JSON every reader takes", () => {
  // Found by a probe: `"sender":"\ud83d"` reached an item's events and state, and jq refused
  // the state's JSON ("Invalid \uXXXX\uXXXX surrogate pair escape").
  const check = createOutputValidator<{ sender: string; ok: string }>({
    type: "object",
    properties: { sender: { type: "string" } },
  });
  const out = check('{"sender":"a\\ud83d", "ok":"\\ud83d\\ude00"}');
  assert.equal(out.ok, true);
  const v = (out as { value: { sender: string; ok: string } }).value;
  assert.equal(v.sender, "a\ufffd");
  assert.equal(v.ok, "\u{1f600}", "a whole pair stays as it is");
});

Deno.test("createOutputValidator() names the field a wrong shape is at fault in, as a JSON pointer", () => {
  const check = createOutputValidator({
    type: "object",
    required: ["label"],
    properties: { label: { type: "string" }, tags: { type: "array", items: { type: "string" } } },
    additionalProperties: false,
  });
  const fieldOf = (content: string) => {
    const r = check(content);
    assert.equal(r.ok, false, content);
    return r.ok ? undefined : r.field;
  };
  assert.equal(fieldOf('{"label": 5}'), "/label");
  assert.equal(fieldOf("{}"), "/label", "a missing property is named");
  assert.equal(fieldOf('{"label": "x", "tags": ["a", 2]}'), "/tags/1");
  assert.equal(fieldOf('{"label": "x", "a/b": 1}'), "/a~1b", "an unknown one too, escaped");
  assert.equal(fieldOf("[]"), "/", "the whole answer");
  const noJson = check("not json");
  assert.equal(noJson.ok, false);
  assert.equal(noJson.ok ? "" : noJson.field, undefined, "no JSON: no field");
});
