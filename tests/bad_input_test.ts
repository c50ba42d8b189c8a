/**
 * Bad input against the real gateway over HTTP and the real services over the bus:
 * thousands of generated malformed requests and messages each get a clear error, no
 * service crashes, nothing is redelivered forever, and valid items sent alongside get
 * the same results as the same items sent on a quiet mesh.
 */
import assert from "node:assert/strict";
import type { FeedbackState } from "../pipelines/feedback/events.gen.ts";
import { listDeadLetters } from "../src/redrive.ts";
import { DEADLETTER_STREAM } from "../src/subjects.ts";
import { FEEDBACK_STREAM } from "../pipelines/feedback/subjects.ts";
import { SERVICES_IN_ONE_PROCESS, startServices } from "./helpers/mesh.ts";
import { countsByItem, readStates } from "./helpers/nats.ts";
import { waitUntil } from "./helpers/wait.ts";

const HTTP_CASES = 8_000;
const BUS_CASES = 2_400;
const enc = new TextEncoder();

interface HttpCase {
  method: string;
  path: string;
  headers: Record<string, string>;
  body?: Uint8Array<ArrayBuffer> | string;
  status: number;
  /** The problem must name this field. */
  field?: string;
}

const JSON_TYPE = { "content-type": "application/json" };
const deep = (n: number) => "[".repeat(n) + "]".repeat(n);

/** The n-th malformed request: cycles through every kind of bad input. */
function httpCase(n: number): HttpCase {
  const post = (
    body: string | Uint8Array<ArrayBuffer>,
    status: number,
    field?: string,
    path = "/feedback",
  ) => ({
    method: "POST",
    path,
    headers: JSON_TYPE,
    body,
    status,
    field,
  });
  const kinds: (() => HttpCase)[] = [
    () => post(JSON.stringify({ text: n }), 422, "/text"),
    () => post(JSON.stringify({ text: null }), 422, "/text"),
    () => post(JSON.stringify({ text: ["a"] }), 422, "/text"),
    () => post(JSON.stringify({}), 422),
    () => post(JSON.stringify({ channel: "web" }), 422),
    () => post(JSON.stringify({ text: "ok", extra: n }), 422),
    () => post(JSON.stringify({ text: "ok", channel: 7 }), 422, "/channel"),
    () => post(JSON.stringify({ text: "ok", id: "bad id!" }), 422, "/id"),
    () => post(JSON.stringify({ text: "" }), 422, "/text"),
    () => post("", 400, "/"),
    () => post("{", 400, "/"),
    () => post('{"text": "x",}', 400, "/"),
    // A member written twice: JSON.parse would keep the last and drop the first.
    () => post(`{"text":"x ${n}","text":"y"}`, 422, "/text"),
    () => post('{"items":[{"text":"a","text":"b"}]}', 422, "/items/0/text", "/feedback/batch"),
    () => post("null", 422),
    () => post(`"just a string ${n}"`, 422),
    () =>
      post(new Uint8Array([0x7b, 0x22, 0x74, 0x22, 0x3a, 0x22, 0xff, 0xfe, 0x22, 0x7d]), 400, "/"),
    () => post(deep(5_000), 422),
    () => post(`{"text":"x","metadata":${deep(2_000)}}`, 422),
    () => ({
      ...post(JSON.stringify({ text: "x" }), 415, "content-type"),
      headers: { "content-type": "text/plain" },
    }),
    () => ({ ...post(JSON.stringify({ text: "x" }), 415, "content-type"), headers: {} }),
    () => ({
      ...post("a=b", 415, "content-type"),
      headers: { "content-type": "application/x-www-form-urlencoded" },
    }),
    () => post(JSON.stringify({ items: "nope" }), 422, "/items", "/feedback/batch"),
    () => post(JSON.stringify({ items: [] }), 422, "/items", "/feedback/batch"),
    () =>
      post(
        JSON.stringify({ items: [{ text: "a" }, { text: 5 }] }),
        422,
        "/items/1/text",
        "/feedback/batch",
      ),
    () => ({
      method: "GET",
      path: `/events?type=bogus_${n}`,
      headers: {},
      status: 422,
      field: "type",
    }),
    () => ({ method: "GET", path: `/feedback/nope-${n}`, headers: {}, status: 404 }),
    () => ({ method: "DELETE", path: "/feedback", headers: {}, status: 405 }),
    () => ({ method: "DELETE", path: `/no-such-route-${n}`, headers: {}, status: 404 }),
    () => ({
      ...post(JSON.stringify({ text: "x" }), 422, "Idempotency-Key"),
      headers: { ...JSON_TYPE, "Idempotency-Key": "k".repeat(300) },
    }),
    () => post(JSON.stringify({ ids: ["x"] }), 422, "/ids", "/deadletters/redrive"),
    () =>
      post(JSON.stringify({ filter: { stage: 5 } }), 422, "/filter/stage", "/deadletters/redrive"),
  ];
  // A few huge bodies (cheap enough to send a handful).
  if (n % 500 === 0) return post(JSON.stringify({ text: "x".repeat(70_000) }), 413);
  return kinds[n % kinds.length]!();
}

