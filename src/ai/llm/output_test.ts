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
