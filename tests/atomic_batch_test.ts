/**
 * POST /feedback/batch is all or nothing on the bus too, where nats-server has atomic
 * batches that take Weft's headers (2.14+): the intake publishes a batch's items as one atomic batch, so a batch
 * the stream refuses, or one with an item refused, leaves none of its items behind.
 * Before, items were published one by one and such a batch left some of them stored.
 *
 * On an older server (Debian's 2.9) these tests are skipped and the intake publishes
 * item by item, as before.
 */
import assert from "node:assert/strict";
import { jetstream } from "@nats-io/jetstream";
import { headers } from "@nats-io/nats-core";
import { createIntake } from "../pipelines/feedback/intake.ts";
import { ErrorCode, WeftError } from "../src/errors.ts";
import { FEEDBACK_STREAM } from "../pipelines/feedback/subjects.ts";
import { publishAtomically, supportsAtomicBatch } from "../src/atomic_batch.ts";
import { eventMessage } from "../src/runner.ts";
import { createEvent } from "../src/events.ts";
import { serverVersion } from "../src/nats_server.ts";
import { startTestNats, type TestNats } from "./helpers/nats.ts";
import { definitionsApp } from "./helpers/pipeline.ts";
import { loadPipelines, pipelineTopology } from "../src/pipeline/runtime.ts";
import { ensureTopology } from "../src/topology.ts";

const version = await serverVersion();
const ignore = !supportsAtomicBatch(version ?? undefined);

/** How many messages FEEDBACK holds. */
async function stored(t: TestNats): Promise<number> {
  return (await t.jsm.streams.info(FEEDBACK_STREAM)).state.messages;
}

Deno.test({
  name: "the FEEDBACK stream takes atomic batches where the server has them",
  ignore,
  async fn() {
    await using t = await startTestNats();
    const info = await t.jsm.streams.info(FEEDBACK_STREAM);
    assert.equal((info.config as { allow_atomic?: boolean }).allow_atomic, true);
  },
});

Deno.test({
  name: "a batch with one item under a known id and another body stores none of its items",
  ignore,
  async fn() {
    await using t = await startTestNats();
    const intake = await createIntake(t.nc);
    await intake.submit({ id: "known1", text: "the first body" });
    assert.equal(await stored(t), 1);

    await assert.rejects(
      intake.submitBatch([
        { id: "new1", text: "a new item" },
        { id: "known1", text: "another body" },
        { id: "new2", text: "another new item" },
      ]),
      (err: unknown) => err instanceof WeftError && err.code === ErrorCode.IdempotencyMismatch,
    );
    assert.equal(await stored(t), 1, "new1 and new2 were not stored either");

    // The same id with the same body is the same item: left out, the others stored.
    const { body } = await intake.submitBatch([
      { id: "new1", text: "a new item" },
      { id: "known1", text: "the first body" },
      { id: "new2", text: "another new item" },
    ]);
    assert.deepEqual(body.items.map((i) => i.id), ["new1", "known1", "new2"]);
    assert.equal(await stored(t), 3);
  },
});

Deno.test({
  name: "a batch the stream cannot hold whole is refused whole, and a retry that fits is stored",
  ignore,
  async fn() {
    // A FEEDBACK stream of 16 KiB (discard new): 10 items of about 2 KiB do not fit.
    await using t = await startTestNats({ streamMaxBytes: 16 * 1024 });
    const intake = await createIntake(t.nc);
    const items = (n: number, prefix: string) =>
      Array.from({ length: n }, (_, i) => ({ id: `${prefix}${i}`, text: "x".repeat(2_000) }));

    await assert.rejects(
      intake.submitBatch(items(10, "big")),
      (err: unknown) => err instanceof WeftError && err.code === ErrorCode.Unavailable,
    );
    assert.equal(await stored(t), 0, "none of the 10 items was stored");

    await intake.submitBatch(items(3, "small"));
    assert.equal(await stored(t), 3);
  },
});

