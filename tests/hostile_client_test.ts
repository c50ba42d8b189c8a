/**
 * Defects found by a hostile-client probe of the gateway's HTTP API, each kept fixed: every
 * refusal is a 4xx application/problem+json naming the field, a refused request changes
 * nothing (not even an Idempotency-Key), and nothing the client sent is silently dropped
 * or rewritten. Real nats-server, the gateway app in-process.
 */
import assert from "node:assert/strict";
import { createApp } from "../src/gateway/app.ts";
import { type Auth, createAuth, hashKey } from "../src/gateway/auth.ts";
import { createIntake } from "../pipelines/feedback/intake.ts";
import { feedbackRoutes } from "../pipelines/feedback/routes.ts";
import { createModerationApi } from "../pipelines/moderation/api.ts";
import { moderationRoutes } from "../pipelines/moderation/routes.ts";
import { serveModerationRequests } from "../pipelines/moderation/requests.ts";
import { FEEDBACK_STREAM } from "../pipelines/feedback/subjects.ts";
import { CONTENT_STREAM, REVIEW_BUCKET } from "../pipelines/moderation/subjects.ts";
import { createReviewQueue } from "../pipelines/moderation/review_queue.ts";
import { Kvm } from "@nats-io/kv";
import { jetstream } from "@nats-io/jetstream";
import { serveRequests } from "../pipelines/feedback/requests.ts";
import { servePipelineRequests } from "../src/gateway/pipelines.ts";
import type { LoadedPipeline } from "../src/pipeline/runtime.ts";
import { headers as natsHeaders } from "@nats-io/nats-core";
import { approvalsPipeline } from "./helpers/pipeline.ts";
import { createShadowControl, type ShadowControl } from "../src/shadow/control.ts";
import { PATIENT, startTestNats, type TestNats } from "./helpers/nats.ts";
import { SseClients } from "../src/gateway/sse.ts";
import { waitFor } from "./helpers/wait.ts";

const JSON_TYPE = { "content-type": "application/json" };

/** The gateway app with feedback and content moderation, no API keys. */
async function gateway(
  t: TestNats,
  opts: {
    pipelines?: LoadedPipeline[];
    shadows?: ShadowControl;
    sseClients?: SseClients;
    auth?: Auth;
  } = {},
) {
  const intake = await createIntake(t.nc);
  const moderation = await createModerationApi({
    nc: t.nc,
    config: t.config,
    log: t.log,
    authEnabled: false,
  });
  return createApp({
    nc: t.nc,
    jetStream: intake,
    config: t.config,
    log: t.log,
    auth: opts.auth ?? createAuth([]),
    ...(opts.pipelines ? { pipelines: opts.pipelines } : {}),
    ...(opts.shadows ? { shadows: opts.shadows } : {}),
    ...(opts.sseClients ? { sseClients: opts.sseClients } : {}),
    extensions: [feedbackRoutes(intake), moderationRoutes(moderation)],
  });
}

/** `res` is a problem document with `status`, naming `field` when given. */
async function expectProblem(res: Response, status: number, field?: string) {
  const text = await res.text();
  assert.equal(res.status, status, text);
  assert.match(res.headers.get("content-type") ?? "", /^application\/problem\+json/);
  const p = JSON.parse(text);
  if (field !== undefined) assert.equal(p.field, field, text);
  return p;
}

