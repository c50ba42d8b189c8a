/**
 * The HTTP gateway, driven through `app.request()` on a real nats-server with the whole
 * pipeline running in-process.
 */
import assert from "node:assert/strict";
import { feedbackApp } from "./helpers/pipeline.ts";
import { startTestNats } from "./helpers/nats.ts";
import { startPipeline } from "./helpers/pipeline.ts";
import { readSse } from "./helpers/sse.ts";
import { waitFor } from "./helpers/wait.ts";
import type { FeedbackState } from "../pipelines/feedback/events.gen.ts";
import type { Problem } from "../src/errors.ts";
import { createIntake } from "../pipelines/feedback/intake.ts";
import { FEEDBACK_STREAM } from "../pipelines/feedback/subjects.ts";
import { IDEMPOTENCY_BUCKET } from "../src/subjects.ts";

const json = (body: unknown, headers: Record<string, string> = {}) => ({
  method: "POST",
  headers: { "content-type": "application/json", ...headers },
  body: typeof body === "string" ? body : JSON.stringify(body),
});

async function problem(res: Response): Promise<Problem> {
  assert.equal(res.headers.get("content-type"), "application/problem+json");
  return await res.json();
}

async function stateOf(
  app: { request: (p: string) => Response | Promise<Response> },
  id: string,
  status = "processed",
) {
  return await waitFor(
    async () => {
      const res = await app.request(`/feedback/${id}`);
      if (res.status !== 200) return undefined;
      const s: FeedbackState = await res.json();
      return s.status === status ? s : undefined;
    },
    10_000,
    `${id} to be ${status}`,
  );
}

async function ingestedCount(
  t: { jsm: import("@nats-io/jetstream").JetStreamManager },
  id: string,
) {
  const info = await t.jsm.streams.info("FEEDBACK", { subjects_filter: `feedback.ingested.${id}` });
  return Object.values(info.state.subjects ?? {}).reduce((a, b) => a + b, 0);
}

Deno.test("POST /feedback accepts an item with 202 and links, and it reaches processed", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const res = await p.app.request(
    "/feedback",
    json({ text: "I love the new design! Could you add an option for dark mode?" }),
  );
  assert.equal(res.status, 202);
  const body = await res.json();
  assert.match(body.id, /^[0-9A-Z]{26}$/);
  assert.equal(res.headers.get("location"), `/feedback/${body.id}`);
  assert.deepEqual(body.links, {
    state: `/feedback/${body.id}`,
    events: `/feedback/${body.id}/events`,
  });
  const s = await stateOf(p.app, body.id);
  assert.equal(s.sentiment?.label, "positive");
  assert.deepEqual(s.topics?.topics, ["general_inquiry"]);
  assert.equal(s.routing?.team, "General Support");
  assert.deepEqual(Object.keys(s.stages).sort(), [
    "dispatched",
    "ingested",
    "processed",
    "sentiment_analyzed",
    "topics_extracted",
  ]);
});

Deno.test("GET /feedback/ID answers right after 202, before the state writer has caught up", async () => {
  await using t = await startTestNats();
  const { createIntake } = await import("../pipelines/feedback/intake.ts");
  const intake = await createIntake(t.nc);
  const app = feedbackApp(t, intake); // no stages, no writer
  const { id } = await (await app.request("/feedback", json({ text: "hello" }))).json();
  const res = await app.request(`/feedback/${id}`);
  assert.equal(res.status, 200);
  const s: FeedbackState = await res.json();
  assert.equal(s.status, "accepted");
  assert.equal(s.text, "hello");
});

Deno.test("a repeated submission with one Idempotency-Key returns the first answer and is processed once", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const first = await p.app.request(
    "/feedback",
    json({ text: "bug report" }, { "Idempotency-Key": "k-1" }),
  );
  const again = await p.app.request(
    "/feedback",
    json({ text: "bug report" }, { "Idempotency-Key": "k-1" }),
  );
  assert.equal(first.status, 202);
  assert.equal(again.status, 202);
  const a = await first.json();
  assert.deepEqual(await again.json(), a);
  assert.equal(again.headers.get("idempotent-replayed"), "true");
  await stateOf(p.app, a.id);
  assert.equal(await ingestedCount(t, a.id), 1);
});

