/**
 * Generative fuzzing of a pipeline loaded from a definition (the shipped support agents),
 * run by the supervisor exactly as `deno task start` runs it: every HTTP route under
 * /pipelines, and every subject of the pipeline on the bus, forged by a client that may
 * publish anything (the mesh's admin identity).
 *
 * The properties, the same as tests/fuzz_test.ts's for the built-in pipelines:
 * - HTTP: no request, however malformed, gets a 5xx; every error is
 *   application/problem+json with its status, a stable code and a detail.
 * - Bus: every message is handled or dead-lettered, nothing is left for redelivery, every
 *   message that fails validation has a dead letter with a reason, and no service crashes;
 *   poison too deep to parse or too big for a dead letter's body ends as a dead letter too.
 * - Afterwards, a valid item still goes through.
 *
 * Inputs come from fast-check with a fixed seed (`FUZZ_SEED`, `FUZZ_RUNS`).
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { listDeadLetters } from "../src/redrive.ts";
import { decodeJson } from "../src/runner.ts";
import { decodeFlowEvent } from "../src/pipeline/flow.ts";
import { pipelineSubjects } from "../src/pipeline/derive.ts";
import { loadPipelines } from "../src/pipeline/runtime.ts";
import { ONE_PROCESS, startMesh } from "./helpers/mesh.ts";
import { fuzzBody, mutated, pathToken } from "./helpers/fuzz.ts";
import { waitFor } from "./helpers/wait.ts";
import { connectClient } from "./helpers/nats.ts";

const SEED = Number(Deno.env.get("FUZZ_SEED") ?? 20261204);
const HTTP_RUNS = Math.ceil(Number(Deno.env.get("FUZZ_RUNS") ?? 1200) / 3);
const BUS_RUNS = Math.ceil(HTTP_RUNS / 2);
const DEF = "pipelines/support/pipeline.ts";
const root = new URL("../", import.meta.url).pathname;
const [support] = await loadPipelines([DEF], root);
const { flow, def } = support!;
const NAME = def.name;
const STREAM = pipelineSubjects(def).stream;

const INPUT = { customer: "ann", text: "Where is my order?", order_id: "A100" };

/** A request body for `route`, from its valid bodies. */
function body(route: string): fc.Arbitrary<string | Uint8Array<ArrayBuffer> | undefined> {
  return fuzzBody(
    route.endsWith("/batch")
      ? [{ items: [INPUT, { ...INPUT, customer: "bob" }] }]
      : route.endsWith("/:event")
      ? [{ by: "carol", answer: "Refunded." }]
      : [INPUT],
  );
}

/** A path parameter: mostly plausible, sometimes hostile. */
const token = pathToken(NAME, "human_replied");

/** Whether a message on `subject` passes the validation the pipeline's consumers apply. */
function isValid(subject: string, payload: string | Uint8Array): boolean {
  try {
    const bytes = typeof payload === "string" ? new TextEncoder().encode(payload) : payload;
    const value = decodeJson(bytes);
    const token = subject.split(".")[1]!;
    if (token === "submit") return flow.checkInput(value) === true;
    if (flow.roles.get(token)?.role === "awaited") {
      return value !== null && typeof value === "object" && !Array.isArray(value);
    }
    decodeFlowEvent(flow, value, subject);
    return true;
  } catch {
    return false;
  }
}

