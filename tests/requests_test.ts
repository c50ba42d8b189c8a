/**
 * nats CLI parity: what `nats pub`, `nats req` and `nats kv get` do, done with the same
 * protocol operations from nats.js against a real server and the pipeline.
 */
import assert from "node:assert/strict";
import { headers } from "@nats-io/nats-core";
import { Kvm } from "@nats-io/kv";
import { serveRequests } from "../pipelines/feedback/requests.ts";
import type { FeedbackState } from "../pipelines/feedback/events.gen.ts";
import { connectClient, PATIENT, startTestNats } from "./helpers/nats.ts";
import { startLink } from "./helpers/link.ts";
import { createIntake } from "../pipelines/feedback/intake.ts";
import { createModerationApi } from "../pipelines/moderation/api.ts";
import { serveModerationRequests } from "../pipelines/moderation/requests.ts";
import { createAuth } from "../src/gateway/auth.ts";
import { startPipeline } from "./helpers/pipeline.ts";
import { waitFor } from "./helpers/wait.ts";
import { jetstream } from "@nats-io/jetstream";
import { createEvent } from "../src/events.ts";
import { serveDeadLetterRequests } from "../src/redrive.ts";
import { scheduleTargets, serveScheduleRequests } from "../src/gateway/schedules.ts";
import { createScheduleStore } from "../src/scheduler/store.ts";
import { SCHEDULE_BUCKET } from "../src/subjects.ts";

async function processedState(nc: import("@nats-io/nats-core").NatsConnection, id: string) {
  const kv = await new Kvm(nc).open("weft_feedback_state");
  return await waitFor(
    async () => {
      const s = (await kv.get(id))?.json<FeedbackState>();
      return s?.status === "processed" || s?.status === "failed" ? s : undefined;
    },
    10_000,
    `state of ${id} in the KV bucket`,
  );
}

Deno.test("plain JSON published on feedback.submit is processed like an HTTP submission", async () => {
  await using t = await startTestNats();
  await using _p = await startPipeline(t);
  // nats pub feedback.submit '{"id":"FB003","text":"..."}'
  t.nc.publish(
    "feedback.submit",
    JSON.stringify({ id: "FB003", text: "This app is so bad, constant issues, fix it!" }),
  );
  const s = await processedState(t.nc, "FB003");
  assert.equal(s.sentiment?.label, "negative");
  assert.deepEqual(s.topics?.topics, ["general_inquiry"]);
  assert.equal(s.routing?.team, "General Support");
});

Deno.test("a bus submission without an id gets one derived from its stream position", async () => {
  await using t = await startTestNats();
  await using _p = await startPipeline(t);
  const sub = t.nc.subscribe("feedback.processed.*", { max: 1 });
  t.nc.publish(
    "feedback.submit",
    JSON.stringify({ text: "Just a general inquiry about subscription plans." }),
  );
  let id = "";
  for await (const m of sub) id = m.subject.split(".")[2]!;
  assert.match(id, /^fb_[0-9a-f]{24}$/);
  const s = await processedState(t.nc, id);
  assert.equal(s.sentiment?.label, "neutral");
});

Deno.test("a bad bus submission is dead-lettered with its validation error and its item marked failed", async () => {
  await using t = await startTestNats();
  await using _p = await startPipeline(t);
  const letters = t.nc.subscribe("deadletter.ingest.*", { max: 1 });
  t.nc.publish("feedback.submit", JSON.stringify({ id: "BAD1", text: 7 }));
  for await (const m of letters) {
    const l = m.json<{ item_id: string; code: string; reason: string }>();
    assert.equal(l.item_id, "BAD1");
    assert.equal(l.code, "invalid_event");
    assert.match(l.reason, /\/text must be string/);
  }
  const s = await processedState(t.nc, "BAD1");
  assert.equal(s.status, "failed");
  assert.equal(s.error?.stage, "ingest");
});

Deno.test("nats req weft.feedback.submit answers with the id; weft.feedback.get with the state", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const requests = serveRequests(t.nc, p.intake, t.log);
  try {
    const r = await t.nc.request(
      "weft.feedback.submit",
      JSON.stringify({ text: "I love it" }),
      PATIENT,
    );
    const answer = r.json<{ id: string; status: string; links: { state: string } }>();
    assert.equal(answer.status, "accepted");
    assert.equal(answer.links.state, `/feedback/${answer.id}`);
    await processedState(t.nc, answer.id);
    const g = await t.nc.request("weft.feedback.get", answer.id, PATIENT);
    assert.equal(g.json<FeedbackState>().status, "processed");
    const bad = await t.nc.request("weft.feedback.submit", JSON.stringify({ text: "" }), PATIENT);
    assert.deepEqual(
      {
        status: bad.json<{ error: { status: number; field: string } }>().error.status,
        field: bad.json<{ error: { field: string } }>().error.field,
      },
      { status: 422, field: "/text" },
    );
    const missing = await t.nc.request("weft.feedback.get", "nope", PATIENT);
    assert.equal(missing.json<{ error: { status: number } }>().error.status, 404);
    // An empty Idempotency-Key is refused, as over HTTP, not taken as none.
    const h = headers();
    h.set("Idempotency-Key", "");
    const empty = await t.nc.request("weft.feedback.submit", JSON.stringify({ text: "hi" }), {
      ...PATIENT,
      headers: h,
    });
    const e = empty.json<{ error?: { status: number; field: string } }>().error;
    assert.deepEqual({ status: e?.status, field: e?.field }, {
      status: 422,
      field: "Idempotency-Key",
    });
  } finally {
    requests.stop();
  }
});

