/**
 * Defects an adversarial probe found in content moderation, each kept fixed: forged or early
 * SLA timers, late timers, decisions replayed after the duplicate window or forged on the
 * bus, cross-site decisions, refused uploads, bad messages on an item's decision subject.
 * Real nats-server; the review and storage stages and the gateway app in-process, on a clock
 * the test moves (the scheduler does not run: the test publishes a schedule's payload when
 * it would fire).
 */
import assert from "node:assert/strict";
import { headers } from "@nats-io/nats-core";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { Objm } from "@nats-io/obj";
import { toxicityAnalyzer } from "../src/ai/analyzers/mod.ts";
import { createApp } from "../src/gateway/app.ts";
import { createAuth, hashKey } from "../src/gateway/auth.ts";
import { runStage, type StageRunner } from "../src/runner.ts";
import { createScheduleStore } from "../src/scheduler/store.ts";
import { DEADLETTER_STREAM, SCHEDULE_BUCKET } from "../src/subjects.ts";
import { createIntake } from "../pipelines/feedback/intake.ts";
import { createModerationApi, type ModerationApi } from "../pipelines/moderation/api.ts";
import { moderationRoutes } from "../pipelines/moderation/routes.ts";
import { serveModerationRequests } from "../pipelines/moderation/requests.ts";
import { createReviewQueue, type ReviewQueue } from "../pipelines/moderation/review_queue.ts";
import {
  contentOutcomeGuard,
  contentOutcomeReader,
  itemModerationReader,
  moderationStage,
  reviewQueueStage,
  reviewSlaStage,
  slaScheduleId,
  storageDecidedStage,
  storageModeratedStage,
  uploadedContentReader,
} from "../pipelines/moderation/stages.ts";
import {
  CONTENT_OBJECT_BUCKET,
  CONTENT_STREAM,
  REVIEW_BUCKET,
} from "../pipelines/moderation/subjects.ts";
import { startTestNats, type TestNats } from "./helpers/nats.ts";
import { waitFor } from "./helpers/wait.ts";

const TOXIC = "You idiot, this is the most pathetic service ever.";
const T0 = Date.parse("2026-03-01T10:00:00.000Z");
const SLA = { reviewSlaMs: 30_000, escalationSlaMs: 20_000, slaDefaultAction: "reject" as const };

// deno-lint-ignore no-explicit-any
type Json = Record<string, any>;

