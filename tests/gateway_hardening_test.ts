/**
 * Defects found by an adversarial run of the gateway, each kept fixed: bad input gets a
 * clear 4xx naming the field, never a 500 or a silent default, and nothing is accepted
 * that would later be dead-lettered. Real nats-server, the gateway app in-process.
 */
import assert from "node:assert/strict";
import { headers } from "@nats-io/nats-core";
import { loadConfig } from "../src/config.ts";
import { ConfigError } from "../src/errors.ts";
import { createApp } from "../src/gateway/app.ts";
import { feedbackRoutes } from "../pipelines/feedback/routes.ts";
import { createAuth, hashKey } from "../src/gateway/auth.ts";
import { createIngestLimiter, parseIngestLimits } from "../src/gateway/ingest_limits.ts";
import { createIntake } from "../pipelines/feedback/intake.ts";
import { serveRequests } from "../pipelines/feedback/requests.ts";
import { createModerationApi } from "../pipelines/moderation/api.ts";
import { moderationRoutes } from "../pipelines/moderation/routes.ts";
import { serveModerationRequests } from "../pipelines/moderation/requests.ts";
import { CONTENT_STREAM } from "../pipelines/moderation/subjects.ts";
import { FEEDBACK_STREAM } from "../pipelines/feedback/subjects.ts";
import { approvalsPipeline, feedbackApp } from "./helpers/pipeline.ts";
import { connectClient, PATIENT, startTestNats, type TestNats } from "./helpers/nats.ts";
import { deadline, waitFor } from "./helpers/wait.ts";
import { readSse } from "./helpers/sse.ts";
import { startService, taskArgs } from "./helpers/mesh.ts";
import { freePort } from "../src/nats_server.ts";
import { StreamReadStalled } from "../src/stream_reader.ts";
import { type LoadedPipeline, pipelineTopology } from "../src/pipeline/runtime.ts";
import { pipelineSubjects } from "../src/pipeline/derive.ts";
import { ensureTopology } from "../src/topology.ts";
import { Hono } from "hono";
import { servePipelineRequests } from "../src/gateway/pipelines.ts";
import { serveShadowRequests } from "../src/gateway/shadows.ts";
import type { ShadowControl } from "../src/shadow/control.ts";
import { serveDeadLetterRequests } from "../src/redrive.ts";
import { REDRIVE_BODY_LIMIT } from "../src/gateway/deadletters.ts";
import { createShadowControl } from "../src/shadow/control.ts";
import { scheduleTargets, serveScheduleRequests } from "../src/gateway/schedules.ts";
import { createScheduleStore } from "../src/scheduler/store.ts";
import { SCHEDULE_BUCKET } from "../src/subjects.ts";
import { Kvm } from "@nats-io/kv";

const JSON_TYPE = { "content-type": "application/json" };

/**
 * The gateway app with feedback and content moderation, no API keys; `opts` adds what the
 * event-stream tests need: a definition and a hub's view of an edge site.
 */
async function gateway(
  t: TestNats,
  opts: { pipelines?: LoadedPipeline[]; hub?: string[] } = {},
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
    config: opts.hub ? { ...t.config, hub: opts.hub } : t.config,
    log: t.log,
    auth: createAuth([]),
    ...(opts.pipelines ? { pipelines: opts.pipelines } : {}),
    extensions: [feedbackRoutes(intake), moderationRoutes(moderation)],
  });
}

/**
 * Every event-stream route: feedback and content, a definition (`approvals`) and a hub's
 * view of the site `east`.
 */
const streamsApp = (t: TestNats) => gateway(t, { pipelines: [approvalsPipeline()], hub: ["east"] });

/** `path` is refused with 422 naming `field`; a 200 event stream is never read whole. */
async function refusedStream(app: Hono, path: string, field: string) {
  const abort = new AbortController();
  const res = await app.request(path, { signal: abort.signal });
  if (res.status === 200) {
    abort.abort();
    await res.body?.cancel();
    assert.fail(`${path}: a 200 event stream`);
  }
  const p = await expectProblem(res, 422, field);
  assert.match(p.detail ?? p.title, new RegExp(field.replace(".", "\\.")), path);
}

function natsHeaders(authorization: string) {
  const h = headers();
  h.set("Authorization", authorization);
  return h;
}

async function expectProblem(res: Response, status: number, field?: string) {
  const text = await res.text();
  assert.equal(res.status, status, text);
  assert.match(res.headers.get("content-type") ?? "", /^application\/problem\+json/);
  const p = JSON.parse(text);
  if (field !== undefined) assert.equal(p.field, field, text);
  return p;
}

Deno.test("a history read that stays stalled is answered 503 with Retry-After, not 500", async () => {
  await using t = await startTestNats();
  const stalls = new Hono().get("/stalls", () => {
    throw new StreamReadStalled("FEEDBACK", 12, 30_000);
  });
  const app = createApp({
    nc: t.nc,
    jetStream: await createIntake(t.nc),
    config: t.config,
    log: t.log,
    auth: createAuth([]),
    extensions: [() => stalls],
  });
  const res = await app.request("/stalls");
  const p = await expectProblem(res, 503);
  assert.equal(p.code, "unavailable");
  assert.ok(Number(res.headers.get("retry-after")) > 0);
});

Deno.test("an Idempotency-Key repeated with the same body in another key order returns the first answer", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  const post = (body: string) =>
    app.request("/feedback", {
      method: "POST",
      headers: { ...JSON_TYPE, "Idempotency-Key": "order-1" },
      body,
    });
  const first = await post('{"text":"hello","channel":"web"}');
  assert.equal(first.status, 202);
  const again = await post('{"channel":"web","text":"hello"}');
  assert.equal(again.status, 202, await again.clone().text());
  assert.equal(again.headers.get("idempotent-replayed"), "true");
  assert.deepEqual(await again.json(), await first.json());
});

Deno.test("a client id reused with a different body is refused with 422 like a reused Idempotency-Key; the same body is a replay", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  const post = (body: unknown) =>
    app.request("/feedback", { method: "POST", headers: JSON_TYPE, body: JSON.stringify(body) });
  assert.equal((await post({ id: "mine-1", text: "first text" })).status, 202);
  const same = await post({ id: "mine-1", text: "first text" });
  assert.equal(same.status, 202);
  assert.equal(same.headers.get("idempotent-replayed"), "true");
  const p = await expectProblem(await post({ id: "mine-1", text: "other text" }), 422, "/id");
  assert.equal(p.code, "idempotency_mismatch");
  const batch = await app.request("/feedback/batch", {
    method: "POST",
    headers: JSON_TYPE,
    body: JSON.stringify({ items: [{ id: "mine-1", text: "yet another" }] }),
  });
  await expectProblem(batch, 422, "/items/0/id");
  // The pointer names the item, as a bad field of a batch item does (/items/<i>/<field>).
  const second = await app.request("/feedback/batch", {
    method: "POST",
    headers: JSON_TYPE,
    body: JSON.stringify({ items: [{ text: "fresh" }, { id: "mine-1", text: "yet another" }] }),
  });
  const p2 = await expectProblem(second, 422, "/items/1/id");
  assert.equal(p2.code, "idempotency_mismatch");
});

