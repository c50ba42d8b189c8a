/**
 * What a step's key cannot do with the end its step leads to, on a real mesh (`deno task start`
 * with its NATS identities), publishing with the service's own key: end an item that has not
 * reached the step. Such an end is dead-lettered `conflict` by the item's state writer and
 * changes nothing (its state, outcome and `updated_at` as they were), and the item still
 * reaches its own end (docs/SECURITY.md, "What a step's key can still do").
 */
import assert from "node:assert/strict";
import { jetstream, type JetStreamManager, jetstreamManager } from "@nats-io/jetstream";
import { headers, type NatsConnection } from "@nats-io/nats-core";
import { type Mesh, ONE_PROCESS, startMesh } from "./helpers/mesh.ts";
import { connectClient } from "./helpers/nats.ts";
import { waitFor } from "./helpers/wait.ts";
import { readSse } from "./helpers/sse.ts";
import { readStream } from "../src/stream_reader.ts";
import { listDeadLetters } from "../src/redrive.ts";
import type { DeadLetter } from "../src/events.gen.ts";
import { createEvent, deterministicId } from "../src/events.ts";
import { decidedEventId } from "../pipelines/moderation/stages.ts";
import { rebuildStates } from "../src/rebuild.ts";
import { CONTENT_STATE_SPEC } from "../pipelines/moderation/state.ts";
import { FEEDBACK_STATE_SPEC } from "../pipelines/feedback/state.ts";
import { CONTENT_STREAM } from "../pipelines/moderation/subjects.ts";

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

type View = { status?: string; stage?: string; updated_at?: string; review?: unknown };

/** Waits until GET `path` answers a view with `status`; returns it. */
function viewWith(mesh: Mesh, path: string, status: string): Promise<View> {
  return waitFor(
    async () => {
      const r = await call(mesh, "GET", path);
      return r.status === 200 && r.body.status === status && r.body as View;
    },
    30_000,
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
      30_000,
      `${stage}'s dead letter of stream sequence ${seq}`,
    ));
}

/**
 * An item's event stream (`path`) read to its end (it closes at the item's end), from its
 * first event or, with `after`, resumed after that sequence (Last-Event-ID).
 */
async function itemStream(mesh: Mesh, path: string, after?: number) {
  const res = await fetch(`${mesh.gatewayUrl}${path}`, {
    headers: after === undefined ? {} : { "Last-Event-ID": String(after) },
  });
  assert.equal(res.status, 200);
  return await readSse(res, { timeoutMs: 60_000 });
}

/** Until the state writer's consumer has taken everything stored (nothing pending or unacked). */
async function settled(jsm: JetStreamManager, stream: string, durable: string) {
  await waitFor(
    async () => {
      const info = await jsm.consumers.info(stream, durable);
      return info.num_pending === 0 && info.num_ack_pending === 0;
    },
    30_000,
    `${durable} to settle`,
  );
}

