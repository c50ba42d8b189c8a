/**
 * A redriven item's per-item event stream (`GET /pipelines/<name>/items/<id>/events`) on a
 * real nats-server: each event its state took shows once, in the replay, resumed with
 * Last-Event-ID, and live; and a redrive's hand-over stores no copy of the item's last
 * completion for the end its step is publishing.
 */
import assert from "node:assert/strict";
import { jetstream } from "@nats-io/jetstream";
import { headers } from "@nats-io/nats-core";
import { Kvm } from "@nats-io/kv";
import { listDeadLetters, redrive } from "../src/redrive.ts";
import { PermanentError } from "../src/errors.ts";
import { runStage } from "../src/runner.ts";
import { runStateWriter } from "../src/state_writer.ts";
import { HANDOVER_HEADER } from "../src/subjects.ts";
import { startTestNats, type TestNats } from "./helpers/nats.ts";
import { readSse } from "./helpers/sse.ts";
import { waitFor } from "./helpers/wait.ts";
import { definePipeline } from "../src/pipeline/definition.ts";
import { compileFlow } from "../src/pipeline/flow.ts";
import { durableOf, pipelineSubjects } from "../src/pipeline/derive.ts";
import {
  controlStage,
  createHandover,
  type LoadedPipeline,
  pipelineStateSpec,
  pipelineTopology,
  readItem,
  stateBucketOf,
  submitItem,
  workStage,
} from "../src/pipeline/runtime.ts";
import { ensureTopology } from "../src/topology.ts";
import { definitionsApp } from "./helpers/pipeline.ts";
import { createLogger } from "../src/observability/log.ts";

const TRACE = "0af7651916cd43dd8448eb211c80319c";
const obj = { type: "object" } as const;

/**
 * `route`, `answer`, `check` and the end `checked`; `check` fails for good while `down()`,
 * after waiting for `hold`.
 */
function orders(down: () => boolean, hold?: Promise<void>): LoadedPipeline {
  const task = (step: string, next: string, fails = false) => ({
    kind: "task" as const,
    output: obj,
    handle: async () => {
      if (fails) await hold;
      if (fails && down()) throw new PermanentError("the check is down");
      return { [step]: true };
    },
    next,
  });
  const def = definePipeline({
    name: "orders",
    input: { schema: obj },
    start: "route",
    steps: {
      route: task("route", "answer"),
      answer: task("answer", "check"),
      check: task("check", "done", true),
      done: { kind: "end", outcome: "checked" },
    },
  });
  return { file: "inline", def, flow: compileFlow(def) };
}

/** The stream's messages on `subject`: sequence, body id and hand-over header. */
async function storedOn(t: TestNats, stream: string, subject: string) {
  const out: { seq: number; id: string; handover?: string }[] = [];
  const info = await t.jsm.streams.info(stream);
  for (let seq = info.state.first_seq; seq <= info.state.last_seq; seq++) {
    const m = await t.jsm.streams.getMessage(stream, { seq }).catch(() => null);
    if (m?.subject !== subject) continue;
    const handover = m.header?.get(HANDOVER_HEADER);
    out.push({ seq, id: m.json<{ id: string }>().id, ...(handover ? { handover } : {}) });
  }
  return out;
}

Deno.test("a redriven item's event stream shows each event its state took once: not a hand-over's copy of one it showed", async () => {
  // Found by probing: after a redrive, the item's replay showed its last step's event twice,
  // the second a hand-over's copy stored (2 of 3 runs) as the item ended.
  await using t = await startTestNats();
  let down = true;
  const p = orders(() => down);
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const runners = [
    await runStateWriter({ ...deps, spec: pipelineStateSpec(p) }),
    ...await Promise.all(
      ["route", "answer", "check"].map((s) =>
        runStage({ ...deps, stage: workStage(p, s, { nc: t.nc }) })
      ),
    ),
    await runStage({ ...deps, stage: controlStage(p, t.nc) }),
  ];
  try {
    const app = await definitionsApp(t, [p]);
    const { stream } = pipelineSubjects(p.def);
    const kv = await new Kvm(t.nc).open(stateBucketOf("orders"));
    await submitItem(t.nc, p, "R1", {}, { source: "test", traceId: TRACE });
    await waitFor(async () => (await readItem(kv, "R1"))?.status === "failed", 20_000, "failed");
    // A live client, from the failure on.
    const failedAt = (await readItem(kv, "R1"))!.failed_seq!;
    const live = Promise.resolve(app.request("/pipelines/orders/items/R1/events", {
      headers: { "Last-Event-ID": String(failedAt) },
    })).then((res) => readSse(res, { timeoutMs: 20_000 }));
    down = false;
    const letters = await listDeadLetters(jetstream(t.nc), { item_id: "R1" });
    assert.equal(letters.length, 1);
    await redrive(jetstream(t.nc), { ids: [letters[0]!.seq] });
    const done = await waitFor(
      async () => {
        const s = await readItem(kv, "R1");
        return s?.status === "done" && s;
      },
      20_000,
      "R1 done",
    );
    // The hand-over's copy of `check`'s completion for its end, as the race stored it.
    const [check] = await storedOn(t, stream, "orders.check.R1");
    const raw = await t.jsm.streams.getMessage(stream, { seq: check!.seq });
    const h = headers();
    h.set(HANDOVER_HEADER, "done");
    await jetstream(t.nc).publish("orders.check.R1", raw!.data, { headers: h });
    const ids = (frames: { id?: string; data: string }[]) =>
      frames.map((f) => `${f.id} ${JSON.parse(f.data).type}`);
    // The replay: the first try, its failure, the redriven event that resumed the item (its
    // only event shown twice: the new attempt's start), the rest once, then the end.
    const replay = await readSse(await app.request("/pipelines/orders/items/R1/events"));
    assert.deepEqual(ids(replay).map((f) => f.split(" ")[1]), [
      "orders.submitted",
      "orders.route",
      "orders.answer",
      "orders.failed",
      "orders.answer",
      "orders.check",
      "orders.checked",
    ]);
    assert.equal(replay.at(-1)!.id, String(done.last_seq));
    // Resumed after the check's event: the end only.
    const resumed = await readSse(
      await app.request("/pipelines/orders/items/R1/events", {
        headers: { "Last-Event-ID": String(check!.seq) },
      }),
    );
    assert.deepEqual(ids(resumed).map((f) => f.split(" ")[1]), ["orders.checked"]);
    // Live: the redriven event, the check's and the end.
    assert.deepEqual(ids(await live).map((f) => f.split(" ")[1]), [
      "orders.answer",
      "orders.check",
      "orders.checked",
    ]);
  } finally {
    for (const r of runners) await r.stop();
  }
});

