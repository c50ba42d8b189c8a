/**
 * GET /openapi.json against the gateway that serves it, on a real nats-server, built as the
 * gateway service builds it (every shipped pipeline's part, a definition with a wait, API
 * keys on): every documented operation has a route and every route is documented, each
 * operation's `x-weft-roles` is what its route enforces, and live responses validate against
 * the documented schemas. Drift between the document and the routes fails here.
 */
import assert from "node:assert/strict";
import { Ajv } from "ajv";
import addFormatsModule from "ajv-formats";
import { createApp } from "../src/gateway/app.ts";
import { createAuth, hashKey } from "../src/gateway/auth.ts";
import { Role } from "../src/config.ts";
import { routeRoles, serves } from "../src/gateway/openapi.ts";
import { createCapacityGuard } from "../src/capacity.ts";
import { createIngestLimiter } from "../src/gateway/ingest_limits.ts";
import { WeftMetrics } from "../src/observability/metrics.ts";
import { SHIPPED_GATEWAYS } from "../pipelines/shipped_gateways.ts";
import { CONTENT_STATE_SPEC } from "../pipelines/moderation/state.ts";
import { runStateWriter } from "../src/state_writer.ts";
import { pipelineTopology } from "../src/pipeline/runtime.ts";
import { ensureTopology } from "../src/topology.ts";
import { lazyScheduleStore } from "../src/gateway/schedules.ts";
import { SseClients } from "../src/gateway/sse.ts";
import type { ShadowControl } from "../src/shadow/control.ts";
import type { GatewayPart } from "../src/wiring.ts";
import { startTestNats, type TestNats } from "./helpers/nats.ts";
import { approvalsPipeline } from "./helpers/pipeline.ts";
import { waitFor } from "./helpers/wait.ts";

const addFormats = ((addFormatsModule as unknown as { default?: unknown }).default ??
  addFormatsModule) as (ajv: Ajv) => Ajv;

const KEYS = {
  [Role.Ingest]: "k-ingest",
  [Role.Reviewer]: "k-alice",
  [Role.Admin]: "k-root",
} as const;
const API_KEYS = [
  { sha256: hashKey(KEYS.ingest), role: Role.Ingest, name: "ivan" },
  { sha256: hashKey(KEYS.reviewer), role: Role.Reviewer, name: "alice" },
  { sha256: hashKey(KEYS.admin), role: Role.Admin, name: "root" },
];

type Doc = {
  paths: Record<string, Record<string, Record<string, unknown>>>;
};

/** The gateway app as services/gateway.ts builds it, with keys on; `hub` adds a site. */
async function gateway(t: TestNats, hub = false) {
  const approvals = approvalsPipeline();
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([approvals], t.config.retentionMs));
  const config = { ...t.config, apiKeys: API_KEYS, hub: hub ? ["east"] : [] };
  const auth = createAuth(API_KEYS);
  const metrics = new WeftMetrics();
  const capacity = createCapacityGuard(t.jsm);
  const parts: GatewayPart[] = [];
  for (const start of SHIPPED_GATEWAYS) {
    parts.push(
      await start({
        nc: t.nc,
        config,
        log: t.log,
        metrics,
        auth,
        capacity,
        limiter: createIngestLimiter(config.ingestLimits),
      }),
    );
  }
  const sseClients = new SseClients(
    config.sseMaxClients,
    config.sseMaxPerKey,
    config.sseOpensPerSecond,
  );
  const app = createApp({
    sseClients,
    nc: t.nc,
    jetStream: { js: t.jsm.jetstream(), jsm: t.jsm },
    config,
    log: t.log,
    auth,
    extensions: parts.map((p) => p.routes),
    openApi: parts.flatMap((p) => p.openApi ? [p.openApi] : []),
    metrics,
    pipelines: [approvals],
    // Only its routes are needed here: nothing below reaches a shadow's handler.
    shadows: {} as ShadowControl,
    schedules: lazyScheduleStore(t.nc),
  });
  const doc = await (await app.request("/openapi.json")).json() as Doc;
  return {
    app,
    doc,
    sseClients,
    [Symbol.dispose]() {
      for (const p of parts) p.stop();
      capacity.close();
    },
  };
}

/** Every documented operation: method and path. */
function operations(doc: Doc): [string, string][] {
  return Object.entries(doc.paths).flatMap(([path, item]) =>
    Object.keys(item).map((method) => [method, path] as [string, string])
  );
}

/** A concrete path for a documented one: each `{param}` as `x1`. */
const concrete = (path: string) => path.replace(/\{[^}]+\}/g, "x1");

