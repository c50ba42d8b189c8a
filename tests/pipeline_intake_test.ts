/**
 * A pipeline loaded from a definition is guarded at intake exactly as the built-in feedback
 * pipeline is: API keys with the same roles over HTTP and over `nats req weft.<name>.*`,
 * per-key rate limits (429 with Retry-After), and, at its stream's limit, 507 before anything
 * accepted could be discarded.
 */
import assert from "node:assert/strict";
import { headers } from "@nats-io/nats-core";
import { jetstream } from "@nats-io/jetstream";
import { createAuth, hashKey } from "../src/gateway/auth.ts";
import { createApp } from "../src/gateway/app.ts";
import { createIntake } from "../pipelines/feedback/intake.ts";
import { feedbackRoutes } from "../pipelines/feedback/routes.ts";
import { createIngestLimiter } from "../src/gateway/ingest_limits.ts";
import { servePipelineRequests, trackItems } from "../src/gateway/pipelines.ts";
import { definePipeline } from "../src/pipeline/definition.ts";
import { compileFlow } from "../src/pipeline/flow.ts";
import { listDeadLetters } from "../src/redrive.ts";
import { createCapacityGuard } from "../src/capacity.ts";
import type { Hono } from "hono";
import {
  intakeStage,
  type LoadedPipeline,
  loadPipelines,
  pipelineServices,
  pipelineStateSpec,
  pipelineTopology,
  workStage,
} from "../src/pipeline/runtime.ts";
import { pipelineSubjects } from "../src/pipeline/derive.ts";
import { WeftMetrics } from "../src/observability/metrics.ts";
import { runStage } from "../src/runner.ts";
import { runStateWriter } from "../src/state_writer.ts";
import { ensureTopology } from "../src/topology.ts";
import { connectClient, startTestNats, type TestNats } from "./helpers/nats.ts";
import { definitionsApp } from "./helpers/pipeline.ts";
import { readSse } from "./helpers/sse.ts";
import { deadline, waitFor } from "./helpers/wait.ts";
import { ONE_PROCESS, startMesh } from "./helpers/mesh.ts";

const root = new URL("../", import.meta.url).pathname;
const pipelines = await loadPipelines(["pipelines/examples/tickets.ts"], root);
const topology = (t: TestNats) => pipelineTopology(pipelines, t.config.retentionMs);

const KEYS = { ingest: "k-ingest-1", reviewer: "k-review-1" };
const auth = createAuth([
  { sha256: await hashKey(KEYS.ingest), role: "ingest", name: "web" },
  { sha256: await hashKey(KEYS.reviewer), role: "reviewer", name: "alice" },
]);
const TICKET = JSON.stringify({ customer: "c-1", text: "the export to PDF fails" });

/** `nats req SUBJECT BODY` with an optional key; the reply as JSON. */
async function ask(t: TestNats, subject: string, body: string, key?: string) {
  const h = headers();
  if (key) h.set("Authorization", `Bearer ${key}`);
  const m = await t.nc.request(subject, body, { headers: h, timeout: 5_000 });
  return m.json<
    { id?: string; status?: string; error?: { status: number; code: string; field?: string } }
  >();
}

Deno.test("a definition's request subjects ask for an API key with the same roles as HTTP", async () => {
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, topology(t));
  const requests = servePipelineRequests(t.nc, pipelines, t.log, { auth });
  try {
    assert.equal((await ask(t, "weft.tickets.submit", TICKET)).error?.status, 401);
    assert.equal((await ask(t, "weft.tickets.submit", TICKET, KEYS.reviewer)).error?.status, 403);
    const accepted = await ask(t, "weft.tickets.submit", TICKET, KEYS.ingest);
    assert.equal(accepted.status, "accepted");
    assert.equal((await ask(t, "weft.tickets.get", accepted.id!)).error?.status, 401);
    assert.notEqual(
      (await ask(t, "weft.tickets.get", accepted.id!, KEYS.reviewer)).error?.status,
      401,
    );
  } finally {
    requests.stop();
  }
});

Deno.test("an empty Idempotency-Key on weft.<name>.submit is refused with 422, as over HTTP, not taken as none", async () => {
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, topology(t));
  const requests = servePipelineRequests(t.nc, pipelines, t.log);
  try {
    const h = headers();
    h.set("Idempotency-Key", "");
    const m = await t.nc.request("weft.tickets.submit", TICKET, { headers: h, timeout: 5_000 });
    const e = m.json<{ error?: { status: number; field: string } }>().error;
    assert.deepEqual({ status: e?.status, field: e?.field }, {
      status: 422,
      field: "Idempotency-Key",
    });
  } finally {
    requests.stop();
  }
});