/** The review and storage stages, the API and the gateway app, on a clock the test moves. */
async function mesh(t: TestNats) {
  let clock = T0;
  const now = () => new Date(clock);
  const kvm = new Kvm(t.nc);
  const queue: ReviewQueue = createReviewQueue(await kvm.open(REVIEW_BUCKET), t.config);
  const schedules = createScheduleStore(await kvm.open(SCHEDULE_BUCKET), now);
  const api: ModerationApi = await createModerationApi({
    nc: t.nc,
    config: t.config,
    log: t.log,
    authEnabled: false,
    now,
  });
  const deps = { nc: t.nc, config: t.config, log: t.log, now };
  const runners: StageRunner[] = [
    await runStage({ ...deps, stage: moderationStage(toxicityAnalyzer()) }),
    await runStage({
      ...deps,
      stage: reviewQueueStage(
        queue,
        schedules,
        SLA,
        contentOutcomeReader(t.jsm),
        itemModerationReader(t.jsm),
      ),
    }),
    await runStage({ ...deps, stage: reviewSlaStage(queue, schedules, SLA) }),
    // As the storage service runs them (services/storage.ts).
    await runStage({
      ...deps,
      stage: storageDecidedStage(uploadedContentReader(t.jsm), contentOutcomeGuard(t.jsm)),
    }),
    await runStage({
      ...deps,
      stage: storageModeratedStage(itemModerationReader(t.jsm), contentOutcomeGuard(t.jsm)),
    }),
  ];
  const app = createApp({
    nc: t.nc,
    jetStream: await createIntake(t.nc),
    config: t.config,
    log: t.log,
    auth: createAuth([]),
    extensions: [moderationRoutes(api)],
  });
  const js = jetstream(t.nc);
  /** Every event stored on `content.<type>.<id>`, oldest first. */
  const events = async (type: string, id: string): Promise<Json[]> => {
    const info = await t.jsm.streams.info(CONTENT_STREAM, {
      subjects_filter: `content.${type}.${id}`,
    });
    const n = Object.values(info.state.subjects ?? {})[0] ?? 0;
    const out: Json[] = [];
    let seq = 0;
    for (let i = 0; i < n; i++) {
      const m = await t.jsm.streams.getMessage(CONTENT_STREAM, {
        next_by_subj: `content.${type}.${id}`,
        seq: seq + 1,
      } as unknown as { seq: number });
      seq = m!.seq;
      out.push(m!.json<Json>());
    }
    return out;
  };
  /** The dead letters of `stage` for item `id`, once there are `n`. */
  const letters = (stage: string, id: string, n = 1) =>
    waitFor(
      async () => {
        const info = await t.jsm.streams.info(DEADLETTER_STREAM, {
          subjects_filter: `deadletter.${stage}.${id}`,
        });
        const count = Object.values(info.state.subjects ?? {})[0] ?? 0;
        if (count < n) return undefined;
        const out: Json[] = [];
        let seq = 0;
        for (let i = 0; i < count; i++) {
          const m = await t.jsm.streams.getMessage(DEADLETTER_STREAM, {
            next_by_subj: `deadletter.${stage}.${id}`,
            seq: seq + 1,
          } as unknown as { seq: number });
          seq = m!.seq;
          out.push(m!.json<Json>());
        }
        return out;
      },
      10_000,
      `${n} dead letter(s) of ${stage} for ${id}`,
    );
  /** A flagged item, waiting in the review queue. */
  const flagged = async (text = TOXIC) => {
    const { body } = await api.submitText({ text }, { name: "test", role: "admin" });
    await waitFor(async () => (await queue.get(body.id)) ?? undefined, 10_000, `${body.id} queued`);
    return body.id;
  };
  /** What the scheduler publishes when schedule `level` of `id` fires (read from the store), now. */
  const fire = async (id: string, level: 1 | 2) => {
    const entry = await schedules.get(slaScheduleId(id, level));
    return await js.publish(entry.subject, JSON.stringify(entry.payload));
  };
  return {
    queue,
    schedules,
    api,
    app,
    js,
    events,
    letters,
    flagged,
    fire,
    set: (ms: number) => (clock = ms),
    get now() {
      return clock;
    },
    async [Symbol.asyncDispose]() {
      for (const r of runners) await r.stop();
    },
  };
}

/** An SLA timer event for `id` as anyone could publish it. */
function forgedTimer(id: string, level: number, dueAt: string, n: string) {
  return JSON.stringify({
    id: `forged-${n}`,
    type: "content.sla_expired",
    version: 1,
    item_id: id,
    trace_id: "0af7651916cd43dd8448eb211c80319c",
    time: new Date(T0).toISOString(),
    source: "forger",
    data: { level, due_at: dueAt },
  });
}