Deno.test("a redrive's hand-over stores no copy of a completion whose step is still publishing the end it leads to", async () => {
  // The race behind the copy above: the hand-over read the item's history between the last
  // step's completion and its end, and handed the completion over to the end.
  await using t = await startTestNats();
  const hold = Promise.withResolvers<void>();
  const p = orders(() => false, hold.promise);
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const { stream } = pipelineSubjects(p.def);
  const runners = await Promise.all(
    ["route", "answer", "check"].map((s) =>
      runStage({ ...deps, stage: workStage(p, s, { nc: t.nc }) })
    ),
  );
  try {
    await submitItem(t.nc, p, "H1", {}, { source: "test", traceId: TRACE });
    // check holds its input, unacked.
    const stored = await waitFor(
      async () =>
        (await t.jsm.streams.getMessage(stream, { last_by_subj: "orders.answer.H1" })
          .catch(() => null)) ?? undefined,
      20_000,
      "answer's event",
    );
    await waitFor(
      async () => {
        const ci = await t.jsm.consumers.info(stream, durableOf(p.def, "check"));
        return ci.num_ack_pending > 0 && ci.ack_floor.stream_seq < stored.seq;
      },
      20_000,
      "check holds the item",
    );
    // As if the check step had stored its completion and not yet its end.
    const answer = stored.json<{ id: string; data: Record<string, unknown> }>();
    const completion = {
      ...answer,
      id: "check-of-answer",
      type: "orders.check",
      source: "weft-orders-check",
      data: {
        ...answer.data,
        value: { check: true },
        results: { ...(answer.data.results as object), check: { check: true } },
        runs: { ...(answer.data.runs as object), check: 1 },
      },
    };
    await jetstream(t.nc).publish("orders.check.H1", JSON.stringify(completion));
    const handover = createHandover(p, t.nc);
    const r = await handover.settle("H1");
    assert.deepEqual(r.handed, [], "nothing handed over while check may publish its end");
    assert.equal(r.undecided, true, "asked again later");
    assert.deepEqual(
      (await storedOn(t, stream, "orders.check.H1")).map((m) => m.handover),
      [undefined],
      "no hand-over's copy",
    );
  } finally {
    hold.resolve();
    for (const r of runners) await r.stop();
  }
});

Deno.test("a hand-over of an item whose history is longer than it reads hands nothing over and fails nothing", async () => {
  // Found by probing a loop of 2,100 rounds (4,205 events): the redrive of the item's last
  // step resumed it, and the control step dead-lettered the redriven event `handler_failed`
  // ("has more than 4096 events: not handed over"), failing an item the redrive had resumed.
  await using t = await startTestNats();
  const p = orders(() => false);
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const { stream } = pipelineSubjects(p.def);
  await submitItem(t.nc, p, "L1", {}, { source: "test", traceId: TRACE });
  const js = jetstream(t.nc);
  for (let i = 0; i < 4100; i += 500) {
    await Promise.all(
      Array.from({ length: 500 }, () => js.publish("orders.note.L1", JSON.stringify({}))),
    );
  }
  assert.ok((await t.jsm.streams.info(stream)).state.messages > 4096);
  const lines: string[] = [];
  const log = createLogger("test", "info", (l) => lines.push(l));
  const r = await createHandover(p, t.nc, log).settle("L1");
  assert.deepEqual(r.handed, []);
  assert.equal(r.tooLong, true);
  assert.ok(lines.some((l) => /history is too long to read/.test(l)), "said so in its log");
});
