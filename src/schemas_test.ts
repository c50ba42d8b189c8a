import assert from "node:assert/strict";
import { Ajv } from "ajv";
import {
  isEntryEvent,
  knownEventTypes,
  registeredSchemas,
  registerEvents,
  submissionDocument,
  validateDocument,
  validateEvent,
} from "./schemas.ts";
import { parseEventSubject } from "./subjects.ts";
import type { DocumentMap, EventMap } from "./schemas.ts";
import { createEvent } from "./events.ts";
import { ValidationError } from "./errors.ts";
import { format, generate } from "../scripts/gen_types.ts";
// The shipped pipelines register their events and documents when their events modules load.
import "../pipelines/feedback/events.ts";
import "../pipelines/moderation/events.ts";

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

Deno.test("the generated types are what the schemas generate (types never drift from schemas)", async () => {
  for (const [path, source] of await generate()) {
    const committed = await Deno.readTextFile(new URL(`../${path}`, import.meta.url));
    assert.equal(committed, await format(source), `${path}: run \`deno task gen\``);
  }
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
  const documents = Object.keys(registeredSchemas()).filter((n) =>
    n !== "defs" && !(n in knownEventTypes())
  ) as (keyof DocumentMap)[];
  assert.ok(documents.includes("feedback.submit") && documents.includes("schedule"));
  for (const name of documents) {
    try {
      validateDocument(name, { "not a field": 1 });
    } catch (err) {
      assert.ok(err instanceof ValidationError, `${name}: ${err}`);
    }
  }
});

Deno.test("every registered schema is valid against its JSON Schema meta-schema (not checked at start)", () => {
  const meta = new Ajv({ strict: true, allowUnionTypes: true });
  for (const [name, schema] of Object.entries(registeredSchemas())) {
    assert.ok(meta.validateSchema(schema), `${name}: ${meta.errorsText(meta.errors)}`);
  }
  assert.ok(!meta.validateSchema({ type: "strng" }), "the check refuses a bad schema");
});

Deno.test("a pipeline registers its events: their schemas, entry events and bus submissions", async (t) => {
  const placed = {
    $id: "https://example.test/orders.placed.v1.json",
    type: "object",
    required: ["type", "version", "item_id"],
    properties: {
      type: { const: "orders.placed" },
      version: { const: 1 },
      item_id: { type: "string" },
    },
  };
  const submit = {
    $id: "https://example.test/orders.submit.v1.json",
    type: "object",
    required: ["sku"],
    properties: { sku: { type: "string" } },
  };
  await t.step("before: its subjects are no event subjects, its types unknown", () => {
    assert.equal(parseEventSubject("orders.placed.o1"), null);
    assert.equal(isEntryEvent("orders.placed"), false);
    assert.equal(submissionDocument("orders.submit"), undefined);
  });
  registerEvents({
    events: { "orders.placed": placed },
    documents: { "orders.submit": submit },
    entry: ["orders.placed"],
    submissions: { "orders.submit": "orders.submit" },
  });
  await t.step("after: validated, parsed from subjects, known as an entry and a submission", () => {
    assert.deepEqual(parseEventSubject("orders.placed.o1"), {
      type: "orders.placed",
      itemId: "o1",
    });
    assert.equal(isEntryEvent("orders.placed"), true);
    assert.equal(submissionDocument("orders.submit"), "orders.submit");
    assert.deepEqual(knownEventTypes()["orders.placed"], [1]);
    const event = { type: "orders.placed", version: 1, item_id: "o1" };
    assert.deepEqual(validateEvent(event, ["orders.placed" as keyof EventMap]), event);
    assert.equal(
      fieldOf(() => validateDocument("orders.submit" as keyof DocumentMap, { sku: 1 })),
      "/sku",
    );
    assert.ok(registeredSchemas()["orders.submit"]);
  });
  await t.step("the same registration again changes nothing; another owner is refused", () => {
    registerEvents({
      events: { "orders.placed": placed },
      submissions: { "orders.submit": "orders.submit" },
    });
    assert.throws(
      () =>
        registerEvents({
          events: { "orders.placed": { ...placed, $id: "https://example.test/other.json" } },
        }),
      /orders.placed version 1 is already registered with another schema/,
    );
    assert.throws(
      () => registerEvents({ submissions: { "orders.submit": "deadletter" } }),
      /already validated as orders.submit/,
    );
    assert.throws(
      () => registerEvents({ requests: { "orders.submit": "orders.submit" } }),
      /already validated as orders.submit/,
      "a submission subject is no request subject",
    );
    assert.throws(
      () => registerEvents({ events: { "feedback.ingested": placed } }),
      /two pipelines cannot own one event type/,
    );
  });
  await t.step("an event schema without a version is refused at registration", () => {
    assert.throws(
      () => registerEvents({ events: { "orders.cancelled": { type: "object" } } }),
      /orders.cancelled names no version/,
    );
  });
});

Deno.test("an unregistered document is a bug, not bad input", () => {
  assert.throws(
    () => validateDocument("nothing.here" as keyof DocumentMap, {}),
    (e) => !(e instanceof ValidationError) && /no schema is registered/.test(String(e)),
  );
});