Deno.test("the content storage key publishing an item's outcome while it waits for review ends nothing: dead-lettered conflict, the state as it was, its event stream neither shows it nor ends there, and the reviewer's decision still publishes it", async () => {
  await using mesh = await startMesh({ ...ONE_PROCESS, WEFT_REVIEW_SLA_MS: "600000" });
  // Two flagged items, each waiting for review.
  const ids: string[] = [];
  for (let i = 0; i < 2; i++) {
    const r = await call(mesh, "POST", "/content", { text: `${TOXIC} (${i})` });
    assert.equal(r.status, 202, JSON.stringify(r.body));
    ids.push(r.body.id);
  }
  const [a, b] = ids as [string, string];
  const before = new Map<string, View>();
  for (const id of ids) before.set(id, await viewWith(mesh, `/content/${id}`, "pending_review"));

  // With the storage service's own key: `published` for one, `archived` for the other, as the
  // storage step would publish them, the content as uploaded.
  const forged = await as(mesh, "storage", async (nc) => {
    const jsm = await jetstreamManager(nc);
    const js = jetstream(nc);
    const seqs = new Map<string, number>();
    for (const [id, type] of [[a, "content.published"], [b, "content.archived"]] as const) {
      const up = (await jsm.streams.getMessage(CONTENT_STREAM, {
        last_by_subj: `content.uploaded.${id}`,
      }))!.json<{ trace_id: string; data: { text: string } }>();
      const event = createEvent({
        type,
        itemId: id,
        traceId: up.trace_id,
        source: "weft-storage",
        data: type === "content.published"
          ? { content: up.data, via: "review" }
          : { content: up.data, reason: "rejected by mallory: forged" },
      });
      seqs.set(id, (await js.publish(`${type}.${id}`, JSON.stringify(event))).seq);
    }
    return seqs;
  });

  for (const id of ids) {
    const letter = await letterOf(mesh, "content-state", forged.get(id)!);
    assert.equal(letter.code, "conflict", JSON.stringify(letter));
    assert.match(letter.reason, /has not reached storage/);
  }
  await as(mesh, "admin", async (nc) => {
    await settled(await jetstreamManager(nc), CONTENT_STREAM, CONTENT_STATE_SPEC.durable);
  });
  // Each item's event stream, opened now: it replays the forged end, which neither shows nor
  // ends it, and goes on live.
  const streams = ids.map((id) => itemStream(mesh, `/content/${id}/events`));
  for (const id of ids) {
    const now = (await call(mesh, "GET", `/content/${id}`)).body as View;
    assert.equal(now.status, "pending_review", `${id}: ${JSON.stringify(now)}`);
    assert.equal(now.stage, before.get(id)!.stage);
    assert.equal(now.updated_at, before.get(id)!.updated_at, "updated_at as it was");
    // Its review is still open, and a reviewer decides it.
    const review = await call(mesh, "GET", `/reviews/${id}`);
    assert.equal(review.status, 200);
    assert.equal(review.body.status, "pending");
    const decided = await call(mesh, "POST", `/reviews/${id}/decision`, {
      decision: "approve",
      reason: "fine after all",
      reviewer: "alice",
    });
    assert.equal(decided.status, 200, JSON.stringify(decided.body));
  }
  // Each is published by its decision: the one a forged `published` was stored for too (its
  // own outcome stored after the forged one), and the one a forged `archived` was stored for.
  for (const id of ids) {
    const done = await viewWith(mesh, `/content/${id}`, "published");
    assert.equal(done.stage, "published");
    assert.deepEqual((done.review as { decision?: string }).decision, "approve");
  }
  // The streams ended at each item's own outcome, never showing the forged one; a client
  // resuming from the forged end's sequence gets the item's own outcome and the end.
  for (const [i, id] of ids.entries()) {
    const forgedSeq = forged.get(id)!;
    for (
      const frames of [
        await streams[i]!,
        await itemStream(mesh, `/content/${id}/events`, forgedSeq),
      ]
    ) {
      assert.ok(!frames.some((f) => Number(f.id) === forgedSeq), JSON.stringify(frames));
      const last = frames.at(-1)!;
      assert.match(last.event ?? "", /published$/);
      assert.ok(Number(last.id) > forgedSeq, JSON.stringify(frames));
    }
  }
  // Neither failed, and a rebuild from the stream agrees with the live state.
  await as(mesh, "admin", async (nc) => {
    const jsm = await jetstreamManager(nc);
    const failed = await jsm.streams.info(CONTENT_STREAM, { subjects_filter: "content.failed.*" });
    assert.deepEqual(Object.keys(failed.state.subjects ?? {}), []);
    await settled(jsm, CONTENT_STREAM, CONTENT_STATE_SPEC.durable);
    const rebuilt = await rebuildStates(jetstream(nc), CONTENT_STATE_SPEC);
    for (const id of ids) assert.equal(rebuilt.states.get(id)?.status, "published", id);
  });
});