Deno.test("a request refused for its body leaves its Idempotency-Key unused: the corrected request under the same key is accepted, one or a batch", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  const post = (path: string, body: unknown, key?: string) =>
    app.request(path, {
      method: "POST",
      headers: { ...JSON_TYPE, ...(key ? { "Idempotency-Key": key } : {}) },
      body: JSON.stringify(body),
    });
  assert.equal((await post("/feedback", { id: "seedX", text: "original" })).status, 202);
  const stored = async () => (await t.jsm.streams.info(FEEDBACK_STREAM)).state.messages;
  assert.equal(await stored(), 1);

  // One: the clash is refused naming /id, nothing stored; the same key with a fixed body works.
  await expectProblem(await post("/feedback", { id: "seedX", text: "clash" }, "burnX"), 422, "/id");
  assert.equal(await stored(), 1, "nothing stored by the refusal");
  const fixed = await post("/feedback", { id: "seedY", text: "corrected" }, "burnX");
  assert.equal(fixed.status, 202, await fixed.clone().text());
  assert.equal(fixed.headers.get("idempotent-replayed"), null);
  assert.equal((await fixed.json()).id, "seedY");
  // The key now holds the accepted request: its repeat is a replay, another body a mismatch.
  const again = await post("/feedback", { id: "seedY", text: "corrected" }, "burnX");
  assert.equal(again.status, 202);
  assert.equal(again.headers.get("idempotent-replayed"), "true");
  await expectProblem(
    await post("/feedback", { id: "seedZ", text: "other" }, "burnX"),
    422,
    "Idempotency-Key",
  );

  // A batch: the same.
  const before = await stored();
  await expectProblem(
    await post(
      "/feedback/batch",
      { items: [{ text: "fine" }, { id: "seedX", text: "clash" }] },
      "burnB",
    ),
    422,
    "/items/1/id",
  );
  assert.equal(await stored(), before, "nothing stored by the refused batch");
  const batch = await post(
    "/feedback/batch",
    { items: [{ text: "fine" }, { text: "also" }] },
    "burnB",
  );
  assert.equal(batch.status, 202, await batch.clone().text());
  assert.equal((await batch.json()).items.length, 2);
  assert.equal(await stored(), before + 2);
});

Deno.test("a repeated Idempotency-Key is refused with 422 naming it, over HTTP and NATS, not merged into one key 'A, B'", async () => {
  await using t = await startTestNats();
  const app = await gateway(t, { pipelines: [approvalsPipeline()] });
  const twoKeys = () => {
    const h = new Headers(JSON_TYPE);
    h.append("Idempotency-Key", "A");
    h.append("Idempotency-Key", "B");
    return h;
  };
  const posts: [string, unknown][] = [
    ["/feedback", { text: "hello" }],
    ["/feedback/batch", { items: [{ text: "hello" }] }],
    ["/pipelines/approvals/items", {}],
    ["/pipelines/approvals/items/batch", { items: [{}] }],
  ];
  for (const [path, body] of posts) {
    const res = await app.request(path, {
      method: "POST",
      headers: twoKeys(),
      body: JSON.stringify(body),
    });
    const p = await expectProblem(res, 422, "Idempotency-Key");
    assert.match(p.detail, /Idempotency-Key takes one value/, path);
  }
  assert.equal((await t.jsm.streams.info(FEEDBACK_STREAM)).state.messages, 0, "nothing stored");

  const served = [
    serveRequests(t.nc, await createIntake(t.nc), t.log),
    servePipelineRequests(t.nc, [approvalsPipeline()], t.log),
  ];
  try {
    const h = natsHeaders();
    h.append("Idempotency-Key", "A");
    h.append("Idempotency-Key", "B");
    for (
      const [subject, body] of [["weft.feedback.submit", { text: "hi" }], [
        "weft.approvals.submit",
        {},
      ]]
    ) {
      const reply =
        (await t.nc.request(subject as string, JSON.stringify(body), { ...PATIENT, headers: h }))
          .json<{ error?: { status: number; field?: string } }>();
      assert.equal(reply.error?.status, 422, `${subject}: ${JSON.stringify(reply)}`);
      assert.equal(reply.error?.field, "Idempotency-Key", `${subject}: ${JSON.stringify(reply)}`);
    }
  } finally {
    for (const s of served) s.stop();
  }
  assert.equal((await t.jsm.streams.info(FEEDBACK_STREAM)).state.messages, 0, "nothing stored");
});

