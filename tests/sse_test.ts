/**
 * SSE clients that stall or vanish, over a real socket: they cost the gateway one small
 * buffer, are cut off, and leave nothing behind on the server.
 */
import assert from "node:assert/strict";
import { DeliverPolicy, jetstream } from "@nats-io/jetstream";
import { headers } from "@nats-io/nats-core";
import { createIntake } from "../pipelines/feedback/intake.ts";
import { createEvent } from "../src/events.ts";
import { feedbackApp } from "./helpers/pipeline.ts";
import { startTestNats, type TestNats } from "./helpers/nats.ts";
import { deadline, waitFor } from "./helpers/wait.ts";
import { sseFrames } from "./helpers/sse_frames.ts";
import { SseClients } from "../src/gateway/sse.ts";

async function serveGateway(t: TestNats, sseClients?: SseClients) {
  const intake = await createIntake(t.nc);
  const app = feedbackApp(t, intake, sseClients ? { sseClients } : {});
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, app.fetch);
  return { server, port: server.addr.port };
}

/** Ephemeral (SSE) consumers on the FEEDBACK stream right now. */
async function sseConsumers(t: TestNats): Promise<number> {
  let n = 0;
  for await (const c of t.jsm.consumers.list("FEEDBACK")) if (!c.config.durable_name) n++;
  return n;
}

Deno.test("an SSE client that stops reading is dropped after the write timeout; the pipeline is untouched", async () => {
  await using t = await startTestNats({ sseWriteTimeoutMs: 300, sseKeepAliveMs: 60_000 });
  const { server, port } = await serveGateway(t);
  try {
    // Fill the stream with ~8 MB of events, far beyond what socket buffers hold.
    const js = jetstream(t.nc);
    const text = "x".repeat(8_000);
    await Promise.all(
      Array.from({ length: 1_000 }, (_, i) =>
        js.publish(
          `feedback.ingested.s${i}`,
          JSON.stringify(createEvent({
            type: "feedback.ingested",
            itemId: `s${i}`,
            traceId: "0af7651916cd43dd8448eb211c80319c",
            source: "test",
            data: { text },
          })),
        )),
    );
    // A client that sends its request and then never reads a byte.
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    await conn.write(new TextEncoder().encode(
      `GET /events?replay=true HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n`,
    ));
    await waitFor(
      () => t.lines.some((l) => l.includes("sse client too slow: dropped")),
      20_000,
      "the slow client to be dropped",
    );
    await waitFor(async () => (await sseConsumers(t)) === 0, 10_000, "its consumer to be removed");
    conn.close();
    // The durable consumers never saw the SSE client: nothing is pending because of it.
    const info = await t.jsm.streams.info("FEEDBACK");
    assert.equal(info.state.messages, 1_000);
  } finally {
    await server.shutdown();
  }
});

Deno.test("a dropped SSE client's connection is closed by the server, not left open with its slot freed", async () => {
  // Found by a probe: a client cut as too slow had its body ended gracefully, which a client
  // that never reads never takes: with WEFT_SSE_MAX_CLIENTS=5, waves of such clients left 15
  // connections open (megabytes queued for each) while the gateway counted none.
  await using t = await startTestNats({ sseWriteTimeoutMs: 300, sseKeepAliveMs: 60_000 });
  const { server, port } = await serveGateway(t);
  const conns: Deno.TcpConn[] = [];
  try {
    const js = jetstream(t.nc);
    const text = "x".repeat(8_000);
    await Promise.all(
      Array.from({ length: 1_000 }, (_, i) =>
        js.publish(
          `feedback.ingested.d${i}`,
          JSON.stringify(createEvent({
            type: "feedback.ingested",
            itemId: `d${i}`,
            traceId: "0af7651916cd43dd8448eb211c80319c",
            source: "test",
            data: { text },
          })),
        )),
    );
    // Clients that send their request and read nothing until they have been dropped.
    for (let i = 0; i < 3; i++) {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      conns.push(conn);
      await conn.write(new TextEncoder().encode(
        `GET /events?replay=true HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n`,
      ));
    }
    await waitFor(
      () => t.lines.filter((l) => l.includes("sse client too slow: dropped")).length >= 3,
      30_000,
      "the three slow clients to be dropped",
    );
    // Each now reads what was queued for it: the server's side of its connection is closed
    // (end of file or reset), not kept open after a finished response.
    const buf = new Uint8Array(64 * 1024);
    for (const conn of conns) {
      await deadline(
        (async () => {
          while (true) {
            try {
              if (await conn.read(buf) === null) return;
            } catch {
              return; // reset by the server
            }
          }
        })(),
        10_000,
        "the server to close the dropped client's connection",
      );
    }
  } finally {
    for (const c of conns) {
      try {
        c.close();
      } catch { /* closed */ }
    }
    await server.shutdown();
  }
});

