/**
 * Reads never starve writes: SSE clients share one server consumer per gateway, each
 * holds a bounded queue, slow or silent clients are cut, caps apply per key and in all,
 * and a per-item stream that has nothing left to say ends. Real nats-server, real sockets.
 */
import assert from "node:assert/strict";
import { jetstream } from "@nats-io/jetstream";
import { createEvent } from "../src/events.ts";
import { createAuth, hashKey } from "../src/gateway/auth.ts";
import { createIntake } from "../pipelines/feedback/intake.ts";
import {
  type FeedSubscription,
  LiveFeeds,
  SSE_FLUSH_SLICE,
  SseClients,
} from "../src/gateway/sse.ts";
import { feedbackApp } from "./helpers/pipeline.ts";
import { startTestNats, type TestNats } from "./helpers/nats.ts";
import { startPipeline } from "./helpers/pipeline.ts";
import { sseFrames } from "./helpers/sse_frames.ts";
import { deadline, waitFor } from "./helpers/wait.ts";

const TRACE = "0af7651916cd43dd8448eb211c80319c";

async function ephemeralConsumers(t: TestNats): Promise<number> {
  let n = 0;
  for await (const c of t.jsm.consumers.list("FEEDBACK")) if (!c?.config?.durable_name) n++;
  return n;
}

function ingested(id: string, text = "hello") {
  return JSON.stringify(createEvent({
    type: "feedback.ingested",
    itemId: id,
    traceId: TRACE,
    source: "test",
    data: { text },
  }));
}

/** POSTs one item to the in-process gateway and checks it was accepted (202). */
async function assertAccepted(app: ReturnType<typeof feedbackApp>, text: string) {
  const res = await app.request("/feedback", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ text }),
  });
  assert.equal(res.status, 202);
  await res.body?.cancel();
}

Deno.test("fifty /events clients share one server consumer, and each receives every new event", async () => {
  await using t = await startTestNats({ sseKeepAliveMs: 60_000 });
  const intake = await createIntake(t.nc);
  const app = feedbackApp(t, intake);
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, app.fetch);
  const abort = new AbortController();
  try {
    const clients = await Promise.all(Array.from({ length: 50 }, async () => {
      const res = await fetch(`http://127.0.0.1:${server.addr.port}/events`, {
        signal: abort.signal,
      });
      assert.equal(res.status, 200);
      return sseFrames(res.body!);
    }));
    // Published as soon as every stream is open: the feed reads from the stream's position
    // when the first client joined, whenever the server creates its consumer.
    const js = jetstream(t.nc);
    for (let i = 0; i < 5; i++) {
      await js.publish(`feedback.ingested.shared${i}`, ingested(`shared${i}`));
    }
    await Promise.all(clients.map(async (frames) => {
      const ids = [];
      for (let i = 0; i < 5; i++) {
        ids.push((await deadline(frames.next(), 10_000, "a frame")).value!.id);
      }
      assert.deepEqual(ids.map(Number), [1, 2, 3, 4, 5]);
    }));
    assert.equal(await ephemeralConsumers(t), 1, "one consumer for all fifty");
    abort.abort();
    await Promise.all(clients.map((f) => f.return(undefined).catch(() => {})));
    await waitFor(
      async () => (await ephemeralConsumers(t)) === 0,
      10_000,
      "the feed gone with its clients",
    );
  } finally {
    abort.abort();
    await server.shutdown();
  }
});

Deno.test("a live client that never reads is cut when its queue is full; the others and ingest go on", async () => {
  await using t = await startTestNats({ sseKeepAliveMs: 60_000, sseWriteTimeoutMs: 60_000 });
  const intake = await createIntake(t.nc);
  const app = feedbackApp(t, intake);
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, app.fetch);
  const silent = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
  try {
    await silent.write(new TextEncoder().encode(
      "GET /events HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n",
    ));
    await waitFor(
      async () => (await ephemeralConsumers(t)) === 1,
      10_000,
      "the client on the feed",
    );
    // Far more than socket buffers and the queue (512 KiB) hold, published live.
    const js = jetstream(t.nc);
    const text = "y".repeat(9_000);
    for (let i = 0; i < 1500; i++) {
      await js.publish(`feedback.ingested.flood${i}`, ingested(`flood${i}`, text));
    }
    await waitFor(
      () => t.lines.some((l) => l.includes("sse client too slow: dropped") && l.includes("full")),
      20_000,
      "the silent client cut",
    );
    // Ingest is untouched.
    await assertAccepted(app, "still accepted");
  } finally {
    silent.close();
    await server.shutdown();
  }
});

