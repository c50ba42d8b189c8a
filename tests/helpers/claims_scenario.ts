/**
 * A team's own pipeline, run from its definition alone, registered by the test file of each
 * mode (tests/pipeline_e2e_test.ts: every service its own process;
 * tests/pipeline_e2e_together_test.ts: all in one, `WEFT_TOGETHER=all`). It writes a NEW
 * definition (insurance claims: an LLM summary, a branch, a human decision with a deadline
 * and a default action, a fan-out and a join with a deadline) into a temporary folder, starts
 * it with the supervisor `deno task start` uses, submits items over HTTP and over NATS, reads
 * SSE to the end, kills a step and the -flow service (together: the one process) with SIGKILL
 * mid-run, and checks that every item reached its expected outcome exactly once.
 *
 * @module
 */
import assert from "node:assert/strict";
import { jetstream } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/nats-core";
import { listDeadLetters } from "../../src/redrive.ts";
import { chat, startFakeOpenAI } from "./openai_server.ts";
import { meshTempDir, rebuildStateTask, removedAtEnd, startMesh } from "./mesh.ts";
import { waitFor } from "./wait.ts";
import { connectClient } from "./nats.ts";
import { readSse } from "./sse.ts";
import type { FaultMode } from "./fault_scenarios.ts";

const MOD = new URL("../../mod.ts", import.meta.url).href;

/** The definition a team would write: one file, the public API only. */
const DEFINITION = `
import { definePipeline } from "${MOD}";

const obj = { type: "object" } as const;
const sleep = (ms: number, signal: AbortSignal) =>
  new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => (clearTimeout(t), resolve(undefined)), { once: true });
  });

export const claims = definePipeline({
  name: "claims",
  description: "Insurance claims: LLM summary, human review of risky ones, checks in parallel",
  input: {
    schema: {
      type: "object",
      required: ["claimant", "amount", "text"],
      properties: {
        claimant: { type: "string" },
        amount: { type: "number", minimum: 0 },
        text: { type: "string", maxLength: 2000 },
      },
    },
  },
  start: "summarize",
  steps: {
    summarize: {
      kind: "llm",
      prompt: "prompts/summarize.md",
      output: {
        type: "object",
        required: ["summary", "risk"],
        properties: { summary: { type: "string" }, risk: { enum: ["low", "high"] } },
      },
      next: "assess",
    },
    assess: {
      kind: "router",
      route: (s: { risk: string }) => (s.risk === "high" ? "risky" : "plain"),
      routes: { risky: "review", plain: "checks" },
    },
    review: {
      kind: "wait",
      event: "decided",
      schema: {
        type: "object",
        required: ["approve"],
        properties: { approve: { type: "boolean" }, by: { type: "string" } },
      },
      timeoutMs: 5000,
      onTimeout: "expired",
      next: "verdict",
    },
    verdict: {
      kind: "router",
      route: (d: { approve?: boolean }) => (d.approve === true ? "approve" : "reject"),
      routes: { approve: "checks", reject: "rejected" },
    },
    checks: {
      kind: "task",
      output: { type: "object", required: ["amount", "batch"] },
      // Batched: the items that arrive within 50 ms in one call, each with its own result.
      flow: { batch: { maxItems: 8, maxWaitMs: 50 } },
      handleBatch: (values: unknown[], ctxs: { input: { amount: number } }[]) =>
        ctxs.map((c) => ({ amount: c.input.amount, batch: values.length })),
      next: ["fraud", "policy"],
    },
    fraud: {
      kind: "task",
      replicas: 2,
      output: { type: "object", required: ["score"] },
      handle: (c: { amount: number }) => ({ score: c.amount > 1000 ? 0.7 : 0.1 }),
      next: "decide",
    },
    policy: {
      kind: "task",
      output: obj,
      handle: async (_c: unknown, ctx: { input: { text: string }; signal: AbortSignal }) => {
        if (ctx.input.text.includes("stall")) await sleep(60_000, ctx.signal);
        return { covered: true };
      },
      next: "decide",
    },
    decide: {
      kind: "join",
      after: ["fraud", "policy"],
      deadlineMs: 20_000,
      onDeadline: "escalated",
      next: "paid",
    },
    paid: { kind: "end", outcome: "paid" },
    rejected: { kind: "end", outcome: "rejected" },
    expired: { kind: "end", outcome: "expired" },
    escalated: { kind: "end", outcome: "escalated" },
  },
});
`;

