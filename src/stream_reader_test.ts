import assert from "node:assert/strict";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { connectNats } from "./nats.ts";
import { startNatsServer } from "./nats_server.ts";
import { prefetchBytes, ReadBudget, readStream } from "./stream_reader.ts";
import { deadline, waitFor } from "../tests/helpers/wait.ts";

const COUNT = 5_000;

async function serverWithStream() {
  const server = await startNatsServer();
  const nc = await connectNats(server.url, "reader-test");
  const jsm = await jetstreamManager(nc);
  await jsm.streams.add({ name: "R", subjects: ["r.>"] });
  const js = jetstream(nc);
  const acks = [];
  for (let i = 0; i < COUNT; i++) acks.push(js.publish(`r.e.${i % 50}`, `m${i}`));
  await Promise.all(acks);
  return {
    server,
    js,
    jsm,
    async [Symbol.asyncDispose]() {
      await nc.close();
      await server[Symbol.asyncDispose]();
    },
  };
}

Deno.test("a stream read that pauses mid-way (the server stalls) still reads to the end, never stopping short", async () => {
  await using t = await serverWithStream();
  const seqs: number[] = [];
  let paused = false;
  for await (const m of readStream(t.js, "R", { filter: "r.*.*" })) {
    seqs.push(m.seq);
    if (seqs.length === 100) {
      // The server stops answering for longer than any idle cut-off a reader might use.
      Deno.kill(t.server.pid, "SIGSTOP");
      paused = true;
      setTimeout(() => Deno.kill(t.server.pid, "SIGCONT"), 1_500);
    }
  }
  assert.ok(paused);
  assert.equal(seqs.length, COUNT, "every stored message, none skipped at the pause");
  assert.deepEqual(seqs, Array.from({ length: COUNT }, (_, i) => i + 1));
});

Deno.test("a read stalled longer than a third of its stall budget starts again after its last message and reads to the end", async () => {
  await using t = await serverWithStream();
  const seqs: number[] = [];
  let paused = false;
  // A 3 s budget: one consumer waits 1 s, then the read starts again from its last message.
  for await (const m of readStream(t.js, "R", { filter: "r.*.*", stallMs: 3_000 })) {
    seqs.push(m.seq);
    if (seqs.length === 100) {
      // Longer than the whole budget: a read that waited on one consumer would fail.
      Deno.kill(t.server.pid, "SIGSTOP");
      paused = true;
      setTimeout(() => Deno.kill(t.server.pid, "SIGCONT"), 4_000);
    }
  }
  assert.ok(paused);
  assert.deepEqual(seqs, Array.from({ length: COUNT }, (_, i) => i + 1), "each once, in order");
  assert.equal((await t.jsm.streams.info("R")).state.consumer_count, 0, "no consumer left");
});

Deno.test("a read whose consumer is deleted on the server mid-read still reads every message once", async () => {
  await using t = await serverWithStream();
  const seqs: number[] = [];
  for await (const m of readStream(t.js, "R", { filter: "r.*.*", stallMs: 3_000 })) {
    seqs.push(m.seq);
    if (seqs.length === 100) {
      // As when the node it lived on dies: the server side of the ordered consumer is gone.
      for await (const c of t.jsm.consumers.list("R")) {
        await t.jsm.consumers.delete("R", c.name);
      }
    }
  }
  assert.deepEqual(seqs, Array.from({ length: COUNT }, (_, i) => i + 1), "each once, in order");
});

Deno.test("a stream read whose filter matches nothing ends at once, and leaves no consumer behind", async () => {
  await using t = await serverWithStream();
  const started = Date.now();
  const seen = [];
  for await (const m of readStream(t.js, "R", { filter: "r.none.*", stallMs: 60_000 })) {
    seen.push(m);
  }
  assert.equal(seen.length, 0);
  assert.ok(Date.now() - started < 30_000, "ended on the server's count, not on a timeout");
  assert.equal((await t.jsm.streams.info("R")).state.consumer_count, 0);
});

Deno.test("a read from a start sequence yields exactly the messages from there to the end", async () => {
  await using t = await serverWithStream();
  const seqs: number[] = [];
  for await (const m of readStream(t.js, "R", { filter: "r.e.7", startSeq: 4_000 })) {
    seqs.push(m.seq);
  }
  const expected = [];
  for (let s = 4_000; s <= COUNT; s++) if ((s - 1) % 50 === 7) expected.push(s);
  assert.deepEqual(seqs, expected);
});

