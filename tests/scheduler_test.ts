/**
 * The scheduler over real processes: two replicas watching the same schedules fire each
 * firing exactly once, and a deadline that passed while no replica ran fires once after
 * a restart.
 */
import assert from "node:assert/strict";
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import type { Msg } from "@nats-io/nats-core";
import { loadConfig } from "../src/config.ts";
import { freePort, startNatsServer } from "../src/nats_server.ts";
import { writeAuthConfig } from "../src/supervisor.ts";
import { createScheduleStore } from "../src/scheduler/store.ts";
import { SCHEDULE_BUCKET, SCHEDULE_LEASE_BUCKET, subjectAllowed } from "../src/subjects.ts";
import { callerSchedulableSubjects } from "../src/wiring.ts";
import { SHIPPED_PIPELINES } from "../pipelines/shipped.ts";
import { leaseKey, runScheduler } from "../src/scheduler/scheduler.ts";
import { createLogger } from "../src/observability/log.ts";
import { ensureTopology } from "../src/topology.ts";
import { startService } from "./helpers/mesh.ts";
import { Hono } from "hono";
import {
  lazyScheduleStore,
  scheduleRoutes,
  scheduleTargets,
  serveScheduleRequests,
} from "../src/gateway/schedules.ts";
import { definePipeline } from "../src/pipeline/definition.ts";
import { compileFlow } from "../src/pipeline/flow.ts";
import { type LoadedPipeline, pipelineTopology } from "../src/pipeline/runtime.ts";
import { createAuth } from "../src/gateway/auth.ts";
import { problemResponse } from "../src/gateway/app.ts";
import { connectClient, PATIENT, startTestNats, testConfig } from "./helpers/nats.ts";
import { waitFor } from "./helpers/wait.ts";
/** Collects the firings seen on a core subscription (every publish, before dedupe). */
function firings(nc: Awaited<ReturnType<typeof connectClient>>, subject: string) {
  const seen: { schedule: string; at: string }[] = [];
  const waiters: { pred: () => boolean; resolve: () => void }[] = [];
  const sub = nc.subscribe(subject, {
    callback: (_e, m: Msg) => {
      seen.push({
        schedule: m.headers?.get("Weft-Schedule-Id") ?? "",
        at: m.headers?.get("Weft-Fire-Time") ?? "",
      });
      for (const w of [...waiters]) if (w.pred()) w.resolve();
    },
  });
  const until = (pred: () => boolean, timeoutMs = 10_000) =>
    pred() ? Promise.resolve() : new Promise<void>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`timed out; saw ${JSON.stringify(seen)}`)),
        timeoutMs,
      );
      waiters.push({
        pred,
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
      });
    });
  return { seen, until, stop: () => sub.unsubscribe() };
}
Deno.test({
  name: "scheduler replicas fire every firing exactly once, also after a restart",
  sanitizeOps: true,
  sanitizeResources: true,
  async fn(t) {
    await using server = await startNatsServer();
    const env = { NATS_URL: server.url, WEFT_LOG_LEVEL: "info" };
    const nc = await connectClient(server.url, "test");
    try {
      const jsm = await jetstreamManager(nc);
      await ensureTopology(nc, jsm, loadConfig({ env: () => undefined, args: [] }));
      const store = createScheduleStore(await new Kvm(nc).open(SCHEDULE_BUCKET));
      const seen = firings(nc, "digest.request.>");
      await t.step(
        "two replicas: a one-shot fires once, a cron tick fires once per tick",
        async () => {
          await using _s1 = await startService("scheduler", env);
          await using _s2 = await startService("scheduler", env);
          const at = new Date(Date.now() + 1000).toISOString();
          await store.create({
            id: "once",
            subject: "digest.request.feedback",
            payload: { hello: 1 },
            at,
          });
          await store.create({
            id: "every-second",
            subject: "digest.request.feedback",
            payload: { kind: "digest" },
            cron: "* * * * * *",
          });
          await seen.until(() =>
            seen.seen.some((f) => f.schedule === "once") &&
            seen.seen.filter((f) => f.schedule === "every-second").length >= 4
          );
          await store.cancel("every-second");
          const once = seen.seen.filter((f) => f.schedule === "once");
          assert.equal(once.length, 1);
          assert.equal(once[0]!.at, at);
          const ticks = seen.seen.filter((f) => f.schedule === "every-second").map((f) => f.at);
          assert.equal(new Set(ticks).size, ticks.length, `no tick fired twice: ${ticks}`);
          assert.equal((await store.get("once")).status, "done");
          const stream = await jsm.streams.info("DIGEST");
          assert.equal(
            stream.state.messages,
            seen.seen.length,
            "every publish reached the stream once",
          );
        },
      );
      await t.step(
        "a deadline that passed while no replica ran fires once after a restart",
        async () => {
          // No replica runs now; the deadline is already past when they start.
          const at = new Date(Date.now() - 1000).toISOString();
          await store.create({
            id: "while-down",
            subject: "digest.request.feedback",
            payload: {},
            at,
          });
          await using _s1 = await startService("scheduler", env);
          await using _s2 = await startService("scheduler", env);
          await seen.until(() => seen.seen.some((f) => f.schedule === "while-down"));
          // The schedule is done once advanced; no replica fires it again.
          const done = async () => (await store.get("while-down")).status === "done";
          const deadline = Date.now() + 5000;
          while (!(await done()) && Date.now() < deadline) {
            await new Promise((r) => setTimeout(r, 20));
          }
          assert.ok(await done(), "the schedule was advanced to done");
          assert.equal(seen.seen.filter((f) => f.schedule === "while-down").length, 1);
        },
      );
      await t.step("a cancelled schedule never fires", async () => {
        await using _s1 = await startService("scheduler", env);
        const at = new Date(Date.now() + 400).toISOString();
        await store.create({
          id: "cancelled",
          subject: "digest.request.feedback",
          payload: {},
          at,
        });
        assert.equal(await store.cancel("cancelled"), true);
        await store.create({
          id: "marker",
          subject: "digest.request.feedback",
          payload: {},
          at: new Date(Date.now() + 800).toISOString(),
        });
        await seen.until(() => seen.seen.some((f) => f.schedule === "marker"));
        assert.equal(seen.seen.filter((f) => f.schedule === "cancelled").length, 0);
      });
      seen.stop();
    } finally {
      await nc.close();
    }
  },
});

