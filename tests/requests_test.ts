/**
 * nats CLI parity: what `nats pub`, `nats req` and `nats kv get` do, done with the same
 * protocol operations from nats.js against a real server and the pipeline.
 */
import assert from "node:assert/strict";
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