Deno.test("a dropped SSE client that reads nothing keeps its slot while its connection stays open: WEFT_SSE_MAX_CLIENTS bounds connections", async () => {
  // Found by re-probing the fix above: a client cut as too slow that never reads keeps its
  // connection open (the server holds what it queued for it until the client takes it), and
  // its slot was freed at the cut: with WEFT_SSE_MAX_CLIENTS=6, three waves of six such
  // clients held 18 connections and 69 MB of send queues for 100 s and more, weft_sse_clients 0.
  await using t = await startTestNats({ sseWriteTimeoutMs: 300, sseKeepAliveMs: 60_000 });
  const clients = new SseClients(3);
  const { server, port } = await serveGateway(t, clients);
  const conns: Deno.TcpConn[] = [];
  const request = (conn: Deno.TcpConn) =>
    conn.write(new TextEncoder().encode(
      `GET /events?replay=true HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n`,
    ));
  try {
    const js = jetstream(t.nc);
    const text = "x".repeat(8_000);
    await Promise.all(
      Array.from({ length: 1_500 }, (_, i) =>
        js.publish(
          `feedback.ingested.k${i}`,
          JSON.stringify(createEvent({
            type: "feedback.ingested",
            itemId: `k${i}`,
            traceId: "0af7651916cd43dd8448eb211c80319c",
            source: "test",
            data: { text },
          })),
        )),
    );
    for (let i = 0; i < 3; i++) {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      conns.push(conn);
      await request(conn);
    }
    await waitFor(
      () => t.lines.filter((l) => l.includes("sse client too slow: dropped")).length >= 3,
      30_000,
      "the three slow clients to be dropped",
    );
    // Their connections are still open (they read nothing): the slots stay taken, and a
    // fourth client is refused as the cap says (before: 200, a fourth connection held).
    assert.equal(clients.open, 3, "the dropped clients' connections still count");
    const refused = await fetch(`http://127.0.0.1:${port}/events?replay=true`);
    assert.equal(refused.status, 503, await refused.clone().text());
    assert.equal(refused.headers.get("content-type"), "application/problem+json");
    assert.match((await refused.json()).detail, /WEFT_SSE_MAX_CLIENTS/);
    // Once they read to the end of their connections, the slots are free again.
    const buf = new Uint8Array(64 * 1024);
    for (const conn of conns) {
      await deadline(
        (async () => {
          while (true) {
            try {
              if (await conn.read(buf) === null) return;
            } catch {
              return; // reset by the server
            }
          }
        })(),
        20_000,
        "the server to close the dropped client's connection",
      );
    }
    await waitFor(() => clients.open === 0, 10_000, "the slots freed");
    const again = await fetch(`http://127.0.0.1:${port}/events`);
    assert.equal(again.status, 200);
    await again.body?.cancel();
  } finally {
    for (const c of conns) {
      try {
        c.close();
      } catch { /* closed */ }
    }
    await server.shutdown();
  }
});

Deno.test("an SSE client that goes away leaves no consumer behind, and the limit counts it out", async () => {
  await using t = await startTestNats({ sseMaxClients: 1 });
  const { server, port } = await serveGateway(t);
  try {
    const abort = new AbortController();
    const res = await fetch(`http://127.0.0.1:${port}/events`, { signal: abort.signal });
    assert.equal(res.status, 200);
    await waitFor(async () => (await sseConsumers(t)) === 1, 5_000, "the SSE consumer");
    const second = await fetch(`http://127.0.0.1:${port}/events`);
    assert.equal(second.status, 503, "over the limit");
    await second.body?.cancel();
    abort.abort();
    await res.body?.cancel().catch(() => {});
    await waitFor(async () => (await sseConsumers(t)) === 0, 10_000, "the consumer to be removed");
    const third = await fetch(`http://127.0.0.1:${port}/events`);
    assert.equal(third.status, 200, "the slot is free again");
    await third.body?.cancel();
    await waitFor(async () => (await sseConsumers(t)) === 0, 10_000, "the consumer to be removed");
  } finally {
    await server.shutdown();
  }
});

