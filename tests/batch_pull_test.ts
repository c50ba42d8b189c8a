/**
 * Batched pulls: a reader wakes once per batch, not once per message.
 */
import assert from "node:assert/strict";
import { AckPolicy, jetstream, type JsMsg } from "@nats-io/jetstream";
import { pullBatches } from "../src/batch_pull.ts";
import { startTestNats, type TestNats } from "./helpers/nats.ts";
import { deadline, waitFor } from "./helpers/wait.ts";

async function consumerOn(t: TestNats) {
  await t.jsm.streams.add({ name: "T", subjects: ["t.>"] });
  await t.jsm.consumers.add("T", { durable_name: "reader", ack_policy: AckPolicy.Explicit });
  return await jetstream(t.nc).consumers.get("T", "reader");
}

async function publish(t: TestNats, from: number, to: number) {
  const js = jetstream(t.nc);
  await Promise.all(
    Array.from({ length: to - from }, (_, i) => js.publish(`t.${from + i}`, String(from + i))),
  );
}

/** Reads batches until `total` messages have come, acking each. */
async function read(batches: AsyncIterable<JsMsg[]>, total: number): Promise<number[][]> {
  const seen: number[][] = [];
  let count = 0;
  for await (const batch of batches) {
    seen.push(batch.map((m) => Number(m.string())));
    for (const m of batch) m.ack();
    count += batch.length;
    if (count >= total) break;
  }
  return seen;
}

Deno.test("a backlog of full batches is taken at once, each message once and in order", async () => {
  await using t = await startTestNats();
  const consumer = await consumerOn(t);
  await publish(t, 0, 200);
  const batches = pullBatches(consumer, { lingerMs: 5_000, maxBatch: 100 });
  // A linger of 5 s would show in the deadline: a full batch waiting is not lingered on.
  const seen = await deadline(read(batches, 200), 4_000, "200 messages");
  batches.close();
  assert.deepEqual(seen.map((b) => b.length), [100, 100]);
  assert.deepEqual(seen.flat(), Array.from({ length: 200 }, (_, i) => i));
});

Deno.test("a lone message is handed over at once; what arrives within the linger comes as one batch", async () => {
  await using t = await startTestNats();
  const consumer = await consumerOn(t);
  // A linger long enough that four publishes fit in it on a loaded machine (2 s did not once).
  const batches = pullBatches(consumer, { lingerMs: 8_000, maxBatch: 100 });
  const it = batches[Symbol.asyncIterator]();
  await publish(t, 0, 1);
  const first: JsMsg[] = (await deadline(it.next(), 1_500, "first batch")).value;
  assert.deepEqual(first.map((m) => m.string()), ["0"]);
  first.forEach((m) => m.ack());
  // The reader now lets the linger pass before it pulls again: these wait on the server.
  for (let i = 1; i < 5; i++) await publish(t, i, i + 1);
  assert.equal((await consumer.info()).num_pending, 4);
  const second: JsMsg[] = (await deadline(it.next(), 15_000, "second batch")).value;
  assert.deepEqual(second.map((m) => m.string()), ["1", "2", "3", "4"]);
  batches.close();
});

Deno.test("batches are sized from the pending count on messages, not from consumer info", async () => {
  // On nats-server 2.9 a consumer info request counts a wildcard filter's subjects under
  // the stream's write lock: asked before every batch, it stalled every publish.
  await using t = await startTestNats();
  const consumer = await consumerOn(t);
  const batches = pullBatches(consumer, { lingerMs: 0, maxBatch: 50 });
  const before = (await t.jsm.getAccountInfo()).api.total;
  await publish(t, 0, 120);
  const seen = await deadline(read(batches, 120), 4_000, "120 messages");
  batches.close();
  assert.equal(seen.flat().length, 120);
  // The only API request in between is the account info call that reads the counter.
  assert.equal((await t.jsm.getAccountInfo()).api.total - before, 1);
});

Deno.test("close() ends a reader that is waiting for its first message", async () => {
  await using t = await startTestNats();
  const consumer = await consumerOn(t);
  const batches = pullBatches(consumer, { lingerMs: 20, maxBatch: 100 });
  const reading = read(batches, 1);
  await waitFor(async () => (await consumer.info()).num_waiting === 1, 2_000, "pull waiting");
  batches.close();
  // The idle pull would otherwise wait 30 s.
  assert.deepEqual(await deadline(reading, 2_000, "reader ends"), []);
});