const FINALS = ["paid", "rejected", "expired", "escalated", "failed"].map((o) => `claims.${o}`);

async function post(base: string, path: string, body: unknown) {
  const res = await fetch(`${base}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  return { status: res.status, body: await res.json() };
}

/** Every event of the CLAIMS stream: type and item, in stream order. */
async function allEvents(nc: NatsConnection): Promise<{ type: string; item: string }[]> {
  const js = jetstream(nc);
  const c = await js.consumers.get("CLAIMS");
  const out: { type: string; item: string }[] = [];
  const info = await c.info();
  const total = info.num_pending;
  if (total === 0) return out;
  const it = await c.fetch({ max_messages: total, expires: 5000 });
  for await (const m of it) {
    const [, token, item] = m.subject.split(".");
    out.push({ type: `claims.${token}`, item: item! });
    if (out.length >= total) break;
  }
  return out;
}

/**
 * The pids of a pipeline service's own processes (`together`: the one process's) among the
 * descendants of `root` (the mesh's `deno task start`): the other mode's test may run a mesh
 * of the same definition beside this one.
 */
async function pidsOf(root: number, service: string): Promise<number[]> {
  const out = await new Deno.Command("ps", { args: ["-eo", "pid,ppid,args"], stdout: "piped" })
    .output();
  const rows = new TextDecoder().decode(out.stdout).split("\n").slice(1)
    .map((l) => l.trim().split(/\s+/))
    .filter((f) => f.length >= 3)
    .map((f) => ({ pid: Number(f[0]), ppid: Number(f[1]), args: f.slice(2).join(" ") }));
  const mine = new Set([root]);
  for (let grew = true; grew;) {
    grew = false;
    for (const r of rows) {
      if (mine.has(r.ppid) && !mine.has(r.pid)) (mine.add(r.pid), grew = true);
    }
  }
  return rows
    .filter((r) =>
      mine.has(r.pid) &&
      (service === "together"
        ? r.args.includes("services/together.ts") && r.args.includes(" claims-flow")
        : r.args.includes("services/pipeline.ts") && r.args.endsWith(` ${service}`))
    )
    .map((r) => r.pid);
}

/**
 * Registers the end-to-end test of the claims definition in `mode`: every service its own
 * process, or every one in one process (`WEFT_TOGETHER=all`), where the kill of the -flow
 * service kills the one process, gateway included.
 */
export function claimsEndToEnd(mode: FaultMode): void {
  Deno.test(`${mode.name}a new definition runs end to end: LLM, branch, human wait with deadline, fan-out, join, kills`, async (t) => {
    const llm = startFakeOpenAI((req) => {
      const text = req.body.messages.at(-1)!.content;
      return chat({ summary: text.slice(0, 40), risk: /urgent/.test(text) ? "high" : "low" });
    });
    const dir = await meshTempDir("weft-claims-");
    await using _dir = removedAtEnd(dir);
    await Deno.mkdir(`${dir}/def/prompts`, { recursive: true });
    await Deno.writeTextFile(`${dir}/def/claims.ts`, DEFINITION);
    await Deno.writeTextFile(
      `${dir}/def/prompts/summarize.md`,
      "Summarise the claim in one sentence and rate its risk. Reply with JSON matching {{schema}}.",
    );
    await using mesh = await startMesh({
      WEFT_PIPELINES: `${dir}/def/claims.ts`,
      WEFT_LLM_BASE_URL: llm.baseUrl,
      WEFT_LLM_API_KEY: "test-key",
      WEFT_LLM_MODEL: "fake-model",
      WEFT_MAX_ATTEMPTS: "5",
      WEFT_RETRY_BASE_MS: "100",
      // What the killed step held is redelivered after the ack wait: well inside the join's
      // deadline, also on a loaded machine.
      WEFT_ACK_WAIT_MS: "2000",
      ...(mode.together ? { WEFT_TOGETHER: "all" } : {}),
    }, { storeDir: `${dir}/nats` });
    const base = mesh.gatewayUrl;
    await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "the mesh to be ready");
    const nc = await connectClient(mesh.natsUrl, "test-ops", mesh.credentials("ops"));
    const expected = new Map<string, string>();
    try {
      await t.step(
        "GET /openapi.json describes the pipeline's routes, input and decision schemas",
        async () => {
          const doc = await (await fetch(`${base}/openapi.json`)).json();
          assert.equal(doc.openapi, "3.1.0");
          assert.ok(doc.paths["/pipelines/claims/items"].post);
          const decided = doc.paths["/pipelines/claims/items/{id}/decided"].post;
          // The wait's schema describes the decision's body.
          assert.deepEqual(
            decided.requestBody.content["application/json"].schema.required,
            ["approve"],
          );
          assert.deepEqual(doc.components.schemas["pipeline.claims.input"].required, [
            "claimant",
            "amount",
            "text",
          ]);
        },
      );

      await t.step(
        "a repeated Idempotency-Key is the same item; the real nats CLI submits and reads",
        async () => {
          const once = async () =>
            await (await fetch(`${base}/pipelines/claims/items`, {
              method: "POST",
              headers: { "content-type": "application/json", "Idempotency-Key": "claim-77" },
              body: JSON.stringify({ claimant: "zed", amount: 1, text: "a scratch" }),
            })).json();
          const [a, b] = [await once(), await once()];
          assert.equal(a.id, b.id);
          expected.set(a.id, "paid");
          const nats = async (...args: string[]) => {
            const out = await new Deno.Command("nats", {
              args: [
                "--server",
                mesh.natsUrl,
                "--nkey",
                mesh.credentials("ops").nkeySeedFile!,
                "--inbox-prefix",
                "_INBOX_ops",
                ...args,
              ],
              stdin: "null",
              stdout: "piped",
              stderr: "piped",
            }).output();
            const text = new TextDecoder().decode(out.stdout);
            assert.ok(out.success, new TextDecoder().decode(out.stderr));
            return text;
          };
          const reply = JSON.parse(
            await nats(
              "req",
              "weft.claims.submit",
              '{"claimant":"cli","amount":2,"text":"hail"}',
              "--raw",
            ),
          );
          assert.equal(reply.status, "accepted");
          expected.set(reply.id, "paid");
          await waitFor(
            async () => {
              const raw = await nats("kv", "get", "weft_claims_state", reply.id, "--raw").catch(
                () => "",
              );
              return raw.includes('"outcome":"paid"') ? raw : undefined;
            },
            30_000,
            "the CLI item paid, read with nats kv get",
          );
          const got = JSON.parse(await nats("req", "weft.claims.get", reply.id, "--raw"));
          assert.equal(got.outcome, "paid");
        },
      );

      await t.step("a bad input is refused with a problem naming the field", async () => {
        const bad = await post(base, "/pipelines/claims/items", { claimant: "x", text: "hi" });
        assert.equal(bad.status, 422);
        assert.equal(bad.body.field, "/amount");
      });

      await t.step(
        "items over HTTP and over NATS; a step killed with SIGKILL mid-run",
        async () => {
          const submit = async (body: unknown, outcome: string) => {
            const r = await post(base, "/pipelines/claims/items", body);
            assert.equal(r.status, 202, JSON.stringify(r.body));
            expected.set(r.body.id, outcome);
            return r.body.id as string;
          };
          const plain = await submit({ claimant: "ann", amount: 120, text: "a dent" }, "paid");
          const approved = await submit(
            { claimant: "bo", amount: 9000, text: "urgent: fire" },
            "paid",
          );
          const refused = await submit(
            { claimant: "cy", amount: 5000, text: "urgent: flood" },
            "rejected",
          );
          const ignored = await submit(
            { claimant: "di", amount: 700, text: "urgent: theft" },
            "expired",
          );
          const stalled = await submit(
            { claimant: "ed", amount: 50, text: "stall please" },
            "escalated",
          );
          // Twenty more on the bus, as `nats pub claims.submit '{...}'` would.
          for (let i = 0; i < 20; i++) {
            nc.publish(
              "claims.submit",
              JSON.stringify({ claimant: `bus${i}`, amount: i, text: "x" }),
            );
          }
          await nc.flush();
          // The fraud step runs as two replicas (together: one in the one process, one alone); one
          // process of its own dies at once, mid-run, and is restarted.
          assert.equal(
            (await pidsOf(mesh.child.pid, "claims-fraud")).length,
            mode.together ? 1 : 2,
            "fraud's own processes",
          );
          Deno.kill((await pidsOf(mesh.child.pid, "claims-fraud"))[0]!, "SIGKILL");

          // The human decisions: one over HTTP, one on the bus; the third never comes.
          const waiting = async (id: string) =>
            await waitFor(
              async () => {
                const s = await (await fetch(`${base}/pipelines/claims/items/${id}`)).json();
                return s.status === "waiting" ? s : undefined;
              },
              // After a kill: a restart on a loaded machine (the one process, together) is slow.
              60_000,
              `${id} waiting for a decision`,
            );
          const w = await waiting(approved);
          assert.equal(w.waiting.event, "claims.decided");
          assert.ok(Date.parse(w.waiting.until) > Date.parse(w.updated_at));
          // A decision the wait's schema refuses: 422 naming the field, and the item waits on.
          const bad = await post(base, `/pipelines/claims/items/${approved}/decided`, {
            approve: "yes",
          });
          assert.equal(bad.status, 422);
          assert.equal(bad.body.code, "invalid_awaited_event");
          assert.equal(bad.body.field, "/approve");
          // A reviewer claims it first (the gateway writes weft_claims_claims under its own
          // identity); the claim's holder decides.
          const claimed = await post(base, `/pipelines/claims/claims/${approved}`, { by: "carol" });
          assert.equal(claimed.status, 200, JSON.stringify(claimed.body));
          assert.equal(claimed.body.claim.by, "carol");
          const d = await post(base, `/pipelines/claims/items/${approved}/decided?by=carol`, {
            approve: true,
          });
          assert.equal(d.status, 202);
          await waiting(refused);
          // On the bus, bad decisions are dead-lettered without failing the item: one its schema
          // refuses, one that is not JSON, one nested too deep to read. Then a good one follows.
          nc.publish(`claims.decided.${refused}`, JSON.stringify({ by: "mallory" }));
          nc.publish(`claims.decided.${refused}`, "approve");
          nc.publish(`claims.decided.${refused}`, "[".repeat(100) + "]".repeat(100));
          const letters = await waitFor(
            async () => {
              const all = (await listDeadLetters(jetstream(nc), { item_id: refused }))
                .filter((l) => l.letter.stage === "claims-control");
              return all.length === 3 ? all : undefined;
            },
            20_000,
            "the bad decisions' dead letters",
          );
          const schemaLetter = letters.find((l) => l.letter.code === "invalid_awaited_event")!;
          assert.match(schemaLetter.letter.reason, /\/approve is required/);
          assert.deepEqual(letters.map((l) => l.letter.code).sort(), [
            "invalid_awaited_event",
            "invalid_event",
            "invalid_event",
          ]);
          assert.equal((await waiting(refused)).status, "waiting", "bad decisions fail no item");
          nc.publish(`claims.decided.${refused}`, JSON.stringify({ approve: false, by: "carol" }));
          // The -flow service (intake, joins, waits, their timers, item state) dies at once, with
          // the decision and the joins in flight; the supervisor restarts it. Together, the one
          // process dies: every step, the state writer and the gateway with it.
          await nc.flush();
          Deno.kill(
            (await pidsOf(mesh.child.pid, mode.together ? "together" : "claims-flow"))[0]!,
            "SIGKILL",
          );
          await waiting(ignored);

          // An item's SSE stream, read to its end.
          const frames = await readSse(
            await fetch(`${base}/pipelines/claims/items/${plain}/events`),
            { timeoutMs: 30_000 },
          );
          assert.deepEqual(frames.map((f) => f.event), [
            "claims.submitted",
            "claims.summarize",
            "claims.assess",
            "claims.checks",
            ...(frames.findIndex((f) => f.event === "claims.fraud") <
                frames.findIndex((f) => f.event === "claims.policy")
              ? ["claims.fraud", "claims.policy"]
              : ["claims.policy", "claims.fraud"]),
            "claims.decide",
            "claims.paid",
          ]);
          void stalled;
        },
      );

      await t.step("every item reaches its expected outcome exactly once", async () => {
        let events: { type: string; item: string }[] = [];
        await waitFor(
          async () => {
            events = await allEvents(nc);
            const ends = events.filter((e) => FINALS.includes(e.type));
            return ends.length >= 27 ? true : undefined;
          },
          60_000,
          "27 items at an end",
        );
        const bus = [
          ...new Set(events.filter((e) => e.type === "claims.submitted").map((e) => e.item)),
        ]
          .filter((id) => !expected.has(id));
        assert.equal(bus.length, 20, "every bus submission became an item");
        for (const id of bus) expected.set(id, "paid");
        for (const [id, outcome] of expected) {
          const ends = events.filter((e) => e.item === id && FINALS.includes(e.type));
          assert.deepEqual(
            ends.map((e) => e.type),
            [`claims.${outcome}`],
            `${id}: ${
              JSON.stringify(events.filter((e) => e.item === id).map((e) => e.type))
            }; all ends: ${JSON.stringify(events.filter((e) => FINALS.includes(e.type)))}`,
          );
          // The state follows its events within a few state-writer flushes.
          const state = await waitFor(
            async () => {
              const s = await (await fetch(`${base}/pipelines/claims/items/${id}`)).json();
              return s.outcome ? s : undefined;
            },
            10_000,
            `${id}'s state`,
          );
          assert.equal(state.outcome, outcome, id);
          if (state.results.checks) {
            // Batched or not, each item's result is its own.
            assert.equal(state.results.checks.amount, state.input.amount, id);
            assert.ok(state.results.checks.batch >= 1 && state.results.checks.batch <= 8);
          }
          assert.equal(state.status, "done");
          assert.match(state.definition, /^[0-9a-f]{16}$/);
        }
        // The LLM was asked once per item (a redelivery would be answered by its cache).
        assert.ok(llm.requests.length >= 27);
        const killed = mesh.logs.some((l) =>
          l.msg === "service exited; restarting" && String(l.child).startsWith("claims-fraud#")
        );
        assert.ok(killed, "the supervisor restarted the killed step");
        assert.ok(
          mesh.logs.some((l) =>
            l.msg === "service exited; restarting" &&
            String(l.child).startsWith(mode.together ? "together" : "claims-flow")
          ),
          "the supervisor restarted the killed -flow service",
        );
      });

      await t.step("a submission scheduled over /schedules becomes an item", async () => {
        const scheduled = await post(base, "/schedules", {
          subject: "claims.submit",
          payload: { claimant: "cron", amount: 4, text: "monthly" },
          at: new Date().toISOString(),
        });
        assert.equal(scheduled.status, 201, JSON.stringify(scheduled.body));
        const id = await waitFor(
          async () => {
            const events = await allEvents(nc);
            const fresh = events.find((e) =>
              e.type === "claims.submitted" && !expected.has(e.item)
            );
            return fresh && events.some((e) => e.item === fresh.item && e.type === "claims.paid")
              ? fresh.item
              : undefined;
          },
          30_000,
          "the scheduled item paid (the scheduler may publish the definition's input)",
        );
        expected.set(id, "paid");
      });

      await t.step(
        "deno task rebuild-state --pipeline claims: the stream rebuilds the live state",
        async () => {
          let figures: Record<string, number> = {};
          // The state writer flushes within milliseconds; a loaded machine may need a retry.
          await waitFor(
            async () => {
              const r = await rebuildStateTask({
                NATS_URL: mesh.natsUrl,
                WEFT_NATS_NKEY: mesh.credentials("ops").nkeySeedFile!,
                WEFT_PIPELINES: `${dir}/def/claims.ts`,
              }, "claims");
              figures = r.figures;
              return r.code === 0 ? true : undefined;
            },
            20_000,
            "rebuild-state to agree with the bucket",
          );
          assert.equal(figures.items, expected.size);
          assert.equal(figures.equal, expected.size);
          assert.equal(figures.different, 0);
        },
      );
    } finally {
      await nc.close();
      await llm.close();
    }
  });
}