Deno.test("a reader whose caller stops taking messages holds at most its prefetch bytes: 60 messages of 100 KB, one taken, at most ~1 MiB delivered", async () => {
  const server = await startNatsServer();
  const nc = await connectNats(server.url, "reader-test");
  try {
    const jsm = await jetstreamManager(nc);
    await jsm.streams.add({ name: "BIG", subjects: ["big.>"] });
    const js = jetstream(nc);
    const size = 100_000;
    const body = new Uint8Array(size).fill(120);
    for (let i = 0; i < 60; i++) await js.publish(`big.e.${i}`, body);
    const reader = readStream(js, "BIG");
    const first = await reader.next();
    assert.equal(first.done, false);
    // The caller takes no more (an event stream whose client stopped reading). Once the
    // server has answered every pull the reader sent (or delivered everything), what it
    // delivered is what the reader holds; it sends no other pull until more are taken.
    const delivered = await waitFor(
      async () => {
        for await (const c of jsm.consumers.list("BIG")) {
          const settled = c.num_waiting === 0 || c.num_pending === 0;
          if (settled && c.delivered.stream_seq > 1) return c.delivered.stream_seq;
        }
        return undefined;
      },
      20_000,
      "the reader's pulls answered",
    );
    const bound = Math.floor(prefetchBytes(nc.info!.max_payload) / size) + 1;
    assert.ok(delivered <= bound, `${delivered} of 60 delivered, more than ${bound}`);
    await reader.return(undefined);
    assert.equal((await jsm.streams.info("BIG")).state.consumer_count, 0, "no consumer left");
  } finally {
    await nc.close();
    await server[Symbol.asyncDispose]();
  }
});

/** A server with stream R holding `count` messages of 200 KB, past a reader's prefetch. */
async function largeMessages(count: number) {
  const server = await startNatsServer();
  const nc = await connectNats(server.url, "reader-test");
  const jsm = await jetstreamManager(nc);
  await jsm.streams.add({ name: "R", subjects: ["r.>"] });
  const js = jetstream(nc);
  const body = new Uint8Array(200_000);
  for (let i = 0; i < count; i++) await js.publish(`r.e.${i}`, body);
  return { server, nc, js, jsm };
}

Deno.test("a read whose connection closes mid-read throws instead of ending as if it had read everything", async () => {
  // nats.js ends a consumer's messages without an error when its connection closes: a read
  // that took that for the end of the stream silently skipped the rest (an SSE replay then
  // went on live with a gap, instead of closing its client to resume with Last-Event-ID).
  // 60 messages of 200 KB: the reader's prefetch (about 1 MiB) holds a few at a time, so
  // most are still on the server when the connection closes, whatever nats.js had buffered.
  const { server, nc, js } = await largeMessages(60);
  try {
    let read = 0;
    await assert.rejects(
      (async () => {
        for await (const _ of readStream(js, "R", { stallMs: 10_000 })) {
          if (++read === 2) await nc.close();
        }
      })(),
      /closed|cut short/,
    );
    assert.ok(read < 60, `${read} read`);
  } finally {
    if (!nc.isClosed()) await nc.close();
    await server[Symbol.asyncDispose]();
  }
});

Deno.test("a read whose last pending messages are removed before they are sent ends when the stream holds nothing after it, not after its stall time", async () => {
  // A message's `pending` is counted when it is sent: older revisions of a bucket's keys,
  // deletes, purges and age limits remove messages a count included. Found on nats-server
  // 2.9 under load: a read of a state bucket waited out its stall time with nothing to read.
  // 40 messages of 200 KB: the reader's prefetch holds a few, the rest stay on the server.
  const { server, nc, js, jsm } = await largeMessages(40);
  try {
    const seqs: number[] = [];
    // A stall time far past the test's deadline: only the consumer's answer can end the read.
    const read = (async () => {
      for await (const m of readStream(js, "R", { stallMs: 600_000 })) {
        seqs.push(m.seq);
        if (seqs.length === 1) {
          // Everything the reader has not been sent yet is removed (as a bucket's newer
          // revisions remove older ones): the messages it holds still count them as pending.
          const sent = await waitFor(
            async () => {
              const [c] = await Array.fromAsync(await jsm.consumers.list("R"));
              return (c?.delivered.stream_seq ?? 0) > 1 && c!.delivered.stream_seq;
            },
            10_000,
            "the reader's prefetch sent",
          );
          for (let seq = sent + 1; seq <= 40; seq++) {
            await jsm.streams.deleteMessage("R", seq, false);
          }
        }
      }
    })();
    await deadline(read, 60_000, "the read to end");
    assert.ok(seqs.length > 1 && seqs.length < 40, `${seqs.length} read`);
    assert.deepEqual(seqs, seqs.map((_, i) => i + 1), "in order, each once, none skipped");
  } finally {
    await nc.close();
    await server[Symbol.asyncDispose]();
  }
});

Deno.test("ReadBudget serves readers first come first served, never past its total, and one that stops waiting leaves the queue", async () => {
  const budget = new ReadBudget(10);
  const a = await budget.acquire(6);
  const order: string[] = [];
  const b = budget.acquire(6).then((r) => (order.push("b"), r));
  const gone = new AbortController();
  const c = budget.acquire(20, gone.signal); // more than the total: the whole budget, alone
  const d = budget.acquire(2).then((r) => (order.push("d"), r));
  assert.equal(budget.free, 4);
  assert.equal(budget.waiting, 3, "d waits behind b and c, though 4 bytes are free");
  gone.abort(new Error("client gone"));
  await assert.rejects(c, /client gone/);
  a();
  a(); // a second release gives nothing back
  const [rb, rd] = await Promise.all([b, d]);
  assert.deepEqual(order, ["b", "d"]);
  assert.equal(budget.free, 2);
  rb();
  rd();
  assert.equal(budget.free, 10);
  assert.equal(budget.waiting, 0);
});
