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

Deno.test("messages that trickle in while the reader lingers after the first arrive as one batch", async () => {
  await using t = await startTestNats();
  const consumer = await consumerOn(t);
  const batches = pullBatches(consumer, { lingerMs: 1_500, maxBatch: 100 });
  const reading = read(batches, 5);
  await publish(t, 0, 1);
  // The reader holds the first message (delivered, not acked) and lingers: send the rest.
  await waitFor(async () => (await consumer.info()).num_ack_pending === 1, 2_000, "first taken");
  for (let i = 1; i < 5; i++) await publish(t, i, i + 1);
  const seen = await deadline(reading, 5_000, "5 messages");
  batches.close();
  assert.deepEqual(seen, [[0, 1, 2, 3, 4]]);
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
