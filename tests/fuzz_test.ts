/**
 * Generative fuzzing of everything a caller can reach, bounded in count and time: every
 * route of the gateway's HTTP API (read from the app's own route table, so a new route is
 * fuzzed without touching this file) and every subject a Weft service consumes, against
 * a real mesh (nats-server, the feedback and moderation services, the gateway).
 *
 * The properties:
 * - HTTP: no request, however malformed, gets a 5xx; every error is
 *   application/problem+json with its status, a stable code and a detail.
 * - Bus: every message a service consumes is handled or dead-lettered: nothing is left
 *   for redelivery, every malformed message has a dead letter, and no service crashes.
 * - Afterwards, a valid item still goes through both pipelines.
 *
 * Inputs come from fast-check with a fixed seed, so a failure replays exactly
 * (`FUZZ_SEED=<n>` to explore other seeds, `FUZZ_RUNS=<n>` for more cases).
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import { createIntake } from "../pipelines/feedback/intake.ts";
import { createApp } from "../src/gateway/app.ts";
import { feedbackRoutes } from "../pipelines/feedback/routes.ts";
import { createAuth } from "../src/gateway/auth.ts";
import { createModerationApi } from "../pipelines/moderation/api.ts";
import { moderationRoutes } from "../pipelines/moderation/routes.ts";
import { loadConfig } from "../src/config.ts";
import { createLogger } from "../src/observability/log.ts";
import { listDeadLetters } from "../src/redrive.ts";
import { decodeJson } from "../src/runner.ts";
import { type EventMap, validateDocument, validateEvent } from "../src/schemas.ts";
import { CONTENT_STREAM } from "../pipelines/moderation/subjects.ts";
import { ContentEventType } from "../pipelines/moderation/events.ts";
import { FEEDBACK_STREAM } from "../pipelines/feedback/subjects.ts";
import { FeedbackEventType } from "../pipelines/feedback/events.ts";
import { SERVICES_IN_ONE_PROCESS, startServices } from "./helpers/mesh.ts";
import { waitUntil } from "./helpers/wait.ts";
import { fuzzBody, mutated, pathToken } from "./helpers/fuzz.ts";

const SEED = Number(Deno.env.get("FUZZ_SEED") ?? 20261204);
const HTTP_RUNS = Number(Deno.env.get("FUZZ_RUNS") ?? 1200);
const BUS_RUNS = Math.ceil(HTTP_RUNS / 3);
const MODERATION_SERVICES = ["content-state", "moderation", "review", "storage", "scheduler"];

const ITEM = "0af7651916cd43dd8448eb211c80319c";
/** A valid event of each consumed type, for mutation. */
function validEvent(type: string, itemId: string): Record<string, unknown> {
  const base = {
    id: `ev-${itemId}-${type}`,
    type,
    version: 1,
    item_id: itemId,
    trace_id: ITEM,
    time: "2026-01-01T00:00:00.000Z",
    source: "fuzz",
  };
  const data: Record<string, unknown> = {
    "feedback.ingested": { text: "The export crashes every time" },
    "content.uploaded": { text: "hello there", kind: "text" },
  };
  return { ...base, data: data[type] ?? { text: "x" } };
}

/** Valid bodies per route, which the fuzzer mutates. */
const SEEDS: Record<string, unknown[]> = {
  "POST /feedback": [{ text: "Love the app" }, { id: "fz-1", text: "crash", channel: "web" }],
  "POST /feedback/batch": [{ items: [{ text: "a" }, { text: "b" }] }],
  "POST /content": [{ text: "a picture of a cat" }],
  "POST /schedules": [{
    subject: "feedback.submit",
    payload: { text: "hi" },
    at: "2099-01-01T00:00:00Z",
  }],
  "POST /deadletters/redrive": [{ ids: [1] }, { filter: { stage: "topics" } }, { all: true }],
  "POST /reviews/:id/claim": [{ reviewer: "alice" }],
  "POST /reviews/:id/decision": [{ decision: "approve", reviewer: "alice", reason: "ok" }],
};

/** A request body: raw bytes, a string, any JSON, deep nesting, or a mutated valid body. */
const body = (route: string) => fuzzBody(SEEDS[route] ?? []);

const token = pathToken();

const CONTENT_TYPES = [
  "application/json",
  "application/problem+json",
  "text/plain",
  "application/octet-stream",
  "image/png",
  "multipart/form-data; boundary=x",
  "",
];