Deno.test("two submissions racing under one client id with different bodies: one is accepted, the other refused with 422, never both accepted", async () => {
  // Found by sending both at once: each looked the id up before either was stored, the second
  // publish was refused (the id's subject held the first), and it was answered 202 all the same:
  // its body accepted and never stored.
  await using t = await startTestNats();
  // The second submission's gateway: its publish of the item waits, past its look-up, until
  // the first submission is stored (a fixed interleaving of the race, not a timing).
  const nc2 = await connectClient(t.server.url, "weft-test-racer");
  try {
    const reached = Promise.withResolvers<void>();
    const release = Promise.withResolvers<void>();
    const request = nc2.request.bind(nc2);
    nc2.request = async (subject, ...rest) => {
      if (subject.startsWith("feedback.ingested.")) {
        reached.resolve();
        await release.promise;
      }
      return await request(subject, ...rest);
    };
    const app = (intake: Awaited<ReturnType<typeof createIntake>>) =>
      createApp({
        nc: t.nc,
        jetStream: intake,
        config: t.config,
        log: t.log,
        auth: createAuth([]),
        extensions: [feedbackRoutes(intake)],
      });
    const first = app(await createIntake(t.nc));
    const second = app(await createIntake(nc2));
    const post = async (a: Hono, body: unknown) =>
      await a.request("/feedback", {
        method: "POST",
        headers: JSON_TYPE,
        body: JSON.stringify(body),
      });
    const late = post(second, { id: "race-1", text: "the second body" });
    await deadline(reached.promise, 10_000, "the second submission's publish");
    const won = await post(first, { id: "race-1", text: "the first body" });
    assert.equal(won.status, 202, await won.clone().text());
    await won.body?.cancel();
    release.resolve();
    const p = await expectProblem(await deadline(late, 10_000, "the second answer"), 422, "/id");
    assert.equal(p.code, "idempotency_mismatch");
    const stored = await t.jsm.streams.getMessage(FEEDBACK_STREAM, {
      last_by_subj: "feedback.ingested.race-1",
    });
    assert.equal(stored!.json<{ data: { text: string } }>().data.text, "the first body");
    // The same body racing is a replay, said so.
    const reached2 = Promise.withResolvers<void>();
    const release2 = Promise.withResolvers<void>();
    nc2.request = async (subject, ...rest) => {
      if (subject.startsWith("feedback.ingested.")) {
        reached2.resolve();
        await release2.promise;
      }
      return await request(subject, ...rest);
    };
    const same = post(second, { id: "race-2", text: "one body" });
    await deadline(reached2.promise, 10_000, "the second submission's publish");
    const firstSame = await post(first, { id: "race-2", text: "one body" });
    assert.equal(firstSame.status, 202);
    await firstSame.body?.cancel();
    release2.resolve();
    const replay = await deadline(same, 10_000, "the replay's answer");
    assert.equal(replay.status, 202, await replay.clone().text());
    assert.equal(replay.headers.get("idempotent-replayed"), "true");
    await replay.body?.cancel();
  } finally {
    await nc2.close();
  }
});

Deno.test("a text with a lone UTF-16 surrogate is accepted, and its repeat is a replay, not a 500", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  // JSON.parse accepts "\ud800"; canonical JSON as RFC 8785 defines it refuses it.
  const body = '{"id":"lone-1","text":"a\\ud800b"}';
  const post = (path: string, text: string, key?: string) =>
    app.request(path, {
      method: "POST",
      headers: { ...JSON_TYPE, ...(key ? { "Idempotency-Key": key } : {}) },
      body: text,
    });
  assert.equal((await post("/feedback", body)).status, 202);
  const again = await post("/feedback", body);
  assert.equal(again.status, 202, await again.clone().text());
  assert.equal(again.headers.get("idempotent-replayed"), "true");
  const keyed = '{"id":"lone-2","text":"a\\ud800b"}';
  assert.equal((await post("/feedback", keyed, "lone-key")).status, 202);
  const keyedAgain = await post("/feedback", keyed, "lone-key");
  assert.equal(keyedAgain.status, 202, await keyedAgain.clone().text());
  assert.equal(keyedAgain.headers.get("idempotent-replayed"), "true");
  const other = await post("/feedback", '{"id":"lone-1","text":"a\\udc00b"}');
  assert.equal((await expectProblem(other, 422, "/id")).code, "idempotency_mismatch");
});

Deno.test("a content id reused with a different body is refused with 422 over HTTP and weft.content.submit, from any key; the same body is a replay", async () => {
  await using t = await startTestNats();
  const auth = createAuth([
    { sha256: hashKey("k-web"), role: "ingest", name: "web" },
    { sha256: hashKey("k-partner"), role: "ingest", name: "partner" },
  ]);
  const moderation = await createModerationApi({
    nc: t.nc,
    config: t.config,
    log: t.log,
    authEnabled: true,
  });
  const app = createApp({
    nc: t.nc,
    jetStream: await createIntake(t.nc),
    config: t.config,
    log: t.log,
    auth,
    extensions: [moderationRoutes(moderation)],
  });
  const requests = serveModerationRequests(t.nc, moderation, auth, t.log);
  try {
    const post = (key: string, body: unknown) =>
      app.request("/content", {
        method: "POST",
        headers: { ...JSON_TYPE, authorization: `Bearer ${key}` },
        body: JSON.stringify(body),
      });
    const storedText = async (id: string) => {
      const m = await t.jsm.streams.getMessage(CONTENT_STREAM, {
        last_by_subj: `content.uploaded.${id}`,
      });
      return m?.json<{ data: { text?: string } }>().data.text;
    };
    const first = { id: "ct-mine-1", text: "first text", metadata: { a: 1, b: "x" } };
    assert.equal((await post("k-web", first)).status, 202);
    // The same body, its keys in another order: the first answer again.
    const same = await post("k-web", {
      metadata: { b: "x", a: 1 },
      text: "first text",
      id: first.id,
    });
    assert.equal(same.status, 202, await same.clone().text());
    assert.equal(same.headers.get("idempotent-replayed"), "true");
    for (const key of ["k-web", "k-partner"]) {
      for (const body of [{ ...first, text: "other text" }, { ...first, metadata: { a: 2 } }]) {
        const p = await expectProblem(await post(key, body), 422, "/id");
        assert.equal(p.code, "idempotency_mismatch");
      }
    }
    const reply = (await t.nc.request(
      "weft.content.submit",
      JSON.stringify({ id: first.id, text: "over the bus" }),
      { ...PATIENT, headers: natsHeaders("Bearer k-partner") },
    )).json<{ error?: { status: number; code: string } }>();
    assert.equal(reply.error?.status, 422, JSON.stringify(reply));
    assert.equal(reply.error?.code, "idempotency_mismatch");
    assert.equal(await storedText(first.id), "first text", "the first submission stands");

    // Two different bodies racing for a new id: one is accepted, the other refused.
    const raced = await Promise.all(
      ["racer one", "racer two"].map((text) => post("k-web", { id: "ct-race-1", text })),
    );
    assert.deepEqual(raced.map((r) => r.status).sort(), [202, 422]);
    const winner = raced.find((r) => r.status === 202)!;
    await winner.body?.cancel();
    await raced.find((r) => r.status === 422)!.body?.cancel();

    // A binary upload's id named by a text submission is another body too.
    const upload = await app.request("/content?meta.camera=x100", {
      method: "POST",
      headers: { "content-type": "image/png", authorization: "Bearer k-web" },
      body: new Uint8Array([1, 2, 3]),
    });
    assert.equal(upload.status, 202);
    const { id: objectId } = await upload.json();
    await expectProblem(await post("k-web", { id: objectId, text: "not the image" }), 422, "/id");
    const info = await t.jsm.streams.info(CONTENT_STREAM, {
      subjects_filter: "content.uploaded.*",
    });
    // (state.messages counts the whole stream; state.subjects only the filter's)
    assert.deepEqual(
      Object.values(info.state.subjects ?? {}),
      [1, 1, 1],
      "one upload per item, nothing more",
    );
  } finally {
    requests.stop();
  }
});

