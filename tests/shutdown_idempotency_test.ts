/**
 * Graceful shutdown and idempotency on real processes.
 */
import assert from "node:assert/strict";
import { FEEDBACK_STREAM } from "../pipelines/feedback/subjects.ts";
import { startServices } from "./helpers/mesh.ts";
import { countsByItem, pushItems } from "./helpers/nats.ts";
import { waitUntil } from "./helpers/wait.ts";
import { makeItems, settle } from "./helpers/scenario.ts";
import { FAULT_MODES } from "./helpers/fault_scenarios.ts";

// Every service its own process, then all in one (`--together`), where the SIGTERM drains
// the one process: every step, the state writer and the gateway.
for (const mode of FAULT_MODES) {
  Deno.test(`${mode.name}SIGTERM stops fetching, finishes in-flight work within the drain deadline, and leaves the rest for redelivery`, async () => {
    const started = Date.now();
    const drainMs = 3000;
    const env = { WEFT_DRAIN_MS: String(drainMs), WEFT_ACK_WAIT_MS: "2000" };
    const slow = { WEFT_SLOW_MS: "1000", WEFT_SLOW_STAGE: "topics", WEFT_CONCURRENCY: "10" };
    await using mesh = await startServices(
      mode.together
        ? { env: { ...env, ...slow }, together: true }
        : { env, serviceEnv: { topics: slow } },
    );
    const items = makeItems(mode.together ? "drain-together" : "drain", 200);
    await pushItems(mesh.js, items);
    await waitUntil(
      async () => (await countsByItem(mesh.jsm, "feedback.sentiment_analyzed.*")).size >= 50,
      20_000,
    );
    // Its ten slots busy (on a loaded machine the slow step may not have pulled them all yet
    // when the earlier step is 50 items in): ten in flight when the SIGTERM comes.
    await waitUntil(
      async () => (await mesh.jsm.consumers.info(FEEDBACK_STREAM, "topics")).num_ack_pending >= 10,
      20_000,
    );
    const before = (await countsByItem(mesh.jsm, "feedback.topics_extracted.*")).size;
    const t0 = Date.now();
    const status = await mesh.kill("topics", "SIGTERM");
    const took = Date.now() - t0;
    assert.equal(status.code, 0, "clean exit");
    assert.ok(took < drainMs + 3000, `stopped within the deadline (${took} ms)`);
    const after = (await countsByItem(mesh.jsm, "feedback.topics_extracted.*")).size;
    assert.ok(after >= before + 10, `in-flight work finished (${before} -> ${after})`);
    assert.ok(after < items.length, "the rest was left for redelivery");
    // Whatever has no topics output yet is still owed, at topics or at a step before it (in
    // one process those stopped too); a handler cut off by the deadline after it published may
    // be owed too: its redelivery is absorbed by the duplicate window. A message topics acked
    // without its output would be owed nowhere.
    let owed = 0;
    for (const durable of ["ingest", "sentiment", "topics"]) {
      const info = await mesh.jsm.consumers.info(FEEDBACK_STREAM, durable);
      owed += info.num_pending + info.num_ack_pending;
    }
    assert.ok(owed >= items.length - after, `the rest is still owed (${owed})`);

    await mesh.start("topics", { WEFT_SLOW_MS: "0", WEFT_CONCURRENCY: "64" });
    await settle(mesh, "graceful shutdown", items, 1, started);
  });
}

Deno.test("a repeated Idempotency-Key returns the first answer and a repeated message id is dropped by the stream", async () => {
  await using mesh = await startServices({ services: ["gateway"] });
  const send = (body: unknown, key: string) =>
    fetch(`${mesh.gatewayUrl}/feedback`, {
      method: "POST",
      headers: { "content-type": "application/json", "Idempotency-Key": key },
      body: JSON.stringify(body),
    });
  const first = await send({ text: "same thing" }, "key-1");
  const firstBody = await first.json();
  assert.equal(first.status, 202);
  const again = await send({ text: "same thing" }, "key-1");
  assert.deepEqual(await again.json(), firstBody);
  assert.equal(again.headers.get("Idempotent-Replayed"), "true");
  const other = await send({ text: "different" }, "key-1");
  assert.equal(other.status, 422);
  assert.equal((await other.json()).code, "idempotency_mismatch");
  assert.equal((await countsByItem(mesh.jsm, "feedback.ingested.*")).size, 1);

  const a = await mesh.js.publish("feedback.submit", JSON.stringify({ text: "x" }), {
    msgID: "m-1",
  });
  const b = await mesh.js.publish("feedback.submit", JSON.stringify({ text: "x" }), {
    msgID: "m-1",
  });
  assert.equal(a.duplicate, false);
  assert.equal(b.duplicate, true);
  assert.equal(b.seq, a.seq);
});