Deno.test({
  name:
    "fuzzed HTTP requests and forged bus events to a definition's pipeline never get a 5xx, never crash a step, and every bad message ends as a dead letter",
  // Long-lived SSE bodies are cancelled by the fuzzer; their timers end with the mesh.
  sanitizeOps: false,
  sanitizeResources: false,
}, async () => {
  // One process (ONE_PROCESS): a crash of any step is still a restart of that process.
  await using mesh = await startMesh({
    ...ONE_PROCESS,
    WEFT_PIPELINES: DEF,
    WEFT_SSE_KEEPALIVE_MS: "1000",
    WEFT_DIGEST_CRON: "off",
  });
  await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
  const nc = await connectClient(mesh.natsUrl, "fuzz-admin", mesh.credentials("admin"));
  try {
    const js = jetstream(nc);
    const jsm = await jetstreamManager(nc);

    // ---------------------------------------------------------------- HTTP
    const routes = [
      "GET /pipelines",
      "POST /pipelines/:name/items",
      "POST /pipelines/:name/items/batch",
      "GET /pipelines/:name/items/:id",
      "GET /pipelines/:name/items/:id/events",
      "GET /pipelines/:name/events",
      "POST /pipelines/:name/items/:id/:event",
    ];
    const request = fc.record({
      route: fc.constantFrom(...routes),
      // Mostly the real pipeline, so the fuzz reaches past the 404 of an unknown name.
      name: fc.oneof(fc.constant(NAME), fc.constant(NAME), token),
      params: fc.array(token, { minLength: 2, maxLength: 2 }),
      method: fc.oneof(fc.constant(undefined), fc.constantFrom("GET", "POST", "PUT", "DELETE")),
      // Mostly JSON, so the fuzz reaches past the 415 of another media type.
      contentType: fc.oneof(
        { arbitrary: fc.constant("application/json"), weight: 4 },
        { arbitrary: fc.constantFrom("text/plain", "image/png", ""), weight: 1 },
      ),
      idempotencyKey: fc.option(fc.string({ maxLength: 300 }), { nil: undefined }),
      replay: fc.option(fc.constantFrom("true", "false", "x"), { nil: undefined }),
    }).chain((r) => body(r.route).map((b) => ({ ...r, body: b })));

    const failures: string[] = [];
    const statuses = new Map<number, number>();
    await fc.assert(
      fc.asyncProperty(request, async (r) => {
        const [routeMethod, pattern] = r.route.split(" ") as [string, string];
        let i = 0;
        const path = pattern.replace(":name", encodeURIComponent(r.name))
          .replace(/:[a-z]+/g, () => encodeURIComponent(r.params[i++]!));
        const method = r.method ?? routeMethod;
        const headers: Record<string, string> = {};
        if (r.contentType) headers["content-type"] = r.contentType;
        if (r.idempotencyKey !== undefined) {
          headers["idempotency-key"] = r.idempotencyKey.replace(/[^\x20-\x7e]/g, "");
        }
        const qs = r.replay === undefined ? "" : `?replay=${r.replay}`;
        const ac = new AbortController();
        const timer = setTimeout(() => ac.abort(), 10_000);
        try {
          const res = await fetch(`${mesh.gatewayUrl}${path}${qs}`, {
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
          const what = `${method} ${path}${qs} ${JSON.stringify(headers)} ${
            sent.slice(0, 120)
          }: ${res.status} ${text.slice(0, 200)}`;
          if (res.status >= 500) failures.push(what);
          if (res.status >= 400) {
            if (!type.startsWith("application/problem+json")) {
              failures.push(`not a problem: ${what}`);
            } else {
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
    assert.ok((statuses.get(202) ?? 0) > 0, `some submissions were accepted: ${[...statuses]}`);

    // ---------------------------------------------------------------- the bus
    // Every event type of the pipeline, its submit subject, on items of the fuzzer's own.
    const tokens = [...flow.roles.keys(), "submit"];
    const seedEvent = (subject: string): Record<string, unknown> => {
      const [, token, item] = subject.split(".") as [string, string, string | undefined];
      if (token === "submit") return INPUT;
      if (flow.roles.get(token)?.role === "awaited") return { by: "carol", answer: "ok" };
      return {
        id: `ev-${item}-${token}`,
        type: `${NAME}.${token}`,
        item_id: item,
        trace_id: "0af7651916cd43dd8448eb211c80319c",
        time: "2026-01-01T00:00:00.000Z",
        source: "fuzz",
        definition: def.hash,
        data: { input: INPUT, value: INPUT, results: {}, runs: {} },
      };
    };
    const message = fc.tuple(
      fc.constantFrom(...tokens),
      fc.stringMatching(/^fz[A-Za-z0-9]{1,20}$/),
    ).map(([t, id]) => t === "submit" ? `${NAME}.submit` : `${NAME}.${t}.${id}`).chain((
      subject,
    ) =>
      fc.oneof(
        fc.uint8Array({ maxLength: 256 }).map((b) => new Uint8Array(b)),
        fc.jsonValue({ maxDepth: 3 }).map((v) => JSON.stringify(v)),
        mutated(seedEvent(subject)).map((v) => JSON.stringify(v)),
      ).map((payload) => ({ subject, payload }))
    );
    const published: { subject: string; seq: number; payload: string | Uint8Array }[] = [];
    await fc.assert(
      fc.asyncProperty(message, async ({ subject, payload }) => {
        const ack = await js.publish(subject, payload);
        published.push({ subject, seq: ack.seq, payload });
      }),
      { seed: SEED, numRuns: BUS_RUNS },
    );
    // Poison of the shapes that once escaped as drops: nesting too deep to parse, a body
    // too big for a dead letter to carry whole, and invalid UTF-8.
    const poison: [string, string | Uint8Array][] = [
      [`${NAME}.route.fzdeep`, "[".repeat(100_000) + "]".repeat(100_000)],
      [`${NAME}.billing.fzbig`, JSON.stringify({ junk: '"'.repeat(400_000) })],
      [`${NAME}.submit`, new Uint8Array(800_000).fill(0xff)],
    ];
    for (const [subject, payload] of poison) {
      const ack = await js.publish(subject, payload);
      published.push({ subject, seq: ack.seq, payload });
    }

    // Nothing is left for redelivery on any durable consumer of the pipeline's stream.
    for await (const ci of jsm.consumers.list(STREAM)) {
      if (!ci.config.durable_name) continue; // SSE's and listings' ordered consumers
      const name = ci.name;
      await waitFor(
        async () => {
          const info = await jsm.consumers.info(STREAM, name);
          return info.num_ack_pending === 0 && info.num_pending === 0 || undefined;
        },
        90_000,
        `${STREAM}/${name} to have nothing pending`,
      );
    }
    // Every message that fails validation has a dead letter naming its stream sequence.
    const letters = (await listDeadLetters(js, {}, 1_000_000)).filter((l) =>
      l.letter.subject.startsWith(`${NAME}.`)
    );
    const lettered = new Set(letters.map((l) => `${l.letter.subject}#${l.letter.stream_seq}`));
    const invalid = published.filter((p) => !isValid(p.subject, p.payload));
    const missing = invalid.filter((p) => !lettered.has(`${p.subject}#${p.seq}`));
    assert.deepEqual(
      missing.slice(0, 5).map((p) => `${p.subject}#${p.seq}: ${String(p.payload).slice(0, 80)}`),
      [],
      `${missing.length} of ${invalid.length} malformed messages have no dead letter`,
    );
    for (const l of letters) {
      assert.ok(l.letter.reason.length > 0, `a dead letter with a reason: ${l.letter.subject}`);
    }
    for (const [subject] of poison) {
      assert.ok(letters.some((l) => l.letter.subject === subject), `poison on ${subject} lettered`);
    }
    const restarts = mesh.logs.filter((l) => l.msg === "service exited; restarting");
    assert.deepEqual(restarts, [], "no step crashed");

    // A valid item still goes through to its outcome.
    const res = await fetch(`${mesh.gatewayUrl}/pipelines/${NAME}/items`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ customer: "zed", text: "How do I reset my password?" }),
    });
    assert.equal(res.status, 202);
    const { id } = await res.json();
    await waitFor(
      async () => {
        const s = await (await fetch(`${mesh.gatewayUrl}/pipelines/${NAME}/items/${id}`)).json();
        return s.status === "done" || undefined;
      },
      60_000,
      `${id} done`,
    );

    Deno.stdout.writeSync(
      new TextEncoder().encode(
        `FUZZ-FIGURES ${
          JSON.stringify({
            pipeline: NAME,
            seed: SEED,
            http: HTTP_RUNS,
            statuses: Object.fromEntries([...statuses].sort((a, b) => a[0] - b[0])),
            bus: published.length,
            dead_letters: letters.length,
            malformed: invalid.length,
          })
        }\n`,
      ),
    );
  } finally {
    await nc.close();
  }
});