Deno.test("weft.feedback.get with malformed JSON answers a clear error, not a 500", async () => {
  await using t = await startTestNats();
  const intake = await createIntake(t.nc);
  const sub = serveRequests(t.nc, intake, t.log);
  try {
    for (const body of ['{"id":', '{"id":5}', "{}"]) {
      const reply = (await t.nc.request("weft.feedback.get", body, PATIENT)).json<
        { error?: { status: number; field?: string } }
      >();
      assert.ok(reply.error, body);
      assert.ok(reply.error.status >= 400 && reply.error.status < 500, JSON.stringify(reply));
    }
  } finally {
    sub.stop();
  }
});

Deno.test("query parameters are validated: limit=-5, pending=yes, replay=maybe get 422 naming the parameter", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  await expectProblem(await app.request("/deadletters?limit=-5"), 422, "limit");
  await expectProblem(await app.request("/deadletters?limit=abc"), 422, "limit");
  await expectProblem(await app.request("/deadletters?pending=yes"), 422, "pending");
  await expectProblem(await app.request("/dashboard/recent?limit=-5"), 422, "limit");
  await expectProblem(await app.request("/dashboard/recent?pipeline=nope"), 422, "pipeline");
  await expectProblem(await app.request("/events?replay=maybe"), 422, "replay");
  assert.equal((await app.request("/deadletters?pending=true&limit=5")).status, 200);
});

Deno.test("a binary upload with more than 32 meta.* parameters, or an empty one, is refused before anything is accepted", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  const meta = Array.from({ length: 33 }, (_, i) => `meta.k${i}=v`).join("&");
  await expectProblem(
    await app.request(`/content?${meta}`, {
      method: "POST",
      headers: { "content-type": "image/png" },
      body: new Uint8Array([1, 2, 3]),
    }),
    422,
    "meta.*",
  );
  await expectProblem(
    await app.request("/content", {
      method: "POST",
      headers: { "content-type": "image/png" },
      body: new Uint8Array(0),
    }),
    422,
    "/",
  );
  assert.equal((await t.jsm.streams.info(CONTENT_STREAM)).state.messages, 0, "nothing accepted");
  const ok = await app.request("/content?meta.camera=x100", {
    method: "POST",
    headers: { "content-type": "image/png" },
    body: new Uint8Array([1, 2, 3]),
  });
  assert.equal(ok.status, 202, await ok.clone().text());
  await ok.body?.cancel();
});

Deno.test("listings and /dashboard/recent leave no consumer on the server", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  await app.request("/feedback", {
    method: "POST",
    headers: JSON_TYPE,
    body: JSON.stringify({ text: "something to list" }),
  });
  for (const path of ["/dashboard/recent", "/deadletters", "/dashboard/recent?limit=5"]) {
    const res = await app.request(path);
    assert.equal(res.status, 200);
    await res.body?.cancel();
  }
  for (const stream of [FEEDBACK_STREAM, "DEADLETTER"]) {
    const info = await t.jsm.streams.info(stream);
    assert.equal(info.state.consumer_count, 0, `${stream} keeps no consumer`);
  }
});

Deno.test("a non-loopback WEFT_HOST without API keys refuses to start unless told it is meant", () => {
  const env = (vars: Record<string, string>) => ({ env: (n: string) => vars[n], args: [] });
  assert.throws(
    () => loadConfig(env({ WEFT_HOST: "0.0.0.0" })),
    (err: unknown) =>
      err instanceof ConfigError && /WEFT_API_KEYS/.test(err.message) &&
      /WEFT_INSECURE_NO_AUTH=1/.test(err.message),
  );
  assert.equal(
    loadConfig(env({ WEFT_HOST: "0.0.0.0", WEFT_INSECURE_NO_AUTH: "1" })).host,
    "0.0.0.0",
  );
  const keys = JSON.stringify([{ sha256: "a".repeat(64), role: "admin", name: "ops" }]);
  assert.equal(loadConfig(env({ WEFT_HOST: "0.0.0.0", WEFT_API_KEYS: keys })).host, "0.0.0.0");
  assert.equal(loadConfig(env({ WEFT_HOST: "127.0.0.1" })).host, "127.0.0.1");
  assert.equal(loadConfig(env({ WEFT_HOST: "localhost" })).host, "localhost");
});