Deno.test("a definition's intake keeps each key to its rate, over HTTP and NATS alike", async () => {
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, topology(t));
  const limiter = createIngestLimiter({ keys: { web: { per_second: 0.001, burst: 2 } } });
  const guards = { limiter };
  const intake = await createIntake(t.nc);
  const app = createApp({
    nc: t.nc,
    jetStream: intake,
    config: t.config,
    log: t.log,
    auth,
    pipelines,
    guards,
  });
  const requests = servePipelineRequests(t.nc, pipelines, t.log, { auth, guards });
  try {
    const post = () =>
      app.request("/pipelines/tickets/items", {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${KEYS.ingest}` },
        body: TICKET,
      });
    assert.equal((await post()).status, 202);
    assert.equal((await ask(t, "weft.tickets.submit", TICKET, KEYS.ingest)).status, "accepted");
    const over = await post();
    assert.equal(over.status, 429, await over.clone().text());
    assert.ok(Number(over.headers.get("retry-after")) > 0, "with Retry-After");
    assert.equal((await over.json()).code, "rate_limited");
    assert.equal((await ask(t, "weft.tickets.submit", TICKET, KEYS.ingest)).error?.status, 429);
    const batch = await app.request("/pipelines/tickets/items/batch", {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${KEYS.ingest}` },
      body: JSON.stringify({ items: [JSON.parse(TICKET)] }),
    });
    assert.equal(batch.status, 429);
    await batch.body?.cancel();
    // What was refused was not accepted: the stream holds exactly the two accepted items.
    const info = await t.jsm.streams.info("TICKETS");
    assert.equal(info.state.messages, 2);
  } finally {
    requests.stop();
  }
});

Deno.test("at its stream's limit, a definition's intake answers 507 and the stream discards nothing accepted", async () => {
  await using t = await startTestNats({ streamMaxBytes: 48 * 1024 });
  await ensureTopology(t.nc, t.jsm, t.config, topology(t));
  const stream = "TICKETS";
  const capacity = createCapacityGuard(t.jsm, { highWater: 0.9, refreshMs: 0, log: t.log });
  const intake = await createIntake(t.nc);
  const app = createApp({
    nc: t.nc,
    jetStream: intake,
    config: t.config,
    log: t.log,
    pipelines,
    guards: { capacity },
  });
  const body = JSON.stringify({ customer: "c-1", text: "x".repeat(1_000) });
  const post = () =>
    app.request("/pipelines/tickets/items", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body,
    });
  let accepted = 0;
  let refusal: Response | undefined;
  for (let i = 0; i < 200 && !refusal; i++) {
    const res = await post();
    if (res.status === 202) {
      accepted++;
      await res.body?.cancel();
    } else refusal = res;
  }
  assert.ok(refusal, "intake refused at the high-water mark");
  assert.equal(refusal.status, 507, await refusal.clone().text());
  assert.equal((await refusal.json()).code, "insufficient_storage");
  assert.ok(Number(refusal.headers.get("retry-after")) > 0);
  const info = await t.jsm.streams.info(stream);
  assert.equal(info.state.first_seq, 1, "nothing accepted was discarded");
  assert.equal(info.state.messages, accepted);

  // Behind the high-water mark, the stream's own refusal (discard-new) is a 507 as well.
  const js = jetstream(t.nc);
  while (
    await js.publish(`tickets.filler.x${Date.now()}`, "y".repeat(2_000)).then(
      () => true,
      () => false,
    )
  );
  const unguarded = createApp({
    nc: t.nc,
    jetStream: intake,
    config: t.config,
    log: t.log,
    pipelines,
  });
  const res = await unguarded.request("/pipelines/tickets/items", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body,
  });
  assert.equal(res.status, 507, await res.clone().text());
  await res.body?.cancel();
  assert.equal((await t.jsm.streams.info(stream)).state.first_seq, 1);
});

Deno.test("a reused Idempotency-Key is the same item with the same input, and refused with another", async () => {
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, topology(t));
  const intake = await createIntake(t.nc);
  const app = createApp({ nc: t.nc, jetStream: intake, config: t.config, log: t.log, pipelines });
  const requests = servePipelineRequests(t.nc, pipelines, t.log);
  try {
    const post = (path: string, body: unknown, key: string) =>
      app.request(`/pipelines/tickets/items${path}`, {
        method: "POST",
        headers: { "content-type": "application/json", "idempotency-key": key },
        body: JSON.stringify(body),
      });
    const first = await post("", { customer: "c-1", text: "refund please" }, "k1");
    assert.equal(first.status, 202);
    assert.equal(first.headers.get("idempotent-replayed"), null);
    const { id } = await first.json();
    // The same input with its keys in another order: the same item, said so.
    const again = await post("", { text: "refund please", customer: "c-1" }, "k1");
    assert.equal(again.status, 202);
    assert.equal(again.headers.get("idempotent-replayed"), "true");
    assert.equal((await again.json()).id, id);
    // Another input under the key: refused, naming the header; the first input stays.
    const other = await post("", { customer: "c-1", text: "cancel my order" }, "k1");
    assert.equal(other.status, 422);
    assert.equal(other.headers.get("content-type"), "application/problem+json");
    const problem = await other.json();
    assert.equal(problem.code, "idempotency_mismatch");
    assert.equal(problem.field, "Idempotency-Key");
    // Over NATS, the same rule.
    const h = headers();
    h.set("Idempotency-Key", "k1");
    const nats = await t.nc.request("weft.tickets.submit", JSON.stringify({ customer: "x" }), {
      headers: h,
      timeout: 5_000,
    });
    assert.equal(nats.json<{ error: { code: string } }>().error.code, "invalid_field");
    const natsOther = await t.nc.request(
      "weft.tickets.submit",
      JSON.stringify({ customer: "c-9", text: "other" }),
      { headers: h, timeout: 5_000 },
    );
    assert.equal(natsOther.json<{ error: { code: string } }>().error.code, "idempotency_mismatch");
    // A batch: a repeat replays, one item changed refuses the whole batch, storing nothing.
    const items = [{ customer: "a", text: "1" }, { customer: "b", text: "2" }];
    assert.equal((await post("/batch", { items }, "b1")).status, 202);
    const replay = await post("/batch", { items }, "b1");
    assert.equal(replay.headers.get("idempotent-replayed"), "true");
    await replay.body?.cancel();
    const changed = await post("/batch", { items: [items[0], { customer: "b", text: "3" }] }, "b1");
    assert.equal(changed.status, 422);
    await changed.body?.cancel();
    const stored = await t.jsm.streams.getMessage("TICKETS", {
      last_by_subj: `tickets.submitted.${id}`,
    });
    assert.equal(
      stored!.json<{ data: { input: { text: string } } }>().data.input.text,
      "refund please",
    );
    assert.equal((await t.jsm.streams.info("TICKETS")).state.messages, 3, "3 items, no more");
  } finally {
    requests.stop();
  }
});