Deno.test("POST /content as JSON refuses any query parameter with 422 naming it, meta.<key> included, instead of dropping it", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  const post = (q: string) =>
    app.request(`/content${q}`, {
      method: "POST",
      headers: JSON_TYPE,
      body: JSON.stringify({ text: "a picture of a cat" }),
    });
  for (const [q, field] of [["?meta.team=red", "meta.team"], ["?zzz=1", "zzz"], ["?x", "x"]]) {
    const p = await expectProblem(await post(q!), 422, field);
    assert.match(p.detail, new RegExp(field!.replace(".", "\\.")), q);
  }
  assert.equal((await t.jsm.streams.info(CONTENT_STREAM)).state.messages, 0, "nothing accepted");
  const ok = await post("");
  assert.equal(ok.status, 202, await ok.clone().text());
  await ok.body?.cancel();
});

Deno.test("a binary upload's meta.* value that is not percent-encoded UTF-8 is refused with 422 naming the parameter, not stored as U+FFFD", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  const upload = (q: string) =>
    app.request(`/content?${q}`, {
      method: "POST",
      headers: { "content-type": "image/png" },
      body: new Uint8Array([1, 2, 3]),
    });
  for (const q of ["meta.a=%ED%A0%80", "meta.a=%C3%28", "meta.ok=1&meta.a=x%FFy", "meta.a=%zz"]) {
    const p = await expectProblem(await upload(q), 422, "meta.a");
    assert.match(p.detail, /meta\.a is not percent-encoded UTF-8/, q);
  }
  // A JSON submission names such a parameter too (it takes none).
  const json = await app.request("/content?meta.a=%C3%28", {
    method: "POST",
    headers: JSON_TYPE,
    body: JSON.stringify({ text: "hello" }),
  });
  await expectProblem(json, 422, "meta.a");
  assert.equal((await t.jsm.streams.info(CONTENT_STREAM)).state.messages, 0, "nothing accepted");
  // Valid UTF-8, `+` as a space, is kept as sent.
  const ok = await upload("meta.city=S%C3%A3o+Paulo&meta.emoji=%F0%9F%90%88");
  assert.equal(ok.status, 202, await ok.clone().text());
  const { id } = await ok.json();
  const m = await t.jsm.streams.getMessage(CONTENT_STREAM, {
    last_by_subj: `content.uploaded.${id}`,
  });
  const data = m!.json<{ data: { metadata?: Record<string, string> } }>().data;
  assert.deepEqual(data.metadata, { city: "São Paulo", emoji: "🐈" });
});

Deno.test("a JSON body declared in a charset other than utf-8 is refused with 415 naming content-type, not decoded as UTF-8 and stored rewritten", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  // {"text":"Ã©"} in ISO-8859-1: the bytes C3 A9, which read as UTF-8 are "é", another text.
  const latin1 = new Uint8Array([...new TextEncoder().encode('{"text":"'), 0xc3, 0xa9, 0x22, 0x7d]);
  for (const path of ["/feedback", "/content"]) {
    for (const charset of ["ISO-8859-1", '"latin1"', "utf-16"]) {
      const res = await app.request(path, {
        method: "POST",
        headers: { "content-type": `application/json; charset=${charset}` },
        body: latin1,
      });
      const p = await expectProblem(res, 415, "content-type");
      assert.match(p.detail, /charset must be utf-8/, `${path} ${charset}`);
    }
  }
  assert.equal((await t.jsm.streams.info(FEEDBACK_STREAM)).state.messages, 0, "nothing stored");
  assert.equal((await t.jsm.streams.info(CONTENT_STREAM)).state.messages, 0, "nothing stored");
  // utf-8 in any case, quoted or not, is the body's own encoding.
  for (const path of ["/feedback", "/content"]) {
    for (const charset of ["utf-8", "UTF-8", '"Utf-8"', "utf8", "UTF8", "us-ascii"]) {
      const res = await app.request(path, {
        method: "POST",
        headers: { "content-type": `application/json;charset=${charset}` },
        body: JSON.stringify({ text: "café" }),
      });
      assert.equal(res.status, 202, `${path} ${charset}: ${await res.clone().text()}`);
      await res.body?.cancel();
    }
  }
});

