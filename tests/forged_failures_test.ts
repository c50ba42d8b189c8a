/**
 * What a key that may publish a pipeline's `failed` event cannot do with it, on a real mesh
 * (`deno task start` with its NATS identities), publishing with a step's own key: fail an item
 * that is fine. A real failure is published by the runner as it dead-letters the item's message
 * (its letter names the message, and the event's id is made from its stream sequence); a
 * `failed` with no such letter is dead-lettered `conflict` by the item's state writer, and the
 * item's state, event stream and later steps go on as if it had never been stored
 * (docs/SECURITY.md, "What a step's key can still do").
 */
import assert from "node:assert/strict";
import { jetstream, type JetStreamManager, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/nats-core";
import { type Mesh, meshTempDir, ONE_PROCESS, removedAtEnd, startMesh } from "./helpers/mesh.ts";
import { connectClient } from "./helpers/nats.ts";
import { waitFor } from "./helpers/wait.ts";
import { readSse } from "./helpers/sse.ts";
import { listDeadLetters } from "../src/redrive.ts";
import type { DeadLetter } from "../src/events.gen.ts";
import { deterministicId } from "../src/events.ts";
import { CONTENT_STREAM } from "../pipelines/moderation/subjects.ts";
import { CONTENT_STATE_SPEC } from "../pipelines/moderation/state.ts";
import { rebuildStates } from "../src/rebuild.ts";
import {
  type LoadedPipeline,
  loadPipelines,
  pipelineStateSpec,
  pipelineTopology,
  readItem,
  stateBucketOf,
  submitItem,
  workStage,
} from "../src/pipeline/runtime.ts";
import { Kvm } from "@nats-io/kv";
import { definePipeline } from "../src/pipeline/definition.ts";
import { compileFlow } from "../src/pipeline/flow.ts";
import { ensureTopology } from "../src/topology.ts";
import { runStage } from "../src/runner.ts";
import { runStateWriter } from "../src/state_writer.ts";
import { PermanentError } from "../src/errors.ts";
import { startTestNats } from "./helpers/nats.ts";

const MOD = new URL("../mod.ts", import.meta.url).href;

/** A check, a human approval, a shipping step and an end: an item waits at the approval. */
const DEFINITION = `
import { definePipeline } from "${MOD}";
const obj = { type: "object" } as const;
export const orders = definePipeline({
  name: "orders",
  input: { schema: obj },
  start: "check",
  steps: {
    check: { kind: "task", output: obj, next: "approval" },
    approval: {
      kind: "wait",
      event: "approved",
      timeoutMs: 3_600_000,
      onTimeout: "expired",
      next: "ship",
    },
    ship: { kind: "task", output: obj, next: "shipped" },
    shipped: { kind: "end", outcome: "shipped" },
    expired: { kind: "end", outcome: "expired" },
  },
}, {
  check: () => ({ checked: true }),
  ship: () => ({ shipped: true }),
});
`;

const TRACE = "0af7651916cd43dd8448eb211c80319c";
/**
 * Ack waits of 5 s: a state writer waits for a failure's letter 10 s and two ack waits
 * (letterWindowMs), 20 s here, before it dead-letters a forged failure.
 */
const LETTER_WAIT = { WEFT_ACK_WAIT_MS: "5000" };
const TOXIC = "You idiot, this is the most pathetic service ever.";

/** Connects as `identity` (one of the mesh's NATS keys) and runs `fn`, closing after. */
async function as<T>(mesh: Mesh, identity: string, fn: (nc: NatsConnection) => Promise<T>) {
  const nc = await connectClient(mesh.natsUrl, `test-as-${identity}`, mesh.credentials(identity));
  try {
    return await fn(nc);
  } finally {
    await nc.close();
  }
}

/** GET/POST on the mesh's gateway (auth off): status and JSON body. */
async function call(mesh: Mesh, method: string, path: string, body?: unknown) {
  const res = await fetch(`${mesh.gatewayUrl}${path}`, {
    method,
    headers: method === "POST" ? { "content-type": "application/json" } : {},
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

type View = { status?: string; updated_at?: string; current?: string[] };

/** Waits until GET `path` answers a view with `status`; returns it. */
function viewWith(mesh: Mesh, path: string, status: string): Promise<View> {
  return waitFor(
    async () => {
      const r = await call(mesh, "GET", path);
      return r.status === 200 && r.body.status === status && r.body as View;
    },
    60_000,
    `${path} ${status}`,
  );
}

/** The dead letter `stage` kept of the message stored at `seq` (read with the admin key). */
function letterOf(mesh: Mesh, stage: string, seq: number): Promise<DeadLetter> {
  return as(mesh, "admin", (nc) =>
    waitFor(
      async () =>
        (await listDeadLetters(jetstream(nc), {})).find((e) =>
          e.letter.stage === stage && e.letter.stream_seq === seq
        )?.letter,
      60_000,
      `${stage}'s dead letter of stream sequence ${seq}`,
    ));
}

/** Until `durable` has taken everything stored (nothing pending or unacked). */
async function settled(jsm: JetStreamManager, stream: string, durable: string) {
  await waitFor(
    async () => {
      const info = await jsm.consumers.info(stream, durable);
      return info.num_pending === 0 && info.num_ack_pending === 0;
    },
    60_000,
    `${durable} to settle`,
  );
}

/**
 * Publishes, with `identity`'s key, `<pipeline>.failed.<item>` as a runner would for a
 * message of the item stored at `seq` on `subject` (the same id, shape and dead letter
 * subject), with no letter stored for it. Answers its stream sequence.
 */
function forgeFailure(
  mesh: Mesh,
  identity: string,
  opts: { pipeline: string; item: string; stage: string; subject: string; seq: number },
): Promise<number> {
  return as(mesh, identity, async (nc) => {
    const type = `${opts.pipeline}.failed`;
    // As the runner's: the id it makes from the failed message's stream sequence.
    const event = {
      id: deterministicId(opts.item, type, String(opts.seq)),
      type,
      version: 1,
      item_id: opts.item,
      trace_id: "0af7651916cd43dd8448eb211c80319c",
      time: new Date().toISOString(),
      source: `weft-${opts.stage}`,
      data: {
        stage: opts.stage,
        code: "rejected",
        reason: "forged: the item is fine",
        attempts: 1,
        dead_letter_subject: `deadletter.${opts.stage}.${opts.item}`,
        subject: opts.subject,
      },
    };
    return (await jetstream(nc).publish(`${type}.${opts.item}`, JSON.stringify(event))).seq;
  });
}

/** A reviewer approves content item `id` (200), and it reads published. */
async function approved(mesh: Mesh, id: string): Promise<void> {
  const decided = await call(mesh, "POST", `/reviews/${id}/decision`, {
    decision: "approve",
    reason: "fine after all",
    reviewer: "alice",
  });
  assert.equal(decided.status, 200, JSON.stringify(decided.body));
  await viewWith(mesh, `/content/${id}`, "published");
}

/** The item's event stream replayed from its start, read until it closes at the item's end. */
async function replayed(mesh: Mesh, path: string) {
  const res = await fetch(`${mesh.gatewayUrl}${path}`);
  assert.equal(res.status, 200);
  return await readSse(res, { timeoutMs: 60_000 });
}

Deno.test("a definition step's key publishing `failed` for an item waiting for approval fails nothing: dead-lettered conflict, the item keeps waiting, and the decision still ships it", async () => {
  const dir = await meshTempDir("weft-forged-failed-");
  await using _dir = removedAtEnd(dir);
  await Deno.writeTextFile(`${dir}/orders.ts`, DEFINITION);
  await using mesh = await startMesh({
    ...ONE_PROCESS,
    ...LETTER_WAIT,
    WEFT_PIPELINES: `${dir}/orders.ts`,
  });
  const r = await call(mesh, "POST", "/pipelines/orders/items", { sku: "A-1" });
  assert.equal(r.status, 202, JSON.stringify(r.body));
  const id: string = r.body.id;
  const before = await viewWith(mesh, `/pipelines/orders/items/${id}`, "waiting");

  // With the check step's own key (it may publish orders.failed.* and its own dead letters),
  // a failure of the item's check completion, as its runner would publish it, and no letter.
  const completion = await as(
    mesh,
    "admin",
    async (nc) =>
      (await (await jetstreamManager(nc)).streams.getMessage("ORDERS", {
        last_by_subj: `orders.check.${id}`,
      }))!,
  );
  const seq = await forgeFailure(mesh, "orders-check", {
    pipeline: "orders",
    item: id,
    stage: "orders-ship",
    subject: completion.subject,
    seq: completion.seq,
  });
  await as(
    mesh,
    "admin",
    async (nc) => settled(await jetstreamManager(nc), "ORDERS", "orders-state"),
  );
  const after = await call(mesh, "GET", `/pipelines/orders/items/${id}`);
  assert.equal(after.body.status, "waiting", JSON.stringify(after.body));
  assert.equal(after.body.updated_at, before.updated_at, "the forged failure changed nothing");
  const letter = await letterOf(mesh, "orders-state", seq);
  assert.equal(letter.code, "conflict", JSON.stringify(letter));
  // A rebuild from the stream agrees: the forged failure folds nothing there either.
  const rebuilt = await as(mesh, "admin", async (nc) => {
    const [p] = await loadPipelines([`${dir}/orders.ts`]);
    return await rebuildStates(jetstream(nc), pipelineStateSpec(p!));
  });
  assert.equal(rebuilt.states.get(id)?.status, "waiting");

  // Its event stream, opened now, neither shows the forged failure nor closes at it.
  const live = replayed(mesh, `/pipelines/orders/items/${id}/events`);
  // The decision still decides: the item ships.
  const d = await call(mesh, "POST", `/pipelines/orders/items/${id}/approved`, { by: "carol" });
  assert.equal(d.status, 202, JSON.stringify(d.body));
  const done = await viewWith(mesh, `/pipelines/orders/items/${id}`, "done");
  assert.equal((done as { outcome?: string }).outcome, "shipped");
  for (const frames of [await live, await replayed(mesh, `/pipelines/orders/items/${id}/events`)]) {
    assert.ok(!frames.some((f) => Number(f.id) === seq), JSON.stringify(frames));
    assert.equal(frames.at(-1)!.event, "orders.shipped", JSON.stringify(frames));
  }
  assert.deepEqual(mesh.logs.filter((l) => l.msg === "nats permission violation"), []);
});

Deno.test("the content storage key publishing `content.failed` for an item waiting for review fails nothing: dead-lettered conflict, the item keeps waiting, and the reviewer's approval publishes it", async () => {
  await using mesh = await startMesh({
    ...ONE_PROCESS,
    ...LETTER_WAIT,
    WEFT_REVIEW_SLA_MS: "600000",
  });
  const r = await call(mesh, "POST", "/content", { text: TOXIC });
  assert.equal(r.status, 202, JSON.stringify(r.body));
  const id: string = r.body.id;
  const before = await viewWith(mesh, `/content/${id}`, "pending_review");
  const uploaded = await as(
    mesh,
    "admin",
    async (nc) =>
      (await (await jetstreamManager(nc)).streams.getMessage(CONTENT_STREAM, {
        last_by_subj: `content.uploaded.${id}`,
      }))!,
  );
  const seq = await forgeFailure(mesh, "storage", {
    pipeline: "content",
    item: id,
    stage: "moderation",
    subject: uploaded.subject,
    seq: uploaded.seq,
  });
  await as(
    mesh,
    "admin",
    async (nc) => settled(await jetstreamManager(nc), CONTENT_STREAM, "content-state"),
  );
  const after = await call(mesh, "GET", `/content/${id}`);
  assert.equal(after.body.status, "pending_review", JSON.stringify(after.body));
  assert.equal(after.body.updated_at, before.updated_at, "the forged failure changed nothing");
  const letter = await letterOf(mesh, "content-state", seq);
  assert.equal(letter.code, "conflict", JSON.stringify(letter));
  const rebuilt = await as(mesh, "admin", (nc) => rebuildStates(jetstream(nc), CONTENT_STATE_SPEC));
  assert.equal(rebuilt.states.get(id)?.status, "pending_review");
  const live = replayed(mesh, `/content/${id}/events`);
  await approved(mesh, id);
  for (const frames of [await live, await replayed(mesh, `/content/${id}/events`)]) {
    assert.ok(!frames.some((f) => Number(f.id) === seq), JSON.stringify(frames));
    assert.equal(frames.at(-1)!.event, "content.published", JSON.stringify(frames));
  }
  assert.deepEqual(mesh.logs.filter((l) => l.msg === "nats permission violation"), []);
});

Deno.test("the content storage key publishing `content.failed` for an item still at moderation fails nothing: review-queue still queues it, and the reviewer's approval publishes it", async () => {
  await using mesh = await startMesh({
    ...ONE_PROCESS,
    ...LETTER_WAIT,
    WEFT_REVIEW_SLA_MS: "600000",
    WEFT_SLOW_MS: "5000",
    WEFT_SLOW_STAGE: "moderation",
  });
  const r = await call(mesh, "POST", "/content", { text: TOXIC });
  assert.equal(r.status, 202, JSON.stringify(r.body));
  const id: string = r.body.id;
  const uploaded = await as(mesh, "admin", async (nc) => {
    const jsm = await jetstreamManager(nc);
    return (await waitFor(
      async () =>
        (await jsm.streams.getMessage(CONTENT_STREAM, {
          last_by_subj: `content.uploaded.${id}`,
        })) ?? undefined,
      30_000,
      "the upload stored",
    ))!;
  });
  // While moderation takes 5 s over it: a failure with no runner's letter.
  const seq = await forgeFailure(mesh, "storage", {
    pipeline: "content",
    item: id,
    stage: "moderation",
    subject: uploaded.subject,
    seq: uploaded.seq,
  });
  // Before: review-queue took the item for failed, refused its moderation, and it failed.
  await viewWith(mesh, `/content/${id}`, "pending_review");
  const letter = await letterOf(mesh, "content-state", seq);
  assert.equal(letter.code, "conflict", JSON.stringify(letter));
  await approved(mesh, id);
});

/** The item's event stream resumed after `after` (Last-Event-ID), read until it closes. */
async function itemStreamAfter(mesh: Mesh, path: string, after: number) {
  const res = await fetch(`${mesh.gatewayUrl}${path}`, {
    headers: { "Last-Event-ID": String(after) },
  });
  assert.equal(res.status, 200);
  return await readSse(res, { timeoutMs: 60_000 });
}

/** Stores again, with `identity`'s key, the message last stored on `subject`, as it is. */
function storeAgain(mesh: Mesh, identity: string, stream: string, subject: string) {
  return as(mesh, identity, async (nc) => {
    const m = (await (await jetstreamManager(nc)).streams.getMessage(stream, {
      last_by_subj: subject,
    }))!;
    // No "expected last subject sequence" header, no message id: stored as a second copy.
    return { first: m.seq, copy: (await jetstream(nc).publish(subject, m.data)).seq };
  });
}

Deno.test("a second copy of a definition item's end, stored by its step's key without the once-per-item header, is not shown by the item's event stream: replayed or resumed, it shows the first and closes there", async () => {
  const dir = await meshTempDir("weft-end-copy-");
  await using _dir = removedAtEnd(dir);
  await Deno.writeTextFile(`${dir}/orders.ts`, DEFINITION);
  await using mesh = await startMesh({ ...ONE_PROCESS, WEFT_PIPELINES: `${dir}/orders.ts` });
  const r = await call(mesh, "POST", "/pipelines/orders/items", { sku: "A-2" });
  assert.equal(r.status, 202, JSON.stringify(r.body));
  const id: string = r.body.id;
  await viewWith(mesh, `/pipelines/orders/items/${id}`, "waiting");
  const d = await call(mesh, "POST", `/pipelines/orders/items/${id}/approved`, { by: "carol" });
  assert.equal(d.status, 202, JSON.stringify(d.body));
  const done = await viewWith(mesh, `/pipelines/orders/items/${id}`, "done");
  const { first, copy } = await storeAgain(mesh, "orders-ship", "ORDERS", `orders.shipped.${id}`);
  assert.ok(copy > first);
  await as(
    mesh,
    "admin",
    async (nc) => settled(await jetstreamManager(nc), "ORDERS", "orders-state"),
  );
  const now = await call(mesh, "GET", `/pipelines/orders/items/${id}`);
  assert.equal(now.body.updated_at, done.updated_at, "the state keeps the first");
  for (
    const frames of [
      await replayed(mesh, `/pipelines/orders/items/${id}/events`),
      await itemStreamAfter(mesh, `/pipelines/orders/items/${id}/events`, first - 1),
    ]
  ) {
    assert.deepEqual(
      frames.filter((f) => f.event === "orders.shipped").map((f) => Number(f.id)),
      [first],
      JSON.stringify(frames),
    );
  }
});

Deno.test("a second copy of a content item's outcome, stored by the storage key without the once-per-item header, is not shown by the item's event stream", async () => {
  await using mesh = await startMesh({ ...ONE_PROCESS, WEFT_REVIEW_SLA_MS: "600000" });
  const r = await call(mesh, "POST", "/content", { text: "A lovely day at the beach." });
  assert.equal(r.status, 202, JSON.stringify(r.body));
  const id: string = r.body.id;
  await viewWith(mesh, `/content/${id}`, "published");
  const { first, copy } = await storeAgain(
    mesh,
    "storage",
    CONTENT_STREAM,
    `content.published.${id}`,
  );
  assert.ok(copy > first);
  for (
    const frames of [
      await replayed(mesh, `/content/${id}/events`),
      await itemStreamAfter(mesh, `/content/${id}/events`, first - 1),
    ]
  ) {
    assert.deepEqual(
      frames.filter((f) => f.event === "content.published").map((f) => Number(f.id)),
      [first],
      JSON.stringify(frames),
    );
  }
});

Deno.test("junk stored first under a dead letter's message id does not keep the letter out: the item fails with its own letter stored", async () => {
  await using t = await startTestNats();
  const obj = { type: "object" } as const;
  const def = definePipeline({
    name: "orders",
    input: { schema: obj },
    start: "check",
    steps: {
      check: {
        kind: "task",
        output: obj,
        handle: () => {
          throw new PermanentError("the check is down");
        },
        next: "done",
      },
      done: { kind: "end", outcome: "checked" },
    },
  });
  const p: LoadedPipeline = { file: "inline", def, flow: compileFlow(def) };
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology([p], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const runners = [
    await runStateWriter({ ...deps, spec: pipelineStateSpec(p) }),
    await runStage({ ...deps, stage: workStage(p, "check", { nc: t.nc }) }),
  ];
  try {
    // The check step's key (it may publish its own letters) stores junk under the id the
    // letter of the item's next message will carry: its stream sequence is predictable.
    const next = (await t.jsm.streams.info("ORDERS")).state.last_seq + 1;
    const js = jetstream(t.nc);
    await js.publish("deadletter.orders-check.J1", "{}", {
      msgID: `dl-ORDERS-${next}-orders-check`,
    });
    await submitItem(t.nc, p, "J1", { sku: "A-3" }, { source: "test", traceId: TRACE });
    const letter = await waitFor(
      async () =>
        (await listDeadLetters(js, { item_id: "J1" })).find((l) =>
          l.letter.stage === "orders-check" && l.letter.stream_seq === next
        ),
      30_000,
      "the check step's letter of J1",
    );
    assert.equal(letter.letter.code, "rejected");
    const kv = await new Kvm(t.nc).open(stateBucketOf("orders"));
    const failed = await waitFor(
      async () => {
        const s = await readItem(kv, "J1");
        return s?.status === "failed" && s;
      },
      30_000,
      "J1 failed",
    );
    assert.equal(failed.error?.stage, "orders-check");
  } finally {
    for (const r of runners) await r.stop();
  }
});

Deno.test("the topics key publishing `feedback.failed` for an item still at sentiment fails nothing, even with a letter of its own naming the item's ingested event: dead-lettered conflict, its event stream neither shows it nor closes there, and the item processes", async () => {
  await using mesh = await startMesh({
    ...ONE_PROCESS,
    ...LETTER_WAIT,
    WEFT_SLOW_MS: "5000",
    WEFT_SLOW_STAGE: "sentiment",
  });
  const r = await call(mesh, "POST", "/feedback", { text: "Why was I charged twice?" });
  assert.equal(r.status, 202, JSON.stringify(r.body));
  const id: string = r.body.id;
  await viewWith(mesh, `/feedback/${id}`, "accepted");
  const ingested = await as(
    mesh,
    "admin",
    async (nc) =>
      (await (await jetstreamManager(nc)).streams.getMessage("FEEDBACK", {
        last_by_subj: `feedback.ingested.${id}`,
      }))!,
  );
  const seq = await forgeFailure(mesh, "topics", {
    pipeline: "feedback",
    item: id,
    stage: "sentiment",
    subject: ingested.subject,
    seq: ingested.seq,
  });
  // The topics key may store letters of its own stage: one naming the ingested event, which
  // topics does not consume, vouches for nothing (before, the item failed at once).
  const own = { stage: "topics", subject: ingested.subject, seq: ingested.seq };
  await as(mesh, "topics", (nc) =>
    jetstream(nc).publish(
      `deadletter.topics.${id}`,
      JSON.stringify({ ...own, stream_seq: own.seq, item_id: id, code: "rejected" }),
    ));
  const withLetter = await forgeFailure(mesh, "topics", { pipeline: "feedback", item: id, ...own });
  await viewWith(mesh, `/feedback/${id}`, "processed");
  for (const forged of [seq, withLetter]) {
    const letter = await letterOf(mesh, "state", forged);
    assert.equal(letter.code, "conflict", JSON.stringify(letter));
  }
  for (const frames of [await replayed(mesh, `/feedback/${id}/events`)]) {
    assert.ok(
      !frames.some((f) => [seq, withLetter].includes(Number(f.id))),
      JSON.stringify(frames),
    );
    assert.equal(frames.at(-1)!.event, "feedback.processed", JSON.stringify(frames));
  }
  assert.deepEqual(mesh.logs.filter((l) => l.msg === "nats permission violation"), []);
});
