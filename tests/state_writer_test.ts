/**
 * The state writer: one KV entry per item, folded from its events, never losing a field.
 */
import assert from "node:assert/strict";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import { Kvm } from "@nats-io/kv";
import { createEvent } from "../src/events.ts";
import { runStateWriter } from "../src/state_writer.ts";
import { FEEDBACK_STATE_SPEC } from "../pipelines/feedback/state.ts";
import type { FeedbackState } from "../pipelines/feedback/events.gen.ts";
import { startTestNats, testConfig } from "./helpers/nats.ts";
import { freePort, startNatsServer } from "../src/nats_server.ts";
import { createLogger } from "../src/observability/log.ts";
import { letterLooks } from "../src/failure_letter.ts";
import { listDeadLetters } from "../src/redrive.ts";
import { waitFor } from "./helpers/wait.ts";
import { definePipeline } from "../src/pipeline/definition.ts";
import { compileFlow } from "../src/pipeline/flow.ts";
import { pipelineSubjects } from "../src/pipeline/derive.ts";
import {
  type LoadedPipeline,
  pipelineStateSpec,
  pipelineTopology,
  readItem,
  stateBucketOf,
  submitItem,
  workStage,
} from "../src/pipeline/runtime.ts";
import { ensureTopology } from "../src/topology.ts";
import { rebuildStates } from "../src/rebuild.ts";
import { runStage, storedMessage } from "../src/runner.ts";

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
  // Each item's events in pipeline order, as its steps store them (a step's event stored
  // before the item reached the step is not the item's: the writer dead-letters it). The two
  // writers take them in batches of their own, so each folds some of an item's events before
  // the events stored ahead of them, which the other holds.
  for (const id of ids) {
    for (const e of eventsOf(id)) {
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
  // None was taken for an event its item's history does not lead to.
  assert.deepEqual(await listDeadLetters(js, {}), []);
});

Deno.test("an item whose state cannot be written is dead-lettered with the reason on its last attempt, and the writer goes on", async () => {
  // Seen in review: a state that can never be stored (here one past the server's largest
  // message) was retried until the server stopped delivering its events: no dead letter, the
  // events silently missing from the state until a rebuild.
  await using t = await startTestNats();
  const config = { ...t.config, maxAttempts: 2, retryBaseMs: 10, retryMaxMs: 20 };
  const huge = "x".repeat(2 * 1024 * 1024);
  const writer = await runStateWriter({
    nc: t.nc,
    config,
    log: t.log,
    spec: {
      ...FEEDBACK_STATE_SPEC,
      apply: (s, e, seq) => {
        const next = FEEDBACK_STATE_SPEC.apply(s, e, seq);
        return e.item_id === "huge" ? { ...next, padding: huge } as typeof next : next;
      },
    },
  });
  try {
    const js = jetstream(t.nc);
    for (const id of ["huge", "fine"]) {
      for (const e of eventsOf(id)) {
        await js.publish(`${e.type}.${id}`, JSON.stringify(e), { msgID: e.id });
      }
    }
    const kv = await new Kvm(t.nc).open("weft_feedback_state");
    await waitFor(
      async () => (await kv.get("fine"))?.json<FeedbackState>().status === "processed",
      10_000,
      "the other item's state",
    );
    const letters = await waitFor(
      async () => {
        const l = await listDeadLetters(js, { stage: FEEDBACK_STATE_SPEC.durable });
        return l.length === 5 ? l : undefined;
      },
      20_000,
      "a dead letter for each of the huge item's five events",
    );
    for (const l of letters) {
      assert.equal(l.letter.item_id, "huge");
      assert.equal(l.letter.attempts, 2);
      assert.match(l.letter.reason, /payload/i);
    }
    assert.equal(await kv.get("huge"), null);
  } finally {
    await writer.stop();
  }
});