Deno.test("every documented operation has a route and every route is documented; /sites only on a hub", async () => {
  await using t = await startTestNats();
  for (const hub of [false, true]) {
    using g = await gateway(t, hub);
    const ops = operations(g.doc);
    const unserved = ops.filter(([m, p]) => routeRoles(g.app.routes, m, p) === undefined);
    assert.deepEqual(unserved, [], `hub ${hub}: documented with no route`);
    const routes = [
      ...new Set(
        g.app.routes.filter((r) => r.method !== "ALL" && !r.path.includes("*"))
          .map((r) => `${r.method} ${r.path}`),
      ),
    ];
    const undocumented = routes.filter((r) => {
      const [method, pattern] = r.split(" ") as [string, string];
      return !ops.some(([m, p]) => m.toUpperCase() === method && serves(pattern, p));
    });
    assert.deepEqual(undocumented, [], `hub ${hub}: routes missing from the document`);
    assert.equal(ops.some(([, p]) => p.startsWith("/sites")), hub, `hub ${hub}: /sites listed`);
  }
});

Deno.test("each operation's x-weft-roles is what its route enforces: no key is 401, another role's key 403, none needed for the open ones", async () => {
  await using t = await startTestNats();
  using g = await gateway(t);
  const open = new Set<string>();
  for (const [method, path] of operations(g.doc)) {
    const op = g.doc.paths[path]![method]!;
    const roles = op["x-weft-roles"] as Role[] | undefined;
    assert.ok(Array.isArray(roles), `${method} ${path}: x-weft-roles`);
    if (roles.length === 0) {
      assert.deepEqual(op.security, [], `${method} ${path}: open`);
      open.add(`${method} ${path}`);
      continue;
    }
    assert.deepEqual(op.security, [{ apiKey: [] }], `${method} ${path}`);
    assert.ok(roles.includes(Role.Admin), `${method} ${path}: admin may do anything`);
    assert.match(String(op.description), /needs a key of role/);
    const request = (key?: string) =>
      g.app.request(concrete(path), {
        method: method.toUpperCase(),
        headers: {
          "content-type": "application/json",
          ...(key ? { authorization: `Bearer ${key}` } : {}),
        },
        ...(method === "get" ? {} : { body: "{}" }),
      });
    const anonymous = await request();
    assert.equal(anonymous.status, 401, `${method} ${path} without a key`);
    await anonymous.body?.cancel();
    for (const role of [Role.Ingest, Role.Reviewer]) {
      if (roles.includes(role)) continue;
      const res = await request(KEYS[role]);
      assert.equal(res.status, 403, `${method} ${path} with a ${role} key`);
      await res.body?.cancel();
    }
  }
  assert.deepEqual(
    [...open].sort(),
    [
      "get /",
      "get /dashboard",
      "get /favicon.ico",
      "get /healthz",
      "get /openapi.json",
      "get /readyz",
    ],
  );
  const rolesOf = (method: string, path: string) => g.doc.paths[path]![method]!["x-weft-roles"];
  assert.deepEqual(rolesOf("get", "/deadletters"), [Role.Admin]);
  assert.deepEqual(rolesOf("post", "/pipelines/approvals/items/{id}/approved"), [
    Role.Reviewer,
    Role.Admin,
  ]);
  assert.deepEqual(rolesOf("get", "/feedback/{id}"), [Role.Ingest, Role.Reviewer, Role.Admin]);
});