Deno.test("an Idempotency-Key reused with a different body is refused with 422", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  await p.app.request("/feedback", json({ text: "one" }, { "Idempotency-Key": "k-2" }));
  const res = await p.app.request("/feedback", json({ text: "two" }, { "Idempotency-Key": "k-2" }));
  assert.equal(res.status, 422);
  const pr = await problem(res);
  assert.equal(pr.code, "idempotency_mismatch");
  assert.equal(pr.field, "Idempotency-Key");
});

Deno.test("a client-chosen id submitted twice is answered the same and processed once", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const body = {
    id: "FB001",
    text: "The new feature is great, but I found a small bug when saving settings.",
  };
  const a = await p.app.request("/feedback", json(body));
  await stateOf(p.app, "FB001");
  const b = await p.app.request("/feedback", json(body));
  assert.deepEqual(await b.json(), await a.json());
  assert.equal(b.headers.get("idempotent-replayed"), "true");
  assert.equal(await ingestedCount(t, "FB001"), 1);
  const s = await stateOf(p.app, "FB001");
  assert.equal(s.routing?.team, "Product Development Team");
  assert.deepEqual(s.topics?.topics, ["technical_issue", "feature_request"]);
});

Deno.test("POST /feedback/batch accepts many items in one request", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const items = Array.from({ length: 50 }, (_, i) => ({ text: `item ${i} has a bug` }));
  const res = await p.app.request(
    "/feedback/batch",
    json({ items: [{ id: "B1", text: "great" }, ...items] }),
  );
  assert.equal(res.status, 202);
  const body = await res.json();
  assert.equal(body.items.length, 51);
  assert.equal(body.items[0].id, "B1");
  for (const item of body.items) await stateOf(p.app, item.id);
});

Deno.test("a batch is refused as a whole, naming the bad item's field", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const res = await p.app.request(
    "/feedback/batch",
    json({ items: [{ text: "ok" }, { text: "" }] }),
  );
  assert.equal(res.status, 422);
  assert.equal((await problem(res)).field, "/items/1/text");
  const dup = await p.app.request(
    "/feedback/batch",
    json({ items: [{ id: "X", text: "a" }, { id: "X", text: "b" }] }),
  );
  assert.equal(dup.status, 422);
  assert.equal((await problem(dup)).field, "/items/1/id");
  assert.equal(await ingestedCount(t, "X"), 0, "nothing of a refused batch is published");
});

Deno.test("bad requests get problem+json errors naming the field", async (t) => {
  await using n = await startTestNats();
  await using p = await startPipeline(n);
  const cases: [string, RequestInit, number, string | undefined][] = [
    ["not JSON", json("{oops"), 400, "/"],
    ["invalid UTF-8", { ...json(""), body: new Uint8Array([0x7b, 0xff, 0x7d]) }, 400, "/"],
    ["a JSON array", json([1]), 422, "/"],
    ["no text", json({}), 422, "/text"],
    ["text of the wrong type", json({ text: 42 }), 422, "/text"],
    ["empty text", json({ text: "" }), 422, "/text"],
    ["an unknown field", json({ text: "a", txt: "b" }), 422, "/txt"],
    ["an id that is not a subject token", json({ text: "a", id: "a.b>" }), 422, "/id"],
    [
      "text/plain",
      { method: "POST", headers: { "content-type": "text/plain" }, body: "hi" },
      415,
      "content-type",
    ],
    ["no content type", { method: "POST", body: "{}" }, 415, "content-type"],
    ["a body over the limit", json({ text: "x".repeat(70_000) }), 413, undefined],
  ];
  for (const [name, init, status, field] of cases) {
    await t.step(`${name} -> ${status}`, async () => {
      const res = await p.app.request("/feedback", init);
      assert.equal(res.status, status);
      const pr = await problem(res);
      assert.equal(pr.status, status);
      assert.equal(pr.field, field);
      assert.ok(pr.detail.length > 0);
    });
  }
  await t.step("unknown id -> 404", async () => {
    assert.equal((await p.app.request("/feedback/nope")).status, 404);
    assert.equal((await p.app.request("/feedback/nope/events")).status, 404);
    assert.equal((await problem(await p.app.request("/feedback/a.b"))).code, "not_found");
  });
});