Deno.test("stream set-ups are paced first come first served after a burst, and the burst comes back after idling", () => {
  let now = 0;
  const clients = new SseClients(10_000, Infinity, 200, () => now); // a burst of 50, then 5 ms apart
  const waits = Array.from({ length: 2_000 }, () => clients.turn());
  assert.deepEqual(waits.slice(0, 50), Array(50).fill(0), "the burst opens at once");
  assert.equal(waits[50], 5);
  assert.equal(waits[1_999], (2_000 - 50) * 5, "the last of a storm of 2,000 waits 9.75 s");
  for (let i = 1; i < waits.length; i++) assert.ok(waits[i]! >= waits[i - 1]!, "in arrival order");
  now = 60_000;
  assert.equal(clients.turn(), 0, "after idling the burst is back");
  assert.equal(new SseClients(10, Infinity, 0, () => now).turn(), 0, "0 paces nothing");
});

Deno.test("a storm of SSE clients waits for its streams' turns while ingest is answered at once", async () => {
  // Two set-ups a second with a burst of one: the fifth stream's turn is 2 s after the first.
  await using t = await startTestNats({ sseKeepAliveMs: 60_000, sseOpensPerSecond: 2 });
  const intake = await createIntake(t.nc);
  const app = feedbackApp(t, intake);
  const start = performance.now();
  const openedAt: number[] = [];
  const streams = Array.from(
    { length: 5 },
    () =>
      Promise.resolve(app.request("/events")).then((res) => {
        openedAt.push(performance.now() - start);
        return res;
      }),
  );
  await assertAccepted(app, "accepted while the streams wait");
  assert.ok(openedAt.length < 5, `ingest answered before the last stream's turn (${openedAt})`);
  const opened = await deadline(Promise.all(streams), 20_000, "every stream's turn");
  for (const r of opened) {
    assert.equal(r.status, 200);
    assert.equal(r.headers.get("content-type"), "text/event-stream");
    await r.body?.cancel();
  }
  assert.ok(openedAt[4]! >= 1_990, `the fifth stream opened at ${openedAt[4]} ms, on its turn`);
});

Deno.test("a client that leaves while waiting for its stream's turn frees its slot at once", async () => {
  await using t = await startTestNats({ sseKeepAliveMs: 60_000 });
  const intake = await createIntake(t.nc);
  // One set-up every 30 s: the second client's turn is 30 s away.
  const sseClients = new SseClients(10, Infinity, 1 / 30);
  const app = feedbackApp(t, intake, { sseClients });
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, app.fetch);
  const url = `http://127.0.0.1:${server.addr.port}/events`;
  const first = new AbortController();
  const second = new AbortController();
  try {
    const res = await fetch(url, { signal: first.signal });
    assert.equal(res.status, 200);
    const waiting = fetch(url, { signal: second.signal }).catch((err) => err);
    await waitFor(() => sseClients.open === 2, 10_000, "the second client waiting with a slot");
    await waitFor(() => sseClients.waiting === 1, 10_000, "the second client waiting its turn");
    const metrics = await (await fetch(`http://127.0.0.1:${server.addr.port}/metrics`)).text();
    assert.match(metrics, /^weft_sse_waiting 1$/m, "/metrics shows it waiting");
    second.abort();
    assert.equal((await waiting).name, "AbortError");
    await waitFor(
      () => sseClients.open === 1,
      10_000,
      "its slot freed when it left, not at its turn",
    );
    assert.equal(sseClients.waiting, 0);
    first.abort();
    await res.body?.cancel().catch(() => {});
    await waitFor(() => sseClients.open === 0, 10_000, "the first slot freed when it left");
  } finally {
    first.abort();
    second.abort();
    await server.shutdown();
  }
});