Deno.test("live responses validate against the document: schedules (a caller's and a pipeline's own timer), a content item's view, the dashboard's routes", async () => {
  await using t = await startTestNats();
  using g = await gateway(t);
  const writer = await runStateWriter({
    nc: t.nc,
    config: t.config,
    log: t.log,
    spec: CONTENT_STATE_SPEC,
  });
  try {
    const ajv = new Ajv({ strict: false, allErrors: true });
    addFormats(ajv);
    ajv.addFormat("binary", true);
    ajv.addSchema(g.doc, "openapi");
    const pointer = (...parts: string[]) =>
      parts.map((p) => p.replaceAll("~", "~0").replaceAll("/", "~1")).join("/");
    /** `res` is what the document says `method path` answers with its status. */
    const conforms = async (res: Response, method: string, path: string) => {
      const status = String(res.status);
      const responses = g.doc.paths[path]![method]!.responses as Record<string, unknown>;
      assert.ok(responses[status], `${method} ${path}: ${status} is documented`);
      const type = (res.headers.get("content-type") ?? "").split(";")[0]!;
      if (type !== "application/json") return;
      const validate = ajv.compile({
        $ref: `openapi#/${
          pointer("paths", path, method, "responses", status, "content", type, "schema")
        }`,
      });
      const body = await res.json();
      assert.ok(
        validate(body),
        `${method} ${path} ${status}: ${JSON.stringify(validate.errors)}\n${
          JSON.stringify(body).slice(0, 800)
        }`,
      );
      return body;
    };
    const as = (key: string, method: string, path: string, body?: unknown) =>
      g.app.request(path, {
        method,
        redirect: "manual",
        headers: { "content-type": "application/json", authorization: `Bearer ${key}` },
        ...(body === undefined ? {} : { body: JSON.stringify(body) }),
      });

    // A caller's schedule, and a pipeline's own timer (a dotted id), as stored.
    const created = await as(KEYS.admin, "POST", "/schedules", {
      id: "nightly",
      subject: "feedback.submit",
      payload: { text: "hi" },
      at: "2099-01-01T00:00:00Z",
    });
    assert.equal(created.status, 201);
    assert.equal(created.headers.get("location"), "/schedules/nightly");
    await conforms(created, "post", "/schedules");
    const store = await lazyScheduleStore(t.nc)();
    await store.create({
      id: "content.sla-1-abc",
      subject: "content.sla_expired.abc",
      payload: { item_id: "abc" },
      at: "2099-01-01T00:00:00Z",
    });
    for (const id of ["nightly", "content.sla-1-abc"]) {
      const one = await as(KEYS.admin, "GET", `/schedules/${id}`);
      assert.equal(one.status, 200, id);
      await conforms(one, "get", "/schedules/{id}");
      const param = (g.doc.paths["/schedules/{id}"]!.get!.parameters as {
        schema: { pattern: string };
      }[])[0]!;
      assert.match(id, new RegExp(param.schema.pattern), "the documented id pattern takes it");
    }
    await conforms(await as(KEYS.admin, "GET", "/schedules"), "get", "/schedules");

    // A content item: before its state is folded, and after.
    const submitted = await as(KEYS.ingest, "POST", "/content", { text: "a picture of a cat" });
    assert.equal(submitted.status, 202);
    const { id } = await conforms(submitted, "post", "/content") as { id: string };
    await conforms(await as(KEYS.reviewer, "GET", `/content/${id}`), "get", "/content/{id}");
    await waitFor(
      async () => (await (await as(KEYS.reviewer, "GET", `/content/${id}`)).json()).trace_id,
      10_000,
      "the item's state folded",
    );
    await conforms(await as(KEYS.reviewer, "GET", `/content/${id}`), "get", "/content/{id}");

    // The dashboard's routes.
    await conforms(await as(KEYS.ingest, "GET", "/"), "get", "/");
    await conforms(await as(KEYS.ingest, "GET", "/dashboard"), "get", "/dashboard");
    await conforms(await as(KEYS.ingest, "GET", "/favicon.ico"), "get", "/favicon.ico");
    await conforms(
      await as(KEYS.reviewer, "GET", "/dashboard/recent?limit=5"),
      "get",
      "/dashboard/recent",
    );
    const stream = await as(KEYS.reviewer, "GET", "/dashboard/stream");
    assert.equal(stream.headers.get("content-type")?.split(";")[0], "text/event-stream");
    await stream.body?.cancel();
    await conforms(stream, "get", "/dashboard/stream");
    // The stream's own timers end once the gateway has let the client go.
    await waitFor(() => g.sseClients.open === 0, 10_000, "the dashboard stream closed");
  } finally {
    await writer.stop();
  }
});

Deno.test("documented query parameters are the routes' own: a value a parameter's schema takes is answered 200, one it refuses 422 naming the parameter", async () => {
  await using t = await startTestNats();
  using g = await gateway(t);
  const ajv = new Ajv({ strict: false, coerceTypes: true });
  const consumers = async () => (await t.jsm.streams.info("FEEDBACK")).state.consumer_count;
  const before = await consumers();
  const cases: [string, string, string[]][] = [
    ["/deadletters", "limit", ["1", "5", "100000", "0", "100001", "abc"]],
    ["/deadletters", "pending", ["true", "false", "maybe", "1"]],
    ["/dashboard/recent", "limit", ["1", "500", "0", "501", "abc"]],
    ["/pipelines/approvals/waiting", "limit", ["1", "1000", "0", "1001", "abc"]],
    ["/reviews", "status", ["pending", "escalated", "decided", "Pending", "done"]],
    ["/events", "type", ["processed", "feedback.failed", "ingest", "content.uploaded"]],
  ];
  for (const [path, name, values] of cases) {
    const params = g.doc.paths[path]?.get?.parameters as
      | { name: string; in: string; schema: unknown }[]
      | undefined;
    const param = params?.find((p) => p.name === name && p.in === "query");
    assert.ok(param, `${path} documents ${name}`);
    const validate = ajv.compile(param.schema as object);
    for (const value of values) {
      const documented = validate(value);
      const res = await g.app.request(`${path}?${name}=${value}`, {
        headers: { authorization: `Bearer ${KEYS.admin}` },
      });
      // An event stream is not read: its 200 is all that is asked of it.
      const stream = res.headers.get("content-type")?.startsWith("text/event-stream");
      const text = stream ? (await res.body?.cancel(), "") : await res.text();
      if (documented) assert.equal(res.status, 200, `${path}?${name}=${value}: ${text}`);
      else {
        assert.equal(res.status, 422, `${path}?${name}=${value} (documented as refused): ${text}`);
        assert.equal(JSON.parse(text).field, name, text);
      }
    }
  }
  await waitFor(() => g.sseClients.open === 0, 10_000, "the event streams closed");
  // The live feed's consumer is deleted once its last client has gone.
  await waitFor(
    async () => await consumers() === before,
    10_000,
    "the live feed's consumer deleted",
  );
});
