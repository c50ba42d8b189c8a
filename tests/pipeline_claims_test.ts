/**
 * Reviewers' claims on a definition's items waiting for a person, on a real nats-server with
 * the gateway app, the control step and the state writer in-process: while a claim lasts,
 * only its holder's decision is taken; the waiting list shows who holds what.
 */
import assert from "node:assert/strict";
import { headers } from "@nats-io/nats-core";
import { createApp } from "../src/gateway/app.ts";
import { createAuth, hashKey } from "../src/gateway/auth.ts";
import { Role } from "../src/config.ts";
import { servePipelineRequests } from "../src/gateway/pipelines.ts";
import { createIntake } from "../pipelines/feedback/intake.ts";
import { advance, entryData, flowEvent } from "../src/pipeline/flow.ts";
import {
  controlStage,
  pipelineStateSpec,
  pipelineTopology,
  submitItem,
} from "../src/pipeline/runtime.ts";
import { runStage } from "../src/runner.ts";
import { runStateWriter } from "../src/state_writer.ts";
import { ensureTopology } from "../src/topology.ts";
import { pipelineSubjects } from "../src/pipeline/derive.ts";
import { PATIENT, startTestNats, type TestNats } from "./helpers/nats.ts";
import { waitFor } from "./helpers/wait.ts";
import { approvalsPipeline, definitionsApp } from "./helpers/pipeline.ts";
import { definePipeline } from "../src/pipeline/definition.ts";
import { compileFlow } from "../src/pipeline/flow.ts";
import { openApiDocument } from "../src/gateway/openapi.ts";

const approvals = approvalsPipeline(600_000);
const TRACE = "0af7651916cd43dd8448eb211c80319c";
const JSON_TYPE = { "content-type": "application/json" };

/** The gateway app, the control step and the state writer for `approvals`, with `keys`. */
async function mesh(t: TestNats, keys: Parameters<typeof createAuth>[0]) {
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const auth = createAuth(keys);
  const app = createApp({
    ...deps,
    jetStream: await createIntake(t.nc),
    pipelines: [approvals],
    auth,
  });
  const runners = [
    await runStage({ ...deps, stage: controlStage(approvals, t.nc) }),
    await runStateWriter({ ...deps, spec: pipelineStateSpec(approvals) }),
  ];
  const requests = servePipelineRequests(t.nc, [approvals], t.log, { auth, claimTtlMs: 60_000 });
  /** An item of approvals held at its wait. */
  const waiting = async (id: string) => {
    await submitItem(t.nc, approvals, id, {}, { source: "test", traceId: TRACE });
    const checked = flowEvent(
      approvals.flow,
      "check",
      { id: `${id}-check`, item_id: id, trace_id: TRACE },
      advance(entryData({}), "check", {}, {}),
      { source: "test", now: new Date() },
    );
    await t.nc.request(`approvals.check.${id}`, JSON.stringify(checked), PATIENT);
    await waitFor(
      async () => (await (await get(id)).json()).status === "waiting",
      10_000,
      `${id} waiting`,
    );
  };
  const get = (id: string, key = "k-carol") =>
    app.request(`/pipelines/approvals/items/${id}`, {
      headers: { authorization: `Bearer ${key}` },
    });
  return {
    app,
    waiting,
    get,
    async [Symbol.asyncDispose]() {
      requests.stop();
      for (const r of runners) await r.stop();
    },
  };
}

const REVIEWERS = [
  { sha256: hashKey("k-carol"), role: Role.Reviewer, name: "carol" },
  { sha256: hashKey("k-dave"), role: Role.Reviewer, name: "dave" },
];

