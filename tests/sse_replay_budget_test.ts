/**
 * SSE replays share one byte budget per gateway: however many clients replay history without
 * reading, the gateway's one NATS connection never has more coming from the server for them
 * than the budget, so nats-server never cuts it as a slow consumer (which failed ingest with
 * 503s and cut live readers). Real nats-server (with a small `max_pending`, so that a few
 * dozen clients reach it as a few hundred reach the default 64 MiB), real sockets.
 */
import assert from "node:assert/strict";
import { jetstream } from "@nats-io/jetstream";
import { createParser } from "eventsource-parser";
import { createEvent } from "../src/events.ts";
import { freePort } from "../src/nats_server.ts";
import { createIntake } from "../pipelines/feedback/intake.ts";
import { feedbackApp } from "./helpers/pipeline.ts";
import { startTestNats, type TestNats } from "./helpers/nats.ts";
import { deadline, waitFor } from "./helpers/wait.ts";
import { sseFrames } from "./helpers/sse_frames.ts";
import { SseClients } from "../src/gateway/sse.ts";

/** Ephemeral (SSE) consumers on the FEEDBACK stream right now. */
async function sseConsumers(t: TestNats): Promise<number> {
  let n = 0;
  for await (const c of t.jsm.consumers.list("FEEDBACK")) if (!c.config.durable_name) n++;
  return n;
}

const SILENT = 60;

Deno.test("60 SSE replay clients that never read share the replay budget: the gateway's NATS connection is never cut as a slow consumer, every POST /feedback is accepted, and a live reader sees each accepted item once", async () => {
  const dir = await Deno.makeTempDir({ prefix: "weft-sse-budget-" });
  // 8 MB waiting for one connection and the server cuts it: 60 replays asking for ~1 MiB each
  // at once are far past it; a 4 MiB budget (two wide replays at a time) is well under it.
  await Deno.writeTextFile(`${dir}/nats.conf`, "max_pending: 8MB\n");
  const monitorPort = freePort();
  const conns: Deno.TcpConn[] = [];
  try {
    await using t = await startTestNats(
      { sseWriteTimeoutMs: 300, sseKeepAliveMs: 60_000, sseReplayBytes: 4 * 1024 * 1024 },
      { configFile: `${dir}/nats.conf`, port: freePort(), storeDir: `${dir}/store`, monitorPort },
    );
    const disconnects: string[] = [];
    (async () => {
      for await (const s of t.nc.status()) {
        if (s.type === "disconnect" || s.type === "reconnect") disconnects.push(s.type);
      }
    })();
    const intake = await createIntake(t.nc);
    const app = feedbackApp(t, intake);
    const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, app.fetch);
    const base = `http://127.0.0.1:${server.addr.port}`;
    const live = new AbortController();
    let sampling = true;
    let sampler: Promise<void> | undefined;
    try {
      // ~10 MB of history: more than a silent client's socket buffers take, so each replay
      // stops on its client and holds its share until the write timeout cuts it.
      const js = jetstream(t.nc);
      const text = "x".repeat(10_000);
      for (let b = 0; b < 10; b++) {
        await Promise.all(Array.from({ length: 100 }, (_, j) => {
          const id = `h${b * 100 + j}`;
          return js.publish(
            `feedback.ingested.${id}`,
            JSON.stringify(createEvent({
              type: "feedback.ingested",
              itemId: id,
              traceId: "0af7651916cd43dd8448eb211c80319c",
              source: "test",
              data: { text },
            })),
          );
        }));
      }

      // A live reader of new ingested events, reading everything.
      const res = await fetch(`${base}/events?type=ingested`, { signal: live.signal });
      assert.equal(res.status, 200);
      const seen: string[] = [];
      const parser = createParser({
        onEvent: (e) => {
          if (e.event === "feedback.ingested") seen.push(JSON.parse(e.data).item_id);
        },
      });
      (async () => {
        for await (const chunk of res.body!.pipeThrough(new TextDecoderStream())) {
          parser.feed(chunk);
        }
      })().catch(() => {});

      // How many consumers the server has, sampled throughout: beyond the live feed and the
      // durable ones already there, only the replays holding a share of the budget have one.
      const consumers = async () =>
        (await (await fetch(`http://127.0.0.1:${monitorPort}/jsz`)).json()).consumers as number;
      const before = await consumers();
      let most = before;
      sampler = (async () => {
        while (sampling) {
          most = Math.max(most, await consumers());
          await new Promise((r) => setTimeout(r, 20));
        }
      })();

      // Clients that ask for the whole history and never read a byte.
      for (let i = 0; i < SILENT; i++) {
        const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
        conns.push(conn);
        await conn.write(new TextEncoder().encode(
          `GET /events?replay=true HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n`,
        ));
      }

      // Ingest meanwhile, one submission every 100 ms.
      const accepted: string[] = [];
      const refused: string[] = [];
      for (let i = 0; i < 30; i++) {
        const r = await fetch(`${base}/feedback`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ id: `live${i}`, text: `submission ${i}` }),
        });
        const body = await r.text();
        if (r.status === 202) accepted.push(`live${i}`);
        else refused.push(`${r.status} ${body.slice(0, 200)}`);
        await new Promise((r) => setTimeout(r, 100)); // pacing, not synchronisation
      }

      const slowConsumers = async () =>
        (await (await fetch(`http://127.0.0.1:${monitorPort}/varz`)).json()).slow_consumers;
      // A 4 MiB budget gives wide replays three quarters (a quarter is reserved for per-item
      // streams): two prefetches of 1 MiB and 64 KiB, two replays at a time.
      assert.ok(most - before <= 2, `at most 2 replays at a time (${most - before} seen)`);
      assert.deepEqual(refused, [], "every submission accepted");
      assert.equal(accepted.length, 30);
      assert.deepEqual(disconnects, [], "the gateway's connection was never cut");
      assert.equal(await slowConsumers(), 0, "no slow consumer on the server");

      // Every replay ends (its client cut by the write timeout), the budget's last holders too.
      await waitFor(async () => (await sseConsumers(t)) <= 1, 60_000, "every replay to end");
      await waitFor(
        () => accepted.every((id) => seen.includes(id)),
        30_000,
        "the live reader to see every accepted item",
      );
      assert.deepEqual(disconnects, [], "the gateway's connection was never cut");
      assert.equal(await slowConsumers(), 0, "no slow consumer on the server");
      sampling = false;
      await sampler;
      assert.ok(most - before <= 2, `at most 2 replays at a time (${most - before} seen)`);
      assert.deepEqual(
        seen.filter((id) => id.startsWith("live")),
        accepted,
        "each accepted item once, in order",
      );
      assert.ok(
        t.lines.filter((l) => l.includes("sse client too slow: dropped")).length >= SILENT,
        "the silent clients were cut",
      );
    } finally {
      sampling = false;
      await sampler?.catch(() => {});
      live.abort();
      for (const c of conns) {
        try {
          c.close();
        } catch { /* closed */ }
      }
      await server.shutdown();
    }
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});