Deno.test("SSE caps apply per API key and in all, with 503 and Retry-After; the dashboard stream needs a key", async () => {
  await using t = await startTestNats({
    sseMaxPerKey: 2,
    sseMaxClients: 3,
    sseKeepAliveMs: 60_000,
  });
  const auth = createAuth([
    { sha256: await hashKey("key-a"), role: "reviewer", name: "a" },
    { sha256: await hashKey("key-b"), role: "reviewer", name: "b" },
  ]);
  const intake = await createIntake(t.nc);
  const app = feedbackApp(t, intake, { auth });
  const open = (key: string) =>
    app.request("/events", { headers: { authorization: `Bearer ${key}` } });
  const a1 = await open("key-a");
  const a2 = await open("key-a");
  assert.equal(a1.status, 200);
  assert.equal(a2.status, 200);
  const a3 = await open("key-a");
  assert.equal(a3.status, 503, "over the per-key cap");
  assert.equal(a3.headers.get("retry-after"), "5");
  await a3.body?.cancel();
  const b1 = await open("key-b");
  assert.equal(b1.status, 200, "another key has its own slots");
  const b2 = await open("key-b");
  assert.equal(b2.status, 503, "over the total cap");
  await b2.body?.cancel();
  const anonymous = await app.request("/dashboard/stream");
  assert.equal(anonymous.status, 401, "the dashboard stream needs a key when keys exist");
  await anonymous.body?.cancel();
  for (const r of [a1, a2, b1]) await r.body?.cancel();
});

Deno.test("a per-item stream resumed with Last-Event-ID after its final event closes at once", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const { body } = await p.intake.submit({ text: "The export crashes" });
  const first = await p.app.request(`/feedback/${body.id}/events`);
  const frames = [];
  for await (const f of sseFrames(first.body!)) frames.push(f);
  const final = frames.at(-1)!;
  assert.equal(final.event, "feedback.processed");
  const resumed = await deadline(
    Promise.resolve(
      p.app.request(`/feedback/${body.id}/events`, { headers: { "Last-Event-ID": final.id! } }),
    ),
    10_000,
    "the resumed stream",
  );
  const rest = await deadline(resumed.text(), 10_000, "the resumed stream to end");
  assert.doesNotMatch(rest, /^id:/m, "nothing more to send, and it ended");
});

Deno.test("past its write budget a live feed flushes less often, and writes to its clients a slice at a time", async () => {
  await using t = await startTestNats();
  // 10 ms flushes, but at most 1,000 client writes a second: 500 clients get a flush at
  // most every 500 ms.
  const feeds = new LiveFeeds(jetstream(t.nc), t.log, 10, 1_000);
  const CLIENTS = 500;
  const subs: FeedSubscription[] = [];
  for (let i = 0; i < CLIENTS; i++) {
    subs.push(await feeds.join("FEEDBACK", "feedback.*.*", { key: "all", match: () => true }));
  }
  try {
    const js = jetstream(t.nc);
    // The first flush: a timer set when the first client got its chunk runs before the last
    // client gets its own, because the flush yields to the event loop between slices.
    let received = 0;
    let receivedWhenTimerRan = -1;
    const firstRound = Promise.all(subs.map(async (sub) => {
      const chunks = await deadline(sub.take(), 10_000, "the first chunk");
      assert.ok(Array.isArray(chunks));
      if (received++ === 0) setTimeout(() => (receivedWhenTimerRan = received), 0);
    }));
    await js.publish("feedback.ingested.budget1", ingested("budget1"));
    await firstRound;
    assert.ok(CLIENTS > 2 * SSE_FLUSH_SLICE);
    assert.ok(
      receivedWhenTimerRan > 0 && receivedWhenTimerRan < CLIENTS,
      `the timer ran after ${receivedWhenTimerRan} of ${CLIENTS} clients were written`,
    );
    // The next: the last flush wrote to 500 clients, so this one waits 500 ms, not 10.
    const sent = performance.now();
    await js.publish("feedback.ingested.budget2", ingested("budget2"));
    const chunks = await deadline(subs[0]!.take(), 10_000, "the second chunk");
    assert.ok(
      Array.isArray(chunks) && chunks[0]!.frames[0]!.subject === "feedback.ingested.budget2",
    );
    const waited = performance.now() - sent;
    assert.ok(waited >= 490, `the second flush came ${Math.round(waited)} ms after the event`);
  } finally {
    for (const sub of subs) sub.close();
    await waitFor(
      async () => (await ephemeralConsumers(t)) === 0,
      10_000,
      "the feed's consumer gone",
    );
  }
});