Deno.test("the content storage key's outcome stored first under the id of the item's own, while it waits for review, does not stand in for it: the reviewer's decision publishes the item", async () => {
  // Found by probing the definitions' steps (documents.filed under its own future id): ids
  // follow from the item, so the storage key can store `content.published` for an item waiting
  // for review under the id the storage step's own will carry once a reviewer approves.
  await using mesh = await startMesh({ ...ONE_PROCESS, WEFT_REVIEW_SLA_MS: "600000" });
  const r = await call(mesh, "POST", "/content", { text: `${TOXIC} (pre-empted)` });
  assert.equal(r.status, 202, JSON.stringify(r.body));
  const id = r.body.id as string;
  await viewWith(mesh, `/content/${id}`, "pending_review");
  const own = deterministicId(decidedEventId(id), "content.published");
  const forgedSeq = await as(mesh, "storage", async (nc) => {
    const jsm = await jetstreamManager(nc);
    const up = (await jsm.streams.getMessage(CONTENT_STREAM, {
      last_by_subj: `content.uploaded.${id}`,
    }))!.json<{ trace_id: string; data: { text: string } }>();
    const event = createEvent({
      id: own,
      type: "content.published",
      itemId: id,
      traceId: up.trace_id,
      source: "weft-storage",
      data: { content: up.data, via: "review" },
    });
    const h = headers();
    h.set("Nats-Msg-Id", own);
    return (await jetstream(nc).publish(`content.published.${id}`, JSON.stringify(event), {
      headers: h,
    })).seq;
  });
  const letter = await letterOf(mesh, "content-state", forgedSeq);
  assert.equal(letter.code, "conflict", JSON.stringify(letter));
  const decided = await call(mesh, "POST", `/reviews/${id}/decision`, {
    decision: "approve",
    reason: "fine after all",
    reviewer: "alice",
  });
  assert.equal(decided.status, 200, JSON.stringify(decided.body));
  const done = await viewWith(mesh, `/content/${id}`, "published");
  assert.deepEqual((done.review as { decision?: string }).decision, "approve");
  await as(mesh, "admin", async (nc) => {
    const jsm = await jetstreamManager(nc);
    const last = (await jsm.streams.getMessage(CONTENT_STREAM, {
      last_by_subj: `content.published.${id}`,
    }))!;
    assert.ok(last.seq > forgedSeq, "the item's own outcome, stored after the forged one");
    assert.equal(last.json<{ id: string }>().id, own, "under the id the forged one took");
  });
});

Deno.test("the dispatch key's `processed` stored first under the id of the item's own, while the item is at sentiment, does not stand in for it: the item processes on its own events", async () => {
  // Ids follow from the item (each event's from its cause's and its type), so the dispatch key
  // can compute the id of an item's `processed` from its id alone.
  await using mesh = await startMesh({
    ...ONE_PROCESS,
    WEFT_SLOW_MS: "5000",
    WEFT_SLOW_STAGE: "sentiment",
  });
  const r = await call(mesh, "POST", "/feedback", { text: "Why was I charged twice?" });
  assert.equal(r.status, 202, JSON.stringify(r.body));
  const id = r.body.id as string;
  await viewWith(mesh, `/feedback/${id}`, "accepted");
  let cause = deterministicId(id, "feedback.ingested");
  for (const t of ["sentiment_analyzed", "topics_extracted", "dispatched", "processed"]) {
    cause = deterministicId(cause, `feedback.${t}`);
  }
  const own = cause;
  const forgedSeq = await as(mesh, "dispatch", async (nc) => {
    const ingested = (await (await jetstreamManager(nc)).streams.getMessage("FEEDBACK", {
      last_by_subj: `feedback.ingested.${id}`,
    }))!.json<{ trace_id: string; data: Record<string, unknown> }>();
    const event = createEvent({
      id: own,
      type: "feedback.processed",
      itemId: id,
      traceId: ingested.trace_id,
      source: "weft-dispatch",
      data: {
        ...ingested.data,
        sentiment: { label: "positive", score: 0.9, analyzer: "rules" },
        topics: { topics: ["praise"], evidence: {}, analyzer: "rules" },
        routing: { team: "Nobody", rule: 0 },
      } as never,
    });
    const h = headers();
    h.set("Nats-Msg-Id", own);
    return (await jetstream(nc).publish(`feedback.processed.${id}`, JSON.stringify(event), {
      headers: h,
    })).seq;
  });
  const letter = await letterOf(mesh, "state", forgedSeq);
  assert.equal(letter.code, "conflict", JSON.stringify(letter));
  const done = await viewWith(mesh, `/feedback/${id}`, "processed") as View & {
    routing?: { team: string };
    stages: Record<string, { seq: number }>;
  };
  assert.notEqual(done.routing?.team, "Nobody");
  assert.ok(done.stages.processed!.seq > forgedSeq, "its own, stored after the forged one");
  await as(mesh, "admin", async (nc) => {
    const last = (await (await jetstreamManager(nc)).streams.getMessage("FEEDBACK", {
      last_by_subj: `feedback.processed.${id}`,
    }))!;
    assert.equal(last.json<{ id: string }>().id, own, "under the id the forged one took");
  });
});