Deno.test("closeAll (the gateway stopping) ends every open stream with a retry hint, refuses new ones, and the server's shutdown waits for none", async () => {
  await using t = await startTestNats({ sseKeepAliveMs: 60_000 });
  const clients = new SseClients(10);
  const { server, port } = await serveGateway(t, clients);
  let shut = false;
  try {
    const intake = await createIntake(t.nc);
    const { body } = await intake.submit({ text: "an item to follow" });
    const live = await fetch(`http://127.0.0.1:${port}/events`);
    const item = await fetch(`http://127.0.0.1:${port}/feedback/${body.id}/events`);
    assert.equal(live.status, 200);
    assert.equal(item.status, 200);
    const frames = sseFrames(item.body!);
    assert.equal((await frames.next()).value?.event, "feedback.ingested");
    await waitFor(async () => (await sseConsumers(t)) === 1, 5_000, "the live feed's consumer");
    const rest = Promise.all([
      new Response(live.body).text(),
      (async () => {
        for await (const _ of frames) { /* to the end */ }
      })(),
    ]);

    const t0 = Date.now();
    const shutdown = server.shutdown();
    clients.closeAll();
    await shutdown;
    shut = true;
    const took = Date.now() - t0;
    const [text] = await rest;
    assert.ok(took < 2_000, `the server shut down in ${took} ms`);
    assert.match(text, /retry: 1000/, "told to reconnect");
    assert.equal(clients.open, 0, "every slot freed");
    assert.equal(clients.tryOpen(), false, "no stream opens after");
    await waitFor(async () => (await sseConsumers(t)) === 0, 10_000, "the consumer to be removed");
  } finally {
    if (!shut) await server.shutdown();
  }
});

Deno.test("an item's event stream starts at the item's first event, not at the start of the stream", async () => {
  // On nats-server 2.9 a replay from the stream's start with a wildcard filter matches every
  // message the stream holds, under its locks: with a day of events, every client that
  // opens an item's stream stalls the pipeline.
  await using t = await startTestNats();
  const { server, port } = await serveGateway(t);
  const abort = new AbortController();
  try {
    const js = jetstream(t.nc);
    const other = (i: number) =>
      JSON.stringify(createEvent({
        type: "feedback.ingested",
        itemId: `earlier${i}`,
        traceId: "0af7651916cd43dd8448eb211c80319c",
        source: "test",
        data: { text: "earlier" },
      }));
    for (let i = 0; i < 20; i++) await js.publish(`feedback.ingested.earlier${i}`, other(i));
    const base = `http://127.0.0.1:${port}`;
    const submitted = await fetch(`${base}/feedback`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ id: "late1", text: "the item being watched" }),
    });
    assert.equal(submitted.status, 202, await submitted.text());
    const res = await fetch(`${base}/feedback/late1/events`, { signal: abort.signal });
    assert.equal(res.status, 200);
    const frames = sseFrames(res.body!);
    const first = (await frames.next()).value!;
    assert.equal(first.event, "feedback.ingested");
    assert.equal(Number(first.id), 21, "the item's ingested event, after the 20 earlier ones");
    // The stream is open (no stage runs, so the item is not final). Its replay consumer,
    // which started there, is gone once caught up: what remains is the gateway's one
    // shared live feed, from new messages on (after the stream's last one when it started).
    const consumers = await waitFor(
      async () => {
        const list = [];
        for await (const c of t.jsm.consumers.list("FEEDBACK")) {
          if (!c.config.durable_name) list.push(c.config);
        }
        return list.length === 1 &&
          list[0]!.deliver_policy === DeliverPolicy.StartSequence &&
          (list[0]!.opt_start_seq ?? 0) >= 22 && list;
      },
      10_000,
      "only the live feed left",
    );
    assert.equal(consumers.length, 1);
    abort.abort();
    await frames.return(undefined).catch(() => {});
    await waitFor(async () => (await sseConsumers(t)) === 0, 10_000, "the consumer to be removed");
  } finally {
    abort.abort();
    await server.shutdown();
  }
});