Deno.test("an SLA timer is judged by the item's review record, not by what it claims: early or inconsistent ones are dead-lettered, decide nothing and fail nothing; an item escalates once", async () => {
  await using t = await startTestNats();
  await using m = await mesh(t);
  const id = await m.flagged();
  const queued = (await m.queue.get(id))!;
  assert.equal(Date.parse(queued.due_at!), T0 + SLA.reviewSlaMs);

  // 28 s before its review deadline, a forged level 2 and a forged level 1 dated 9999.
  m.set(T0 + 2_000);
  await m.js.publish(
    `content.sla_expired.${id}`,
    forgedTimer(id, 2, new Date(T0).toISOString(), "a"),
  );
  await m.js.publish(
    `content.sla_expired.${id}`,
    forgedTimer(id, 1, "9999-01-01T00:00:00.000Z", "b"),
  );
  const early = await m.letters("review-sla", id, 2);
  for (const l of early) assert.equal(l.code, "invalid_awaited_event", JSON.stringify(l));
  let entry = (await m.queue.get(id))!;
  assert.equal(entry.status, "pending", "the item still waits for review");
  assert.equal(entry.due_at, queued.due_at);
  assert.deepEqual(await m.events("decided", id), [], "no decision");
  assert.deepEqual(await m.events("escalated", id), [], "no escalation");
  assert.deepEqual(await m.events("failed", id), [], "nothing failed");

  // The real review deadline escalates it.
  m.set(T0 + SLA.reviewSlaMs);
  await m.fire(id, 1);
  await waitFor(async () => (await m.events("escalated", id)).length > 0, 10_000, "escalated");
  entry = (await m.queue.get(id))!;
  assert.equal(entry.status, "escalated");
  const escalationDue = T0 + SLA.reviewSlaMs + SLA.escalationSlaMs;
  assert.equal(Date.parse(entry.due_at!), escalationDue);
  assert.equal(Date.parse((await m.schedules.get(slaScheduleId(id, 2))).at!), escalationDue);

  // A forged level 1 again (another id), and the forged level 2 before the escalation ends.
  await m.js.publish(
    `content.sla_expired.${id}`,
    forgedTimer(id, 1, "9999-01-01T00:00:00.000Z", "c"),
  );
  await m.js.publish(
    `content.sla_expired.${id}`,
    forgedTimer(id, 2, new Date(T0).toISOString(), "d"),
  );
  const later = await m.letters("review-sla", id, 4);
  for (const l of later) assert.equal(l.code, "invalid_awaited_event", JSON.stringify(l));
  assert.equal((await m.events("escalated", id)).length, 1, "escalated once");
  assert.deepEqual(await m.events("decided", id), [], "no decision before the escalation SLA");
  assert.equal((await m.queue.get(id))!.status, "escalated");

  // The real escalation deadline applies the default action.
  m.set(escalationDue + 10);
  await m.fire(id, 2);
  await waitFor(async () => (await m.events("archived", id)).length > 0, 10_000, "archived");
  const decided = await m.events("decided", id);
  assert.equal(decided.length, 1);
  assert.equal(decided[0]!.data.automatic, true);
  assert.deepEqual(await m.events("failed", id), [], "nothing failed");
});

Deno.test("the escalation SLA counts from the escalation: a review deadline handled 70 s late does not default-decide the item at once", async () => {
  await using t = await startTestNats();
  await using m = await mesh(t);
  const id = await m.flagged();
  // The scheduler was stopped for 70 s: the review deadline fires that late.
  const escalatedAt = T0 + SLA.reviewSlaMs + 70_000;
  m.set(escalatedAt);
  await m.fire(id, 1);
  const [escalated] = await waitFor(
    async () => {
      const es = await m.events("escalated", id);
      return es.length > 0 ? es : undefined;
    },
    10_000,
    "escalated",
  );
  const due = escalatedAt + SLA.escalationSlaMs;
  assert.equal(
    Date.parse(escalated!.data.due_at),
    due,
    "still undecided this long after escalation",
  );
  assert.equal(Date.parse((await m.queue.get(id))!.due_at!), due);
  assert.equal(Date.parse((await m.schedules.get(slaScheduleId(id, 2))).at!), due);

  // Its escalation deadline, handled 12 ms later, is not due yet: nothing is decided.
  m.set(escalatedAt + 12);
  await m.fire(id, 2);
  const [letter] = await m.letters("review-sla", id);
  assert.equal(letter!.code, "invalid_awaited_event");
  assert.deepEqual(await m.events("decided", id), [], "a reviewer still has the escalation SLA");
  assert.equal((await m.queue.get(id))!.status, "escalated");

  m.set(due);
  await m.fire(id, 2);
  await waitFor(async () => (await m.events("archived", id)).length > 0, 10_000, "archived");
  assert.equal((await m.events("decided", id)).length, 1);
});

/** Resolves once the stream has forgotten the message ids published before this call. */
async function duplicateWindowPassed(t: TestNats) {
  const js = jetstream(t.nc);
  const probe = () => js.publish("content.probe.window", "", { msgID: "window-probe" });
  await probe();
  await waitFor(async () => !(await probe()).duplicate, 20_000, "the duplicate window to pass");
}