Deno.test("two submissions racing under one Idempotency-Key with different inputs: one is accepted, the other refused with 422", async () => {
  // Found on nats-server 2.9: the second entry event, under the same event id within the
  // duplicate window, was answered "duplicate" rather than refused, taken for stored, and the
  // second request answered 202 with its input never stored.
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, topology(t));
  const nc2 = await connectClient(t.server.url, "weft-test-racer");
  try {
    // The second request's gateway: its publish waits, past its look-up, until the first
    // request's item is stored (a fixed interleaving of the race, not a timing).
    const reached = Promise.withResolvers<void>();
    const release = Promise.withResolvers<void>();
    const request = nc2.request.bind(nc2);
    nc2.request = async (subject, ...rest) => {
      if (subject.startsWith("tickets.submitted.")) {
        reached.resolve();
        await release.promise;
      }
      return await request(subject, ...rest);
    };
    const first = await definitionsApp(t, pipelines);
    const second = createApp({
      nc: nc2,
      jetStream: await createIntake(nc2),
      config: t.config,
      log: t.log,
      pipelines,
    });
    const post = async (app: typeof first, body: unknown) =>
      await app.request("/pipelines/tickets/items", {
        method: "POST",
        headers: { "content-type": "application/json", "idempotency-key": "race" },
        body: JSON.stringify(body),
      });
    const late = post(second, { customer: "c-2", text: "the second input" });
    await deadline(reached.promise, 10_000, "the second request's publish");
    const won = await post(first, { customer: "c-1", text: "the first input" });
    assert.equal(won.status, 202, await won.clone().text());
    const { id } = await won.json();
    release.resolve();
    const lost = await deadline(late, 10_000, "the second answer");
    assert.equal(lost.status, 422, await lost.clone().text());
    assert.equal((await lost.json()).code, "idempotency_mismatch");
    const stored = await t.jsm.streams.getMessage("TICKETS", {
      last_by_subj: `tickets.submitted.${id}`,
    });
    assert.equal(
      stored!.json<{ data: { input: { text: string } } }>().data.input.text,
      "the first input",
    );
  } finally {
    await nc2.close();
  }
});