Deno.test("POST /content and weft.content.submit refuse an Idempotency-Key with 422 naming it, instead of ignoring it and making a second item", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  const keyed = { "Idempotency-Key": "same-key" };
  const posts: [Record<string, string>, BodyInit, string][] = [
    [JSON_TYPE, JSON.stringify({ text: "a picture of a cat" }), ""],
    [JSON_TYPE, JSON.stringify({ id: "ct-keyed", text: "a picture of a cat" }), ""],
    [{ "content-type": "image/png" }, new Uint8Array([1, 2, 3]), "?meta.camera=x100"],
  ];
  for (const [headers, body, q] of posts) {
    for (let i = 0; i < 2; i++) {
      const res = await app.request(`/content${q}`, {
        method: "POST",
        headers: { ...headers, ...keyed },
        body,
      });
      const p = await expectProblem(res, 422, "Idempotency-Key");
      assert.match(p.detail, /takes no Idempotency-Key/);
    }
  }
  const requests = serveModerationRequests(
    t.nc,
    await createModerationApi({
      nc: t.nc,
      config: t.config,
      log: t.log,
      authEnabled: false,
    }),
    createAuth([]),
    t.log,
  );
  try {
    const h = natsHeaders();
    h.set("Idempotency-Key", "same-key");
    const reply = (await t.nc.request(
      "weft.content.submit",
      JSON.stringify({ text: "a picture of a cat" }),
      { ...PATIENT, headers: h },
    )).json<{ error?: { status: number; field?: string } }>();
    assert.equal(reply.error?.status, 422, JSON.stringify(reply));
    assert.equal(reply.error?.field, "Idempotency-Key", JSON.stringify(reply));
  } finally {
    requests.stop();
  }
  assert.equal((await t.jsm.streams.info(CONTENT_STREAM)).state.messages, 0, "nothing accepted");
});

Deno.test("a reviewer's decision whose publish the full CONTENT stream refuses answers 503 with Retry-After, not 500; the same decision retried publishes it", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  const queue = createReviewQueue(await new Kvm(t.nc).open(REVIEW_BUCKET), t.config);
  const id = "ct-full-1";
  await queue.enqueue({
    id,
    status: "pending",
    trace_id: "0".repeat(32),
    queued_at: new Date().toISOString(),
    escalation_level: 0,
    content: { text: "a text under review", submitted_by: "test" },
    moderation: {
      verdict: "flagged",
      categories: ["insult"],
      score: 0.9,
      analyzer: "test",
      reasons: ["r"],
    },
  });
  // The stream at its message limit (discard new): the decision's publish is refused (10077).
  await jetstream(t.nc).publish("content.probe.full", "");
  const info = await t.jsm.streams.info(CONTENT_STREAM);
  await t.jsm.streams.update(CONTENT_STREAM, { ...info.config, max_msgs: info.state.messages });
  const decide = () =>
    app.request(`/reviews/${id}/decision`, {
      method: "POST",
      headers: JSON_TYPE,
      body: JSON.stringify({ decision: "approve", reason: "fine", reviewer: "amy" }),
    });
  const refused = await decide();
  const p = await expectProblem(refused, 503);
  assert.equal(p.code, "unavailable");
  assert.ok(Number(refused.headers.get("retry-after")) > 0, "Retry-After");
  assert.match(p.detail, /retry/i);

  await t.jsm.streams.update(CONTENT_STREAM, { ...info.config, max_msgs: -1 });
  const ok = await decide();
  assert.equal(ok.status, 200, await ok.clone().text());
  await ok.body?.cancel();
  const m = await t.jsm.streams.getMessage(CONTENT_STREAM, {
    last_by_subj: `content.decided.${id}`,
  });
  assert.equal(m?.json<{ data: { decision: string } }>().data.decision, "approve");
});

