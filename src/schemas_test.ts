import assert from "node:assert/strict";
import { knownEventTypes, validateDocument, validateEvent } from "./schemas.ts";
import type { DocumentMap, EventMap } from "./schemas.ts";
import { createEvent } from "./events.ts";
import { ValidationError } from "./errors.ts";
import { generate } from "../scripts/gen_types.ts";

const event = createEvent({
  type: "feedback.ingested",
  itemId: "fb1",
  traceId: "0af7651916cd43dd8448eb211c80319c",
  source: "test",
  data: { text: "hello" },
});

function fieldOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof ValidationError, String(err));
    return err.field;
  }
  assert.fail("expected a ValidationError");
}

Deno.test("validateDocument() names the missing, wrong or unknown field as a JSON pointer", () => {
  assert.equal(fieldOf(() => validateDocument("feedback.submit", {})), "/text");
  assert.equal(fieldOf(() => validateDocument("feedback.submit", { text: 1 })), "/text");
  assert.equal(fieldOf(() => validateDocument("feedback.submit", { text: "" })), "/text");
  assert.equal(
    fieldOf(() => validateDocument("feedback.submit", { text: "a", colour: 1 })),
    "/colour",
  );
  assert.equal(fieldOf(() => validateDocument("feedback.submit", { text: "a", id: "a.b" })), "/id");
  assert.equal(
    fieldOf(() => validateDocument("feedback.submit_batch", { items: [{ text: "a" }, {}] })),
    "/items/1/text",
  );
});

Deno.test("validateEvent() ignores fields it does not know", () => {
  const extended = { ...event, producer_build: "abc", data: { ...event.data, extra: true } };
  assert.equal(validateEvent(extended, ["feedback.ingested"]).item_id, "fb1");
});

Deno.test("validateEvent() refuses another type, an unknown version and missing fields", () => {
  assert.throws(
    () => validateEvent(event, ["feedback.processed"]),
    (e) => e instanceof ValidationError && e.code === "invalid_event",
  );
  assert.throws(
    () => validateEvent({ ...event, version: 2 }, ["feedback.ingested"]),
    (e) => e instanceof ValidationError && e.code === "unknown_version",
  );
  assert.equal(
    fieldOf(() => validateEvent({ ...event, trace_id: undefined }, ["feedback.ingested"])),
    "/trace_id",
  );
  assert.equal(fieldOf(() => validateEvent([1], ["feedback.ingested"])), "/");
});

Deno.test("src/events.gen.ts is what the schemas generate (types never drift from schemas)", async () => {
  const committed = await Deno.readTextFile(new URL("./events.gen.ts", import.meta.url));
  const cmd = new Deno.Command("deno", {
    args: ["fmt", "--ext=ts", "-"],
    stdin: "piped",
    stdout: "piped",
  }).spawn();
  const w = cmd.stdin.getWriter();
  await w.write(new TextEncoder().encode(await generate()));
  await w.close();
  const formatted = new TextDecoder().decode((await cmd.output()).stdout);
  assert.equal(committed, formatted, "run `deno task gen`");
});

Deno.test("every event and document schema compiles (validators compile on first use)", () => {
  // An empty object fails each schema on a field: it reaches ajv, so a schema ajv refuses
  // (strict mode) throws here instead of a ValidationError.
  for (const [type, versions] of Object.entries(knownEventTypes())) {
    for (const version of versions) {
      assert.ok(
        fieldOf(() => validateEvent({ type, version }, [type as keyof EventMap])) !== undefined,
      );
    }
  }
  const documents: (keyof DocumentMap)[] = [
    "feedback.submit",
    "feedback.submit_batch",
    "feedback.state",
    "deadletter",
    "rules",
    "content.submit",
    "content.state",
    "review.decision",
    "schedule",
    "digest.request",
  ];
  for (const name of documents) {
    try {
      validateDocument(name, { "not a field": 1 });
    } catch (err) {
      assert.ok(err instanceof ValidationError, `${name}: ${err}`);
    }
  }
});