async function pool<T>(n: number, parallel: number, work: (i: number) => Promise<T>): Promise<T[]> {
  const out = new Array<T>(n);
  let next = 0;
  await Promise.all(Array.from({ length: parallel }, async () => {
    while (next < n) {
      const i = next++;
      out[i] = await work(i);
    }
  }));
  return out;
}

/** The n-th poison message for the bus: subject and body. */
function busCase(n: number): { subject: string; body: Uint8Array | string } {
  const id = `poison-${n}`;
  const event = {
    id: `e${n}`,
    type: "feedback.ingested",
    version: 1,
    item_id: id,
    trace_id: "0af7651916cd43dd8448eb211c80319c",
    time: "2026-01-01T00:00:00.000Z",
    source: "test",
    data: { text: "hello" },
  };
  const kinds: (() => { subject: string; body: Uint8Array | string })[] = [
    () => ({ subject: "feedback.submit", body: `not json ${n}` }),
    () => ({ subject: "feedback.submit", body: JSON.stringify({ id, text: 42 }) }),
    () => ({ subject: "feedback.submit", body: JSON.stringify({ id, extra: true, text: "x" }) }),
    () => ({ subject: "feedback.submit", body: new Uint8Array([0xc3, 0x28, 0xff]) }),
    () => ({ subject: "feedback.submit", body: "" }),
    () => ({ subject: "feedback.submit", body: `{"id":"${id}","text":"a","text":"b"}` }),
    () => ({
      subject: `feedback.ingested.${id}`,
      body: JSON.stringify(event).replace('"source":', '"source":"forged","source":'),
    }),
    () => ({ subject: `feedback.ingested.${id}`, body: JSON.stringify({ ...event, version: 2 }) }),
    () => ({ subject: `feedback.ingested.${id}`, body: JSON.stringify({ ...event, data: {} }) }),
    () => ({ subject: `feedback.ingested.${id}`, body: JSON.stringify({ ...event, trace_id: 7 }) }),
    () => ({ subject: `feedback.ingested.${id}`, body: deep(3_000) }),
    () => ({ subject: `feedback.sentiment_analyzed.${id}`, body: JSON.stringify(event) }),
    () => ({
      subject: `feedback.mystery.${id}`,
      body: JSON.stringify({ ...event, type: "feedback.mystery" }),
    }),
    () => ({
      subject: `feedback.topics_extracted.${id}`,
      body: JSON.stringify({ ...event, type: "feedback.topics_extracted" }),
    }),
  ];
  return kinds[n % kinds.length]!();
}

function valid(prefix: string) {
  return Array.from({ length: 100 }, (_, i) => ({
    id: `${prefix}-${i}`,
    text: [`I love the new search ${i}`, `checkout crashes on pay ${i}`, `slow support reply ${i}`][
      i % 3
    ]!,
  }));
}

function results(s: FeedbackState | undefined) {
  return { status: s?.status, sentiment: s?.sentiment, topics: s?.topics, routing: s?.routing };
}