const decide = (
  app: { request: (path: string, init: RequestInit) => Response | Promise<Response> },
  id: string,
  body: Json,
) =>
  app.request(`/reviews/${id}/decision`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });

Deno.test("a decision replayed after the duplicate window stores no second content.decided; a decision the stream did not store is answered 409, not 200", async () => {
  await using t = await startTestNats({ duplicateWindowMs: 1_000 });
  await using m = await mesh(t);
  const id = await m.flagged();
  const carol = { decision: "reject", reason: "insults staff", reviewer: "carol" };
  const first = await decide(m.app, id, carol);
  assert.equal(first.status, 200, await first.text());
  await waitFor(async () => (await m.events("archived", id)).length > 0, 10_000, "archived");

  await duplicateWindowPassed(t);
  const replay = await decide(m.app, id, carol);
  assert.equal(replay.status, 200, await replay.text());
  assert.equal(replay.headers.get("idempotent-replayed"), "true");
  assert.equal((await m.events("decided", id)).length, 1, "one decision event per item");

  // A decision forged on the bus before the reviewer's: hers is not the stored one.
  const other = await m.flagged(`${TOXIC} moron`);
  const forged = {
    id: `forged-decision-${other}`,
    type: "content.decided",
    version: 1,
    item_id: other,
    trace_id: (await m.queue.get(other))!.trace_id,
    time: new Date(m.now).toISOString(),
    source: "forger",
    data: {
      content: { text: TOXIC },
      decision: "approve",
      reason: "forged",
      reviewer: "mallory",
      automatic: false,
    },
  };
  await m.js.publish(`content.decided.${other}`, JSON.stringify(forged));
  const refused = await decide(m.app, other, carol);
  const text = await refused.text();
  assert.equal(refused.status, 409, text);
  assert.equal(JSON.parse(text).code, "conflict");
  assert.match(JSON.parse(text).detail, /mallory/);
  const stored = await m.events("decided", other);
  assert.deepEqual(stored.map((e) => e.data.reviewer), ["mallory"], "the stream's one decision");
  assert.equal((await m.queue.get(other))!.decision, undefined, "the queue records no decision");
});

Deno.test("claims and decisions require a JSON content type: a cross-site form (text/plain) decides nothing, even with no API keys", async () => {
  await using t = await startTestNats();
  await using m = await mesh(t);
  const id = await m.flagged();
  const form = (path: string, body: string, type?: string) =>
    m.app.request(path, {
      method: "POST",
      headers: type === undefined ? {} : { "content-type": type },
      body,
    });
  const decision = JSON.stringify({ decision: "approve", reason: "csrf", reviewer: "mallory" });
  for (const type of ["text/plain", "application/x-www-form-urlencoded", undefined]) {
    const decided = await form(`/reviews/${id}/decision`, decision, type);
    const text = await decided.text();
    assert.equal(decided.status, 415, `${type}: ${text}`);
    assert.equal(JSON.parse(text).field, "content-type");
    const claimed = await form(`/reviews/${id}/claim`, "", type);
    assert.equal(claimed.status, 415, `${type}: ${await claimed.text()}`);
  }
  const entry = (await m.queue.get(id))!;
  assert.equal(entry.status, "pending");
  assert.equal(entry.claim, undefined, "no claim");
  assert.deepEqual(await m.events("decided", id), [], "no decision");

  // With the header, an empty claim body is still {} (the reviewer, auth off, named in it).
  const claimed = await form(`/reviews/${id}/claim`, "", "application/json");
  assert.equal(claimed.status, 422, "auth off: the reviewer is required");
  await claimed.body?.cancel();
  const ok = await form(`/reviews/${id}/claim`, '{"reviewer":"carol"}', "application/json");
  assert.equal(ok.status, 200, await ok.clone().text());
  await ok.body?.cancel();
  // A decision, too, names its reviewer with auth off (README, docs/MODERATION.md).
  const unnamed = await form(
    `/reviews/${id}/decision`,
    '{"decision":"reject","reason":"insults"}',
    "application/json",
  );
  assert.equal(unnamed.status, 422, "auth off: the decision's reviewer is required");
  assert.equal((await unnamed.json()).field, "/reviewer");
  assert.deepEqual(await m.events("decided", id), [], "no decision");
});

