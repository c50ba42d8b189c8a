/**
 * The scheduler over real processes: two replicas watching the same schedules fire each
 * firing exactly once, and a deadline that passed while no replica ran fires once after
 * a restart.
 */
import assert from "node:assert/strict";
import { jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import type { Msg } from "@nats-io/nats-core";
import { loadConfig } from "../src/config.ts";
import { connectNats } from "../src/nats.ts";
import { startNatsServer } from "../src/nats_server.ts";
import { createScheduleStore } from "../src/scheduler/store.ts";
import { SCHEDULE_BUCKET, SCHEDULE_LEASE_BUCKET } from "../src/subjects.ts";
import { leaseKey, runScheduler } from "../src/scheduler/scheduler.ts";
import { createLogger } from "../src/log.ts";
import { ensureTopology } from "../src/topology.ts";
import { startService } from "./helpers/services.ts";
/** Collects the firings seen on a core subscription (every publish, before dedupe). */
function firings(nc: Awaited<ReturnType<typeof connectNats>>, subject: string) {
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
    const nc = await connectNats(server.url, "test");
    try {
      const jsm = await jetstreamManager(nc);
      await ensureTopology(nc, jsm, loadConfig({ env: () => undefined, args: [] }));
      await jsm.streams.add({ name: "TICKS", subjects: ["ticks.>"] });
      const store = createScheduleStore(await new Kvm(nc).open(SCHEDULE_BUCKET));
      const seen = firings(nc, "ticks.>");
      await t.step(
        "two replicas: a one-shot fires once, a cron tick fires once per tick",
        async () => {
          await using _s1 = await startService("scheduler", env);
          await using _s2 = await startService("scheduler", env);
          const at = new Date(Date.now() + 1000).toISOString();
          await store.create({ id: "once", subject: "ticks.once", payload: { hello: 1 }, at });
          await store.create({
            id: "every-second",
            subject: "ticks.cron",
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
          const stream = await jsm.streams.info("TICKS");
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
          await store.create({ id: "while-down", subject: "ticks.down", payload: {}, at });
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
        await store.create({ id: "cancelled", subject: "ticks.cancelled", payload: {}, at });
        assert.equal(await store.cancel("cancelled"), true);
        await store.create({
          id: "marker",
          subject: "ticks.marker",
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
    const nc = await connectNats(server.url, "test");
    try {
      const jsm = await jetstreamManager(nc);
      await ensureTopology(nc, jsm, loadConfig({ env: () => undefined, args: [] }));
      await jsm.streams.add({ name: "TICKS", subjects: ["ticks.>"] });
      const kvm = new Kvm(nc);
      const store = createScheduleStore(await kvm.open(SCHEDULE_BUCKET));
      const at = new Date(Date.now() - 1000).toISOString();
      await store.create({ id: "orphan", subject: "ticks.orphan", payload: {}, at });
      // A replica took the lease and died: no publish, schedule not advanced.
      const leases = await kvm.open(SCHEDULE_LEASE_BUCKET);
      await leases.create(leaseKey("orphan", Date.parse(at)), JSON.stringify({ replica: "dead" }));
      const seen = firings(nc, "ticks.>");
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