Deno.test("thousands of malformed HTTP requests and bus messages each get a clear error, crash nothing, and leave valid items' results unchanged", async () => {
  await using mesh = await startServices(SERVICES_IN_ONE_PROCESS);
  const post = (item: unknown) =>
    fetch(`${mesh.gatewayUrl}/feedback`, {
      method: "POST",
      headers: JSON_TYPE,
      body: JSON.stringify(item),
    })
      .then(async (r) => {
        assert.equal(r.status, 202, await r.text());
      });

  // Baseline: valid items on a quiet mesh.
  const quiet = valid("quiet");
  await pool(quiet.length, 16, (i) => post(quiet[i]));
  await waitUntil(async () => {
    const s = await readStates(mesh.js);
    return quiet.every((q) => s.get(q.id)?.status === "processed");
  }, 30_000);

  // The storm: malformed HTTP and bus input, with the same valid texts mixed in.
  const mixed = valid("mixed");
  const busSeqs = new Map<number, string>();
  const storm = Promise.all([
    pool(HTTP_CASES, 32, async (i) => {
      const c = httpCase(i);
      const res = await fetch(`${mesh.gatewayUrl}${c.path}`, {
        method: c.method,
        headers: c.headers,
        body: c.body,
      });
      const text = await res.text();
      assert.equal(res.status, c.status, `case ${i} ${c.method} ${c.path}: ${text.slice(0, 300)}`);
      assert.match(res.headers.get("content-type") ?? "", /^application\/problem\+json/);
      const problem = JSON.parse(text);
      assert.equal(problem.status, c.status);
      assert.equal(typeof problem.code, "string");
      assert.ok(problem.detail.length > 0);
      if (c.field !== undefined) assert.equal(problem.field, c.field, `case ${i}: ${text}`);
    }),
    pool(BUS_CASES, 32, async (i) => {
      const c = busCase(i);
      const ack = await mesh.js.publish(c.subject, c.body);
      busSeqs.set(ack.seq, c.subject);
    }),
    pool(mixed.length, 4, (i) => post(mixed[i])),
  ]);
  await storm;

  // An oversized message is refused at publish with a clear error.
  await assert.rejects(
    mesh.js.publish("feedback.submit", new Uint8Array(2 * 1024 * 1024)),
    /payload|size|exceed/i,
  );

  // Every poison message is dead-lettered with its validation error.
  let letters: Awaited<ReturnType<typeof listDeadLetters>> = [];
  await waitUntil(
    async () => {
      letters = await listDeadLetters(mesh.js, {}, 100_000);
      const covered = new Set(letters.map((l) => l.letter.stream_seq));
      return [...busSeqs.keys()].every((s) => covered.has(s));
    },
    60_000,
    () => `${letters.length} letters for ${busSeqs.size} poison messages`,
  );
  for (const { letter } of letters) {
    assert.ok(
      busSeqs.has(letter.stream_seq),
      `only poison is dead-lettered: ${letter.subject} ${letter.stage} ${letter.code} ${letter.reason} ${
        letter.payload?.slice(0, 400)
      }`,
    );
    assert.match(letter.code, /^(invalid_event|invalid_field|unknown_version|subject_mismatch)$/);
    assert.ok(letter.reason.length > 0);
    assert.equal(letter.attempts, 1, "poison is never retried");
  }

  // Valid items: same results as on the quiet mesh.
  await waitUntil(async () => {
    const s = await readStates(mesh.js);
    return mixed.every((m) => s.get(m.id)?.status === "processed");
  }, 30_000);
  const states = await readStates(mesh.js);
  for (let i = 0; i < quiet.length; i++) {
    assert.deepEqual(results(states.get(mixed[i]!.id)), results(states.get(quiet[i]!.id)));
  }
  const processed = await countsByItem(mesh.jsm, "feedback.processed.*");
  assert.equal(processed.size, quiet.length + mixed.length, "only valid items complete");

  // Nothing is left for redelivery; nothing crashed.
  for (const name of ["ingest", "sentiment", "topics", "dispatch", "state"]) {
    await waitUntil(
      async () => {
        const info = await mesh.jsm.consumers.info(FEEDBACK_STREAM, name);
        return info.num_ack_pending === 0 && info.num_pending === 0;
      },
      20_000,
      () => `${name} still has work`,
    );
  }
  assert.deepEqual(mesh.crashed(), []);
  const dead = (await mesh.jsm.streams.info(DEADLETTER_STREAM)).state.messages;
  Deno.stdout.writeSync(enc.encode(
    `BAD-INPUT-FIGURES ${
      JSON.stringify({
        http: HTTP_CASES,
        bus: BUS_CASES,
        dead_letters: dead,
        valid: quiet.length + mixed.length,
      })
    }\n`,
  ));
});