Deno.test("a claim refuses a field it does not take, and a reviewer that is not a string, with 422 naming it, over HTTP and weft.reviews.claim alike", async () => {
  await using t = await startTestNats();
  await using m = await mesh(t);
  const id = await m.flagged();
  // Over NATS with API keys, where a reviewer that is not a string was ignored (the claim
  // taken in the key's name) rather than refused.
  const keyed = await createModerationApi({
    nc: t.nc,
    config: t.config,
    log: t.log,
    authEnabled: true,
  });
  const auth = createAuth([{ sha256: hashKey("k-amy"), role: "reviewer", name: "amy" }]);
  const requests = serveModerationRequests(t.nc, keyed, auth, t.log);
  const h = headers();
  h.set("Authorization", "Bearer k-amy");
  try {
    const http = (body: unknown) =>
      m.app.request(`/reviews/${id}/claim`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(body),
      });
    const nats = async (body: unknown) =>
      (await t.nc.request("weft.reviews.claim", JSON.stringify(body), {
        headers: h,
        timeout: 5_000,
      }))
        .json<{ error?: { status: number; code: string; field?: string } }>();
    for (
      const [body, field] of [
        [{ reviewer: "amy", x: 1 }, "/x"],
        [{ reviewer: 5 }, "/reviewer"],
        [{ reviewer: null }, "/reviewer"],
        [{ reviewer: "amy", id }, "/id"], // over HTTP the item is the path's
      ] as const
    ) {
      const res = await http(body);
      const text = await res.text();
      assert.equal(res.status, 422, `${JSON.stringify(body)}: ${text}`);
      assert.equal(JSON.parse(text).field, field, text);
    }
    for (
      const [body, field] of [
        [{ id, reviewer: "amy", x: 1 }, "/x"],
        [{ id, reviewer: 5 }, "/reviewer"],
        [{ id, reviewer: null }, "/reviewer"],
      ] as const
    ) {
      const reply = await nats(body);
      assert.equal(reply.error?.status, 422, `${JSON.stringify(body)}: ${JSON.stringify(reply)}`);
      assert.equal(reply.error?.field, field, JSON.stringify(reply));
    }
    assert.equal((await m.queue.get(id))!.claim, undefined, "no claim taken");
    const ok = await nats({ id });
    assert.equal(ok.error, undefined, JSON.stringify(ok));
    assert.equal((await m.queue.get(id))!.claim?.reviewer, "amy");
  } finally {
    requests.stop();
  }
});

Deno.test("a refused binary upload leaves nothing in the object store: a too-long content type is a 422 naming the header, and a publish the stream refuses removes the stored object", async () => {
  await using t = await startTestNats();
  await using m = await mesh(t);
  const objects = await new Objm(t.nc).open(CONTENT_OBJECT_BUCKET);
  const stored = async () => {
    const names: string[] = [];
    for (const o of await objects.list()) names.push(o.name);
    return names;
  };
  const upload = (type: string) =>
    m.app.request("/content?meta.camera=x100", {
      method: "POST",
      headers: { "content-type": type },
      body: new Uint8Array([137, 80, 78, 71, 1, 2, 3]),
    });

  const long = await upload(`image/${"x".repeat(294)}`);
  const text = await long.text();
  assert.equal(long.status, 422, text);
  const problem = JSON.parse(text);
  assert.equal(problem.field, "content-type", text);
  assert.equal(problem.code, "invalid_field", text);
  assert.deepEqual(await stored(), [], "no object left behind");
  assert.equal((await t.jsm.streams.info(CONTENT_STREAM)).state.messages, 0, "nothing accepted");

  // The stream refuses the upload event (full: discard new): the object goes too.
  const info = await t.jsm.streams.info(CONTENT_STREAM);
  await t.jsm.streams.update(CONTENT_STREAM, { ...info.config, max_msgs: 1 });
  await m.js.publish("content.probe.full", "");
  const refused = await upload("image/png");
  assert.ok(refused.status >= 500, `${refused.status}: ${await refused.text()}`);
  assert.deepEqual(await stored(), [], "no object left behind");

  await t.jsm.streams.update(CONTENT_STREAM, { ...info.config, max_msgs: -1 });
  const ok = await upload("image/png");
  assert.equal(ok.status, 202, await ok.clone().text());
  const { id } = await ok.json();
  assert.deepEqual(await stored(), [id], "an accepted upload keeps its object");
});

