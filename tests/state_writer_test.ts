/**
 * The state writer: one KV entry per item, folded from its events, never losing a field.
 */
import assert from "node:assert/strict";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { createEvent } from "../src/events.ts";
import { runStateWriter } from "../src/state_writer.ts";
import { FEEDBACK_STATE_SPEC } from "../pipelines/feedback/state.ts";
import type { FeedbackState } from "../pipelines/feedback/events.gen.ts";
import { startTestNats } from "./helpers/nats.ts";
import { waitFor } from "./helpers/wait.ts";

const TRACE = "0af7651916cd43dd8448eb211c80319c";
const sentiment = { label: "negative" as const, score: -0.8, analyzer: "rules" };
const topics = {
  topics: ["technical_issue"],
  evidence: { technical_issue: ["bug"] },
  analyzer: "rules",
};
const routing = { team: "Urgent Technical Support", rule: 0 };

function eventsOf(id: string) {
  const base = { itemId: id, traceId: TRACE, source: "test" };
  const data = { text: "bad bug" };
  return [
    createEvent({ ...base, type: "feedback.ingested", data }),
    createEvent({ ...base, type: "feedback.sentiment_analyzed", data: { ...data, sentiment } }),
    createEvent({
      ...base,
      type: "feedback.topics_extracted",
      data: { ...data, sentiment, topics },
    }),
    createEvent({
      ...base,
      type: "feedback.dispatched",
      data: { ...data, sentiment, topics, routing },
    }),
    createEvent({
      ...base,
      type: "feedback.processed",
      data: { ...data, sentiment, topics, routing },
    }),
  ];
}

Deno.test("two state writers on one consumer, fed events out of order, lose no field of any item", async () => {
  await using t = await startTestNats();
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const writers = [
    await runStateWriter({ ...deps, spec: FEEDBACK_STATE_SPEC }),
    await runStateWriter({ ...deps, spec: FEEDBACK_STATE_SPEC }),
  ];
  const js = jetstream(t.nc);
  const ids = Array.from({ length: 200 }, (_, i) => `item${i}`);
  const publishes = [];
  for (const id of ids) {
    for (const e of eventsOf(id).reverse()) {
      publishes.push(js.publish(`${e.type}.${id}`, JSON.stringify(e), { msgID: e.id }));
    }
  }
  await Promise.all(publishes);
  const kv = await new Kvm(t.nc).open("weft_feedback_state");
  for (const id of ids) {
    const s = await waitFor(
      async () => {
        const v = (await kv.get(id))?.json<FeedbackState>();
        return v && Object.keys(v.stages).length === 5 ? v : undefined;
      },
      10_000,
      `all five stages of ${id}`,
    );
    assert.equal(s.status, "processed");
    assert.deepEqual(s.sentiment, sentiment);
    assert.deepEqual(s.topics, topics);
    assert.deepEqual(s.routing, routing);
  }
  await Promise.all(writers.map((w) => w.stop()));
  const events = writers.reduce((n, w) => n + w.stats.events, 0);
  const writes = writers.reduce((n, w) => n + w.stats.writes, 0);
  assert.ok(events >= ids.length * 5);
  assert.ok(writes < events, `batched: ${writes} writes for ${events} events`);
});