Deno.test("an input nesting deeper than an event may is refused at intake with 422, not accepted and failed", async () => {
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, topology(t));
  const app = await definitionsApp(t, pipelines);
  // The entry event holds the input two levels down, under data.input: 62 levels fit in
  // the 64 every consumer takes, 63 do not.
  const nested = (levels: number) =>
    `{"customer":"c-1","text":"deep","x":${"[".repeat(levels - 1)}${"]".repeat(levels - 1)}}`;
  const post = (path: string, body: string) =>
    app.request(`/pipelines/tickets/items${path}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body,
    });
  assert.equal((await post("", nested(62))).status, 202);
  const deep = await post("", nested(63));
  assert.equal(deep.status, 422);
  assert.equal(deep.headers.get("content-type"), "application/problem+json");
  assert.equal((await deep.json()).field, "/");
  const batch = await post("/batch", `{"items":[${nested(2)},${nested(63)}]}`);
  assert.equal(batch.status, 422);
  assert.equal((await batch.json()).field, "/items/1");
  const requests = servePipelineRequests(t.nc, pipelines, t.log);
  try {
    assert.equal((await ask(t, "weft.tickets.submit", nested(63))).error?.status, 422);
  } finally {
    requests.stop();
  }
});

/**
 * Publishes `body` on `tickets.submit` with the intake running, and returns the dead letter it
 * was given on first delivery, once no entry event holds it.
 */
async function busRefusal(t: TestNats, body: string) {
  const runner = await runStage({
    nc: t.nc,
    config: { ...t.config, maxAttempts: 5, retryBaseMs: 10 },
    log: t.log,
    stage: intakeStage(pipelines[0]!),
  });
  try {
    await jetstream(t.nc).publish("tickets.submit", body);
    const letter = await waitFor(
      async () => {
        const info = await t.jsm.streams.info("DEADLETTER", { subjects_filter: "deadletter.>" });
        if (info.state.messages === 0) return false;
        const m = await t.jsm.streams.getMessage("DEADLETTER", { seq: info.state.first_seq });
        return m?.json<{ code: string; reason: string; attempts: number }>() ?? false;
      },
      15_000,
      "the submission's dead letter",
    );
    assert.equal(letter.attempts, 1, "not retried");
    const info = await t.jsm.streams.info("TICKETS", { subjects_filter: "tickets.submitted.>" });
    assert.deepEqual(Object.keys(info.state.subjects ?? {}), [], "no entry event was stored");
    return letter;
  } finally {
    await runner.stop();
  }
}

Deno.test("a number a JavaScript number cannot hold is refused naming its field, never stored as another value", async () => {
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, topology(t));
  const app = await definitionsApp(t, pipelines);
  const post = (path: string, body: string) =>
    app.request(`/pipelines/tickets/items${path}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body,
    });
  // 1e400 would be Infinity (stored as null); the integer would be rounded to 1.2345678901234568e+22.
  for (const n of ["1e400", "12345678901234567890123"]) {
    const res = await post("", `{"customer":"c-1","text":"n","n":${n}}`);
    assert.equal(res.status, 422, n);
    assert.equal(res.headers.get("content-type"), "application/problem+json");
    const problem = await res.json();
    assert.equal(problem.field, "/n");
    assert.match(problem.detail, new RegExp(`the number ${n} cannot be kept as written`));
  }
  const batch = await post(
    "/batch",
    `{"items":[{"customer":"c","text":"a"},{"customer":"c","text":"b","n":-1e999}]}`,
  );
  assert.equal(batch.status, 422);
  assert.equal((await batch.json()).field, "/items/1/n");
  const requests = servePipelineRequests(t.nc, pipelines, t.log);
  try {
    const reply = await ask(t, "weft.tickets.submit", '{"customer":"c-1","text":"n","n":1e400}');
    assert.equal(reply.error?.status, 422);
  } finally {
    requests.stop();
  }
  // From the bus: dead-lettered at once naming the field, nothing stored as null.
  const letter = await busRefusal(t, '{"customer":"c-1","text":"n","n":1e400}');
  assert.equal(letter.code, "invalid_field");
  assert.match(letter.reason, /\/n: the number 1e400 cannot be kept as written/);
});

Deno.test("a member written twice in one object is refused naming it, over HTTP, NATS and the bus, never stored with one value dropped", async () => {
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, topology(t));
  const app = await definitionsApp(t, pipelines);
  const intake = await createIntake(t.nc);
  const feedback = createApp({
    nc: t.nc,
    jetStream: intake,
    config: t.config,
    log: t.log,
    extensions: [feedbackRoutes(intake)],
  });
  const post = (target: Hono, path: string, body: string) =>
    target.request(path, { method: "POST", headers: { "content-type": "application/json" }, body });
  // JSON.parse would keep "y" and drop "x" without a word; a reader that keeps the first
  // would see "x" in the same bytes.
  for (
    const [target, path] of [[app, "/pipelines/tickets/items"], [feedback, "/feedback"]] as const
  ) {
    const res = await post(target, path, '{"customer":"c-1","text":"x","text":"y"}');
    assert.equal(res.status, 422, path);
    assert.equal(res.headers.get("content-type"), "application/problem+json");
    const problem = await res.json();
    assert.equal(problem.field, "/text");
    assert.match(problem.detail, /\/text: this member is written twice in one object/);
  }
  const batch = await post(
    app,
    "/pipelines/tickets/items/batch",
    '{"items":[{"customer":"c","text":"a"},{"customer":"c","customer":"d","text":"b"}]}',
  );
  assert.equal(batch.status, 422);
  assert.equal((await batch.json()).field, "/items/1/customer");
  const requests = servePipelineRequests(t.nc, pipelines, t.log);
  try {
    const reply = await ask(t, "weft.tickets.submit", '{"customer":"c-1","text":"x","text":"y"}');
    assert.equal(reply.error?.status, 422);
    assert.equal(reply.error?.field, "/text");
  } finally {
    requests.stop();
  }
  // From the bus: dead-lettered at once naming the member, nothing entered.
  const letter = await busRefusal(t, '{"customer":"c-1","text":"x","text":"y"}');
  assert.equal(letter.code, "invalid_field");
  assert.match(letter.reason, /\/text: this member is written twice/);
});