Deno.test("GET /content/<id>/object serves the item's first upload: an upload event re-published on its subject naming another object does not swap the bytes", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  const upload = async (bytes: number[]) => {
    const res = await app.request("/content", {
      method: "POST",
      headers: { "content-type": "image/png" },
      body: new Uint8Array(bytes),
    });
    assert.equal(res.status, 202, await res.clone().text());
    return (await res.json()).id as string;
  };
  const id = await upload([1, 1, 1]);
  const other = await upload([6, 6, 6, 6]);
  const subject = `content.uploaded.${id}`;
  const first = (await t.jsm.streams.getMessage(CONTENT_STREAM, { last_by_subj: subject }))!
    .json<{ data: { object: { name: string; size: number } } }>();
  // The gateway's key may publish on the subject: a second upload event naming the other object.
  const forged = structuredClone(first);
  forged.data.object = { ...forged.data.object, name: other, size: 4 };
  await jetstream(t.nc).publish(subject, JSON.stringify(forged));
  const res = await app.request(`/content/${id}/object`);
  assert.equal(res.status, 200, await res.clone().text());
  assert.deepEqual([...new Uint8Array(await res.arrayBuffer())], [1, 1, 1]);
});

Deno.test("POST /shadows for a pipeline that is not running names /pipeline, not /candidate/definition", async () => {
  await using t = await startTestNats();
  const pipelines = [approvalsPipeline()];
  const shadows = createShadowControl(t.nc, [], { pipelines, root: "" });
  const app = await gateway(t, { pipelines, shadows });
  const attach = (spec: unknown) =>
    app.request("/shadows", { method: "POST", headers: JSON_TYPE, body: JSON.stringify(spec) });
  for (
    const candidate of [{ analyzers: "rules" }, {}, { definition: "pipelines/nope/v2.ts" }]
  ) {
    const p = await expectProblem(
      await attach({ id: "s1", pipeline: "nope", step: "check", candidate }),
      422,
      "/pipeline",
    );
    assert.match(p.detail, /no running pipeline nope/, JSON.stringify(candidate));
  }
  // A running definition's pipeline still gets its candidate checked.
  await expectProblem(
    await attach({ id: "s1", pipeline: "approvals", step: "check", candidate: {} }),
    422,
    "/candidate/definition",
  );
});

Deno.test("limit takes decimal digits only, and /dashboard/recent, a claim's release and an awaited event refuse an unknown query parameter with 422 naming it", async () => {
  await using t = await startTestNats();
  const app = await gateway(t, { pipelines: [approvalsPipeline()] });
  for (const limit of ["0x10", "1e2", "%205%20", "+5", "5.0"]) {
    const p = await expectProblem(await app.request(`/deadletters?limit=${limit}`), 422, "limit");
    assert.match(p.detail, /limit must be an integer/, limit);
  }
  const ok = await app.request("/deadletters?limit=5");
  assert.equal(ok.status, 200, await ok.clone().text());
  await ok.body?.cancel();
  const recent = await app.request("/dashboard/recent?limit=010");
  assert.equal(recent.status, 200, await recent.clone().text());
  await recent.body?.cancel();

  const refusals: [string, RequestInit, string][] = [
    ["/dashboard/recent?zzz=1", {}, "zzz"],
    ["/dashboard/recent?limit=1e2", {}, "limit"],
    ["/pipelines/approvals/claims/A1?q=1", { method: "DELETE" }, "q"],
    [
      "/pipelines/approvals/items/A1/approved?x=1",
      { method: "POST", headers: JSON_TYPE, body: JSON.stringify({ by: "carol" }) },
      "x",
    ],
  ];
  for (const [path, init, field] of refusals) {
    const p = await expectProblem(await app.request(path, init), 422, field);
    assert.match(p.detail, new RegExp(field), path);
  }
});