Deno.test("idle wide SSE replays holding their whole budget do not hold up an item's event stream: its replay reads from a share reserved for items", async () => {
  // Found by a probe: 300 idle /events?replay=true clients delayed GET /feedback/<id>/events
  // 129 s, its replay waiting behind theirs for the one shared budget.
  const dir = await Deno.makeTempDir({ prefix: "weft-sse-item-budget-" });
  const conns: Deno.TcpConn[] = [];
  try {
    // Wide replays are cut only after a minute: until then they hold what they took.
    await using t = await startTestNats(
      { sseWriteTimeoutMs: 60_000, sseKeepAliveMs: 60_000, sseReplayBytes: 4 * 1024 * 1024 },
      { port: freePort(), storeDir: `${dir}/store` },
    );
    const clients = new SseClients(100, Infinity, 0, undefined, t.config.sseReplayBytes);
    const intake = await createIntake(t.nc);
    const app = feedbackApp(t, intake, { sseClients: clients });
    const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, app.fetch);
    const item = new AbortController();
    try {
      // ~10 MB of other items' history: more than a silent client's socket buffers take.
      const js = jetstream(t.nc);
      const text = "x".repeat(10_000);
      for (let b = 0; b < 10; b++) {
        await Promise.all(Array.from({ length: 100 }, (_, j) => {
          const id = `w${b * 100 + j}`;
          return js.publish(
            `feedback.ingested.${id}`,
            JSON.stringify(createEvent({
              type: "feedback.ingested",
              itemId: id,
              traceId: "0af7651916cd43dd8448eb211c80319c",
              source: "test",
              data: { text },
            })),
          );
        }));
      }
      const { body } = await intake.submit({ text: "the item being watched" });

      // Wide replays that never read: the first hold the whole wide budget, the rest wait.
      for (let i = 0; i < 10; i++) {
        const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
        conns.push(conn);
        await conn.write(new TextEncoder().encode(
          `GET /events?replay=true HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n`,
        ));
      }
      await waitFor(() => clients.replayBudget.waiting > 0, 20_000, "wide replays to queue");

      const res = await fetch(`http://127.0.0.1:${server.addr.port}/feedback/${body.id}/events`, {
        signal: item.signal,
      });
      assert.equal(res.status, 200);
      const first = (await deadline(
        sseFrames(res.body!).next(),
        10_000,
        "the item's first event while idle wide replays hold their budget",
      )).value!;
      assert.equal(first.event, "feedback.ingested");
      assert.equal(JSON.parse(first.data!).item_id, body.id);
      // The wide replays are still budgeted: still waiting, none cut to make room.
      assert.ok(clients.replayBudget.waiting > 0, "wide replays still wait for their turn");
      assert.equal(
        t.lines.filter((l) => l.includes("sse client too slow: dropped")).length,
        0,
        "no wide replay was cut",
      );
    } finally {
      item.abort();
      for (const c of conns) {
        try {
          c.close();
        } catch { /* closed */ }
      }
      // As the gateway stops: every stream told to end, then the server waits for them. A
      // stream's timers are cleared before its slot is freed, so none outlives the test.
      clients.closeAll();
      await server.shutdown();
      await waitFor(() => clients.open === 0, 20_000, "every SSE stream to end");
    }
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});