Deno.test("a bad message on an item's decided subject is dead-lettered and fails nothing; the item waits for a good decision", async () => {
  await using t = await startTestNats();
  await using m = await mesh(t);
  const id = await m.flagged();
  await m.js.publish(`content.decided.${id}`, "this is not JSON");
  await m.js.publish(
    `content.decided.${id}`,
    JSON.stringify({
      id: `wrong-type-${id}`,
      type: "content.escalated",
      version: 1,
      item_id: id,
      trace_id: "0af7651916cd43dd8448eb211c80319c",
      time: new Date(T0).toISOString(),
      source: "forger",
      data: { level: 1, reason: "x", due_at: new Date(T0).toISOString() },
    }),
  );
  const letters = await m.letters("storage-decided", id, 2);
  assert.deepEqual(letters.map((l) => l.code), ["invalid_event", "invalid_event"]);
  assert.deepEqual(await m.events("failed", id), [], "the item did not fail");
  assert.equal((await m.queue.get(id))!.status, "pending", "its review still runs");

  const decided = await decide(m.app, id, {
    decision: "reject",
    reason: "insults staff",
    reviewer: "carol",
  });
  assert.equal(decided.status, 200, await decided.text());
  await waitFor(async () => (await m.events("archived", id)).length > 0, 10_000, "archived");
  assert.deepEqual(await m.events("failed", id), []);
});

Deno.test("a bad message on an item's SLA timer subject is dead-lettered and fails nothing; the real deadline still escalates it", async () => {
  // Left open by the fix above (seen in its review): junk on content.sla_expired.<id> still
  // marked a pending item failed.
  await using t = await startTestNats();
  await using m = await mesh(t);
  const id = await m.flagged();
  await m.js.publish(`content.sla_expired.${id}`, "this is not JSON");
  const letters = await m.letters("review-sla", id, 1);
  assert.deepEqual(letters.map((l) => l.code), ["invalid_event"]);
  assert.deepEqual(await m.events("failed", id), [], "the item did not fail");
  m.set(T0 + SLA.reviewSlaMs);
  await m.fire(id, 1);
  await waitFor(async () => (await m.events("escalated", id)).length > 0, 10_000, "escalated");
  assert.deepEqual(await m.events("failed", id), []);
});

Deno.test("a message that is no decision, stored first on an item's decided subject, does not keep the SLA's default action from being stored", async () => {
  // Left open by the fix above: the default action is published once per item ("expected
  // last subject sequence 0", nats-server 2.10+), and the runner took the refusal behind a
  // junk message for a decision already stored: the queue said decided, the stream held none,
  // and the item never got its outcome.
  await using t = await startTestNats();
  await using m = await mesh(t);
  const id = await m.flagged();
  const junk = { type: "content.escalated", item_id: id, note: "not a decision" };
  await m.js.publish(`content.decided.${id}`, JSON.stringify(junk));
  await m.letters("storage-decided", id, 1);
  m.set(T0 + SLA.reviewSlaMs);
  await m.fire(id, 1);
  await waitFor(async () => (await m.events("escalated", id)).length > 0, 10_000, "escalated");
  m.set(T0 + SLA.reviewSlaMs + SLA.escalationSlaMs + 10);
  await m.fire(id, 2);
  await waitFor(async () => (await m.events("archived", id)).length > 0, 10_000, "archived");
  const decided = (await m.events("decided", id)).filter((e) => e.type === "content.decided");
  assert.equal(decided.length, 1);
  assert.equal(decided[0]!.data.automatic, true);
  assert.deepEqual(await m.events("failed", id), [], "nothing failed");
});