/** Runs `deno task start` with `args` as its user would: exit code and everything it said. */
async function startTask(...args: string[]): Promise<{ code: number; text: string }> {
  const out = await new Deno.Command("deno", {
    args: [...await taskArgs("start"), ...args],
    cwd: new URL("../", import.meta.url),
    env: { WEFT_NATS_DIR: "" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decode = (b: Uint8Array) => new TextDecoder().decode(b);
  return { code: out.code, text: decode(out.stdout) + decode(out.stderr) };
}

Deno.test("deno task start refuses a flag it does not know, naming the likely one, and a stray argument, before starting anything; --help lists the flags", async () => {
  const unknown = await startTask("--together", "--event-port", "8001");
  assert.equal(unknown.code, 2, unknown.text);
  assert.match(unknown.text, /unknown flag: --event-port \(did you mean --events-port\?\)/);
  assert.doesNotMatch(unknown.text, /pipeline loaded|starting services|weft is ready/);
  const stray = await startTask("--cluster", "3", "3");
  assert.equal(stray.code, 2, stray.text);
  assert.match(stray.text, /unexpected argument: 3;/);
  const help = await startTask("--help");
  assert.equal(help.code, 0);
  assert.match(help.text, /--events-port\s+WEFT_EVENTS_PORT/);
});

Deno.test("while NATS is down, POST answers 503 with Retry-After at once, and works again after it returns", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  const post = () =>
    app.request("/feedback", {
      method: "POST",
      headers: JSON_TYPE,
      body: JSON.stringify({ text: "are you there?" }),
    });
  const ok = await post();
  assert.equal(ok.status, 202);
  await ok.body?.cancel();
  await t.server.stop("SIGKILL");
  // The client notices the lost connection within a moment; from then on, 503 at once.
  const refused = await waitFor(
    async () => {
      const res = await post();
      if (res.status === 503) return res;
      await res.body?.cancel();
      return undefined;
    },
    10_000,
    "a 503 while NATS is down",
  );
  const started = performance.now();
  const p = await expectProblem(refused, 503);
  assert.equal(p.code, "unavailable");
  assert.equal(refused.headers.get("retry-after"), "5");
  const again = await post();
  assert.equal(again.status, 503);
  await again.body?.cancel();
  assert.ok(performance.now() - started < 4000, "well before a publish would time out");
  await t.server.restart();
  await waitFor(
    async () => {
      const res = await post();
      await res.body?.cancel();
      return res.status === 202;
    },
    20_000,
    "accepting again after NATS returns",
  );
});

Deno.test("ingest limits per API key and role: over the rate or the daily quota is 429 with Retry-After, other keys go on", async () => {
  await using t = await startTestNats();
  const limits = parseIngestLimits(JSON.stringify({
    roles: { ingest: { per_second: 0.001, burst: 3 } },
    keys: { partner: { per_day: 2 } },
  }));
  assert.ok(limits, "WEFT_RATE_LIMITS parses");
  assert.equal(parseIngestLimits('{"roles":{"ingest":{"per_second":-1}}}'), undefined);
  const auth = createAuth([
    { sha256: await hashKey("k-web"), role: "ingest", name: "web" },
    { sha256: await hashKey("k-mobile"), role: "ingest", name: "mobile" },
    { sha256: await hashKey("k-partner"), role: "ingest", name: "partner" },
  ]);
  const intake = await createIntake(t.nc, "weft-gateway", {
    limiter: createIngestLimiter(limits!),
  });
  const app = feedbackApp(t, intake, { auth });
  const post = (key: string, path = "/feedback", body: unknown = { text: "hi" }) =>
    app.request(path, {
      method: "POST",
      headers: { ...JSON_TYPE, authorization: `Bearer ${key}` },
      body: JSON.stringify(body),
    });
  for (let i = 0; i < 3; i++) assert.equal((await post("k-web")).status, 202, "within the burst");
  const limited = await post("k-web");
  const p = await expectProblem(limited, 429);
  assert.equal(p.code, "rate_limited");
  assert.ok(Number(limited.headers.get("retry-after")) >= 1);
  assert.equal((await post("k-mobile")).status, 202, "another key has its own bucket");
  await expectProblem(
    await post("k-mobile", "/feedback/batch", {
      items: [{ text: "a" }, { text: "b" }, { text: "c" }],
    }),
    429,
  );
  assert.equal((await post("k-partner")).status, 202);
  assert.equal((await post("k-partner")).status, 202);
  const quota = await post("k-partner");
  await expectProblem(quota, 429);
  assert.ok(Number(quota.headers.get("retry-after")) > 0, "until the next UTC day");
});

Deno.test("every request subject answers malformed or wrong-shaped JSON with a 4xx problem, never a 5xx or silence", async () => {
  await using t = await startTestNats();
  await using _gateway = await startService("gateway", {
    NATS_URL: t.server.url,
    PORT: String(freePort()),
  });
  // Its subscriptions reach the server just after it listens: wait for the first answer.
  await waitFor(
    async () => {
      try {
        return await t.nc.request("weft.feedback.get", "x", { timeout: 1_000 });
      } catch {
        return undefined;
      }
    },
    10_000,
    "the gateway's request subjects",
  );
  const subjects = [
    "weft.feedback.submit",
    "weft.feedback.get",
    "weft.content.submit",
    "weft.content.get",
    "weft.reviews.list",
    "weft.reviews.claim",
    "weft.reviews.decide",
    "weft.schedules.create",
    "weft.schedules.get",
    "weft.schedules.cancel",
    "weft.deadletters.list",
    "weft.deadletters.redrive",
  ];
  for (const subject of subjects) {
    for (const body of ['{"id":', "[1,2]", '"just a string"', '{"id":{"x":1}}', "null"]) {
      const msg = await t.nc.request(subject, body, { timeout: 5_000 });
      const reply = msg.json<{ error?: { status: number } }>();
      if (!reply.error) continue; // a listing may accept anything it can ignore
      assert.ok(
        reply.error.status >= 400 && reply.error.status < 500,
        `${subject} ${body}: ${JSON.stringify(reply)}`,
      );
    }
  }
});

Deno.test("GET /reviews with an unknown status is refused with 422 naming the parameter", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  const res = await app.request("/reviews?status=bogus");
  assert.ok(res.status === 422 || res.status === 400, `status ${res.status}`);
  assert.match(await res.text(), /status/);
  assert.equal((await app.request("/reviews?status=pending")).status, 200);
});

Deno.test("with API keys configured, GET /metrics needs one, and scrapes close together share one gather", async () => {
  // Found by a probe: /metrics answered anyone while every other read needed a key, and each
  // call gathered from the whole mesh again (16 loops of it took POST /feedback's p99 from
  // 9 to 36 ms).
  await using t = await startTestNats();
  const intake = await createIntake(t.nc);
  const app = createApp({
    nc: t.nc,
    jetStream: intake,
    config: t.config,
    log: t.log,
    auth: createAuth([{ sha256: hashKey("k-prom"), role: "ingest", name: "prometheus" }]),
  });
  await expectProblem(await app.request("/metrics"), 401);
  let gathers = 0;
  // One service of the mesh the gateway knows: each gather asks it once.
  const sub = t.nc.subscribe("weft.dispatch.metrics", { callback: () => void gathers++ });
  await t.nc.flush();
  const scrape = () => app.request("/metrics", { headers: { authorization: "Bearer k-prom" } });
  const scrapes = await Promise.all(Array.from({ length: 8 }, scrape));
  for (const r of scrapes) {
    assert.equal(r.status, 200);
    assert.match(await r.text(), /weft_/);
  }
  sub.unsubscribe();
  assert.equal(gathers, 1, "eight scrapes at once, one gather across the mesh");
});

Deno.test("GET /reviews takes no limit: limit=-5, limit=x or another unknown parameter is refused with 422 naming it, not ignored", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  await expectProblem(await app.request("/reviews?limit=-5"), 422, "limit");
  await expectProblem(await app.request("/reviews?limit=x"), 422, "limit");
  await expectProblem(await app.request("/reviews?status=decided&limit=10"), 422, "limit");
  await expectProblem(await app.request("/reviews?statuss=decided"), 422, "statuss");
  const ok = await app.request("/reviews?status=decided");
  assert.equal(ok.status, 200);
  assert.deepEqual(await ok.json(), { items: [] });
});