Deno.test({
  name: "a scheduler replica takes over a firing whose lease holder died before advancing it",
  sanitizeOps: true,
  sanitizeResources: true,
  async fn() {
    await using server = await startNatsServer();
    const nc = await connectClient(server.url, "test");
    try {
      const jsm = await jetstreamManager(nc);
      await ensureTopology(nc, jsm, loadConfig({ env: () => undefined, args: [] }));
      const kvm = new Kvm(nc);
      const store = createScheduleStore(await kvm.open(SCHEDULE_BUCKET));
      const at = new Date(Date.now() - 1000).toISOString();
      await store.create({ id: "orphan", subject: "digest.request.feedback", payload: {}, at });
      // A replica took the lease and died: no publish, schedule not advanced.
      const leases = await kvm.open(SCHEDULE_LEASE_BUCKET);
      await leases.create(leaseKey("orphan", Date.parse(at)), JSON.stringify({ replica: "dead" }));
      const seen = firings(nc, "digest.request.>");
      const scheduler = await runScheduler({
        nc,
        log: createLogger("test", "error"),
        replica: "r1",
        takeoverMs: 300,
      });
      try {
        await seen.until(() => seen.seen.length > 0, 5000);
        assert.equal(scheduler.stats.takeovers, 1);
        assert.ok(scheduler.stats.lost >= 1, "it first waited for the lease holder");
        assert.deepEqual(seen.seen.map((f) => f.schedule), ["orphan"]);
      } finally {
        seen.stop();
        await scheduler.stop();
      }
    } finally {
      await nc.close();
    }
  },
});

/**
 * The gateway's schedule routes (`/schedules`) and request subjects on `t`'s server, with no
 * API keys, for the shipped pipelines and `pipelines`; and the schedule store.
 */
async function scheduleApp(
  t: Awaited<ReturnType<typeof startTestNats>>,
  pipelines: readonly LoadedPipeline[] = [],
  opts: { maxCallerCrons?: number } = {},
) {
  const log = createLogger("test", "error", () => {});
  const store = lazyScheduleStore(t.nc, opts);
  const allowed = scheduleTargets(pipelines);
  const app = new Hono();
  app.onError((err, c) => problemResponse(c, err));
  app.route("/schedules", scheduleRoutes(store, allowed, t.config.bodyLimit));
  const requests = serveScheduleRequests(t.nc, store, allowed, log, createAuth([]));
  return {
    schedules: await store(),
    app,
    log,
    [Symbol.dispose]: () => requests.stop(),
  };
}

