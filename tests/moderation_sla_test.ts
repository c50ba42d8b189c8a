/**
 * Review SLAs and durability over real processes: every service is killed while items
 * wait for review, restarted, and nothing is lost; a deadline that was pending in NATS
 * during the outage still escalates the item, and after the second timeout the default
 * action decides it. Authentication is off here (no keys configured): reviewers name
 * themselves in the body.
 */
import assert from "node:assert/strict";
import { freePort, startNatsServer } from "../src/nats_server.ts";
import { has, waitForEvents } from "./helpers/content_events.ts";
import { MODERATION_SERVICES, SERVICES_IN_ONE_PROCESS, startServices } from "./helpers/mesh.ts";
import { connectClient } from "./helpers/nats.ts";

const TOXIC = "You idiot, this is the most pathetic service ever.";

// deno-lint-ignore no-explicit-any
type Json = Record<string, any>;

async function call(base: string, method: string, path: string, body?: unknown) {
  const res = await fetch(`${base}${path}`, {
    method,
    headers: body === undefined ? {} : { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, body: (text ? JSON.parse(text) : null) as Json };
}

Deno.test({
  name:
    "items waiting for review survive a restart of every service, and SLAs escalate then apply the default action",
  sanitizeOps: true,
  sanitizeResources: true,
  async fn() {
    await using server = await startNatsServer();
    const port = freePort();
    const base = `http://127.0.0.1:${port}`;
    await using mesh = await startServices({
      ...SERVICES_IN_ONE_PROCESS,
      services: MODERATION_SERVICES,
      parallel: true,
      nats: server,
      port,
      baseEnv: {},
      env: {
        WEFT_LOG_LEVEL: "info",
        // Long enough that a restart of every service on a loaded machine ends before it.
        WEFT_REVIEW_SLA_MS: "12000",
        WEFT_ESCALATION_SLA_MS: "2000",
        WEFT_SLA_DEFAULT_ACTION: "reject",
      },
    });
    const nc = await connectClient(server.url, "test");
    try {
      const a = (await call(base, "POST", "/content", { text: TOXIC })).body.id as string;
      const b = (await call(base, "POST", "/content", { text: `${TOXIC} moron` })).body
        .id as string;
      await waitForEvents(nc, a, has("content.review_requested"));
      await waitForEvents(nc, b, has("content.review_requested"));
      const schedules = (await call(base, "GET", "/schedules")).body.items as Json[];
      assert.ok(schedules.some((s) => s.id === `content.sla-1-${b}`), "the deadline lives in NATS");

      // Every process dies at once, without draining; NATS keeps running.
      await mesh.stopAll("SIGKILL");
      await mesh.startAll();

      const pending = (await call(base, "GET", "/reviews?status=pending")).body.items as Json[];
      // Oldest first means by the time each entered the queue (its moderation), which for
      // two items moderated concurrently need not be the order they were posted in.
      assert.deepEqual(pending.map((e) => e.id).sort(), [a, b].sort(), "the queue survived");
      const queuedAt = pending.map((e) => e.queued_at as string);
      assert.deepEqual(queuedAt, [...queuedAt].sort(), "oldest first");
      const decided = await call(base, "POST", `/reviews/${a}/decision`, {
        decision: "approve",
        reason: "fine in context",
        reviewer: "carol",
      });
      assert.equal(decided.status, 200);
      const aEvents = await waitForEvents(nc, a, has("content.published"));
      for (const type of ["content.uploaded", "content.moderated", "content.review_requested"]) {
        assert.equal(aEvents.filter((e) => e.type === type).length, 1, `one ${type}`);
      }
      const afterDecision = (await call(base, "GET", "/schedules")).body.items as Json[];
      assert.ok(
        !afterDecision.some((s) => s.id === `content.sla-1-${a}`),
        "a decision cancels its SLA",
      );

      // b's review deadline was pending while the scheduler was dead: it still fires.
      const escalated = await waitForEvents(nc, b, has("content.escalated"), 25_000);
      assert.equal(escalated.find((e) => e.type === "content.escalated")!.event.data.level, 1);
      const escalationQueue = (await call(base, "GET", "/reviews?status=escalated")).body
        .items as Json[];
      assert.ok(escalationQueue.some((e) => e.id === b), "b moved to the escalation queue");

      const final = await waitForEvents(nc, b, has("content.archived"), 15_000);
      const decision = final.find((e) => e.type === "content.decided")!.event.data;
      assert.equal(decision.automatic, true);
      assert.equal(decision.decision, "reject");
      assert.equal(decision.reviewer, "weft-sla");
      assert.equal(final.filter((e) => e.type === "content.escalated").length, 1);
      assert.equal(final.filter((e) => e.type === "content.decided").length, 1);

      const late = await call(base, "POST", `/reviews/${b}/decision`, {
        decision: "approve",
        reason: "too late",
        reviewer: "carol",
      });
      assert.equal(late.status, 409, "the default action's decision stands");
    } finally {
      await nc.close();
    }
  },
});
