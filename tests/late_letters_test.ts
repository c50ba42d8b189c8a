/**
 * A failure's dead letter that comes late. A runner fails an item by publishing the item's
 * `failed` event and then storing the letter that vouches for it (src/failure_letter.ts); a
 * runner stopped between the two, or whose store of the letter failed, stores it when the
 * message comes back, an ack wait later. The state writer waits for it that long
 * (letterWindowMs), and a failure it gives up on stays out of the item's state in a rebuild
 * too, so the bucket and a rebuild agree whenever the letter comes.
 */
import assert from "node:assert/strict";
import { jetstream, type JetStreamClient } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { definePipeline } from "../src/pipeline/definition.ts";
import { compileFlow } from "../src/pipeline/flow.ts";
import {
  type LoadedPipeline,
  pipelineStateSpec,
  pipelineTopology,
  readItem,
  stateBucketOf,
  submitItem,
} from "../src/pipeline/runtime.ts";
import { compareStates, rebuildStates } from "../src/rebuild.ts";
import { messagesOn } from "../src/runner.ts";
import { runStateWriter, type StateSpec } from "../src/state_writer.ts";
import { deterministicId } from "../src/events.ts";
import { DEADLETTER_STREAM, deadLetterSubject } from "../src/subjects.ts";
import { ensureTopology } from "../src/topology.ts";
import { letterWindowMs } from "../src/failure_letter.ts";
import { startTestNats } from "./helpers/nats.ts";
import { createEvent } from "../src/events.ts";
import { FEEDBACK_STATE_SPEC } from "../pipelines/feedback/state.ts";
import { waitFor } from "./helpers/wait.ts";

const TRACE = "0af7651916cd43dd8448eb211c80319c";
const STAGE = "orders-check";

/** Where a runner failed an item: its pipeline and stage, and the message it failed on. */
interface FailedOn {
  pipeline: string;
  stage: string;
  item: string;
  subject: string;
  seq: number;
  /** The id of the event it failed on, when that message was an event. */
  eventId?: string;
}

/** The `<pipeline>.failed` event a runner publishes as it fails the item (before its letter). */
function runnerFailure(on: FailedOn) {
  return {
    id: deterministicId(on.item, `${on.pipeline}.failed`, String(on.seq)),
    type: `${on.pipeline}.failed`,
    version: 1,
    item_id: on.item,
    trace_id: TRACE,
    time: new Date().toISOString(),
    source: `weft-${on.stage}`,
    data: {
      stage: on.stage,
      code: "handler_failed",
      reason: "injected fault",
      attempts: 1,
      dead_letter_subject: deadLetterSubject(on.stage, on.item),
      subject: on.subject,
      ...(on.eventId ? { event_id: on.eventId } : {}),
    },
  };
}

/** Stores the dead letter that vouches for the failure, as the runner does right after it. */
function storeRunnerLetter(js: JetStreamClient, on: FailedOn) {
  return js.publish(
    deadLetterSubject(on.stage, on.item),
    JSON.stringify({
      stage: on.stage,
      code: "handler_failed",
      reason: "injected fault",
      attempts: 1,
      subject: on.subject,
      stream_seq: on.seq,
      time: new Date().toISOString(),
      item_id: on.item,
    }),
    { msgID: `dl-${on.pipeline.toUpperCase()}-${on.seq}-${on.stage}` },
  );
}