Deno.test("a schedule on a subject callers may not schedule is refused with 422 over HTTP and NATS, and the scheduler never fires one written into the bucket", async () => {
  await using t = await startTestNats();
  using gateway = await scheduleApp(t);
  const { schedules, app } = gateway;
  {
    for (
      const subject of [
        "$JS.API.STREAM.CREATE.X",
        "$KV.weft_feedback_state.x",
        "feedback.processed.x",
        "weft.feedback.get",
      ]
    ) {
      const body = JSON.stringify({
        subject,
        payload: { name: "X" },
        at: new Date().toISOString(),
      });
      const res = await app.request("/schedules", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body,
      });
      assert.equal(res.status, 422, subject);
      assert.equal((await res.json()).field, "/subject");
      const reply = await t.nc.request("weft.schedules.create", body, PATIENT);
      assert.equal(reply.json<{ error?: { field?: string } }>().error?.field, "/subject", subject);
    }
    assert.equal((await schedules.list()).length, 0, "nothing was scheduled");
    const ok = await app.request("/schedules", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        subject: "feedback.submit",
        payload: { text: "hi" },
        at: "2099-01-01T00:00:00Z",
      }),
    });
    assert.equal(ok.status, 201, await ok.clone().text());

    // Written straight into the bucket (as anyone with KV access could), due now.
    const seen: string[] = [];
    const sub = t.nc.subscribe("$JS.API.STREAM.CREATE.>", {
      callback: (_e, m) => void seen.push(m.subject),
    });
    const store = createScheduleStore(await new Kvm(t.nc).open(SCHEDULE_BUCKET));
    await store.create({
      id: "evil",
      subject: "$JS.API.STREAM.CREATE.EVIL",
      payload: { name: "EVIL" },
      at: new Date().toISOString(),
    });
    const lines: string[] = [];
    const scheduler = await runScheduler({
      nc: t.nc,
      log: createLogger("test", "debug", (l) => lines.push(l)),
      replica: "guard",
    });
    await waitFor(() => lines.some((l) => l.includes("schedule refused")), 10_000, "the refusal");
    await scheduler.stop();
    await t.nc.flush();
    sub.unsubscribe();
    assert.deepEqual(seen, []);
    await assert.rejects(t.jsm.streams.info("EVIL"));
  }
});

