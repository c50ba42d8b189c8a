import assert from "node:assert/strict";
import { ValidationError } from "./errors.ts";
import { originalBody, parseFilter, parseRedriveRequest } from "./redrive.ts";
import type { DeadLetter } from "./events.gen.ts";

Deno.test("parseRedriveRequest accepts exactly one of ids, filter, all", () => {
  assert.deepEqual(parseRedriveRequest({ ids: [1, 2] }), { ids: [1, 2] });
  assert.deepEqual(parseRedriveRequest({ filter: { stage: "topics" } }), {
    filter: { stage: "topics" },
  });
  assert.deepEqual(parseRedriveRequest({ all: true }), { all: true });
});

Deno.test("parseRedriveRequest refuses bad requests naming the field", () => {
  const field = (v: unknown) => {
    try {
      parseRedriveRequest(v);
    } catch (err) {
      assert.ok(err instanceof ValidationError);
      return err.field;
    }
    assert.fail("accepted");
  };
  assert.equal(field(null), "/");
  assert.equal(field({ ids: [1], all: true }), "/");
  assert.equal(field({ ids: [1], zz: 1 }), "/zz", "an unknown field is named");
  assert.equal(field({ zz: 1 }), "/zz");
  assert.equal(field({ ids: [] }), "/ids");
  assert.equal(field({ ids: [-1] }), "/ids");
  assert.equal(field({ all: false }), "/all");
  assert.equal(field({ filter: { stage: 3 } }), "/filter/stage");
  assert.equal(field({ filter: { colour: "red" } }), "/filter/colour");
  // A filter redrives each letter once: `pending: false` redrove letters already redriven.
  assert.equal(field({ filter: { pending: false, stage: "topics" } }), "/filter/pending");
});

Deno.test("parseFilter keeps the known fields", () => {
  assert.deepEqual(parseFilter({ code: "rejected", pending: true }), {
    code: "rejected",
    pending: true,
  });
  assert.deepEqual(parseFilter(undefined), {});
});

const letter = (over: Partial<DeadLetter>): DeadLetter => ({
  stage: "ingest",
  code: "handler_failed",
  reason: "r",
  attempts: 3,
  subject: "feedback.submit",
  stream_seq: 9,
  time: "2026-01-01T00:00:00.000Z",
  payload: '{"text":"hi"}',
  payload_encoding: "utf8",
  ...over,
});

Deno.test("originalBody gives an id-less bus submission the item id it was dead-lettered under", () => {
  const body = originalBody(letter({ item_id: "fb_x" }));
  assert.deepEqual(JSON.parse(new TextDecoder().decode(body)), { text: "hi", id: "fb_x" });
});

Deno.test("originalBody returns other originals byte for byte, base64 decoded", () => {
  const event = letter({ subject: "feedback.ingested.a", payload: '{"a":1}', item_id: "a" });
  assert.equal(new TextDecoder().decode(originalBody(event)), '{"a":1}');
  const binary = letter({ payload: btoa("\xff\xfe"), payload_encoding: "base64" });
  assert.deepEqual([...originalBody(binary)], [0xff, 0xfe]);
});

Deno.test("originalBody keeps a submission it cannot read as its consumer does byte for byte", () => {
  for (
    const payload of [
      btoa('{"text":"bad \xff\xfe"}'),
      btoa('{"text":"a","metadata":{"x":1e400}}'),
      btoa('{"text":"a","metadata":{"x":123456789012345678901234567890}}'),
    ]
  ) {
    const l = letter({ item_id: "fb_x", payload, payload_encoding: "base64" });
    assert.deepEqual([...originalBody(l)], [
      ...Uint8Array.from(atob(payload), (c) => c.charCodeAt(0)),
    ]);
  }
});
