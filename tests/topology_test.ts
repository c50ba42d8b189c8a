/**
 * Creating the topology is idempotent: a second start changes nothing and loses nothing.
 */
import assert from "node:assert/strict";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { ensureTopology } from "../src/topology.ts";
import { startTestNats } from "./helpers/nats.ts";

Deno.test("ensureTopology() run again keeps every stream, bucket and message", async () => {
  await using t = await startTestNats();
  await jetstream(t.nc).publish("feedback.submit", JSON.stringify({ text: "kept" }));
  const kv = await new Kvm(t.nc).open("weft_feedback_state");
  await kv.put("fb1", JSON.stringify({ kept: true }));
  const before = await t.jsm.streams.info("FEEDBACK");
  await ensureTopology(t.nc, t.jsm, t.config);
  const after = await t.jsm.streams.info("FEEDBACK");
  assert.equal(after.state.messages, 1);
  assert.equal(after.created, before.created, "not recreated");
  assert.deepEqual(after.config, before.config);
  assert.deepEqual((await kv.get("fb1"))?.json(), { kept: true });
});

Deno.test("ensureTopology() updates a changed limit in place without losing messages", async () => {
  await using t = await startTestNats();
  await jetstream(t.nc).publish("feedback.submit", JSON.stringify({ text: "kept" }));
  await ensureTopology(t.nc, t.jsm, { ...t.config, retentionMs: 3_600_000 });
  const info = await t.jsm.streams.info("FEEDBACK");
  assert.equal(info.config.max_age, 3_600_000 * 1_000_000);
  assert.equal(info.state.messages, 1);
});