Deno.test("a claimed waiting item takes only its holder's decision; the waiting list shows the claim; a released one is free again", async () => {
  await using t = await startTestNats();
  await using m = await mesh(t, REVIEWERS);
  await m.waiting("a1");
  const as = (key: string, method: string, path: string, body?: unknown) =>
    m.app.request(path, {
      method,
      headers: { ...JSON_TYPE, authorization: `Bearer ${key}` },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    });

  const taken = await as("k-carol", "POST", "/pipelines/approvals/claims/a1", {});
  assert.equal(taken.status, 200, await taken.clone().text());
  assert.equal((await taken.json()).claim.by, "carol");
  const other = await as("k-dave", "POST", "/pipelines/approvals/claims/a1", {});
  assert.equal(other.status, 409);
  assert.match((await other.json()).detail, /claimed by carol/);
  const spoof = await as("k-dave", "POST", "/pipelines/approvals/claims/a1", { by: "carol" });
  assert.equal(spoof.status, 403, "a key claims as its holder only");

  const list = await (await as("k-dave", "GET", "/pipelines/approvals/waiting")).json();
  assert.deepEqual(
    list.items.map((i: { id: string; claim?: { by: string } }) => [i.id, i.claim?.by]),
    [
      ["a1", "carol"],
    ],
  );

  const daveDecides = await as("k-dave", "POST", "/pipelines/approvals/items/a1/approved", {
    ok: true,
  });
  assert.equal(daveDecides.status, 409, "held by carol");
  assert.equal((await as("k-dave", "DELETE", "/pipelines/approvals/claims/a1")).status, 409);
  assert.equal((await as("k-carol", "DELETE", "/pipelines/approvals/claims/a1")).status, 204);
  // Free again: dave takes it over NATS and decides.
  const h = headers();
  h.set("Authorization", "Bearer k-dave");
  const viaNats = await t.nc.request(
    "weft.approvals.claim",
    JSON.stringify({ id: "a1" }),
    { ...PATIENT, headers: h },
  );
  assert.equal(viaNats.json<{ claim?: { by: string } }>().claim?.by, "dave");
  const decided = await as("k-dave", "POST", "/pipelines/approvals/items/a1/approved", { ok: 1 });
  assert.equal(decided.status, 202, await decided.clone().text());
  await waitFor(async () => (await (await m.get("a1")).json()).status === "done", 10_000, "done");

  // An item that is not waiting cannot be claimed; one that does not exist is 404.
  assert.equal((await as("k-carol", "POST", "/pipelines/approvals/claims/a1", {})).status, 409);
  assert.equal((await as("k-carol", "POST", "/pipelines/approvals/claims/nope", {})).status, 404);
  assert.equal(
    (await m.app.request("/pipelines/approvals/claims/a1", {
      method: "POST",
      headers: { authorization: "Bearer k-carol", "content-type": "text/plain" },
      body: "{}",
    })).status,
    415,
    "JSON only: no cross-site form can claim",
  );
});

Deno.test("with authentication off, a claim names its reviewer (by), and a decision names its decider with ?by=", async () => {
  await using t = await startTestNats();
  await using m = await mesh(t, []);
  await m.waiting("b1");
  const post = (path: string, body: unknown) =>
    m.app.request(path, { method: "POST", headers: JSON_TYPE, body: JSON.stringify(body) });
  const unnamed = await post("/pipelines/approvals/claims/b1", {});
  assert.equal(unnamed.status, 422);
  assert.equal((await unnamed.json()).field, "/by", "a JSON pointer into the body");
  const extra = await post("/pipelines/approvals/claims/b1", { by: "erin", x: 1 });
  assert.equal(extra.status, 422);
  assert.equal((await extra.json()).field, "/x", "an unknown field is refused, naming it");
  assert.equal((await post("/pipelines/approvals/claims/b1", { by: "erin" })).status, 200);
  assert.equal((await post("/pipelines/approvals/items/b1/approved", { ok: 1 })).status, 409);
  // Released with the name in a JSON body (or ?by=), then taken again, then decided.
  const release = await m.app.request("/pipelines/approvals/claims/b1", {
    method: "DELETE",
    headers: JSON_TYPE,
    body: JSON.stringify({ by: "erin" }),
  });
  assert.equal(release.status, 204, await release.text());
  assert.equal((await post("/pipelines/approvals/claims/b1", { by: "erin" })).status, 200);
  const erin = await post("/pipelines/approvals/items/b1/approved?by=erin", { ok: 1 });
  assert.equal(erin.status, 202, await erin.clone().text());
  // GET /openapi.json documents the ?by= both routes take (the decision's was missing).
  const doc = await (await m.app.request("/openapi.json")).json();
  const queries = (op: { parameters?: { name: string; in: string }[] }) =>
    (op.parameters ?? []).filter((p) => p.in === "query").map((p) => p.name);
  assert.deepEqual(queries(doc.paths["/pipelines/approvals/items/{id}/approved"].post), ["by"]);
  assert.deepEqual(queries(doc.paths["/pipelines/approvals/claims/{id}"].delete), ["by"]);
});