Deno.test("an item that failed at intake streams its events, to its failure, as GET shows it failed", async () => {
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, topology(t));
  const p = pipelines[0]!;
  const intake = await createIntake(t.nc);
  const app = createApp({ nc: t.nc, jetStream: intake, config: t.config, log: t.log, pipelines });
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const runners = [
    await runStage({ ...deps, stage: intakeStage(p) }),
    await runStateWriter({ ...deps, spec: pipelineStateSpec(p) }),
  ];
  try {
    // A bus submission its schema refuses: the item fails before its entry event exists.
    const ack = await jetstream(t.nc).publish("tickets.submit", JSON.stringify({ customer: "x" }));
    const id = `tickets-${ack.seq}`;
    await waitFor(
      async () => {
        const res = await app.request(`/pipelines/tickets/items/${id}`);
        return res.status === 200 && (await res.json()).status === "failed";
      },
      10_000,
      `${id} failed`,
    );
    const res = await app.request(`/pipelines/tickets/items/${id}/events`);
    assert.equal(res.status, 200, await res.clone().text());
    // The stream closes at the item's failure.
    const frames = await readSse(res);
    assert.deepEqual(frames.map((f) => f.event), ["tickets.failed"]);
    assert.equal(JSON.parse(frames[0]!.data).item_id, id);
    // An item of no event at all is still unknown.
    const none = await app.request("/pipelines/tickets/items/tickets-999999/events");
    assert.equal(none.status, 404);
    await none.body?.cancel();
  } finally {
    for (const r of runners) await r.stop();
  }
});

Deno.test("an input whose entry event would pass the server's message limit is refused at once: 413 over HTTP, one dead letter from the bus", async () => {
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, topology(t));
  const app = await definitionsApp(t, pipelines, { bodyLimit: 4 * 1024 * 1024 });
  // 600 KB of text: the entry event carries it twice (the input, and the value handed on),
  // more than the server's 1 MB.
  const input = JSON.stringify({ customer: "c-1", text: "x".repeat(600_000) });
  const res = await app.request("/pipelines/tickets/items", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: input,
  });
  assert.equal(res.status, 413, await res.clone().text());
  assert.equal(res.headers.get("content-type"), "application/problem+json");
  await res.body?.cancel();
  // No retry can make it fit: dead-lettered on first delivery.
  assert.equal((await busRefusal(t, input)).code, "payload_too_large");
});

Deno.test("an Idempotency-Key is its caller's: another API key's holder using the same key gets its own item, over HTTP and NATS", async () => {
  // Found by a probe: the ingest key posted {"text":"private A"} with Idempotency-Key shared-1,
  // and the admin key, posting the same with that key, was answered the first caller's item;
  // with another body it got 422. Keys are per caller at any API that takes them.
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, topology(t));
  const keys = createAuth([
    { sha256: await hashKey("k-a"), role: "ingest", name: "team-a" },
    { sha256: await hashKey("k-b"), role: "ingest", name: "team-b" },
  ]);
  const app = createApp({
    nc: t.nc,
    jetStream: await createIntake(t.nc),
    config: t.config,
    log: t.log,
    auth: keys,
    pipelines,
    extensions: [feedbackRoutes(await createIntake(t.nc))],
  });
  const post = async (path: string, key: string, body: unknown) => {
    const res = await app.request(path, {
      method: "POST",
      headers: {
        "content-type": "application/json",
        authorization: `Bearer ${key}`,
        "Idempotency-Key": "shared-1",
      },
      body: JSON.stringify(body),
    });
    return { status: res.status, body: await res.json() };
  };
  for (
    const [path, a, b] of [
      ["/pipelines/tickets/items", { customer: "a", text: "mine" }, {
        customer: "b",
        text: "theirs",
      }],
      ["/feedback", { text: "private A" }, { text: "private B" }],
    ] as const
  ) {
    const first = await post(path, "k-a", a);
    assert.equal(first.status, 202, JSON.stringify(first.body));
    const other = await post(path, "k-b", b);
    assert.equal(other.status, 202, `${path}: ${JSON.stringify(other.body)}`);
    assert.notEqual(other.body.id, first.body.id, path);
    const again = await post(path, "k-a", a);
    assert.equal(again.body.id, first.body.id, `${path}: the same caller's repeat`);
    assert.equal((await post(path, "k-a", b)).status, 422, `${path}: its key, another body`);
  }
  // Over NATS the key is the caller's too: team-b's request is its own item.
  const requests = servePipelineRequests(t.nc, pipelines, t.log, { auth: keys });
  try {
    const h = headers();
    h.set("Authorization", "Bearer k-b");
    h.set("Idempotency-Key", "shared-2");
    const viaNats =
      (await t.nc.request("weft.tickets.submit", TICKET, { headers: h, timeout: 5_000 })).json<
        { id: string }
      >();
    const viaHttp = await app.request("/pipelines/tickets/items", {
      method: "POST",
      headers: {
        "content-type": "application/json",
        authorization: "Bearer k-b",
        "Idempotency-Key": "shared-2",
      },
      body: TICKET,
    });
    assert.equal((await viaHttp.json()).id, viaNats.id, "one caller, one key: one item");
  } finally {
    requests.stop();
  }
});