Deno.test("GET /feedback/ID/events replays the item's events in order and closes after the final one", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const { id } = await (await p.app.request("/feedback", json({ text: "bad error in the app" })))
    .json();
  const res = await p.app.request(`/feedback/${id}/events`);
  assert.equal(res.status, 200);
  assert.match(res.headers.get("content-type") ?? "", /text\/event-stream/);
  const events = await readSse(res);
  assert.deepEqual(events.map((e) => e.event), [
    "feedback.ingested",
    "feedback.sentiment_analyzed",
    "feedback.topics_extracted",
    "feedback.dispatched",
    "feedback.processed",
  ]);
  const ids = events.map((e) => Number(e.id));
  assert.deepEqual(ids, [...ids].sort((a, b) => a - b), "ids are increasing stream sequences");
  const last = JSON.parse(events.at(-1)!.data);
  assert.equal(last.item_id, id);
  assert.equal(last.data.routing.team, "Urgent Technical Support");

  const resumed = await readSse(
    await p.app.request(`/feedback/${id}/events`, { headers: { "Last-Event-ID": events[1]!.id! } }),
  );
  assert.deepEqual(
    resumed.map((e) => e.id),
    events.slice(2).map((e) => e.id),
    "resume misses nothing",
  );
});

Deno.test("GET /events streams live events of every item, filtered by type", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const res = await p.app.request("/events?type=processed");
  assert.equal(res.status, 200);
  const reading = readSse(res, { stopAfter: (_e, all) => all.length === 3 });
  const ids = [];
  for (const text of ["one", "two", "three"]) {
    ids.push((await (await p.app.request("/feedback", json({ text }))).json()).id);
  }
  const events = await reading;
  assert.deepEqual(new Set(events.map((e) => e.event)), new Set(["feedback.processed"]));
  assert.deepEqual(new Set(events.map((e) => JSON.parse(e.data).item_id)), new Set(ids));
  assert.equal((await p.app.request("/events?type=bogus")).status, 422);
});

Deno.test("GET /healthz and /readyz report the process and NATS", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  assert.deepEqual(await (await p.app.request("/healthz")).json(), { status: "ok" });
  const ready = await p.app.request("/readyz");
  assert.equal(ready.status, 200);
  assert.equal((await ready.json()).status, "ready");
  await t.jsm.streams.delete("DEADLETTER");
  const notReady = await p.app.request("/readyz");
  assert.equal(notReady.status, 503);
  assert.equal((await problem(notReady)).code, "unavailable");
});

Deno.test("an Idempotency-Key whose record cannot be written is answered and logged for what failed, not as a record that vanished", async () => {
  await using t = await startTestNats();
  const intake = await createIntake(t.nc);
  const app = feedbackApp(t, intake);
  // The idempotency bucket refuses every write (sealed): its create fails, and not because
  // the key exists, so no record is there to read either.
  const info = await t.jsm.streams.info(`KV_${IDEMPOTENCY_BUCKET}`);
  // (`sealed` is a stream setting nats.js's update type leaves out; the server takes it.)
  const sealed = { ...info.config, sealed: true } as unknown as typeof info.config;
  await t.jsm.streams.update(`KV_${IDEMPOTENCY_BUCKET}`, sealed);
  const res = await app.request(
    "/feedback",
    json({ text: "bug report" }, { "Idempotency-Key": "k-sealed" }),
  );
  assert.equal(res.status, 500, await res.clone().text());
  assert.equal((await res.json() as Problem).code, "handler_failed");
  const said = t.lines.join("\n");
  assert.doesNotMatch(said, /vanished/);
  assert.match(said, /sealed/, "the log names the refusal");
  // Nothing was stored for the item.
  const stream = await t.jsm.streams.info(FEEDBACK_STREAM);
  assert.equal(stream.state.messages, 0);
});