Deno.test("the content storage key's outcome for a failed item, which its state writer does not keep cached, is dead-lettered conflict too: the item stays failed", async () => {
  await using mesh = await startMesh({ ...ONE_PROCESS, WEFT_REVIEW_SLA_MS: "600000" });
  const r = await call(mesh, "POST", "/content", { text: TOXIC });
  assert.equal(r.status, 202, JSON.stringify(r.body));
  const id: string = r.body.id;
  await viewWith(mesh, `/content/${id}`, "pending_review");
  // The pipeline's failure event with the moderation key (a step's key may publish it, with a
  // dead letter of its own stage, for a message the stage consumes, stored first: a failure
  // with none fails nothing, tests/forged_failures_test.ts), then, once the item reads failed
  // (a final state, which leaves the writer's cache), its outcome with the storage key.
  const publish = (type: "content.failed" | "content.published") =>
    as(mesh, type === "content.failed" ? "moderation" : "storage", async (nc) => {
      const stored = (await (await jetstreamManager(nc)).streams.getMessage(CONTENT_STREAM, {
        last_by_subj: `content.uploaded.${id}`,
      }))!;
      const up = stored.json<{ trace_id: string; data: { text: string } }>();
      const js = jetstream(nc);
      const stage = "moderation";
      const dlSubject = `deadletter.${stage}.${id}`;
      if (type === "content.failed") {
        const letter = {
          stage,
          code: "handler_failed",
          reason: "forged",
          attempts: 5,
          subject: stored.subject,
          stream_seq: stored.seq,
          time: new Date().toISOString(),
          item_id: id,
        };
        await js.publish(dlSubject, JSON.stringify(letter));
      }
      const event = createEvent({
        type,
        itemId: id,
        traceId: up.trace_id,
        source: "weft-storage",
        data: type === "content.failed"
          ? {
            stage,
            code: "handler_failed",
            reason: "forged",
            attempts: 5,
            dead_letter_subject: dlSubject,
            subject: stored.subject,
          }
          : { content: up.data, via: "review" },
      });
      if (type === "content.failed") {
        event.id = deterministicId(id, type, String(stored.seq));
      }
      return (await js.publish(`${type}.${id}`, JSON.stringify(event))).seq;
    });
  await publish("content.failed");
  const failed = await viewWith(mesh, `/content/${id}`, "failed");
  const seq = await publish("content.published");
  const letter = await letterOf(mesh, "content-state", seq);
  assert.equal(letter.code, "conflict", JSON.stringify(letter));
  await as(mesh, "admin", async (nc) => {
    await settled(await jetstreamManager(nc), CONTENT_STREAM, CONTENT_STATE_SPEC.durable);
  });
  const now = (await call(mesh, "GET", `/content/${id}`)).body as View;
  assert.equal(now.status, "failed", JSON.stringify(now));
  assert.equal(now.updated_at, failed.updated_at, "updated_at as it was");
});

Deno.test("the content storage key's outcome for an item moderation has not screened does not keep the item from failing: moderation giving up on it fails it", async () => {
  await using mesh = await startMesh({
    ...ONE_PROCESS,
    // Moderation takes 3 s an attempt, then gives up on any text that says "crash", twice.
    WEFT_SLOW_MS: "3000",
    WEFT_SLOW_STAGE: "moderation",
    WEFT_FAIL_ON: "crash",
    WEFT_FAIL_STAGE: "moderation",
    WEFT_MAX_ATTEMPTS: "2",
    WEFT_RETRY_BASE_MS: "50",
    WEFT_RETRY_MAX_MS: "50",
  });
  const r = await call(mesh, "POST", "/content", { text: "The app did crash on upload." });
  assert.equal(r.status, 202, JSON.stringify(r.body));
  const id: string = r.body.id;
  await viewWith(mesh, `/content/${id}`, "uploaded");
  // While moderation works on it, the storage key publishes its outcome.
  const seq = await as(mesh, "storage", async (nc) => {
    const up = (await (await jetstreamManager(nc)).streams.getMessage(CONTENT_STREAM, {
      last_by_subj: `content.uploaded.${id}`,
    }))!.json<{ trace_id: string; data: { text: string } }>();
    const event = createEvent({
      type: "content.published",
      itemId: id,
      traceId: up.trace_id,
      source: "weft-storage",
      data: { content: up.data, via: "moderation" },
    });
    return (await jetstream(nc).publish(`content.published.${id}`, JSON.stringify(event))).seq;
  });
  assert.equal((await letterOf(mesh, "content-state", seq)).code, "conflict");
  // The forged outcome is no end of the item: moderation's giving up fails it.
  const failed = await viewWith(mesh, `/content/${id}`, "failed") as View & {
    error?: { stage?: string };
  };
  assert.equal(failed.error?.stage, "moderation", JSON.stringify(failed));
  const letter = await as(mesh, "admin", (nc) =>
    waitFor(
      async () =>
        (await listDeadLetters(jetstream(nc), {})).find((e) => e.letter.stage === "moderation")
          ?.letter,
      30_000,
      "moderation's dead letter",
    ));
  assert.equal(letter.item_id, id);
});