Deno.test("an event stream refused for a bad query parameter holds no SSE slot: the next good request still gets its stream", async () => {
  await using t = await startTestNats();
  const intake = await createIntake(t.nc);
  const app = createApp({
    nc: t.nc,
    jetStream: intake,
    config: { ...t.config, sseMaxClients: 1, hub: ["east"] },
    log: t.log,
    auth: createAuth([]),
    extensions: [feedbackRoutes(intake)],
  });
  for (const path of ["/events?replay=maybe", "/sites/east/events?replay=maybe"]) {
    for (let i = 0; i < 3; i++) {
      await expectProblem(await app.request(path), 422, "replay");
    }
  }
  const abort = new AbortController();
  const ok = await app.request("/events", { signal: abort.signal });
  assert.equal(ok.status, 200);
  abort.abort();
  await ok.body?.cancel();
});

Deno.test("a Last-Event-ID that is not a stream sequence (abc, -1, 1e3, 3,000 digits) is refused with 422 naming the header, not read as the start or as 1000", async () => {
  await using t = await startTestNats();
  const intake = await createIntake(t.nc);
  const app = feedbackApp(t, intake, {
    config: { ...t.config, sseMaxClients: 1 },
    auth: createAuth([]),
  });
  for (let i = 1; i <= 3; i++) {
    const res = await app.request("/feedback", {
      method: "POST",
      headers: JSON_TYPE,
      body: JSON.stringify({ id: `L${i}`, text: `item ${i}` }),
    });
    assert.equal(res.status, 202);
  }
  const bad = ["abc", "-1", "1e3", "1.5", "0x2", "+2", "2 3", "9".repeat(3_000), "9".repeat(17)];
  for (const id of bad) {
    for (const path of ["/events", "/events?replay=true", "/feedback/L1/events"]) {
      const abort = new AbortController();
      const res = await app.request(path, {
        headers: { "Last-Event-ID": id },
        signal: abort.signal,
      });
      if (res.status === 200) { // an event stream: never read whole
        abort.abort();
        await res.body?.cancel();
        assert.fail(`${path} with Last-Event-ID ${id.slice(0, 20)}: a 200 event stream`);
      }
      await expectProblem(res, 422, "Last-Event-ID");
    }
  }
  // A stream sequence resumes after it, with the one slot free.
  const res = await app.request("/events", { headers: { "Last-Event-ID": "1" } });
  assert.equal(res.status, 200);
  const frames = await readSse(res, { stopAfter: (_, all) => all.length === 2 });
  assert.deepEqual(frames.map((f) => f.id), ["2", "3"]);
});

Deno.test("GET /events takes one type: a repeated type is refused with 422 naming it, not read as the first", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  for (
    const q of ["type=processed&type=failed", "type=processed&type=processed", "type=x&type=failed"]
  ) {
    const abort = new AbortController();
    const res = await app.request(`/events?${q}`, { signal: abort.signal });
    if (res.status === 200) { // an event stream: never read whole
      abort.abort();
      await res.body?.cancel();
      assert.fail(`/events?${q}: a 200 event stream`);
    }
    await expectProblem(res, 422, "type");
  }
});

Deno.test("every event stream that takes replay takes one: a repeated replay is refused with 422 naming it, not read as the first", async () => {
  await using t = await startTestNats();
  const app = await streamsApp(t);
  for (const path of ["/events", "/pipelines/approvals/events", "/sites/east/events"]) {
    for (
      const q of ["replay=true&replay=false", "replay=false&replay=false", "replay=x&replay=true"]
    ) {
      await refusedStream(app, `${path}?${q}`, "replay");
    }
  }
});

Deno.test("an event stream refuses a query parameter it does not take with 422 naming it, instead of ignoring it: an item's stream takes none", async () => {
  await using t = await startTestNats();
  const app = await streamsApp(t);
  const post = (path: string, body: unknown) =>
    app.request(path, { method: "POST", headers: JSON_TYPE, body: JSON.stringify(body) });
  assert.equal((await post("/feedback", { id: "Q1", text: "an item" })).status, 202);
  assert.equal((await post("/content", { id: "C1", text: "a text" })).status, 202);
  const refusals: [string, string][] = [
    ["/events?foo=1", "foo"],
    ["/events?type=processed&replay=true&limit=5", "limit"],
    ["/feedback/Q1/events?replay=false", "replay"],
    ["/feedback/Q1/events?foo=1", "foo"],
    ["/content/C1/events?replay=maybe", "replay"],
    ["/content/C1/events?foo=1", "foo"],
    ["/pipelines/approvals/events?foo=1", "foo"],
    ["/pipelines/approvals/items/A1/events?replay=true", "replay"],
    ["/sites/east/events?replay=true&type=processed", "type"],
    ["/sites/east/feedback/Q1/events?foo=1", "foo"],
  ];
  for (const [path, field] of refusals) await refusedStream(app, path, field);
  // What a stream takes is still taken.
  for (const path of ["/events?type=processed&replay=true", "/content/C1/events"]) {
    const abort = new AbortController();
    const res = await app.request(path, { signal: abort.signal });
    assert.equal(res.status, 200, path);
    abort.abort();
    await res.body?.cancel();
  }
});

Deno.test("a binary upload refuses a repeated meta.<key> and a parameter other than meta.<key> with 422 naming it, before anything is accepted", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  const upload = (q: string) =>
    app.request(`/content?${q}`, {
      method: "POST",
      headers: { "content-type": "image/png" },
      body: new Uint8Array([1, 2, 3]),
    });
  const refusals: [string, string][] = [
    ["meta.camera=a&meta.camera=b", "meta.camera"],
    ["meta.camera=a&meta.lens=x&meta.camera=a", "meta.camera"],
    ["meta.camera=a&foo=1", "foo"],
    ["id=C9", "id"],
  ];
  for (const [q, field] of refusals) {
    const p = await expectProblem(await upload(q), 422, field);
    assert.match(p.detail, new RegExp(field.replace(".", "\\.")), q);
  }
  assert.equal((await t.jsm.streams.info(CONTENT_STREAM)).state.messages, 0, "nothing accepted");
  const ok = await upload("meta.camera=x100&meta.lens=35mm");
  assert.equal(ok.status, 202, await ok.clone().text());
  await ok.body?.cancel();
});

