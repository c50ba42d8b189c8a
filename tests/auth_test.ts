/**
 * With API keys configured, every way in (HTTP and NATS requests) asks for a key with the
 * right role: ingest to submit, any key to read items, admin for dead letters.
 */
import assert from "node:assert/strict";
import { createAuth, hashKey } from "../src/gateway/auth.ts";
import { createIntake } from "../pipelines/feedback/intake.ts";
import { serveRequests } from "../pipelines/feedback/requests.ts";
import { serveDeadLetterRequests } from "../src/redrive.ts";
import { headers } from "@nats-io/nats-core";
import { feedbackApp } from "./helpers/pipeline.ts";
import { startTestNats } from "./helpers/nats.ts";

const KEYS = { ingest: "k-ingest-1", reviewer: "k-review-1", admin: "k-admin-1" };
const auth = createAuth([
  { sha256: await hashKey(KEYS.ingest), role: "ingest", name: "web" },
  { sha256: await hashKey(KEYS.reviewer), role: "reviewer", name: "alice" },
  { sha256: await hashKey(KEYS.admin), role: "admin", name: "ops" },
]);
const bearer = (key?: string): Record<string, string> =>
  key ? { authorization: `Bearer ${key}` } : {};

Deno.test("HTTP: submitting needs an ingest key, reading any key, dead letters an admin key", async () => {
  await using t = await startTestNats();
  const intake = await createIntake(t.nc);
  const app = feedbackApp(t, intake, { auth });
  const post = (key?: string) =>
    app.request("/feedback", {
      method: "POST",
      headers: { "content-type": "application/json", ...bearer(key) },
      body: JSON.stringify({ id: "A1", text: "hello" }),
    });
  const none = await post();
  assert.equal(none.status, 401);
  assert.equal(none.headers.get("www-authenticate"), 'Bearer realm="weft"');
  assert.equal((await post("not-a-key")).status, 401);
  assert.equal((await post(KEYS.reviewer)).status, 403);
  assert.equal((await post(KEYS.ingest)).status, 202);
  assert.equal((await post(KEYS.admin)).status, 202, "admin may do everything");

  assert.equal((await app.request("/feedback/A1")).status, 401);
  assert.equal((await app.request("/feedback/A1", { headers: bearer(KEYS.reviewer) })).status, 200);
  assert.equal((await app.request("/events", { headers: bearer() })).status, 401);

  assert.equal((await app.request("/deadletters")).status, 401);
  assert.equal((await app.request("/deadletters", { headers: bearer(KEYS.ingest) })).status, 403);
  assert.equal((await app.request("/deadletters", { headers: bearer(KEYS.admin) })).status, 200);
  const redrive = await app.request("/deadletters/redrive", {
    method: "POST",
    headers: { "content-type": "application/json", ...bearer(KEYS.reviewer) },
    body: JSON.stringify({ all: true }),
  });
  assert.equal(redrive.status, 403);
  assert.equal((await app.request("/healthz")).status, 200, "health stays open");
});

Deno.test("NATS requests carry the key in an Authorization header, with the same roles", async () => {
  await using t = await startTestNats();
  const intake = await createIntake(t.nc);
  const subs = [
    serveRequests(t.nc, intake, t.log, auth),
    serveDeadLetterRequests(t.nc, t.log, auth),
  ];
  try {
    const ask = async (subject: string, body: string, key?: string) => {
      const h = headers();
      if (key) h.set("Authorization", `Bearer ${key}`);
      return (await t.nc.request(subject, body, { headers: h, timeout: 5_000 })).json<
        { id?: string; error?: { status: number } }
      >();
    };
    const submit = JSON.stringify({ text: "hello" });
    assert.equal((await ask("weft.feedback.submit", submit)).error?.status, 401);
    assert.equal((await ask("weft.feedback.submit", submit, KEYS.reviewer)).error?.status, 403);
    assert.ok((await ask("weft.feedback.submit", submit, KEYS.ingest)).id);
    assert.equal((await ask("weft.deadletters.list", "", KEYS.reviewer)).error?.status, 403);
    assert.equal((await ask("weft.deadletters.redrive", '{"all":true}')).error?.status, 401);
    assert.equal((await ask("weft.deadletters.list", "", KEYS.admin)).error, undefined);
  } finally {
    subs.forEach((s) => s.stop());
  }
});