Deno.test("HEAD of an event stream answers its headers and frees its SSE slot at once, instead of holding it while the stream is quiet", async () => {
  await using t = await startTestNats();
  // Two slots: before the fix, the third HEAD found both held by the first two (503).
  const clients = new SseClients(2);
  const app = await gateway(t, { sseClients: clients });
  const posted = await app.request("/feedback", {
    method: "POST",
    headers: JSON_TYPE,
    body: JSON.stringify({ text: "an item no step runs: its stream stays open, live" }),
  });
  assert.equal(posted.status, 202, await posted.clone().text());
  const { id } = await posted.json();
  const streams = [
    "/events",
    "/events?type=processed",
    "/dashboard/stream",
    `/feedback/${id}/events`,
  ];
  for (let round = 0; round < 3; round++) {
    for (const path of streams) {
      const res = await app.request(path, { method: "HEAD" });
      assert.equal(res.status, 200, `HEAD ${path}`);
      assert.match(res.headers.get("content-type") ?? "", /^text\/event-stream/, path);
      assert.equal(res.body, null, path);
      await waitFor(() => clients.open === 0, 10_000, `HEAD ${path} freed its slot`);
    }
  }
  // The slots are free for streams that are read.
  const live = await app.request("/events");
  assert.equal(live.status, 200);
  await live.body?.cancel();
  await waitFor(() => clients.open === 0, 10_000, "the read stream freed its slot");
  // The live feeds' consumers are deleted once their last client has gone.
  await waitFor(
    async () => (await t.jsm.streams.info(FEEDBACK_STREAM)).state.consumer_count === 0,
    10_000,
    "the live feeds' consumers deleted",
  );
});

Deno.test("a body in a content coding (gzip) is refused with 415 naming content-encoding, not stored as its coded bytes; identity is taken", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  const gzip = async (bytes: Uint8Array<ArrayBuffer>) =>
    new Uint8Array(
      await new Response(new Blob([bytes]).stream().pipeThrough(new CompressionStream("gzip")))
        .arrayBuffer(),
    );
  const png = new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 1, 2, 3]);
  const json = new TextEncoder().encode(JSON.stringify({ text: "compressed" }));
  const sends: [string, string, Uint8Array<ArrayBuffer>][] = [
    ["/content", "image/png", await gzip(png)],
    ["/content", "image/png", png], // declared coded, sent plain: read as coded all the same
    ["/content", "application/json", await gzip(json)],
    ["/feedback", "application/json", await gzip(json)],
    ["/feedback", "application/json", json],
    ["/feedback/batch", "application/json", await gzip(json)],
  ];
  for (const [path, type, body] of sends) {
    for (const coding of ["gzip", "br", "identity, gzip"]) {
      const res = await app.request(path, {
        method: "POST",
        headers: { "content-type": type, "content-encoding": coding },
        body,
      });
      const p = await expectProblem(res, 415, "content-encoding");
      assert.match(p.detail, /content-encoding/, `${path} ${type} ${coding}`);
    }
  }
  assert.equal((await t.jsm.streams.info(FEEDBACK_STREAM)).state.messages, 0, "nothing stored");
  assert.equal((await t.jsm.streams.info(CONTENT_STREAM)).state.messages, 0, "nothing stored");
  // identity is the body as it is.
  for (
    const [path, type, body] of [["/content", "image/png", png], [
      "/feedback",
      "application/json",
      json,
    ]] as const
  ) {
    const res = await app.request(path, {
      method: "POST",
      headers: { "content-type": type, "content-encoding": "Identity" },
      body,
    });
    assert.equal(res.status, 202, `${path}: ${await res.clone().text()}`);
    await res.body?.cancel();
  }
});