Deno.test("with API keys, an awaited event's `by` is the caller's: naming another is 403 on /by and publishes nothing; one without is recorded as the caller's", async () => {
  await using t = await startTestNats();
  await using m = await mesh(t, REVIEWERS);
  await m.waiting("c1");
  const decide = (key: string, body: unknown) =>
    m.app.request("/pipelines/approvals/items/c1/approved", {
      method: "POST",
      headers: { ...JSON_TYPE, authorization: `Bearer ${key}` },
      body: JSON.stringify(body),
    });
  const { stream } = pipelineSubjects(approvals.def);
  const stored = () =>
    t.jsm.streams.getMessage(stream, { last_by_subj: "approvals.approved.c1" })
      .then((msg) => msg?.json<Record<string, unknown>>() ?? null);

  const spoof = await decide("k-dave", { ok: 1, by: "carol" });
  assert.equal(spoof.status, 403, await spoof.clone().text());
  assert.equal((await spoof.json()).field, "/by");
  assert.equal(await stored(), null, "nothing published in carol's name");

  const decided = await decide("k-dave", { ok: 1 });
  assert.equal(decided.status, 202, await decided.clone().text());
  assert.deepEqual(await stored(), { ok: 1, by: "dave" }, "recorded as the key's holder");
  await waitFor(async () => (await (await m.get("c1")).json()).status === "done", 10_000, "done");
});

Deno.test("with authentication off, an awaited event's `by` is published as given", async () => {
  await using t = await startTestNats();
  await using m = await mesh(t, []);
  await m.waiting("d1");
  const res = await m.app.request("/pipelines/approvals/items/d1/approved", {
    method: "POST",
    headers: JSON_TYPE,
    body: JSON.stringify({ ok: 1, by: "mallory" }),
  });
  assert.equal(res.status, 202, await res.clone().text());
  const msg = await t.jsm.streams.getMessage(pipelineSubjects(approvals.def).stream, {
    last_by_subj: "approvals.approved.d1",
  });
  assert.deepEqual(msg?.json(), { ok: 1, by: "mallory" });
});

Deno.test("a pipeline without a wait step has no waiting list and no claims: 404 saying so over HTTP and NATS, not an empty list or 409, and its OpenAPI lists neither", async () => {
  await using t = await startTestNats();
  const obj = { type: "object" } as const;
  const def = definePipeline({
    name: "plain",
    input: { schema: obj },
    start: "check",
    steps: {
      check: { kind: "task", output: obj, handle: () => ({}), next: "done" },
      done: { kind: "end", outcome: "done" },
    },
  });
  const plain = { file: "inline", def, flow: compileFlow(def) };
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([plain], t.config.retentionMs));
  await submitItem(t.nc, plain, "p1", {}, { source: "test", traceId: TRACE });
  const app = await definitionsApp(t, [plain]);
  for (
    const [method, path] of [
      ["GET", "/pipelines/plain/waiting"],
      ["POST", "/pipelines/plain/claims/p1"],
      ["DELETE", "/pipelines/plain/claims/p1?by=erin"],
    ]
  ) {
    const res = await app.request(path!, {
      method,
      headers: JSON_TYPE,
      ...(method === "POST" ? { body: JSON.stringify({ by: "erin" }) } : {}),
    });
    assert.equal(res.status, 404, `${method} ${path}: ${await res.clone().text()}`);
    assert.match((await res.json()).detail, /plain has no wait step/);
  }
  // `nats req weft.plain.waiting ''` answers the same problem, not an empty list.
  const requests = servePipelineRequests(t.nc, [plain], t.log);
  try {
    const answer = (await t.nc.request("weft.plain.waiting", "", PATIENT)).json<
      { error?: { status: number; detail: string } }
    >();
    assert.equal(answer.error?.status, 404, JSON.stringify(answer));
    assert.match(answer.error.detail, /plain has no wait step: nothing waits/);
  } finally {
    requests.stop();
  }
  const paths = Object.keys(openApiDocument([plain, approvals]).paths as Record<string, unknown>);
  assert.ok(paths.includes("/pipelines/approvals/waiting"));
  assert.ok(paths.includes("/pipelines/approvals/claims/{id}"));
  assert.deepEqual(paths.filter((p) => /^\/pipelines\/plain\/(waiting|claims)/.test(p)), []);
});