Deno.test("every schedule in the docs' examples targets a subject callers may schedule", async () => {
  for (const file of ["docs/MODERATION.md", "README.md", "docs/PIPELINES.md"]) {
    const text = await Deno.readTextFile(new URL(`../${file}`, import.meta.url));
    // A schedule example is a JSON body with "subject" next to "at" or "cron".
    const bodies = [...text.matchAll(/\{[^{}\n]*"subject":"([^"]+)"[^\n]*"(?:at|cron)"/g)];
    for (const [, subject] of bodies) {
      assert.ok(
        subjectAllowed(callerSchedulableSubjects(SHIPPED_PIPELINES), subject!),
        `${file}: ${subject}`,
      );
    }
  }
});

Deno.test("a caller can neither squat a pipeline timer's id before it is set nor cancel one", async () => {
  // Found adversarially: an admin schedule made with the id of a review's SLA deadline to
  // come (`sla-1-<item>`) kept the deadline from ever being set, and DELETE
  // /schedules/sla-1-<item> cancelled one: the item stayed pending for good.
  await using t = await startTestNats();
  using gateway = await scheduleApp(t);
  const { schedules, app } = gateway;
  const post = (body: unknown) =>
    app.request("/schedules", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
  const later = new Date(Date.now() + 3_600_000).toISOString();
  const squat = await post({
    id: "sla-1-r14",
    subject: "feedback.submit",
    payload: { text: "x" },
    at: "2099-01-01T00:00:00.000Z",
  });
  assert.equal(squat.status, 201);
  // The pipeline sets its deadline under that id: its timer wins.
  const sla = { subject: "content.sla_expired.r14", payload: { id: "e" }, at: later };
  const own = await schedules.create({ id: "sla-1-r14", ...sla });
  assert.equal(own.subject, "content.sla_expired.r14");
  assert.equal((await schedules.get("sla-1-r14")).at, later);
  // A caller cannot cancel it, nor take its id again; its own schedules it can cancel.
  const cancel = await app.request("/schedules/sla-1-r14", { method: "DELETE" });
  assert.equal(cancel.status, 409, await cancel.text());
  assert.equal((await schedules.get("sla-1-r14")).subject, "content.sla_expired.r14");
  const again = await post({
    id: "sla-1-r14",
    subject: "feedback.submit",
    payload: { text: "x" },
    at: later,
  });
  assert.equal(again.status, 409);
  assert.equal((await again.json()).field, "/id", "the conflict names the id");
  assert.equal(
    (await post({ id: "mine", subject: "feedback.submit", payload: { text: "x" }, at: later }))
      .status,
    201,
  );
  assert.equal((await app.request("/schedules/mine", { method: "DELETE" })).status, 204);

  // A pipeline's timers now have ids of their own (`<owner>.<id>`): a caller can neither make
  // one nor cancel one.
  const owned = await post({ id: "content.sla-1-r15", ...sla });
  assert.equal(await expectField(owned, 422), "/id");
  await schedules.create({ id: "content.sla-1-r15", ...sla });
  const cancelOwned = await app.request("/schedules/content.sla-1-r15", { method: "DELETE" });
  assert.equal(cancelOwned.status, 409, await cancelOwned.text());
  assert.equal((await schedules.get("content.sla-1-r15")).subject, "content.sla_expired.r14");
});

/** The `field` of a problem answered with `status`. */
async function expectField(res: Response, status: number): Promise<string | undefined> {
  const text = await res.text();
  assert.equal(res.status, status, text);
  return (JSON.parse(text) as { field?: string }).field;
}

Deno.test("a pipeline's own schedule fires only on that pipeline's subjects, whoever wrote it", async () => {
  // Its services may write only `<owner>.<...>` keys (NATS permissions; tests/identities_test.ts):
  // one written there for another pipeline's subject is refused when it comes due.
  await using t = await startTestNats();
  const lines: string[] = [];
  const scheduler = await runScheduler({
    nc: t.nc,
    log: createLogger("test", "debug", (l) => lines.push(l)),
    replica: "owners",
  });
  const fired = firings(t.nc, "content.sla_expired.*");
  try {
    const store = createScheduleStore(await new Kvm(t.nc).open(SCHEDULE_BUCKET));
    const now = new Date().toISOString();
    await store.create({
      id: "feedback.evil",
      subject: "content.sla_expired.victim",
      payload: {},
      at: now,
    });
    await store.create({
      id: "content.sla-1-ok",
      subject: "content.sla_expired.ok",
      payload: {},
      at: now,
    });
    // With no owner (a caller's id, which the gateway may write), a "timer" under the
    // runtime's own roots or a hand-wired pipeline's is never fired either: it would be a
    // forged dead letter, or a content event no service set.
    const forged = [["gwforge", "deadletter._timer.x"], ["gwforge2", "content._timer.x"]] as const;
    for (const [id, subject] of forged) {
      await store.create({ id, subject, payload: {}, at: now });
    }
    await fired.until(() => fired.seen.length >= 1);
    for (const id of ["feedback.evil", "gwforge", "gwforge2"]) {
      await waitFor(
        () => lines.some((l) => l.includes("schedule refused") && l.includes(`"${id}"`)),
        10_000,
        `the refusal of ${id}`,
      );
    }
    assert.deepEqual(fired.seen.map((f) => f.schedule), ["content.sla-1-ok"]);
  } finally {
    fired.stop();
    await scheduler.stop();
  }
});

Deno.test("a forged entry delivered onto the scheduler's watch cancels nothing: it follows the bucket", async () => {
  // Found adversarially: any reader may create a push consumer, and the server delivers its
  // messages wherever its deliver_subject says, unchecked: onto the scheduler's bucket watch,
  // a message {"id":"victim","status":"cancelled"} from another stream cancelled the timer.
  await using t = await startTestNats();
  const log = createLogger("test", "error", () => {});
  const scheduler = await runScheduler({ nc: t.nc, log, replica: "r1" });
  const fired = firings(t.nc, "feedback.submit");
  try {
    const store = createScheduleStore(await new Kvm(t.nc).open(SCHEDULE_BUCKET));
    const due = new Date(Date.now() + 4_000).toISOString();
    await store.create({
      id: "victim",
      subject: "feedback.submit",
      payload: { text: "x" },
      at: due,
    });
    // A stream of the attacker's whose message, read as a bucket entry, is key "victim":
    // its subject past the bucket's prefix (`$KV.weft_schedules.`, 19 characters).
    await t.jsm.streams.add({ name: "FORGE", subjects: ["forge.>"] });
    const forged = { id: "victim", subject: "feedback.submit", status: "cancelled" };
    await jetstream(t.nc).publish(`forge.${"x".repeat(13)}victim`, JSON.stringify(forged));
    const watchInbox = async () => {
      const found: string[] = [];
      for await (const c of t.jsm.consumers.list("KV_weft_schedules")) {
        if (c.config.deliver_subject) found.push(c.config.deliver_subject);
      }
      return found;
    };
    // The first delivery out of order makes nats.js recreate the watch on another inbox;
    // the second, on that one, is taken as the watch's next entry.
    for (const n of [1, 2]) {
      const [inbox] = await waitFor(
        async () => {
          const now = await watchInbox();
          return now.length === 1 && now;
        },
        10_000,
        "the scheduler's watch",
      );
      await t.jsm.consumers.add("FORGE", {
        name: `forge${n}`,
        deliver_subject: inbox,
        ack_policy: AckPolicy.None,
        deliver_policy: DeliverPolicy.All,
      });
      await waitFor(async () => !(await watchInbox()).includes(inbox!) || n === 2, 10_000, "reset");
    }
    await fired.until(() => fired.seen.some((f) => f.schedule === "victim"), 15_000);
  } finally {
    fired.stop();
    await scheduler.stop();
  }
});

Deno.test("callers may schedule submissions to a running definition; a pipeline nothing runs is refused", async () => {
  // Found in review: /schedules took only the shipped pipelines' inputs, so a team could not
  // schedule a submission to its own pipeline (`orders.submit`), and lived in the moderation
  // pipeline's routes: without it, the mesh had no /schedules at all.
  await using t = await startTestNats();
  const def = definePipeline({
    name: "orders",
    input: { schema: { type: "object", required: ["sku"] } },
    start: "price",
    steps: {
      price: { kind: "task", output: { type: "object" }, handle: () => ({}), next: "done" },
      done: { kind: "end", outcome: "done" },
    },
  });
  const orders: LoadedPipeline = { file: "inline", def, flow: compileFlow(def) };
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([orders], t.config.retentionMs));
  using gateway = await scheduleApp(t, [orders]);
  const body = (subject: string) =>
    JSON.stringify({ subject, payload: { sku: "A1" }, at: new Date().toISOString() });
  const refused = await gateway.app.request("/schedules", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: body("nope.submit"),
  });
  assert.equal(refused.status, 422);
  assert.equal((await refused.json()).field, "/subject");
  const overNats = await t.nc.request("weft.schedules.create", body("nope.submit"), PATIENT);
  assert.equal(overNats.json<{ error?: { field?: string } }>().error?.field, "/subject");

  const made = await gateway.app.request("/schedules", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: body("orders.submit"),
  });
  assert.equal(made.status, 201, await made.clone().text());
  const fired = firings(t.nc, "orders.submit");
  const scheduler = await runScheduler({ nc: t.nc, log: gateway.log, replica: "r1" });
  try {
    await fired.until(() => fired.seen.length === 1);
    // A subscriber can see the firing before the stream has stored it: wait for the store.
    const stored = await waitFor(
      async () =>
        (await t.jsm.streams.getMessage("ORDERS", { last_by_subj: "orders.submit" })) ?? undefined,
      20_000,
      "the firing stored in ORDERS",
    );
    assert.deepEqual(stored.json(), { sku: "A1" }, "stored for the pipeline's intake");
  } finally {
    fired.stop();
    await scheduler.stop();
  }
});