Deno.test("a Last-Event-ID past everything the stream holds resumes from now: new events arrive", async () => {
  // Found by a probe: `Last-Event-ID: 99999999` (a client of another server, or one that made
  // it up) passed the digits-only check, and the stream stayed silent until its sequence
  // passed the id: 0 events where a client without it got 5.
  await using t = await startTestNats({ sseKeepAliveMs: 60_000 });
  const { server, port } = await serveGateway(t);
  const abort = new AbortController();
  try {
    const res = await fetch(`http://127.0.0.1:${port}/events`, {
      signal: abort.signal,
      headers: { "Last-Event-ID": "99999999" },
    });
    assert.equal(res.status, 200);
    const frames = sseFrames(res.body!);
    const js = jetstream(t.nc);
    await js.publish(
      "feedback.ingested.after1",
      JSON.stringify(createEvent({
        type: "feedback.ingested",
        itemId: "after1",
        traceId: "0af7651916cd43dd8448eb211c80319c",
        source: "test",
        data: { text: "new" },
      })),
    );
    const first = await deadline(frames.next(), 10_000, "the new event");
    assert.equal(first.value!.event, "feedback.ingested");
  } finally {
    abort.abort();
    await server.shutdown();
  }
});

Deno.test("an item's event stream takes each event's type from its subject: a forged Weft-Event-Type header or a final subject whose body disagrees shows no end", async () => {
  // Found by a probe: `nats pub <pipeline>.approved.<id> '{"note":"x"}' -H
  // 'Weft-Event-Type:<pipeline>.done'` made the live per-item stream emit `event: <pipeline>.done`
  // and close while the item was waiting; a replay ended there too.
  await using t = await startTestNats({ sseKeepAliveMs: 60_000 });
  const { server, port } = await serveGateway(t);
  const aborts: AbortController[] = [];
  const open = async (id: string) => {
    const abort = new AbortController();
    aborts.push(abort);
    const res = await fetch(`http://127.0.0.1:${port}/feedback/${id}/events`, {
      signal: abort.signal,
    });
    assert.equal(res.status, 200);
    return sseFrames(res.body!);
  };
  /** The frames up to the stream's end (it must end within the deadline). */
  const rest = async (frames: AsyncGenerator<{ event?: string; id?: string }>) => {
    const seen: string[] = [];
    await deadline(
      (async () => {
        for await (const f of frames) seen.push(`${f.event} ${f.id}`);
      })(),
      10_000,
      "the stream to end",
    );
    return seen;
  };
  try {
    const intake = await createIntake(t.nc);
    const { body } = await intake.submit({ text: "an item to follow" });
    const id = body.id;
    const live = await open(id);
    const first = (await deadline(live.next(), 10_000, "the ingested event")).value!;
    assert.equal(first.event, "feedback.ingested");

    const js = jetstream(t.nc);
    const h = headers();
    h.set("Weft-Event-Type", "feedback.processed");
    const a = await js.publish(`feedback.sentiment_analyzed.${id}`, '{"note":"x"}', { headers: h });
    // On a final subject, with a body that is no event of that type.
    const b = await js.publish(`feedback.processed.${id}`, '{"note":"y"}', { headers: h });
    const c = await js.publish(
      `feedback.processed.${id}`,
      JSON.stringify({ type: "feedback.failed", item_id: id }),
    );
    // The live stream shows the first as its subject's type, hides the other two, stays open.
    const second = (await deadline(live.next(), 10_000, "the forged event")).value!;
    assert.deepEqual([second.event, Number(second.id)], ["feedback.sentiment_analyzed", a.seq]);
    // A replay, from the start, shows the same and does not end at them either.
    const replay = await open(id);
    const replayed = [
      (await deadline(replay.next(), 10_000, "replay 1")).value!,
      (await deadline(replay.next(), 10_000, "replay 2")).value!,
    ];
    assert.deepEqual(replayed.map((f) => f.event), [
      "feedback.ingested",
      "feedback.sentiment_analyzed",
    ]);

    const done = await js.publish(
      `feedback.processed.${id}`,
      // The gateway shows events as stored (the stages validate them): type and item are
      // what it reads.
      JSON.stringify({ id: "done-1", type: "feedback.processed", version: 1, item_id: id }),
    );
    assert.ok(done.seq > c.seq && c.seq > b.seq);
    // Both end at the item's own final event, and only there.
    assert.deepEqual(await rest(live), [`feedback.processed ${done.seq}`]);
    assert.deepEqual(await rest(replay), [`feedback.processed ${done.seq}`]);
    // A stream opened after the end replays it and ends there.
    assert.deepEqual((await rest(await open(id))).map((s) => s.split(" ")[0]), [
      "feedback.ingested",
      "feedback.sentiment_analyzed",
      "feedback.processed",
    ]);
  } finally {
    for (const a of aborts) a.abort();
    await server.shutdown();
  }
});