Deno.test("nats req weft.<name>.waiting takes GET /pipelines/<name>/waiting's limit, answers the same list, and refuses a bad one naming it", async () => {
  await using t = await startTestNats();
  await using m = await mesh(t, []);
  for (const id of ["w1", "w2", "w3"]) await m.waiting(id);
  const ask = async (body: string) =>
    (await t.nc.request("weft.approvals.waiting", body, PATIENT)).json<
      { items?: { id: string }[]; total?: number; error?: { status: number; field?: string } }
    >();
  const viaHttp = await (await m.app.request("/pipelines/approvals/waiting?limit=1")).json();
  const one = await ask('{"limit":1}');
  assert.equal(one.items?.length, 1, JSON.stringify(one));
  assert.equal(one.total, 3);
  assert.deepEqual(one, viaHttp, "the same JSON as over HTTP");
  assert.equal((await ask("")).items?.length, 3, "an empty body lists as GET does without limit");
  for (
    const [body, status, field] of [
      ['{"limit":0}', 422, "/limit"],
      ['{"limit":1001}', 422, "/limit"],
      ['{"limit":"2"}', 422, "/limit"],
      ['{"limt":1}', 422, "/limt"],
      ["[1]", 422, "/"],
      ["{", 400, "/"],
    ] as const
  ) {
    const answer = await ask(body);
    assert.equal(answer.error?.status, status, `${body}: ${JSON.stringify(answer)}`);
    assert.equal(answer.error?.field, field, body);
  }
});

Deno.test("an awaited event published on the bus is taken while another reviewer holds the claim, with whatever `by` it names", async () => {
  await using t = await startTestNats();
  await using m = await mesh(t, []);
  await m.waiting("e1");
  const claim = await m.app.request("/pipelines/approvals/claims/e1", {
    method: "POST",
    headers: JSON_TYPE,
    body: JSON.stringify({ by: "erin" }),
  });
  assert.equal(claim.status, 200, await claim.clone().text());
  // Over HTTP the claim binds: another reviewer's decision is 409.
  const other = await m.app.request("/pipelines/approvals/items/e1/approved?by=mallory", {
    method: "POST",
    headers: JSON_TYPE,
    body: JSON.stringify({ ok: 1 }),
  });
  assert.equal(other.status, 409);
  // On the bus (`nats pub approvals.approved.e1`, as the ops key may) it does not.
  await t.nc.request("approvals.approved.e1", JSON.stringify({ ok: 1, by: "mallory" }), PATIENT);
  await waitFor(
    async () => (await (await m.get("e1")).json()).status === "done",
    10_000,
    "e1 done on the bus's decision",
  );
  const stored = await t.jsm.streams.getMessage(pipelineSubjects(approvals.def).stream, {
    last_by_subj: "approvals.approved.e1",
  });
  assert.deepEqual(stored?.json(), { ok: 1, by: "mallory" }, "taken in the name it gave");
});