Deno.test("a schedule its target would refuse is refused when made, naming the field: a bad payload, or a subject nothing reads", async () => {
  // Found by a probe: `{"subject":"feedback.submit","payload":{"text":""}}` got 201 and, when
  // it fired, a dead letter and a failed item; `digest.request.nonexistent` (inside the then
  // allowed `digest.request.*`; now only `digest.request.feedback` may be scheduled) got 201,
  // fired, and was read by no one.
  await using t = await startTestNats();
  using gateway = await scheduleApp(t);
  const at = "2099-01-01T00:00:00Z";
  const cases: [unknown, string][] = [
    [{ subject: "feedback.submit", payload: { text: "" }, at }, "/payload/text"],
    [{ subject: "feedback.submit", payload: {}, at }, "/payload/text"],
    [{ subject: "digest.request.feedback", payload: { window_ms: 1 }, at }, "/payload/window_ms"],
    [{ subject: "digest.request.nonexistent", payload: {}, at }, "/subject"],
  ];
  for (const [body, field] of cases) {
    const res = await gateway.app.request("/schedules", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    assert.equal(await expectField(res, 422), field, JSON.stringify(body));
    const reply = await t.nc.request("weft.schedules.create", JSON.stringify(body), PATIENT);
    assert.equal(reply.json<{ error?: { field?: string } }>().error?.field, field);
  }
  assert.deepEqual(await gateway.schedules.list(), [], "nothing was scheduled");
  // A body that is not JSON is the same problem over NATS as over HTTP.
  const garbled = await t.nc.request("weft.schedules.create", "{not json", PATIENT);
  const problem = garbled.json<{ error?: { status?: number; code?: string } }>().error;
  assert.deepEqual([problem?.status, problem?.code], [400, "malformed_json"]);
});

Deno.test("a caller's recurring schedule fires at most once a minute, and only so many are active at once, over HTTP and NATS; a pipeline's own timers are not bound", async () => {
  // Found by probing: 300 schedules of `"cron": "* * * * * *"` on feedback.submit, made with
  // 300 requests, submitted 300 items a second, past the intake's high-water mark and the
  // per-key rate limits, until cancelled.
  await using t = await startTestNats();
  using gateway = await scheduleApp(t, [], { maxCallerCrons: 2 });
  const { app, schedules } = gateway;
  const post = (body: unknown) =>
    app.request("/schedules", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
  const payload = { text: "how is the week going?" };
  const subject = "feedback.submit";
  for (const cron of ["* * * * * *", "*/30 * * * * *", "0,59 * * * * *"]) {
    const res = await post({ subject, payload, cron });
    assert.equal(await expectField(res, 422), "/cron", cron);
    const reply = await t.nc.request(
      "weft.schedules.create",
      JSON.stringify({ subject, payload, cron }),
      PATIENT,
    );
    assert.equal(reply.json<{ error?: { field?: string } }>().error?.field, "/cron", cron);
  }
  assert.deepEqual(await schedules.list(), [], "none was stored");
  // Once a minute (five fields, or a sixth at a fixed second) is allowed; two are active.
  assert.equal((await post({ id: "weekly", subject, payload, cron: "0 9 * * 1" })).status, 201);
  assert.equal((await post({ id: "minutely", subject, payload, cron: "0 * * * * *" })).status, 201);
  // A third is refused while two are active; one-shots and a pipeline's timers do not count.
  const third = await post({ id: "third", subject, payload, cron: "0 10 * * *" });
  assert.equal(await expectField(third, 409), "/cron");
  await assert.rejects(schedules.get("third"), /no schedule/, "the refused one is not kept");
  assert.equal((await post({ subject, payload, at: "2099-01-01T00:00:00Z" })).status, 201);
  await schedules.create({
    id: "orders.timer-1",
    subject: "orders.timer.o1",
    payload: {},
    cron: "* * * * * *",
  });
  // The same definition again answers the schedule it made, cap or not.
  assert.equal((await post({ id: "weekly", subject, payload, cron: "0 9 * * 1" })).status, 201);
  // Cancelled, one makes room for another.
  assert.equal((await app.request("/schedules/weekly", { method: "DELETE" })).status, 204);
  assert.equal((await post({ id: "third", subject, payload, cron: "0 10 * * *" })).status, 201);
});

Deno.test("a pipeline's retired schedule is removed when the scheduler starts; a caller's schedule under that id for another subject stays", async () => {
  // Its digest schedule was `feedback-digest` before schedules had owners; left in a store, it
  // would fire beside `feedback.digest`. Only the scheduler may remove it: no service's key
  // may write ids without an owner's prefix but the gateway's, for callers.
  for (
    const [subject, stays] of [["digest.request.feedback", false], [
      "feedback.submit",
      true,
    ]] as const
  ) {
    await using t = await startTestNats();
    const store = createScheduleStore(await new Kvm(t.nc).open(SCHEDULE_BUCKET));
    const payload = subject === "feedback.submit" ? { text: "monthly" } : {};
    await store.create({ id: "feedback-digest", subject, payload, cron: "0 * * * *" });
    const lines: string[] = [];
    const scheduler = await runScheduler({
      nc: t.nc,
      log: createLogger("test", "info", (l) => lines.push(l)),
      replica: "retire",
    });
    await scheduler.stop();
    const left = (await store.list()).map((s) => s.id);
    assert.deepEqual(left, stays ? ["feedback-digest"] : [], subject);
    assert.equal(lines.some((l) => l.includes("retired schedule removed")), !stays);
  }
});

Deno.test("a timer of a pipeline no longer run is held once, not retried every second, and fires when a start runs the pipeline again", async () => {
  // A definition's wait was pending when its file left pipelines/run.json: the scheduler's
  // key (the mesh's own, derived with no definition listed) may not publish its timer. It
  // used to try again every second for ever, each try a permission violation and an error
  // line (3 lines a second per timer, found by probing).
  const dir = await Deno.makeTempDir({ prefix: "weft-sched-held-" });
  try {
    await Deno.writeTextFile(`${dir}/base.conf`, "max_payload: 1MB\n");
    const auth = await writeAuthConfig(`${dir}/base.conf`, dir);
    await using server = await startNatsServer({
      configFile: auth.configFile,
      port: freePort(),
      storeDir: `${dir}/store`,
      cwd: dir,
    });
    const admin = await connectClient(server.url, "weft-admin", {
      nkeySeedFile: auth.seeds.get("admin")!,
    });
    const sched = await connectClient(server.url, "weft-scheduler", {
      nkeySeedFile: auth.seeds.get("scheduler")!,
    });
    const fired = firings(admin, "gone._timer.*");
    try {
      await ensureTopology(admin, await jetstreamManager(admin), testConfig(server.url));
      const store = createScheduleStore(await new Kvm(admin).open(SCHEDULE_BUCKET));
      const at = new Date().toISOString();
      await store.create({ id: "gone.approval-i1-0", subject: "gone._timer.i1", payload: {}, at });
      const lines: string[] = [];
      const scheduler = await runScheduler({
        nc: sched,
        log: createLogger("test", "info", (l) => lines.push(l)),
        replica: "held",
        // A refused firing's lease is taken over at once, as it would be after 30 s.
        takeoverMs: 100,
      });
      try {
        await waitFor(
          () => lines.some((l) => l.includes("gone.approval-i1-0")),
          10_000,
          "the first try of the timer",
        );
        // Then a schedule the key may publish, due 2.5 s on: by its firing, a timer retried
        // every second would have been tried twice more.
        await store.create({
          id: "later",
          subject: "digest.request.feedback",
          payload: {},
          at: new Date(Date.now() + 2500).toISOString(),
        });
        await waitFor(
          () => lines.some((l) => l.includes('"fired"') && l.includes('"later"')),
          15_000,
          `the later schedule fired (${lines.join("\n")})`,
        );
        const tries = lines.filter((l) => l.includes("gone.approval-i1-0"));
        assert.equal(tries.length, 1, tries.join("\n"));
        assert.match(tries[0]!, /schedule held: its subject is no running pipeline's to publish/);
        assert.ok(!lines.some((l) => l.includes("firing failed")), lines.join("\n"));
      } finally {
        await scheduler.stop();
      }
      assert.equal(fired.seen.length, 0);
      const kept = await store.get("gone.approval-i1-0");
      assert.equal(kept.status, "active", "kept for when its pipeline runs again");
      // A start that runs the pipeline again (here a replica whose key may publish it) fires it.
      const again = await runScheduler({
        nc: admin,
        log: createLogger("test", "info", () => {}),
        replica: "again",
      });
      try {
        await fired.until(() => fired.seen.length >= 1, 15_000);
        assert.deepEqual(fired.seen.map((f) => f.schedule), ["gone.approval-i1-0"]);
      } finally {
        await again.stop();
      }
    } finally {
      fired.stop();
      await sched.close();
      await admin.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