/** Whether a bus message passes the validation its consumer applies. */
function isValid(subject: string, payload: string | Uint8Array): boolean {
  try {
    const bytes = typeof payload === "string" ? new TextEncoder().encode(payload) : payload;
    const value = decodeJson(bytes);
    if (subject === "feedback.submit") validateDocument("feedback.submit", value);
    else {
      const type = subject.slice(0, subject.lastIndexOf(".")) as keyof EventMap;
      validateEvent(value, [type]);
    }
    return true;
  } catch {
    return false;
  }
}

const QUERY_KEYS = ["limit", "pending", "type", "replay", "status", "stage", "meta.a", "id"];

Deno.test({
  name:
    "fuzzed HTTP requests and bus messages never get a 5xx, never crash a service, and every bad message ends as a dead letter",
  // Long-lived SSE bodies are cancelled by the fuzzer; their timers end with the mesh.
  sanitizeOps: false,
  sanitizeResources: false,
}, async () => {
  await using mesh = await startServices({
    ...SERVICES_IN_ONE_PROCESS,
    services: [
      "state",
      "ingest",
      "sentiment",
      "topics",
      "dispatch",
      ...MODERATION_SERVICES,
      "gateway",
    ],
    env: { WEFT_SSE_KEEPALIVE_MS: "1000", WEFT_DIGEST_CRON: "off" },
  });

  // The route table, read from the gateway's own app (the same code the process runs).
  const config = loadConfig({ env: () => undefined, args: [] });
  const log = createLogger("fuzz", "error", () => {});
  const intake = await createIntake(mesh.nc);
  const moderation = await createModerationApi({ nc: mesh.nc, config, log, authEnabled: false });
  const app = createApp({
    nc: mesh.nc,
    jetStream: intake,
    config,
    log,
    auth: createAuth([]),
    extensions: [feedbackRoutes(intake), moderationRoutes(moderation)],
  });
  const routes = [
    ...new Set(
      app.routes
        .filter((r) => r.method !== "ALL" && !r.path.includes("*"))
        .map((r) => `${r.method} ${r.path}`),
    ),
  ];
  assert.ok(routes.length >= 15, `route table: ${routes.join(", ")}`);

  const request = fc.record({
    route: fc.constantFrom(...routes),
    method: fc.oneof(
      fc.constant(undefined),
      fc.constantFrom("GET", "POST", "PUT", "DELETE", "PATCH"),
    ),
    params: fc.array(token, { minLength: 3, maxLength: 3 }),
    query: fc.array(fc.tuple(fc.constantFrom(...QUERY_KEYS), fc.string({ maxLength: 12 })), {
      maxLength: 3,
    }),
    contentType: fc.constantFrom(...CONTENT_TYPES),
    idempotencyKey: fc.option(fc.string({ maxLength: 300 }), { nil: undefined }),
  }).chain((r) => body(r.route).map((b) => ({ ...r, body: b })));

  const failures: string[] = [];
  let statuses = new Map<number, number>();
  await fc.assert(
    fc.asyncProperty(request, async (r) => {
      const [routeMethod, pattern] = r.route.split(" ") as [string, string];
      let i = 0;
      const path = pattern.replace(/:[a-z]+/g, () => encodeURIComponent(r.params[i++]!));
      const qs = new URLSearchParams(r.query).toString();
      const method = r.method ?? routeMethod;
      const headers: Record<string, string> = {};
      if (r.contentType) headers["content-type"] = r.contentType;
      if (r.idempotencyKey !== undefined) {
        headers["idempotency-key"] = r.idempotencyKey.replace(/[^\x20-\x7e]/g, "");
      }
      const ac = new AbortController();
      const timer = setTimeout(() => ac.abort(), 10_000);
      try {
        const res = await fetch(`${mesh.gatewayUrl}${path}${qs ? `?${qs}` : ""}`, {
          method,
          headers,
          body: method === "GET" ? undefined : r.body,
          signal: ac.signal,
        });
        statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
        const type = res.headers.get("content-type") ?? "";
        if (type.startsWith("text/event-stream")) {
          await res.body?.cancel();
          return;
        }
        const text = await res.text();
        const sent = typeof r.body === "string" ? r.body : `${r.body?.length ?? 0} bytes`;
        const what = `${method} ${path}${qs ? `?${qs}` : ""} (${r.route}) ${
          JSON.stringify(headers)
        } ${sent.slice(0, 120)}: ${res.status} ${text.slice(0, 200)}`;
        if (res.status >= 500) failures.push(what);
        if (res.status >= 400) {
          if (!type.startsWith("application/problem+json")) failures.push(`not a problem: ${what}`);
          else {
            const p = JSON.parse(text);
            if (p.status !== res.status || typeof p.code !== "string" || !p.detail) {
              failures.push(`incomplete problem: ${what}`);
            }
          }
        }
      } finally {
        clearTimeout(timer);
      }
    }),
    { seed: SEED, numRuns: HTTP_RUNS, endOnFailure: true },
  );
  assert.deepEqual(failures.slice(0, 20), [], `${failures.length} bad answers`);

  // The bus: every subject a service consumes, with mutated valid events and garbage.
  const subjects = fc.oneof(
    fc.constant("feedback.submit"),
    // Every event type of both pipelines (stages and state writers consume them all).
    fc.constantFrom(...Object.values(FeedbackEventType), ...Object.values(ContentEventType)).chain((
      type,
    ) => fc.stringMatching(/^fz[A-Za-z0-9]{1,20}$/).map((id) => ({ type, id }))).map((
      { type, id },
    ) => `${type}.${id}`),
  );
  const message = subjects.chain((subject) => {
    const parts = subject.split(".");
    const seed = parts.length === 3
      ? validEvent(`${parts[0]}.${parts[1]}`, parts[2]!)
      : { text: "hello" };
    return fc.oneof(
      fc.uint8Array({ maxLength: 256 }).map((b) => new Uint8Array(b)),
      fc.jsonValue({ maxDepth: 3 }).map((v) => JSON.stringify(v)),
      mutated(seed).map((v) => JSON.stringify(v)),
    ).map((payload) => ({ subject, payload }));
  });
  const published: { subject: string; seq: number; payload: string | Uint8Array }[] = [];
  await fc.assert(
    fc.asyncProperty(message, async ({ subject, payload }) => {
      const ack = await mesh.js.publish(subject, payload);
      published.push({ subject, seq: ack.seq, payload });
    }),
    { seed: SEED, numRuns: BUS_RUNS },
  );

  // Nothing is left for redelivery on any durable consumer of either stream.
  for (const stream of [FEEDBACK_STREAM, CONTENT_STREAM]) {
    for await (const ci of mesh.jsm.consumers.list(stream)) {
      if (!ci.config.durable_name) continue; // SSE and listings' ordered consumers
      const name = ci.name;
      await waitUntil(
        async () => {
          const info = await mesh.jsm.consumers.info(stream, name);
          return info.num_ack_pending === 0 && info.num_pending === 0;
        },
        60_000,
        async () => {
          const info = await mesh.jsm.consumers.info(stream, name);
          return `${stream}/${name}: ${info.num_pending} pending, ${info.num_ack_pending} unacked`;
        },
      );
    }
  }
  // Every message that fails validation has a dead letter naming its stream sequence.
  const letters = await listDeadLetters(mesh.js, {}, 1_000_000);
  const lettered = new Set(letters.map((l) => l.letter.stream_seq));
  const invalid = published.filter((p) => !isValid(p.subject, p.payload));
  const missing = invalid.filter((p) => !lettered.has(p.seq));
  assert.deepEqual(
    missing.slice(0, 5).map((p) => `${p.subject}#${p.seq}: ${String(p.payload).slice(0, 80)}`),
    [],
    `${missing.length} of ${invalid.length} malformed messages have no dead letter`,
  );
  for (const l of letters) {
    assert.ok(l.letter.reason.length > 0, `dead letter with a reason: ${JSON.stringify(l.letter)}`);
  }
  assert.deepEqual(mesh.crashed(), [], "no service crashed");

  // A valid item still goes through.
  const res = await fetch(`${mesh.gatewayUrl}/feedback`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ text: "After all that, the export still crashes" }),
  });
  assert.equal(res.status, 202);
  const { id } = await res.json();
  await waitUntil(async () => {
    const s = await fetch(`${mesh.gatewayUrl}/feedback/${id}`).then((r) => r.json());
    return s.status === "processed";
  }, 30_000);

  const byStatus = Object.fromEntries([...statuses].sort((a, b) => a[0] - b[0]));
  statuses = new Map();
  Deno.stdout.writeSync(
    new TextEncoder().encode(
      `FUZZ-FIGURES ${
        JSON.stringify({
          seed: SEED,
          http: HTTP_RUNS,
          routes: routes.length,
          statuses: byStatus,
          bus: published.length,
          dead_letters: letters.length,
          malformed: invalid.length,
        })
      }\n`,
    ),
  );
});