Deno.test("feedback steps' keys publishing their events for an item still at sentiment end nothing: dispatch's `processed` and topics' `topics_extracted` are dead-lettered conflict, the item's event stream does not end at the forged `processed`, the item processes on its own events, and the digest counts its own routing", async () => {
  // Sentiment takes 15 s an item, so each item waits there while the keys publish.
  await using mesh = await startMesh({
    ...ONE_PROCESS,
    WEFT_SLOW_MS: "15000",
    WEFT_SLOW_STAGE: "sentiment",
  });
  const ids: string[] = [];
  for (const text of ["The app crashes on login, terrible", "Why was I charged twice?"]) {
    const r = await call(mesh, "POST", "/feedback", { text });
    assert.equal(r.status, 202, JSON.stringify(r.body));
    ids.push(r.body.id);
  }
  const [a, b] = ids as [string, string];
  const before = new Map<string, View>();
  for (const id of ids) before.set(id, await viewWith(mesh, `/feedback/${id}`, "accepted"));

  const sentiment = { label: "positive", score: 0.9, analyzer: "rules" };
  const topics = { topics: ["praise"], evidence: {}, analyzer: "rules" };
  const routing = { team: "Nobody", rule: 0 };
  /** Publishes `type` for `id` with `identity`'s key, the item's own fields carried on. */
  const forge = (identity: string, id: string, type: string, extra: Record<string, unknown>) =>
    as(mesh, identity, async (nc) => {
      const ingested = (await (await jetstreamManager(nc)).streams.getMessage("FEEDBACK", {
        last_by_subj: `feedback.ingested.${id}`,
      }))!.json<{ trace_id: string; data: Record<string, unknown> }>();
      const event = createEvent({
        type: type as "feedback.processed",
        itemId: id,
        traceId: ingested.trace_id,
        source: `weft-${identity}`,
        data: { ...ingested.data, ...extra } as never,
      });
      return (await jetstream(nc).publish(`${type}.${id}`, JSON.stringify(event))).seq;
    });
  // Dispatch's key: the item's routing and outcome while it is still at sentiment.
  const dispatched = await forge("dispatch", a, "feedback.dispatched", {
    sentiment,
    topics,
    routing,
  });
  const processed = await forge("dispatch", a, "feedback.processed", {
    sentiment,
    topics,
    routing,
  });
  // Topics' key: its event for an item still at sentiment.
  const extracted = await forge("topics", b, "feedback.topics_extracted", { sentiment, topics });

  const letters = [
    await letterOf(mesh, "state", dispatched),
    await letterOf(mesh, "state", processed),
    await letterOf(mesh, "state", extracted),
    await letterOf(mesh, "dispatch", extracted),
  ];
  for (const letter of letters) {
    assert.equal(letter.code, "conflict", JSON.stringify(letter));
    assert.match(letter.reason, /had not reached/);
  }
  // Each item's event stream, opened now: it replays the forged `processed`, which neither
  // shows nor ends it, and goes on live.
  const streams = ids.map((id) => itemStream(mesh, `/feedback/${id}/events`));
  // Still at sentiment, as they were.
  for (const id of ids) {
    const now = (await call(mesh, "GET", `/feedback/${id}`)).body as View;
    assert.equal(now.status, "accepted", `${id}: ${JSON.stringify(now)}`);
    assert.equal(now.updated_at, before.get(id)!.updated_at, "updated_at as it was");
  }
  // Each processes on its own events, stored after the forged ones.
  type Done = View & {
    routing?: { team: string };
    stages: Record<string, { seq: number }>;
  };
  for (const id of ids) {
    const done = await viewWith(mesh, `/feedback/${id}`, "processed") as Done;
    assert.notEqual(done.routing?.team, "Nobody", id);
    assert.ok(done.stages.processed!.seq > processed, id);
    assert.ok(done.stages.topics_extracted!.seq > extracted, id);
  }
  // The streams ended at each item's own `processed`, never showing the forged one.
  for (const [i, id] of ids.entries()) {
    const frames = await streams[i]!;
    assert.ok(!frames.some((f) => Number(f.id) === processed), JSON.stringify(frames));
    const last = frames.at(-1)!;
    assert.match(last.event ?? "", /processed$/);
    assert.equal(
      Number(last.id),
      (await viewWith(mesh, `/feedback/${id}`, "processed") as Done)
        .stages.processed!.seq,
    );
  }
  await as(mesh, "admin", async (nc) => {
    const jsm = await jetstreamManager(nc);
    const failed = await jsm.streams.info("FEEDBACK", { subjects_filter: "feedback.failed.*" });
    assert.deepEqual(Object.keys(failed.state.subjects ?? {}), []);
    await settled(jsm, "FEEDBACK", FEEDBACK_STATE_SPEC.durable);
    const rebuilt = await rebuildStates(jetstream(nc), FEEDBACK_STATE_SPEC);
    for (const id of ids) assert.equal(rebuilt.states.get(id)?.status, "processed", id);
    // The hourly digest counts each item once, under the team its own dispatch chose, never
    // the forged `dispatched`'s.
    const request = await jetstream(nc).publish(
      "digest.request.feedback",
      JSON.stringify({ window_ms: 3_600_000 }),
    );
    const digest = await waitFor(
      async () => {
        for await (
          const m of readStream(jetstream(nc), "DIGEST", {
            filter: "digest.feedback_counts.*",
          })
        ) {
          if (m.seq > request.seq) return m.json<{ data: { total: number; teams: object } }>();
        }
      },
      30_000,
      "the digest's counts",
    );
    assert.equal(digest.data.total, 2, JSON.stringify(digest.data));
    assert.ok(!("Nobody" in digest.data.teams), JSON.stringify(digest.data));
  });
});