Deno.test("a request body that is not JSON answers 400 malformed_json naming the body, over NATS as over HTTP, on every request subject that reads JSON", async () => {
  await using t = await startTestNats();
  const intake = await createIntake(t.nc);
  const moderation = await createModerationApi({
    nc: t.nc,
    config: t.config,
    log: t.log,
    authEnabled: false,
  });
  const auth = createAuth([]);
  // A body that is not JSON is refused before the control is asked anything.
  const control = {} as ShadowControl;
  const served = [
    serveRequests(t.nc, intake, t.log),
    serveModerationRequests(t.nc, moderation, auth, t.log),
    servePipelineRequests(t.nc, [approvalsPipeline()], t.log),
    serveDeadLetterRequests(t.nc, t.log),
    serveShadowRequests(t.nc, control, t.log),
  ];
  try {
    const subjects = [
      "weft.feedback.submit",
      "weft.feedback.get",
      "weft.content.submit",
      "weft.content.get",
      "weft.reviews.list",
      "weft.reviews.claim",
      "weft.reviews.decide",
      "weft.approvals.submit",
      "weft.approvals.claim",
      "weft.approvals.release",
      "weft.deadletters.list",
      "weft.deadletters.redrive",
      "weft.shadow.attach",
      "weft.shadow.detach",
    ];
    const bodies = ['{"id":', '{"id": "x",}', new Uint8Array([0x7b, 0xff, 0x7d])];
    for (const subject of subjects) {
      for (const body of bodies) {
        const reply = (await t.nc.request(subject, body, PATIENT)).json<
          { error?: { status: number; code: string; field?: string } }
        >();
        const what = `${subject} ${String(body)}: ${JSON.stringify(reply)}`;
        assert.equal(reply.error?.code, "malformed_json", what);
        assert.equal(reply.error?.status, 400, what);
        assert.equal(reply.error?.field, "/", what);
      }
    }
    // Over HTTP the same body is the same problem, POST /deadletters/redrive included.
    const app = await gateway(t);
    for (const path of ["/feedback", "/content", "/deadletters/redrive"]) {
      const p = await expectProblem(
        await app.request(path, { method: "POST", headers: JSON_TYPE, body: '{"id":' }),
        400,
        "/",
      );
      assert.equal(p.code, "malformed_json", path);
    }
  } finally {
    for (const s of served) s.stop();
  }
});

Deno.test("a request body past its HTTP route's limit answers the same 413 payload_too_large over NATS, on every request subject that reads a body", async () => {
  // Found by a probe: a 70 KB `nats req weft.<name>.submit` was accepted (202) where the same
  // body over HTTP got 413 (WEFT_BODY_LIMIT); the request subjects read any body up to the
  // server's max_payload.
  await using t = await startTestNats();
  const approvals = approvalsPipeline();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const moderation = await createModerationApi({
    nc: t.nc,
    config: t.config,
    log: t.log,
    authEnabled: false,
  });
  const auth = createAuth([]);
  const kvm = new Kvm(t.nc);
  const schedules = createScheduleStore(
    await kvm.create(SCHEDULE_BUCKET).catch(() => kvm.open(SCHEDULE_BUCKET)),
  );
  const limit = t.config.bodyLimit;
  const served = [
    serveRequests(t.nc, await createIntake(t.nc), t.log, undefined, limit),
    serveModerationRequests(t.nc, moderation, auth, t.log, limit),
    servePipelineRequests(t.nc, [approvals], t.log, { bodyLimit: limit }),
    serveDeadLetterRequests(t.nc, t.log),
    serveShadowRequests(t.nc, createShadowControl(t.nc), t.log),
    serveScheduleRequests(
      t.nc,
      () => Promise.resolve(schedules),
      scheduleTargets([]),
      t.log,
      auth,
      limit,
    ),
  ];
  // A JSON object of exactly `n` bytes.
  const sized = (n: number) => `{"x":"${"a".repeat(n - 8)}"}`;
  const ask = async (subject: string, body: string) =>
    (await t.nc.request(subject, body, PATIENT)).json<{ error?: Record<string, unknown> }>().error;
  try {
    for (
      const [subject, max] of [
        ["weft.feedback.submit", limit],
        ["weft.content.submit", limit],
        ["weft.reviews.claim", 4096],
        ["weft.reviews.decide", 16 * 1024],
        ["weft.approvals.submit", limit],
        ["weft.approvals.claim", 4096],
        ["weft.approvals.release", 4096],
        ["weft.deadletters.redrive", REDRIVE_BODY_LIMIT],
        ["weft.shadow.attach", 16 * 1024],
        ["weft.schedules.create", limit],
      ] as const
    ) {
      const past = await ask(subject, sized(max + 1));
      assert.deepEqual(
        past && [past.status, past.code, past.detail],
        [413, "payload_too_large", `body is larger than ${max} bytes`],
        subject,
      );
      // At the limit the body is read (whatever else is wrong with it).
      assert.notEqual((await ask(subject, sized(max)))?.code, "payload_too_large", subject);
    }
    // The same problem as HTTP's for the same body (70 KB past the default 64 KiB).
    const app = await gateway(t, { pipelines: [approvals] });
    for (
      const [path, subject] of [
        ["/pipelines/approvals/items", "weft.approvals.submit"],
        ["/feedback", "weft.feedback.submit"],
        ["/content", "weft.content.submit"],
      ] as const
    ) {
      const body = sized(70_000);
      const http = await expectProblem(
        await app.request(path, { method: "POST", headers: JSON_TYPE, body }),
        413,
      );
      assert.deepEqual(await ask(subject, body), http, subject);
    }
    const info = await t.jsm.streams.info(pipelineSubjects(approvals.def).stream);
    assert.equal(info.state.messages, 1, "only the body at the limit was stored");
  } finally {
    for (const s of served) s.stop();
  }
});

Deno.test("every query parameter takes one value: a repeated status, stage, limit, pipeline or by is refused with 422 naming it, not read as the first", async () => {
  await using t = await startTestNats();
  const approvals = approvalsPipeline();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const app = await gateway(t, { pipelines: [approvals] });
  for (
    const [method, path, field] of [
      ["GET", "/reviews?status=pending&status=decided", "status"],
      ["GET", "/deadletters?stage=a&stage=b", "stage"],
      ["GET", "/deadletters?limit=1&limit=2", "limit"],
      ["GET", "/deadletters?pending=true&pending=true", "pending"],
      ["GET", "/pipelines/approvals/waiting?limit=1&limit=2", "limit"],
      ["GET", "/dashboard/recent?limit=1&limit=2", "limit"],
      ["GET", "/dashboard/recent?pipeline=feedback&pipeline=content", "pipeline"],
      ["DELETE", "/pipelines/approvals/claims/a1?by=erin&by=frank", "by"],
      ["POST", "/pipelines/approvals/items/a1/approved?by=erin&by=frank", "by"],
    ] as const
  ) {
    const res = await app.request(path, {
      method,
      headers: JSON_TYPE,
      ...(method === "POST" ? { body: "{}" } : {}),
    });
    const p = await expectProblem(res, 422, field);
    assert.match(p.detail, /takes one value/, `${method} ${path}`);
  }
});