Deno.test("GET /pipelines/<name>/events refuses a replay other than true or false with 422 naming it, as /events does, and holds no SSE slot for it", async () => {
  await using t = await startTestNats();
  await ensureTopology(t.nc, t.jsm, t.config, topology(t));
  const app = await definitionsApp(t, pipelines, { sseMaxClients: 1 });
  for (const bad of ["x", "1", "TRUE", ""]) {
    const abort = new AbortController();
    const res = await app.request(`/pipelines/tickets/events?replay=${bad}`, {
      signal: abort.signal,
    });
    if (res.status === 200) { // an event stream: never read whole
      abort.abort();
      await res.body?.cancel();
    }
    assert.equal(res.status, 422, `replay=${bad}`);
    assert.equal(res.headers.get("content-type"), "application/problem+json");
    assert.equal((await res.json()).field, "replay");
  }
  // The one slot is still free: a good request gets its stream.
  const abort = new AbortController();
  const ok = await app.request("/pipelines/tickets/events?replay=false", { signal: abort.signal });
  assert.equal(ok.status, 200);
  abort.abort();
  await ok.body?.cancel();
});

Deno.test("a bus submission's intake letter, redriven once the schema takes it, resumes its failed item under the same id: no second item", async () => {
  await using t = await startTestNats();
  const obj = { type: "object" } as const;
  const orders = (text: Record<string, unknown>): LoadedPipeline => {
    const def = definePipeline({
      name: "orders",
      input: { schema: { type: "object", required: ["text"], properties: { text } } },
      start: "check",
      steps: {
        check: { kind: "task", output: obj, handle: () => ({}), next: "done" },
        done: { kind: "end", outcome: "done" },
      },
    });
    return { file: "inline", def, flow: compileFlow(def) };
  };
  const strict = orders({ type: "string" });
  const wide = orders({ type: ["string", "number"] });
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([strict], t.config.retentionMs));
  const start = async (p: LoadedPipeline) =>
    await Promise.all(
      [...pipelineServices([p]).values()].map((s) =>
        s.start({ config: t.config, log: t.log, nc: t.nc, metrics: new WeftMetrics() })
      ),
    );
  const stateOf = async (app: Hono, id: string) => {
    const res = await app.request(`/pipelines/orders/items/${id}`);
    return res.status === 200 ? (await res.json()).status as string : undefined;
  };
  let running = await start(strict);
  try {
    // `nats req orders.submit '{"text":5}'`: the schema refuses it at intake, failing the item.
    const ack = await jetstream(t.nc).publish("orders.submit", JSON.stringify({ text: 5 }));
    const id = `orders-${ack.seq}`;
    const before = await definitionsApp(t, [strict]);
    await waitFor(async () => await stateOf(before, id) === "failed", 15_000, `${id} failed`);
    const letters = await waitFor(
      async () => {
        const res = await before.request(`/deadletters?item_id=${id}`);
        const body = await res.json() as { items: { seq: number }[] };
        return body.items.length > 0 ? body.items : undefined;
      },
      15_000,
      `${id}'s letter`,
    );

    // The schema widened, the pipeline restarted, the letter redriven.
    await Promise.all(running.map((r) => r.stop()));
    running = await start(wide);
    const app = await definitionsApp(t, [wide]);
    const res = await app.request("/deadletters/redrive", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ ids: [letters[0]!.seq] }),
    });
    assert.equal(res.status, 200, await res.clone().text());
    assert.equal((await res.json()).redriven[0].item_id, id);
    await waitFor(async () => await stateOf(app, id) === "done", 30_000, `${id} done`);
    // One item entered, the one that failed: no other item was made of the redrive.
    const info = await t.jsm.streams.info(pipelineSubjects(wide.def).stream, {
      subjects_filter: "orders.submitted.>",
    });
    assert.deepEqual(Object.keys(info.state.subjects ?? {}), [`orders.submitted.${id}`]);

    // A redrive header naming an item that did not fail at intake (here, the stream position
    // of the item's own check event) makes no item: a conflict letter says why.
    const check = await t.jsm.streams.getMessage(pipelineSubjects(wide.def).stream, {
      last_by_subj: `orders.check.${id}`,
    });
    const forged = `orders-${check!.seq}`;
    const h = headers();
    h.set("Weft-Redrive-Of", "1");
    h.set("Weft-Redrive-Item", forged);
    await jetstream(t.nc).publish("orders.submit", JSON.stringify({ text: "x" }), { headers: h });
    const refused = await waitFor(
      async () => {
        const res = await app.request(`/deadletters?item_id=${forged}`);
        const body = await res.json() as { items: { letter: { code: string; reason: string } }[] };
        return body.items[0]?.letter;
      },
      15_000,
      `${forged}'s letter`,
    );
    assert.equal(refused.code, "conflict");
    assert.match(
      refused.reason,
      new RegExp(`names item ${forged}, but it did not fail at orders-ingest`),
    );
    assert.equal(await stateOf(app, forged), undefined, "no item made");
  } finally {
    await Promise.all(running.map((r) => r.stop()));
  }
});