Deno.test("nats req on a submit subject answers 503 unavailable, as HTTP does, when JetStream does not answer in time", async () => {
  await using t = await startTestNats();
  // The intakes publish through a link the test holds; requests come straight to the server.
  await using link = startLink(t.server.port);
  const slow = await connectClient(`nats://127.0.0.1:${link.port}`, "weft-test-intake");
  const feedback = serveRequests(t.nc, await createIntake(slow), t.log);
  const content = serveModerationRequests(
    t.nc,
    await createModerationApi({ nc: slow, config: t.config, log: t.log, authEnabled: false }),
    createAuth([]),
    t.log,
  );
  try {
    link.pause();
    const answers = await Promise.all(
      ["weft.feedback.submit", "weft.content.submit"].map(async (subject) => {
        const r = await t.nc.request(subject, JSON.stringify({ text: "anyone there?" }), {
          timeout: 30_000,
        });
        return r.json<{ error?: { status: number; code: string } }>().error;
      }),
    );
    for (const error of answers) {
      assert.deepEqual(error && { status: error.status, code: error.code }, {
        status: 503,
        code: "unavailable",
      });
    }
    assert.ok(
      !t.lines.some((l) => l.includes('"request failed"')),
      "NATS being slow is not logged as a failed request",
    );
  } finally {
    link.resume();
    feedback.stop();
    content.stop();
    await slow.close();
  }
});

Deno.test("answers past max_payload are cut to fit and say so, never a 500 after the work is done", async () => {
  await using t = await startTestNats();
  const js = jetstream(t.nc);
  const max = t.nc.info!.max_payload;
  const dl = serveDeadLetterRequests(t.nc, t.log);
  // 400 schedules of 3 KB each: their list is more than 1 MB.
  const store = createScheduleStore(
    await new Kvm(t.nc).create(SCHEDULE_BUCKET).catch(() => new Kvm(t.nc).open(SCHEDULE_BUCKET)),
  );
  const at = new Date(Date.now() + 86_400_000).toISOString();
  for (let i = 0; i < 400; i += 50) {
    await Promise.all(
      Array.from({ length: 50 }, (_, k) =>
        store.create({
          id: `s${i + k}`,
          subject: "feedback.submit",
          payload: { text: "x".repeat(3_000) },
          at,
        })),
    );
  }
  const schedules = serveScheduleRequests(
    t.nc,
    () => Promise.resolve(store),
    scheduleTargets([]),
    t.log,
    createAuth([]),
  );
  try {
    // One letter a redrive republishes (its stage consumes its subject), and 300 it refuses
    // with a 4 KB reason each.
    await t.jsm.consumers.add("FEEDBACK", {
      durable_name: "sentiment",
      filter_subject: "feedback.ingested.>",
    });
    const ok = createEvent({
      type: "feedback.ingested",
      itemId: "fits1",
      traceId: "0af7651916cd43dd8448eb211c80319c",
      source: "test",
      data: { text: "hello" },
    });
    const base = {
      stage: "sentiment",
      code: "handler_failed",
      reason: "test",
      attempts: 1,
      stream_seq: 999_999,
      time: "2026-01-01T00:00:00.000Z",
      payload_encoding: "utf8",
    };
    await js.publish(
      "deadletter.sentiment.fits1",
      JSON.stringify({ ...base, subject: "feedback.ingested.fits1", payload: JSON.stringify(ok) }),
    );
    for (let i = 0; i < 300; i++) {
      await js.publish(
        "deadletter.sentiment.x",
        JSON.stringify({ ...base, subject: `_${"a".repeat(4_000)}${i}`, payload: "{}" }),
      );
    }
    const ask = async (subject: string, body: unknown) => {
      const m = await t.nc.request(subject, JSON.stringify(body), PATIENT);
      assert.ok(m.data.length <= max, `${subject}: ${m.data.length} bytes`);
      return m.json<Record<string, unknown>>();
    };

    const list = await ask("weft.deadletters.list", {});
    assert.equal(list.error, undefined, JSON.stringify(list.error));
    assert.equal(list.truncated, true);
    assert.equal(list.total, 301);
    const items = list.items as { seq: number }[];
    assert.ok(items.length > 100 && items.length < 301, `${items.length} items`);
    assert.match(list.hint as string, /filter.*limit/);
    // `limit` is taken over NATS as over HTTP; a short answer is whole.
    const two = await ask("weft.deadletters.list", { limit: 2, stage: "sentiment" });
    assert.equal((two.items as unknown[]).length, 2);
    assert.equal(two.total, 301);
    assert.equal(two.truncated, undefined);
    assert.equal(
      ((await ask("weft.deadletters.list", { limit: 0 })).error as { field: string }).field,
      "/limit",
    );

    const done = await ask("weft.deadletters.redrive", { all: true });
    assert.equal(done.error, undefined, JSON.stringify(done.error));
    assert.equal(done.truncated, true);
    assert.equal(done.redriven_count, 1);
    assert.equal(done.refused_count, 300);
    assert.equal(done.not_found_count, 0);
    assert.equal((done.redriven as unknown[]).length, 1);
    assert.ok((done.refused as unknown[]).length < 300);
    // The redrive was done: the original is on its subject again.
    const msg = await t.jsm.streams.getMessage("FEEDBACK", {
      last_by_subj: "feedback.ingested.fits1",
    });
    assert.equal(msg?.json<{ id: string }>().id, ok.id);

    const sl = await ask("weft.schedules.list", "");
    assert.equal(sl.error, undefined, JSON.stringify(sl.error));
    assert.equal(sl.truncated, true);
    assert.equal(sl.total, 400);
    assert.ok((sl.items as unknown[]).length > 100);
  } finally {
    dl.stop();
    schedules.stop();
  }
});