Deno.test("dead letters answer like every JSON route: a redrive not declared JSON is 415, an unknown body field is 422 naming it, and a list's bad parameter is named bare", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  const redrive = (headers: Record<string, string>, body: string) =>
    app.request("/deadletters/redrive", { method: "POST", headers, body });
  for (const type of ["text/plain", "application/x-www-form-urlencoded"]) {
    await expectProblem(
      await redrive({ "content-type": type }, '{"ids":[1]}'),
      415,
      "content-type",
    );
  }
  const untyped = await app.request("/deadletters/redrive", {
    method: "POST",
    body: new TextEncoder().encode('{"ids":[1]}'),
  });
  await expectProblem(untyped, 415, "content-type");
  const extra = await expectProblem(await redrive(JSON_TYPE, '{"ids":[1],"zz":1}'), 422, "/zz");
  assert.match(extra.detail, /\/zz is not a field/);
  await expectProblem(await redrive(JSON_TYPE, '{"ids":[1],"all":true}'), 422, "/");
  await expectProblem(await app.request("/deadletters?zzz=1"), 422, "zzz");
  await expectProblem(await app.request("/deadletters?stage="), 422, "stage");
  assert.equal((await redrive(JSON_TYPE, '{"ids":[1]}')).status, 200);
});

Deno.test("a path served with other methods answers 405 with Allow, OPTIONS 204 with Allow, the same with a key or without; an unknown path stays 404", async () => {
  await using t = await startTestNats();
  const intake = await createIntake(t.nc);
  const moderation = await createModerationApi({
    nc: t.nc,
    config: t.config,
    log: t.log,
    authEnabled: true,
  });
  const app = createApp({
    nc: t.nc,
    jetStream: intake,
    config: t.config,
    log: t.log,
    auth: createAuth([{ sha256: hashKey("k-root"), role: "admin", name: "root" }]),
    extensions: [feedbackRoutes(intake), moderationRoutes(moderation)],
  });
  for (const key of [undefined, "k-root"]) {
    const headers: Record<string, string> = key ? { authorization: `Bearer ${key}` } : {};
    for (
      const [method, path, allow] of [
        ["PUT", "/feedback", "POST, OPTIONS"],
        ["DELETE", "/feedback/abc", "GET, HEAD, OPTIONS"],
        ["GET", "/content", "POST, OPTIONS"],
        ["PUT", "/schedules", "GET, POST, HEAD, OPTIONS"],
        ["POST", "/healthz", "GET, HEAD, OPTIONS"],
      ]
    ) {
      const res = await app.request(path!, { method, headers });
      await expectProblem(res, 405);
      assert.equal(res.headers.get("allow"), allow, `${method} ${path}`);
    }
    for (
      const [path, allow] of [["/schedules", "GET, POST, HEAD, OPTIONS"], [
        "/feedback",
        "POST, OPTIONS",
      ]]
    ) {
      const res = await app.request(path!, { method: "OPTIONS", headers });
      assert.equal(res.status, 204, `OPTIONS ${path} with key ${key}`);
      assert.equal(res.headers.get("allow"), allow);
    }
    await expectProblem(await app.request("/nope", { method: "OPTIONS", headers }), 404);
    await expectProblem(await app.request("/nope", { method: "PUT", headers }), 404);
  }
});

Deno.test("small answers fixed: /readyz's 503 has Retry-After, a stream cap's 503 says which cap, a reused id's title fits an id, POST /schedules has Location, a decision's body id must be the path's, a batch refuses an unknown field", async () => {
  await using t = await startTestNats();
  const intake = await createIntake(t.nc);
  const notReady = createApp({
    nc: t.nc,
    jetStream: intake,
    streams: ["NO_SUCH_STREAM"],
    config: t.config,
    log: t.log,
  });
  const ready = await notReady.request("/readyz");
  await expectProblem(ready, 503);
  assert.equal(ready.headers.get("retry-after"), "5");

  const app = await gateway(t, { pipelines: [approvalsPipeline()] });
  const capped = feedbackApp(t, intake, { config: { ...t.config, sseMaxPerKey: 1 } });
  const key = { authorization: "Bearer k1" };
  const abort = new AbortController();
  const first = await capped.request("/events", { headers: key, signal: abort.signal });
  assert.equal(first.status, 200);
  try {
    const second = await capped.request("/events", { headers: key });
    const p = await expectProblem(second, 503);
    assert.match(p.detail, /this API key's 1 event streams are open \(WEFT_SSE_MAX_PER_KEY\)/);
    assert.equal(second.headers.get("retry-after"), "5");
  } finally {
    abort.abort();
    await first.body?.cancel();
  }

  const post = (path: string, body: unknown) =>
    app.request(path, { method: "POST", headers: JSON_TYPE, body: JSON.stringify(body) });
  assert.equal((await post("/feedback", { id: "reused-1", text: "one" })).status, 202);
  const reused = await expectProblem(await post("/feedback", { id: "reused-1", text: "two" }), 422);
  assert.equal(reused.code, "idempotency_mismatch");
  assert.match(reused.title, /\bid\b/, "the title fits a reused id");

  const scheduled = await post("/schedules", {
    id: "located",
    subject: "feedback.submit",
    payload: { text: "hi" },
    at: "2099-01-01T00:00:00Z",
  });
  assert.equal(scheduled.status, 201, await scheduled.clone().text());
  assert.equal(scheduled.headers.get("location"), "/schedules/located");

  await expectProblem(
    await post("/reviews/abc/decision", { id: "other", decision: "approve", reason: "ok" }),
    422,
    "/id",
  );
  await expectProblem(
    await post("/pipelines/approvals/items/batch", { items: [{}], zz: 1 }),
    422,
    "/zz",
  );
});

/**
 * Stops (SIGSTOP) the process `pid` and waits until it is: a stop takes effect when the kernel
 * next interrupts its threads, so a publish sent at once might still be answered (seen once
 * on a loaded machine). `ps` tells, as reading /proc needs --allow-all in Deno. The caller
 * sends SIGCONT in a `finally`, whatever happens here.
 */
async function stopServer(pid: number): Promise<void> {
  Deno.kill(pid, "SIGSTOP");
  await waitFor(
    async () => {
      const out = await new Deno.Command("ps", { args: ["-o", "stat=", "-p", String(pid)] })
        .output();
      return new TextDecoder().decode(out.stdout).trim().startsWith("T");
    },
    10_000,
    "nats-server stopped",
  );
}

Deno.test("a 503 whose publish went unanswered names the item's id; a retry with it stores the item once", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  const post = (path: string, body: Record<string, unknown>) =>
    app.request(path, { method: "POST", headers: JSON_TYPE, body: JSON.stringify(body) });
  const feedback = { text: "is anyone reading this?" };
  const content = { text: "a post to moderate" };
  // The server stops answering with the gateway's publishes on their way; they stay queued in
  // the client after its timeout and land when it resumes.
  let answers: Response[];
  try {
    await stopServer(t.server.pid);
    answers = await deadline(
      Promise.all([post("/feedback", feedback), post("/content", content)]),
      30_000,
      "the answers while nats-server is stopped",
    );
  } finally {
    Deno.kill(t.server.pid, "SIGCONT");
  }
  const ids: string[] = [];
  for (const res of answers) {
    const p = await expectProblem(res, 503);
    assert.equal(p.code, "unavailable");
    assert.equal(res.headers.get("retry-after"), "5");
    assert.equal(typeof p.id, "string", JSON.stringify(p));
    assert.match(p.detail, new RegExp(`may be stored: retry shortly with "id": "${p.id}"`));
    ids.push(p.id);
  }
  const [feedbackId, contentId] = ids as [string, string];
  const retried = await post("/feedback", { ...feedback, id: feedbackId });
  assert.equal(retried.status, 202, await retried.clone().text());
  assert.equal((await retried.json()).id, feedbackId);
  const again = await post("/content", { ...content, id: contentId });
  assert.equal(again.status, 202, await again.clone().text());
  assert.equal((await again.json()).id, contentId);
  // Exactly one item each: the late publish and the retry stored one upload between them.
  const count = async (stream: string, subject: string) =>
    Object.values(
      (await t.jsm.streams.info(stream, { subjects_filter: subject })).state.subjects ?? {},
    ).reduce((a, b) => a + b, 0);
  assert.equal(await count(FEEDBACK_STREAM, "feedback.ingested.>"), 1);
  assert.equal(await count(FEEDBACK_STREAM, `feedback.ingested.${feedbackId}`), 1);
  assert.equal(await count(CONTENT_STREAM, "content.uploaded.>"), 1);
  assert.equal(await count(CONTENT_STREAM, `content.uploaded.${contentId}`), 1);
});