Deno.test("storage publishes the item's uploaded content, never the content a decision carries", async () => {
  await using t = await startTestNats();
  await using m = await mesh(t);
  const id = await m.flagged();
  await m.js.publish(
    `content.decided.${id}`,
    JSON.stringify({
      id: `forged-decision-${id}`,
      type: "content.decided",
      version: 1,
      item_id: id,
      trace_id: "0af7651916cd43dd8448eb211c80319c",
      time: new Date(T0).toISOString(),
      source: "forger",
      data: {
        content: { text: "Buy cheap watches at example.com" },
        decision: "approve",
        reason: "forged",
        reviewer: "mallory",
        automatic: false,
      },
    }),
  );
  const [published] = await waitFor(
    async () => {
      const es = await m.events("published", id);
      return es.length > 0 ? es : undefined;
    },
    10_000,
    "published",
  );
  assert.equal(published!.data.content.text, TOXIC, "the uploaded text, not the decision's");

  // A decision for an item that was never uploaded publishes nothing and fails nothing.
  const ghost = "ct_never_uploaded";
  await m.js.publish(
    `content.decided.${ghost}`,
    JSON.stringify({
      id: `forged-decision-${ghost}`,
      type: "content.decided",
      version: 1,
      item_id: ghost,
      trace_id: "0af7651916cd43dd8448eb211c80319c",
      time: new Date(T0).toISOString(),
      source: "forger",
      data: {
        content: { text: "spam" },
        decision: "approve",
        reason: "x",
        reviewer: "m",
        automatic: false,
      },
    }),
  );
  const [letter] = await m.letters("storage-decided", ghost);
  assert.equal(letter!.code, "not_found");
  assert.match(letter!.reason, /content\.uploaded\.ct_never_uploaded\) was stored before it/);
  assert.deepEqual(await m.events("published", ghost), []);
  assert.deepEqual(await m.events("failed", ghost), []);
});

Deno.test("a moderation published again for an item that has its outcome queues no review: dead-lettered as a conflict, the item stays as decided", async () => {
  await using t = await startTestNats();
  await using m = await mesh(t);
  const id = await m.flagged();
  const approve = { decision: "approve", reason: "fair criticism", reviewer: "carol" };
  assert.equal((await decide(m.app, id, approve)).status, 200);
  await waitFor(async () => (await m.events("published", id)).length > 0, 10_000, "published");
  // The moderation key publishes its event again, flagged, under a new id.
  const [moderated] = await m.events("moderated", id);
  await m.js.publish(
    `content.moderated.${id}`,
    JSON.stringify({ ...moderated, id: `again-${id}`, time: new Date(m.now).toISOString() }),
  );
  const [letter] = await m.letters("review-queue", id);
  assert.equal(letter!.code, "conflict");
  assert.match(letter!.reason, new RegExp(`content item ${id} is published already`));

  assert.equal((await m.events("review_requested", id)).length, 1, "queued once");
  assert.equal((await m.queue.get(id))!.status, "decided");
  assert.deepEqual(await m.events("failed", id), []);
});

Deno.test("a decision the queue holds and the stream lacks (the gateway died between the two) is published when a gateway starts, once", async () => {
  await using t = await startTestNats();
  await using m = await mesh(t);
  const id = await m.flagged();
  // What a gateway killed after its compare-and-set and before its publish leaves behind.
  await m.queue.decide(id, {
    decision: "reject",
    reason: "insults staff",
    reviewer: "carol",
    automatic: false,
  }, new Date(m.now));
  assert.deepEqual(await m.events("decided", id), []);
  assert.ok(await m.schedules.get(slaScheduleId(id, 1)), "its SLA schedule is still set");
  assert.equal(await m.api.healDecisions(), 1);
  const [decided] = await m.events("decided", id);
  assert.equal(decided!.data.reviewer, "carol");
  assert.equal(decided!.data.decision, "reject");
  await waitFor(async () => (await m.events("archived", id)).length > 0, 10_000, "archived");
  await assert.rejects(m.schedules.get(slaScheduleId(id, 1)), "its SLA schedule is cancelled");
  assert.equal(await m.api.healDecisions(), 0, "nothing twice");
  assert.equal((await m.events("decided", id)).length, 1);
});