Deno.test("a failure whose letter is stored 11 s after it (its runner stopped between the two) still fails the item; one whose letter comes after the writer gave up stays out, in the bucket and in a rebuild alike", async () => {
  // Ack waits of 2 s: the writer waits for a failure's letter 10 s + 2 x 2 s.
  await using t = await startTestNats({ ackWaitMs: 2_000, maxAttempts: 3 });
  assert.equal(letterWindowMs(t.config.ackWaitMs), 14_000);
  const obj = { type: "object" } as const;
  const def = definePipeline({
    name: "orders",
    input: { schema: obj },
    start: "check",
    steps: {
      check: { kind: "task", output: obj, next: "done" },
      done: { kind: "end", outcome: "checked" },
    },
  }, { check: () => ({ checked: true }) });
  const p: LoadedPipeline = { file: "inline", def, flow: compileFlow(def) };
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const spec = pipelineStateSpec(p);
  // The writer alone: the check step's runner is played by the test, failing both items.
  const writer = await runStateWriter({ nc: t.nc, config: t.config, log: t.log, spec });
  const js = jetstream(t.nc);
  const kv = await new Kvm(t.nc).open(stateBucketOf("orders"));
  try {
    /** Fails `id` as the check step's runner would on its entry message, without its letter. */
    const fail = async (id: string) => {
      await submitItem(t.nc, p, id, {}, { source: "test", traceId: TRACE });
      const entry = (await t.jsm.streams.getMessage("ORDERS", {
        last_by_subj: spec.entrySubject!(id),
      }))!;
      const on = {
        pipeline: "orders",
        stage: STAGE,
        item: id,
        subject: entry.subject,
        seq: entry.seq,
      };
      const ack = await js.publish(`orders.failed.${id}`, JSON.stringify(runnerFailure(on)));
      const stored = (await t.jsm.streams.getMessage("ORDERS", { seq: ack.seq }))!.time;
      const letter = () => storeRunnerLetter(js, on);
      return { failedSeq: ack.seq, stored: stored.getTime(), letter };
    };
    const late = await fail("LATE");
    const gone = await fail("GONE");

    // LATE's letter 11 s after its failure: past the 10 s the writer once waited, within 14 s.
    await new Promise((r) => setTimeout(r, Math.max(0, late.stored + 11_000 - Date.now())));
    await late.letter();
    const failed = await waitFor(
      async () => {
        const s = await readItem(kv, "LATE");
        return s?.status === "failed" && s;
      },
      30_000,
      "LATE failed in its state",
    );
    assert.equal(failed.status, "failed");

    // GONE's failure is given up on (dead-lettered by the writer), then its letter comes.
    const refusal = await waitFor(
      async () => {
        for await (
          const m of messagesOn(t.jsm, DEADLETTER_STREAM, deadLetterSubject(spec.durable, "GONE"))
        ) {
          const l = m.json<{ stream_seq?: number; code?: string; reason?: string }>();
          if (l.stream_seq === gone.failedSeq) return l;
        }
        return undefined;
      },
      30_000,
      "the writer's letter of GONE's failure",
    );
    assert.equal(refusal.code, "conflict");
    assert.ok(Date.now() - gone.stored >= 14_000, "refused only after the whole window");
    await gone.letter();
    assert.notEqual((await readItem(kv, "GONE"))?.status, "failed");

    const { states } = await rebuildStates(js, spec as StateSpec<unknown>);
    const diff = compareStates(
      states,
      new Map([["LATE", await readItem(kv, "LATE")], ["GONE", await readItem(kv, "GONE")]]),
    );
    assert.deepEqual(diff, { equal: 2, different: [], missingLive: [], missingRebuilt: [] });
  } finally {
    await writer.stop();
  }
});

Deno.test("an item's redrive and next failure, taken while its first failure waits for its letter, fold to the state a rebuild folds", async () => {
  // Found by a loaded run of the identities test: the writer put the first failure off for its
  // letter, folded the redrive's event and the item's second failure meanwhile, then the first
  // failure over them; the item's state kept the first failure for good, a rebuild the second.
  await using t = await startTestNats();
  const writer = await runStateWriter({
    nc: t.nc,
    config: t.config,
    log: t.log,
    spec: FEEDBACK_STATE_SPEC,
  });
  const js = jetstream(t.nc);
  const kv = await new Kvm(t.nc).open("weft_feedback_state");
  try {
    const base = { itemId: "R1", traceId: TRACE, source: "test" };
    const data = { text: "it will crash" };
    const sentiment = { label: "negative" as const, score: -0.5, analyzer: "rules" };
    const ingested = createEvent({ ...base, type: "feedback.ingested", data });
    const analyzed = createEvent({
      ...base,
      type: "feedback.sentiment_analyzed",
      data: { ...data, sentiment },
    });
    await js.publish("feedback.ingested.R1", JSON.stringify(ingested));
    const on = await js.publish("feedback.sentiment_analyzed.R1", JSON.stringify(analyzed));
    await waitFor(async () => (await readItem(kv, "R1")) !== null, 10_000, "R1's state");
    /** topics failing R1 on the message stored at `seq`, as its runner would. */
    const failedAt = (seq: number) => ({
      pipeline: "feedback",
      stage: "topics",
      item: "R1",
      subject: "feedback.sentiment_analyzed.R1",
      seq,
      eventId: analyzed.id,
    });
    const failure = (seq: number) => runnerFailure(failedAt(seq));
    const letterOf = (seq: number) => storeRunnerLetter(js, failedAt(seq));
    // The first failure, its letter late; its redrive (the event again) and the second
    // failure, whose letter is stored at once.
    await js.publish("feedback.failed.R1", JSON.stringify(failure(on.seq)));
    const redriven = await js.publish("feedback.sentiment_analyzed.R1", JSON.stringify(analyzed));
    await letterOf(redriven.seq);
    const second = await js.publish("feedback.failed.R1", JSON.stringify(failure(redriven.seq)));
    await new Promise((r) => setTimeout(r, 1_000));
    await letterOf(on.seq);

    // Until the writer has settled every event (the first failure's last, once its letter
    // is found): then its state and a rebuild's are compared.
    await waitFor(
      async () => {
        const c = await t.jsm.consumers.info("FEEDBACK", FEEDBACK_STATE_SPEC.durable);
        return c.num_pending === 0 && c.num_ack_pending === 0;
      },
      30_000,
      "the state writer settled",
    );
    const live = await readItem(kv, "R1") as { stages?: { failed?: { seq?: number } } };
    assert.equal(live.stages?.failed?.seq, second.seq, JSON.stringify(live));
    const { states } = await rebuildStates(js, FEEDBACK_STATE_SPEC as StateSpec<unknown>);
    const diff = compareStates(states, new Map([["R1", live]]));
    assert.deepEqual(diff, { equal: 1, different: [], missingLive: [], missingRebuilt: [] });
  } finally {
    await writer.stop();
  }
});