Deno.test("an event the writer cannot look its item up for (NATS refuses the read on every delivery) is dead-lettered on its last delivery, not dropped", async () => {
  // Found by reading: on NATS trouble the writer naked the event on every delivery, so once
  // the server stopped delivering it (max_deliver) it was gone: not folded, no letter.
  const dir = await Deno.makeTempDir({ prefix: "weft-writer-reads-" });
  const port = freePort();
  await Deno.writeTextFile(
    `${dir}/nats.conf`,
    `listen: "127.0.0.1:${port}"
jetstream { store_dir: "${dir}/js" }
authorization {
  users = [
    { user: admin, password: admin }
    # The writer may do everything but read a message of FEEDBACK by sequence or subject.
    { user: writer, password: writer, permissions: {
      publish: { allow: [">"], deny: ["$JS.API.STREAM.MSG.GET.FEEDBACK"] }
      subscribe: { allow: [">"] } } }
  ]
}
`,
  );
  await using server = await startNatsServer({ configFile: `${dir}/nats.conf`, port });
  const admin = await connect({ servers: server.url, user: "admin", pass: "admin" });
  const nc = await connect({ servers: server.url, user: "writer", pass: "writer" });
  const config = { ...testConfig(server.url), maxAttempts: 2, retryBaseMs: 10, retryMaxMs: 20 };
  const log = createLogger("test", "error");
  await ensureTopology(admin, await jetstreamManager(admin), config);
  const writer = await runStateWriter({ nc, config, log, spec: FEEDBACK_STATE_SPEC });
  try {
    // A step's event for an item the writer has no state of: it reads the item's entry
    // subject in the stream to judge it, and that read is refused.
    const [, analyzed] = eventsOf("ORPHAN");
    const js = jetstream(admin);
    const stored = await js.publish(`${analyzed!.type}.ORPHAN`, JSON.stringify(analyzed));
    const letter = await waitFor(
      async () =>
        (await listDeadLetters(js, { stage: FEEDBACK_STATE_SPEC.durable })).find((l) =>
          l.letter.stream_seq === stored.seq
        )?.letter,
      20_000,
      "the writer's dead letter of the event",
    );
    assert.equal(letter.item_id, "ORPHAN");
    assert.equal(letter.attempts, letterLooks(config.maxAttempts) + 2, "its last delivery");
    assert.match(letter.reason, /permission/i);
  } finally {
    await writer.stop();
    await nc.close();
    await admin.close();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});

Deno.test("a restarted state writer given a definition's step events before the earlier one it held folds them all, as a rebuild does", async () => {
  await using t = await startTestNats({ ackWaitMs: 1000 });
  const obj = { type: "object" } as const;
  // A bounded loop: draft, critique, draft again, critique again, shipped. The second draft
  // waits for the test.
  let open!: () => void;
  const gate = new Promise<void>((r) => (open = r));
  const def = definePipeline({
    name: "orders",
    input: { schema: obj },
    start: "draft",
    steps: {
      draft: {
        kind: "task",
        output: obj,
        handle: async (_v: unknown, c: { runs: Record<string, number> }) => {
          if ((c.runs.draft ?? 0) >= 1) await gate;
          return { n: (c.runs.draft ?? 0) + 1 };
        },
        next: "critique",
      },
      critique: {
        kind: "router",
        route: (_v: unknown, c: { runs: Record<string, number> }) =>
          (c.runs.draft ?? 0) < 2 ? "again" : "ok",
        routes: { again: "draft", ok: "shipped" },
      },
      shipped: { kind: "end", outcome: "shipped" },
    },
    loops: [{ from: "critique", to: "draft", maxIterations: 3 }],
  });
  const p: LoadedPipeline = { file: "inline", def, flow: compileFlow(def) };
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const { stream } = pipelineSubjects(def);
  const spec = pipelineStateSpec(p);
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const kv = await new Kvm(t.nc).open(stateBucketOf("orders"));
  const js = jetstream(t.nc);
  const steps = await Promise.all(
    ["draft", "critique"].map((id) => runStage({ ...deps, stage: workStage(p, id, { nc: t.nc }) })),
  );
  try {
    // The item's first round is folded; the writer stops while the second draft runs.
    let writer = await runStateWriter({ ...deps, spec });
    await submitItem(t.nc, p, "o1", {}, { source: "test", traceId: TRACE });
    await waitFor(
      async () => (await readItem(kv, "o1"))?.runs.critique === 1 ? true : undefined,
      10_000,
      "o1's first round folded",
    );
    await writer.stop();
    open();
    await waitFor(
      async () =>
        (await storedMessage(t.jsm, stream, { last_by_subj: "orders.shipped.o1" })) ?? undefined,
      20_000,
      "o1 shipped on the stream",
    );
    // The writer's consumer had delivered the second draft when the writer died (not acked):
    // the restarted writer gets the second critique and the end first, and the draft again
    // only after the ack wait.
    const consumer = await js.consumers.get(stream, spec.durable);
    const held = await consumer.next({ expires: 5000 });
    assert.equal(held?.subject, "orders.draft.o1");
    writer = await runStateWriter({ ...deps, spec });
    try {
      await waitFor(
        async () => {
          const info = await t.jsm.consumers.info(stream, spec.durable);
          return info.num_pending === 0 && info.num_ack_pending === 0 ? true : undefined;
        },
        20_000,
        "the writer to fold every event",
      );
    } finally {
      await writer.stop();
    }
  } finally {
    for (const s of steps) await s.stop();
  }
  const live = await readItem(kv, "o1");
  const { states } = await rebuildStates(js, spec);
  assert.equal(live?.outcome, "shipped", JSON.stringify(live));
  assert.deepEqual(live?.runs, { draft: 2, critique: 2 });
  assert.deepEqual(live, states.get("o1"));
  // Nothing was taken for an event the item's history does not lead to.
  assert.deepEqual(await listDeadLetters(js, {}), []);
});