Deno.test("a definition whose items store several large events keeps room for the items in flight: every accepted item ends, none is dead-lettered for lack of room", async () => {
  // Found by an operator's probe: with a 2 MiB stream, a definition's intake accepted items
  // until the stream itself was full (refused by it, at 99.9%): the items' later events
  // found no room, and 87 accepted items were dead-lettered "could not be marked failed".
  const max = 1024 * 1024;
  await using t = await startTestNats({ streamMaxBytes: max, maxAttempts: 3 });
  const obj = { type: "object" } as const;
  let open!: () => void;
  const gate = new Promise<void>((r) => (open = r));
  // Every step carries the item's text again, as an agent's answers and scratchpad do.
  const copy = (_v: unknown, ctx: { input: { text: string } }) => ({ copy: ctx.input.text });
  const def = definePipeline({
    name: "bulky",
    input: {
      schema: {
        type: "object",
        required: ["text", "n"],
        properties: { text: { type: "string" }, n: { type: "integer" } },
      },
    },
    start: "a",
    steps: {
      // The first item goes through at once; the others wait here (a slow model) until
      // intake refused one, so all of them are in flight together.
      a: {
        kind: "task",
        output: obj,
        handle: async (v: unknown, ctx: { input: { text: string; n: number } }) => {
          if (ctx.input.n > 0) await gate;
          return copy(v, ctx);
        },
        next: "b",
      },
      b: { kind: "task", output: obj, handle: copy, next: "c" },
      c: { kind: "task", output: obj, handle: copy, next: "done" },
      done: { kind: "end", outcome: "done" },
    },
  });
  const p: LoadedPipeline = { file: "inline", def, flow: compileFlow(def) };
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const runners = [
    await runStateWriter({ ...deps, spec: pipelineStateSpec(p) }),
    await runStage({ ...deps, stage: workStage(p, "a") }),
    await runStage({ ...deps, stage: workStage(p, "b") }),
    await runStage({ ...deps, stage: workStage(p, "c") }),
  ];
  // As the gateway service builds it.
  using capacity = createCapacityGuard(t.jsm, { highWater: 0.9, log: t.log });
  await trackItems(capacity, [p], t.nc);
  try {
    const intake = await createIntake(t.nc);
    const app = createApp({
      nc: t.nc,
      jetStream: intake,
      config: t.config,
      log: t.log,
      pipelines: [p],
      guards: { capacity },
    });
    const text = "the export to PDF fails again ".repeat(130); // ~3.9 KB
    const post = (n: number) =>
      app.request("/pipelines/bulky/items", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ text, n }),
      });
    const status = async (id: string) => {
      const r = await app.request(`/pipelines/bulky/items/${id}`);
      return r.status === 200 ? ((await r.json()) as { status?: string }).status : undefined;
    };
    const ids: string[] = [];
    const first = await post(0);
    assert.equal(first.status, 202, await first.clone().text());
    ids.push(((await first.json()) as { id: string }).id);
    await waitFor(async () => (await status(ids[0]!)) === "done", 20_000, "the first item done");
    let refusal: Response | undefined;
    for (let n = 1; n < 300 && !refusal; n++) {
      const res = await post(n);
      if (res.status === 202) ids.push(((await res.json()) as { id: string }).id);
      else refusal = res;
    }
    assert.ok(refusal, "intake refused");
    const problem = await refusal.json();
    assert.equal(refusal.status, 507, JSON.stringify(problem));
    // Refused by the guard (items in flight counted), not by the full stream itself.
    assert.match(problem.detail, /refused from 90%/, JSON.stringify(problem));
    assert.ok(ids.length > 3, `accepted ${ids.length}`);
    open();
    const final = await waitFor(
      async () => {
        const s = await Promise.all(ids.map(status));
        return s.every((x) => x === "done" || x === "failed") && s;
      },
      60_000,
      "every accepted item done or failed",
    );
    const js = jetstream(t.nc);
    const letters = await listDeadLetters(js, {});
    assert.deepEqual(letters.map((l) => l.letter.reason), [], "no dead letters");
    assert.deepEqual(final.filter((s) => s !== "done"), [], "every accepted item done");
    const info = await t.jsm.streams.info("BULKY");
    assert.ok(info.state.bytes < max, `the stream holds ${info.state.bytes} of ${max} bytes`);
  } finally {
    for (const r of runners) await r.stop();
  }
});