Deno.test("a moderation published for an item that failed, and was not resumed, queues no review", async () => {
  await using t = await startTestNats();
  await using m = await mesh(t);
  const real = await m.flagged();
  const [moderated] = await m.events("moderated", real);
  // An upload that is no event fails its item at the moderation stage.
  const id = "ct_FAILX1";
  await m.js.publish(`content.uploaded.${id}`, "notjson");
  await waitFor(async () => (await m.events("failed", id)).length > 0, 10_000, "failed");
  // The moderation key publishes a flagged moderation for it afterwards.
  await m.js.publish(
    `content.moderated.${id}`,
    JSON.stringify({ ...moderated, id: `forged-${id}`, item_id: id }),
  );
  const [letter] = await m.letters("review-queue", id);
  assert.equal(letter!.code, "conflict");
  assert.match(letter!.reason, /content item ct_FAILX1 has failed/);
  assert.equal(await m.queue.get(id), null, "not queued");
  assert.deepEqual(await m.events("review_requested", id), []);
});

Deno.test("only an item's own moderation is acted on: another published on its subject, or for an id never uploaded, publishes and queues nothing", async () => {
  // Found by probing with the moderation key: a second content.moderated for an item under
  // review, safe and carrying other text, published that text; one for an id never uploaded
  // made a published item of it; one published before an id's upload took the place of the
  // item's own moderation, which was never stored.
  await using t = await startTestNats();
  await using m = await mesh(t);
  const id = await m.flagged();
  const [moderated] = await m.events("moderated", id);
  const safe = { verdict: "safe", categories: [], score: 0, analyzer: "forger", reasons: [] };
  const forged = (itemId: string, eventId: string) =>
    JSON.stringify({
      ...moderated,
      id: eventId,
      item_id: itemId,
      data: { content: { text: "SWAPPED TEXT" }, moderation: safe },
    });
  await m.js.publish(`content.moderated.${id}`, forged(id, `forged-${id}`));
  const [conflict] = await m.letters("storage-moderated", id);
  assert.equal(conflict!.code, "conflict");
  assert.match(conflict!.reason, /has one moderation/);
  // A copy under the moderation's own id, saying safe: acted on as the stored one says.
  const copy = await m.js.publish(`content.moderated.${id}`, forged(id, moderated!.id as string));
  await waitFor(
    async () => {
      const ci = await t.jsm.consumers.info(CONTENT_STREAM, "storage-moderated");
      return ci.ack_floor.stream_seq >= copy.seq;
    },
    10_000,
    "storage-moderated past the copy",
  );
  assert.deepEqual(await m.events("published", id), [], "nothing published");
  assert.equal((await m.queue.get(id))!.status, "pending", "still waiting for its review");
  assert.equal((await m.queue.get(id))!.content.text, TOXIC, "reviewers see the upload");

  // An id never uploaded: no item, nothing published.
  await m.js.publish("content.moderated.ct_PHANTOM1", forged("ct_PHANTOM1", "forged-phantom"));
  const [phantom] = await m.letters("storage-moderated", "ct_PHANTOM1");
  assert.equal(phantom!.code, "not_found");
  assert.deepEqual(await m.events("published", "ct_PHANTOM1"), []);
  assert.deepEqual(await m.events("failed", "ct_PHANTOM1"), []);

  // Before an id's upload: the item's own moderation is stored after it, and acted on.
  await m.js.publish("content.moderated.ct_EARLY1", forged("ct_EARLY1", "forged-early"));
  await m.letters("storage-moderated", "ct_EARLY1");
  await m.api.submitText({ id: "ct_EARLY1", text: TOXIC }, { name: "test", role: "admin" });
  const entry = await waitFor(
    async () => (await m.queue.get("ct_EARLY1")) ?? undefined,
    10_000,
    "ct_EARLY1 queued for review on its own moderation",
  );
  assert.equal(entry.content.text, TOXIC);
  assert.equal(entry.moderation.verdict, "flagged");
  assert.deepEqual(await m.events("published", "ct_EARLY1"), []);
});