Deno.test({
  name: "publishAtomically stores every message with its headers, or none when one is refused",
  ignore,
  async fn() {
    await using t = await startTestNats();
    const js = jetstream(t.nc);
    const ingested = (id: string) =>
      eventMessage(
        createEvent({
          type: "feedback.ingested",
          id: `ev-${id}`,
          itemId: id,
          traceId: "0af7651916cd43dd8448eb211c80319c",
          source: "test",
          data: { text: id, channel: "test" },
        }),
        null,
        true,
      );
    await publishAtomically(js, ["a1", "a2", "a3"].map(ingested));
    assert.equal(await stored(t), 3);
    const m = await t.jsm.streams.getMessage(FEEDBACK_STREAM, {
      last_by_subj: "feedback.ingested.a2",
    });
    assert.equal(m?.header.get("Weft-Event-Type"), "feedback.ingested");
    assert.equal(m?.header.get("Nats-Msg-Id"), "ev-a2");

    // a2's subject already holds its entry event: the whole batch is refused.
    await assert.rejects(
      publishAtomically(js, ["b1", "a2", "b2"].map(ingested)),
      { name: "AtomicBatchRefused" },
    );
    assert.equal(await stored(t), 3);
  },
});

Deno.test({
  name:
    "a definition's batch is all or nothing on the bus too: one the stream cannot hold stores none",
  ignore,
  async fn() {
    // The definition's stream (discard new) at 16 KiB: 10 items of about 2 KiB do not fit.
    await using t = await startTestNats({ streamMaxBytes: 16 * 1024 });
    const pipelines = await loadPipelines(
      ["pipelines/examples/tickets.ts"],
      new URL("../", import.meta.url).pathname,
    );
    await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology(pipelines, t.config.retentionMs));
    const info = await t.jsm.streams.info("TICKETS");
    assert.equal((info.config as { allow_atomic?: boolean }).allow_atomic, true);
    const app = await definitionsApp(t, pipelines);
    const batch = (n: number) =>
      app.request("/pipelines/tickets/items/batch", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({
          items: Array.from(
            { length: n },
            (_, i) => ({ customer: `c${i}`, text: "x".repeat(2_000) }),
          ),
        }),
      });
    const refused = await batch(10);
    assert.equal(refused.status, 503, await refused.clone().text());
    assert.equal((await refused.json()).code, "unavailable");
    assert.ok(Number(refused.headers.get("retry-after")) > 0, "says when to retry");
    assert.equal((await t.jsm.streams.info("TICKETS")).state.messages, 0, "none of the 10 stored");
    const fits = await batch(3);
    assert.equal(fits.status, 202);
    await fits.body?.cancel();
    assert.equal((await t.jsm.streams.info("TICKETS")).state.messages, 3);
  },
});

Deno.test({
  name: "batches others opened and never committed make a batch wait or answer 503, never fail it",
  ignore,
  async fn() {
    // Found adversarially: 60 atomic batches opened on feedback.submit (anyone who may submit
    // can) and left open; the next POST /feedback/batch answered 500 ("atomic publish too
    // many inflight").
    await using t = await startTestNats();
    const intake = await createIntake(t.nc);
    for (let i = 0; i < 60; i++) {
      t.nc.publish("feedback.submit", "{}", {
        headers: batchHeaders(`open-${i}`),
      });
    }
    await t.nc.flush();
    try {
      const { body } = await intake.submitBatch([{ text: "one" }, { text: "two" }]);
      assert.equal(body.items.length, 2);
    } catch (err) {
      assert.ok(err instanceof WeftError, String(err));
      assert.equal(err.code, ErrorCode.Unavailable, err.message);
      assert.ok(err.retryAfterSeconds, "with Retry-After");
    }
  },
});

/** The headers of the first message of an atomic batch (nats-server 2.14+). */
function batchHeaders(id: string) {
  const h = headers();
  h.set("Nats-Batch-Id", id);
  h.set("Nats-Batch-Sequence", "1");
  return h;
}