Deno.test("under deno task start, the support pipeline's intake refuses before its stream fills, and no accepted item is dead-lettered", async () => {
  // The operator's probe, as it ran: a 2 MiB stream, ~3.9 KB requests one at a time. Before,
  // 91 were accepted, the stream itself refused at 99.9%, and 87-90 were dead-lettered.
  await using mesh = await startMesh({
    ...ONE_PROCESS,
    WEFT_STREAM_MAX_BYTES: String(2 * 1024 * 1024),
    WEFT_PIPELINES: "pipelines/support/pipeline.ts",
  });
  await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
  const text = "My invoice shows a double charge and I want a refund please. ".repeat(64)
    .slice(0, 3900);
  const ids: string[] = [];
  let refusal: { status: number; detail: string } | undefined;
  for (let i = 0; i < 400 && !refusal; i++) {
    const r = await fetch(`${mesh.gatewayUrl}/pipelines/support/items`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ customer: `c${i}`, text }),
    });
    if (r.status === 202) ids.push((await r.json()).id);
    else refusal = { status: r.status, detail: (await r.json()).detail };
  }
  assert.equal(refusal?.status, 507, JSON.stringify(refusal));
  assert.match(refusal!.detail, /refused from 90%/, "refused by the guard, not the full stream");
  assert.ok(ids.length > 0);
  // Every accepted item reaches a step that holds it (a person's answer) or its end.
  const statuses = await waitFor(
    async () => {
      const s = await Promise.all(ids.map(async (id) => {
        const r = await fetch(`${mesh.gatewayUrl}/pipelines/support/items/${id}`);
        return r.status === 200 ? ((await r.json()) as { status: string }).status : "";
      }));
      return s.every((x) => x !== "" && x !== "running" && x !== "accepted") && s;
    },
    60_000,
    "every accepted item settled",
  );
  assert.ok(!statuses.includes("failed"), JSON.stringify(statuses));
  const letters = await (await fetch(`${mesh.gatewayUrl}/deadletters`)).json();
  assert.deepEqual(letters.items, [], "no dead letters");
  const metrics = await (await fetch(`${mesh.gatewayUrl}/metrics`)).text();
  const usage = Number(
    /weft_stream_usage_ratio\{stream="SUPPORT",resource="bytes"\} (\S+)/.exec(metrics)?.[1],
  );
  assert.ok(usage < 0.9, `SUPPORT at ${usage}`);
});

Deno.test("the capacity guard follows only items that entered: events for ids never in flight or already ended reserve nothing, and intake accepts", async () => {
  // Found by an operator's probe: 250 `nats pub lw.approved.ghost<i> {}` (each dead-lettered
  // not_found) made every later POST 507 with the stream 2% full, for good; repeat decisions
  // for ended items cut the accepted burst too. Any event with a role started an item "in
  // flight" that only an end could stop.
  const max = 128 * 1024;
  await using t = await startTestNats({ streamMaxBytes: max });
  const obj = { type: "object" } as const;
  const def = definePipeline({
    name: "ghosts",
    input: {
      schema: { type: "object", required: ["text"], properties: { text: { type: "string" } } },
    },
    start: "a",
    steps: {
      a: { kind: "task", output: obj, handle: () => ({}), next: "done" },
      done: { kind: "end", outcome: "done" },
    },
  });
  const p: LoadedPipeline = { file: "inline", def, flow: compileFlow(def) };
  const roleOf = (r: string) => [...p.flow.roles].find(([, v]) => v.role === r)![0];
  const { stream } = pipelineSubjects(def);
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  // No stage runs: the items stay where the test puts them.
  using capacity = createCapacityGuard(t.jsm, { highWater: 0.9, log: t.log });
  await trackItems(capacity, [p], t.nc);
  const intake = await createIntake(t.nc);
  const app = createApp({
    nc: t.nc,
    jetStream: intake,
    config: t.config,
    log: t.log,
    pipelines: [p],
    guards: { capacity },
  });
  const text = "the export to PDF fails again ".repeat(80); // ~2.4 KB
  const post = () =>
    app.request("/pipelines/ghosts/items", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ text }),
    });
  const idOf = async (res: Response) => {
    assert.equal(res.status, 202, await res.clone().text());
    return ((await res.json()) as { id: string }).id;
  };
  const ended = await idOf(await post());
  const open = await idOf(await post());
  const js = jetstream(t.nc);
  // The first item ends (its end event, as the end step publishes it).
  await js.publish(`ghosts.${roleOf("end")}.${ended}`, JSON.stringify({ outcome: "done" }));
  await waitFor(() => capacity.following(stream)?.items === 1, 10_000, "one item in flight");
  // Timer events for ids that never entered, and repeats for the ended item.
  for (let i = 0; i < 60; i++) await js.publish(`ghosts.${roleOf("timer")}.ghost${i}`, "{}");
  for (let i = 0; i < 20; i++) await js.publish(`ghosts.${roleOf("done")}.${ended}`, "{}");
  await waitFor(
    () => (capacity.following(stream)?.events ?? 0) >= 3 + 80,
    10_000,
    "the guard saw every event",
  );
  const info = await t.jsm.streams.info(stream);
  assert.ok(info.state.bytes < max * 0.5, `the stream holds ${info.state.bytes} of ${max} bytes`);
  // Before: 507, the 80 ids counted in flight for an ended item's size each.
  const res = await post();
  assert.equal(res.status, 202, await res.clone().text());
  // The guard follows the new item once its entry event reaches it (its own read of the stream).
  await waitFor(
    () => capacity.following(stream)?.items === 2,
    10_000,
    `${open} and the new item followed, none other`,
  );
});