Deno.test("the dispatch key's `processed` for an item at sentiment does not keep the item from failing: sentiment giving up on it fails it", async () => {
  await using mesh = await startMesh({
    ...ONE_PROCESS,
    // Sentiment takes 3 s an attempt, then gives up on any text that says "crash", twice.
    WEFT_SLOW_MS: "3000",
    WEFT_SLOW_STAGE: "sentiment",
    WEFT_FAIL_ON: "crash",
    WEFT_FAIL_STAGE: "sentiment",
    WEFT_MAX_ATTEMPTS: "2",
    WEFT_RETRY_BASE_MS: "50",
    WEFT_RETRY_MAX_MS: "50",
  });
  const r = await call(mesh, "POST", "/feedback", { text: "The app did crash on login" });
  assert.equal(r.status, 202, JSON.stringify(r.body));
  const id: string = r.body.id;
  await viewWith(mesh, `/feedback/${id}`, "accepted");
  // While sentiment works on it, the dispatch key publishes its outcome.
  const seq = await as(mesh, "dispatch", async (nc) => {
    const ingested = (await (await jetstreamManager(nc)).streams.getMessage("FEEDBACK", {
      last_by_subj: `feedback.ingested.${id}`,
    }))!.json<{ trace_id: string; data: { text: string } }>();
    const event = createEvent({
      type: "feedback.processed",
      itemId: id,
      traceId: ingested.trace_id,
      source: "weft-dispatch",
      data: {
        ...ingested.data,
        sentiment: { label: "positive", score: 0.9, analyzer: "rules" },
        topics: { topics: ["praise"], evidence: {}, analyzer: "rules" },
        routing: { team: "Nobody", rule: 0 },
      },
    });
    return (await jetstream(nc).publish(`feedback.processed.${id}`, JSON.stringify(event))).seq;
  });
  assert.equal((await letterOf(mesh, "state", seq)).code, "conflict");
  // The forged outcome is no end of the item: sentiment's giving up fails it.
  const failed = await viewWith(mesh, `/feedback/${id}`, "failed") as View & {
    error?: { stage?: string };
  };
  assert.equal(failed.error?.stage, "sentiment", JSON.stringify(failed));
});