Deno.test("a definition's 503 whose publish went unanswered names the item's id and where to see whether it was stored", async () => {
  await using t = await startTestNats();
  const approvals = approvalsPipeline();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const app = await gateway(t, { pipelines: [approvals] });
  const post = (body: unknown, key?: string) =>
    app.request("/pipelines/approvals/items", {
      method: "POST",
      headers: { ...JSON_TYPE, ...(key ? { "Idempotency-Key": key } : {}) },
      body: JSON.stringify(body),
    });
  let answers: Response[];
  try {
    await stopServer(t.server.pid);
    answers = await deadline(
      Promise.all([post({ n: 1 }), post({ n: 2 }, "order-2")]),
      30_000,
      "the answers while nats-server is stopped",
    );
  } finally {
    Deno.kill(t.server.pid, "SIGCONT");
  }
  const [bare, keyed] = await Promise.all(answers.map((r) => expectProblem(r, 503)));
  // Published, unanswered: its id, and how to tell whether it landed.
  assert.equal(typeof bare!.id, "string", JSON.stringify(bare));
  assert.match(bare!.detail, new RegExp(`GET /pipelines/approvals/items/${bare!.id} tells`));
  // A keyed one looks its key up first, which NATS did not answer: nothing was published.
  assert.equal(keyed!.id, undefined, JSON.stringify(keyed));
  const stream = pipelineSubjects(approvals.def).stream;
  const entries = async (id: string) =>
    Object.values(
      (await t.jsm.streams.info(stream, { subjects_filter: `approvals.submitted.${id}` })).state
        .subjects ?? {},
    ).reduce((a, b) => a + b, 0);
  await waitFor(async () => (await entries(bare!.id)) === 1, 10_000, "the late publish landed");
  const seen = await app.request(`/pipelines/approvals/items/${bare!.id}`);
  assert.equal(seen.status, 200, await seen.clone().text());
  await seen.body?.cancel();
});

Deno.test("a keyed batch answered 503 that stored nothing is stored by its retry, which is not called a replay", async () => {
  await using t = await startTestNats();
  const app = await gateway(t);
  const batch = { items: [{ text: "first of two" }, { text: "second of two" }] };
  const post = () =>
    app.request("/feedback/batch", {
      method: "POST",
      headers: { ...JSON_TYPE, "Idempotency-Key": "nightly-import" },
      body: JSON.stringify(batch),
    });
  let first: Response;
  try {
    await stopServer(t.server.pid);
    first = await deadline(
      Promise.resolve(post()),
      30_000,
      "the batch's answer while nats-server is stopped",
    );
  } finally {
    Deno.kill(t.server.pid, "SIGCONT");
  }
  await expectProblem(first, 503);
  const stored = async () =>
    Object.values(
      (await t.jsm.streams.info(FEEDBACK_STREAM, { subjects_filter: "feedback.ingested.>" })).state
        .subjects ?? {},
    ).reduce((a, b) => a + b, 0);
  const retried = await post();
  assert.equal(retried.status, 202, await retried.clone().text());
  assert.equal(await stored(), 2, "both stored once");
  // Stored by this request, whatever the first one's record said: not a replay.
  assert.equal(retried.headers.get("idempotent-replayed"), null);
  await retried.body?.cancel();
  const again = await post();
  assert.equal(again.headers.get("idempotent-replayed"), "true", "a repeat after it is one");
  await again.body?.cancel();
  assert.equal(await stored(), 2);
});

Deno.test("a definition's waiting list refuses a query parameter it does not take, as every listing does", async () => {
  await using t = await startTestNats();
  const approvals = approvalsPipeline();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const app = await gateway(t, { pipelines: [approvals] });
  const p = await expectProblem(
    await app.request("/pipelines/approvals/waiting?limt=5"),
    422,
    "limt",
  );
  assert.match(p.detail, /unknown query parameter limt; this route takes limit/);
  assert.equal((await app.request("/pipelines/approvals/waiting?limit=5")).status, 200);
});

Deno.test("GET /dashboard/stream refuses a query parameter with 422 naming it, as /events does", async () => {
  // Found by an operator's probe: ?x=1 and ?replay=true were answered 200 and ignored.
  await using t = await startTestNats();
  const app = await gateway(t);
  for (const [query, field] of [["x=1", "x"], ["replay=true", "replay"]]) {
    const res = await app.request(`/dashboard/stream?${query}`);
    if (res.status !== 422) {
      await res.body?.cancel(); // an open stream: not read to its end
      assert.fail(`?${query} answered ${res.status}, not 422`);
    }
    const p = await expectProblem(res, 422, field);
    assert.match(p.detail, new RegExp(`unknown query parameter ${field}; this route takes none`));
  }
  // (Without a query it streams: tests/observability_test.ts reads it.)
});