Deno.test("an API key's event streams count against its WEFT_SSE_MAX_PER_KEY however its Authorization header is spelled", async () => {
  await using t = await startTestNats();
  const clients = new SseClients(10, 2);
  const auth = createAuth([{ sha256: hashKey("k-ingest"), role: "ingest", name: "ivan" }]);
  const app = await gateway(t, { sseClients: clients, auth });
  const consumers = async () => (await t.jsm.streams.info(FEEDBACK_STREAM)).state.consumer_count;
  const before = await consumers();
  const open: Response[] = [];
  try {
    for (let i = 0; i < 2; i++) {
      const res = await app.request("/events", { headers: { authorization: "Bearer k-ingest" } });
      assert.equal(res.status, 200);
      open.push(res);
    }
    // The same key, spelled otherwise: each spelling used to get two streams of its own.
    for (const spelling of ["bearer  k-ingest", "BEARER k-ingest", "Bearer\tk-ingest"]) {
      const res = await app.request("/events", { headers: { authorization: spelling } });
      if (res.status === 200) {
        open.push(res);
        assert.fail(`${spelling}: a third stream of the key opened`);
      }
      const p = await expectProblem(res, 503);
      assert.match(p.detail, /WEFT_SSE_MAX_PER_KEY/, spelling);
    }
  } finally {
    for (const res of open) await res.body?.cancel();
  }
  await waitFor(() => clients.open === 0, 10_000, "the streams freed their slots");
  await waitFor(
    async () => await consumers() === before,
    10_000,
    "the live feed's consumer deleted",
  );
});

Deno.test("with authentication off, a browser's cross-site POST (a web page's form) is refused with 403 naming origin; same-origin and non-browser requests are taken", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  // What a hostile page's <form method=post enctype=text/plain> sends: no preflight needed.
  const form = (headers: Record<string, string>) =>
    app.request("http://127.0.0.1:8000/content", {
      method: "POST",
      headers: { "content-type": "text/plain", ...headers },
      body: "planted by a web page",
    });
  for (
    const headers of [
      { "sec-fetch-site": "cross-site", origin: "https://evil.example" } as Record<string, string>,
      { "sec-fetch-site": "same-site", origin: "http://127.0.0.1:3000" },
      { origin: "https://evil.example" }, // a browser that sends no Sec-Fetch-Site
      { origin: "null" }, // a sandboxed frame or a file
    ]
  ) {
    const p = await expectProblem(await form(headers), 403, "origin");
    assert.match(p.detail, /cross-site/, JSON.stringify(headers));
  }
  const json = await app.request("http://127.0.0.1:8000/feedback", {
    method: "POST",
    headers: { ...JSON_TYPE, "sec-fetch-site": "cross-site" },
    body: JSON.stringify({ text: "from another site" }),
  });
  await expectProblem(json, 403, "origin");
  assert.equal((await t.jsm.streams.info(CONTENT_STREAM)).state.messages, 0, "nothing stored");
  assert.equal((await t.jsm.streams.info(FEEDBACK_STREAM)).state.messages, 0, "nothing stored");
  // The dashboard's own requests (same origin), and callers that are no browser, are taken;
  // a cross-site GET changes nothing and is answered.
  for (
    const headers of [
      { "sec-fetch-site": "same-origin", origin: "http://127.0.0.1:8000" } as Record<
        string,
        string
      >,
      { origin: "http://127.0.0.1:8000" },
      {},
    ]
  ) {
    const res = await form(headers);
    assert.equal(res.status, 202, `${JSON.stringify(headers)}: ${await res.clone().text()}`);
    await res.body?.cancel();
  }
  const read = await app.request("http://127.0.0.1:8000/healthz", {
    headers: { "sec-fetch-site": "cross-site" },
  });
  assert.equal(read.status, 200);
  await read.body?.cancel();
});
