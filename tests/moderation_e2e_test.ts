/**
 * The content moderation pipeline end to end: a real nats-server and every service as
 * its own `deno run` process (gateway, content-state, moderation, review, storage,
 * scheduler), driven over HTTP, SSE and NATS requests.
 */
import assert from "node:assert/strict";
import { headers } from "@nats-io/nats-core";
import { jetstream } from "@nats-io/jetstream";
import { freePort, startNatsServer } from "../src/nats_server.ts";
import { hashKey } from "../src/gateway/auth.ts";
import { has, waitForEvents } from "./helpers/content_events.ts";
import {
  MODERATION_SERVICES,
  rebuildStateTask,
  SERVICES_IN_ONE_PROCESS,
  startServices,
} from "./helpers/mesh.ts";
import { waitFor } from "./helpers/wait.ts";
import { connectClient } from "./helpers/nats.ts";
import { CONTENT_STATE_BUCKET, CONTENT_STREAM } from "../pipelines/moderation/subjects.ts";
import { Kvm } from "@nats-io/kv";

const KEYS = {
  ingest: "ingest-key-0123456789",
  alice: "alice-key-0123456789",
  bob: "bob-key-0123456789",
  admin: "admin-key-0123456789",
};
const API_KEYS = JSON.stringify([
  { sha256: hashKey(KEYS.ingest), role: "ingest", name: "uploader" },
  { sha256: hashKey(KEYS.alice), role: "reviewer", name: "alice" },
  { sha256: hashKey(KEYS.bob), role: "reviewer", name: "bob" },
  { sha256: hashKey(KEYS.admin), role: "admin", name: "root" },
]);

const SAFE = "Thanks for the quick delivery, the lamp looks great.";
const TOXIC = "You idiot, this is the most pathetic service ever.";

function client(base: string) {
  const call = async (method: string, path: string, key?: string, body?: unknown) => {
    const h: Record<string, string> = {};
    if (key) h.authorization = `Bearer ${key}`;
    // Every POST declares JSON, a claim's empty body included (claims and decisions require it).
    if (body !== undefined || method === "POST") h["content-type"] = "application/json";
    const res = await fetch(`${base}${path}`, {
      method,
      headers: h,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    return { status: res.status, headers: res.headers, body: text ? JSON.parse(text) : null };
  };
  return call;
}

async function sseEvents(url: string, key: string): Promise<{ event: string; id: string }[]> {
  const res = await fetch(url, { headers: { authorization: `Bearer ${key}` } });
  assert.equal(res.status, 200);
  const text = await res.text(); // the per-item stream closes after the final event
  return text.split("\n\n").filter((f) => f.includes("event:")).map((f) => ({
    event: /event: ?(.*)/.exec(f)![1]!,
    id: /id: ?(.*)/.exec(f)?.[1] ?? "",
  }));
}

Deno.test({
  name:
    "content moderation runs end to end across real services, with review, auth and NATS requests",
  sanitizeOps: true,
  sanitizeResources: true,
  async fn(t) {
    await using server = await startNatsServer();
    const port = freePort();
    const base = `http://127.0.0.1:${port}`;
    await using _mesh = await startServices({
      ...SERVICES_IN_ONE_PROCESS,
      services: MODERATION_SERVICES,
      parallel: true,
      nats: server,
      port,
      baseEnv: {},
      env: {
        WEFT_API_KEYS: API_KEYS,
        WEFT_CONTENT_MAX_BYTES: String(64 * 1024),
        WEFT_LOG_LEVEL: "info",
      },
    });
    const nc = await connectClient(server.url, "test");
    const call = client(base);
    try {
      await t.step("safe content is published and its history streams over SSE", async () => {
        const res = await call("POST", "/content", KEYS.ingest, {
          text: SAFE,
          metadata: { lang: "en" },
        });
        assert.equal(res.status, 202);
        const id = res.body.id as string;
        assert.equal(res.body.links.events, `/content/${id}/events`);
        const frames = await sseEvents(`${base}/content/${id}/events`, KEYS.ingest);
        assert.deepEqual(frames.map((f) => f.event), [
          "content.uploaded",
          "content.moderated",
          "content.published",
        ]);
        const state = await waitForState(call, id, "published");
        assert.equal(state.content.text, SAFE);
        assert.equal(state.content.metadata.lang, "en");
        assert.equal(state.moderation.verdict, "safe");
      });

      await t.step(
        "a decision forged on the bus for an item moderation published is dead-lettered as a conflict; the item stays published",
        async () => {
          const res = await call("POST", "/content", KEYS.ingest, { text: SAFE });
          assert.equal(res.status, 202);
          const id = res.body.id as string;
          const before = await waitForState(call, id, "published");
          const js = jetstream(nc);
          const forged = {
            id: `forged-decision-${id}`,
            type: "content.decided",
            version: 1,
            item_id: id,
            trace_id: before.trace_id,
            time: new Date().toISOString(),
            source: "forger",
            data: {
              content: before.content,
              decision: "reject",
              reason: "forged",
              reviewer: "mallory",
              automatic: false,
            },
          };
          const ack = await js.publish(`content.decided.${id}`, JSON.stringify(forged));
          const letter = await waitFor(
            async () =>
              (await call("GET", `/deadletters?item_id=${id}`, KEYS.admin)).body.items
                .find((l: Json) => l.letter.stream_seq === ack.seq)?.letter,
            10_000,
            "the forged decision's dead letter",
          );
          assert.equal(letter.code, "conflict");
          assert.match(letter.reason, /already has its outcome content\.published/);
          const info = await (await js.jetstreamManager()).streams.info(CONTENT_STREAM, {
            subjects_filter: `content.*.${id}`,
          });
          assert.deepEqual(Object.keys(info.state.subjects ?? {}).sort(), [
            `content.decided.${id}`,
            `content.moderated.${id}`,
            `content.published.${id}`,
            `content.uploaded.${id}`,
          ], "no second outcome, no failure");
          // Once the state writer has read the forgery: still published, and no review shows.
          // Once the state writer has read the forgery (its bucket entry records every event):
          // still published, and no review shows.
          const kv = await new Kvm(nc).open(CONTENT_STATE_BUCKET);
          const after = await waitFor(
            async () => {
              const entry = await kv.get(id);
              const state = entry?.json<Json>();
              return state?.stages?.decided ? state : undefined;
            },
            10_000,
            "the forged decision folded",
          );
          assert.equal(after.status, "published");
          assert.equal(after.review, undefined);
          assert.equal(after.content.text, SAFE);
        },
      );

      await t.step(
        "flagged content waits for review; approve publishes it; a second decision is 409",
        async () => {
          const { body } = await call("POST", "/content", KEYS.ingest, { text: TOXIC });
          const id = body.id as string;
          await waitForEvents(nc, id, has("content.review_requested"));
          const pendingState = await waitForState(call, id, "pending_review");
          assert.equal(pendingState.content, undefined, "unpublished content is not shown");

          const queue = await call("GET", "/reviews?status=pending", KEYS.alice);
          assert.equal(queue.status, 200);
          const entry = queue.body.items.find((e: { id: string }) => e.id === id);
          assert.ok(entry, "the item is in the pending queue");
          assert.equal(entry.moderation.verdict, "flagged");
          assert.ok(entry.moderation.reasons.some((r: string) => r.includes("idiot")));
          assert.equal(entry.content.text, TOXIC);

          const claimed = await call("POST", `/reviews/${id}/claim`, KEYS.alice);
          assert.equal(claimed.status, 200);
          assert.equal(claimed.body.claim.reviewer, "alice");
          const stolen = await call("POST", `/reviews/${id}/claim`, KEYS.bob);
          assert.equal(stolen.status, 409);
          assert.equal(stolen.body.code, "conflict");

          const decided = await call("POST", `/reviews/${id}/decision`, KEYS.alice, {
            decision: "approve",
            reason: "quoting a customer, fine in context",
          });
          assert.equal(decided.status, 200);
          assert.equal(decided.body.status, "decided");
          const events = await waitForEvents(nc, id, has("content.published"));
          const published = events.find((e) => e.type === "content.published")!;
          assert.equal(published.event.data.via, "review");

          const again = await call("POST", `/reviews/${id}/decision`, KEYS.bob, {
            decision: "reject",
            reason: "too late",
          });
          assert.equal(again.status, 409);
          const replay = await call("POST", `/reviews/${id}/decision`, KEYS.alice, {
            decision: "approve",
            reason: "quoting a customer, fine in context",
          });
          assert.equal(replay.status, 200, "the same decision again is an idempotent replay");
          assert.equal(replay.headers.get("idempotent-replayed"), "true");
          const state = await waitForState(call, id, "published");
          assert.equal(state.review.reviewer, "alice");
          assert.equal(state.review.decision, "approve");
          assert.equal(state.content.text, TOXIC);
          assert.equal(
            events.filter((e) => e.type === "content.decided").length,
            1,
            "exactly one decision event",
          );
        },
      );

      await t.step("flagged content rejected by a reviewer is archived", async () => {
        const { body } = await call("POST", "/content", KEYS.ingest, { text: `${TOXIC} moron` });
        const id = body.id as string;
        await waitForEvents(nc, id, has("content.review_requested"));
        const decided = await call("POST", `/reviews/${id}/decision`, KEYS.bob, {
          decision: "reject",
          reason: "insults staff",
        });
        assert.equal(decided.status, 200);
        const frames = await sseEvents(`${base}/content/${id}/events`, KEYS.ingest);
        assert.equal(frames.at(-1)!.event, "content.archived");
        const state = await waitForState(call, id, "archived");
        assert.equal(state.content, undefined);
        assert.equal(state.review.reason, "insults staff");
      });

      await t.step(
        "two reviewers racing for one item: exactly one claim and one decision win",
        async () => {
          const { body } = await call("POST", "/content", KEYS.ingest, { text: `stupid ${TOXIC}` });
          const id = body.id as string;
          await waitForEvents(nc, id, has("content.review_requested"));
          const claims = await Promise.all([
            call("POST", `/reviews/${id}/claim`, KEYS.alice),
            call("POST", `/reviews/${id}/claim`, KEYS.bob),
          ]);
          assert.deepEqual(claims.map((c) => c.status).sort(), [200, 409]);
          const winner = claims[0]!.status === 200 ? "alice" : "bob";
          const decisions = await Promise.all([
            call("POST", `/reviews/${id}/decision`, KEYS.alice, {
              decision: "approve",
              reason: "a",
            }),
            call("POST", `/reviews/${id}/decision`, KEYS.bob, { decision: "reject", reason: "b" }),
          ]);
          assert.deepEqual(decisions.map((d) => d.status).sort(), [200, 409]);
          const won = decisions.find((d) => d.status === 200)!;
          assert.equal(won.body.decision.reviewer, winner, "the claim holder decides");
          const events = await waitForEvents(
            nc,
            id,
            (es) => has("content.published")(es) || has("content.archived")(es),
          );
          assert.equal(events.filter((e) => e.type === "content.decided").length, 1);
        },
      );

      await t.step("binary uploads go to the object store and to human review", async () => {
        const bytes = crypto.getRandomValues(new Uint8Array(40_000));
        const res = await fetch(`${base}/content?meta.filename=photo.png`, {
          method: "POST",
          headers: { authorization: `Bearer ${KEYS.ingest}`, "content-type": "image/png" },
          body: bytes,
        });
        assert.equal(res.status, 202);
        const body = await res.json();
        const id = body.id as string;
        assert.equal(body.links.object, `/content/${id}/object`);
        const events = await waitForEvents(nc, id, has("content.review_requested"));
        const uploaded = events.find((e) => e.type === "content.uploaded")!.event.data;
        assert.deepEqual(uploaded.metadata, { filename: "photo.png" });
        const moderated = events.find((e) => e.type === "content.moderated")!.event.data;
        assert.deepEqual((moderated.moderation as Json).categories, ["unscreened"]);

        const asUploader = await fetch(`${base}/content/${id}/object`, {
          headers: { authorization: `Bearer ${KEYS.ingest}` },
        });
        assert.equal(asUploader.status, 404, "not visible before it is published");
        await asUploader.body?.cancel();
        const asReviewer = await fetch(`${base}/content/${id}/object`, {
          headers: { authorization: `Bearer ${KEYS.alice}` },
        });
        assert.equal(asReviewer.status, 200);
        assert.equal(asReviewer.headers.get("content-type"), "image/png");
        // The uploader's bytes, never run as a page on the gateway's origin.
        assert.equal(asReviewer.headers.get("x-content-type-options"), "nosniff");
        assert.match(asReviewer.headers.get("content-security-policy") ?? "", /^sandbox;/);
        assert.deepEqual(new Uint8Array(await asReviewer.arrayBuffer()), bytes);

        await call("POST", `/reviews/${id}/decision`, KEYS.alice, {
          decision: "approve",
          reason: "a photo of the product",
        });
        await waitForState(call, id, "published");
        const published = await fetch(`${base}/content/${id}/object`, {
          headers: { authorization: `Bearer ${KEYS.ingest}` },
        });
        assert.equal(published.status, 200);
        assert.deepEqual(new Uint8Array(await published.arrayBuffer()), bytes);

        const tooBig = await fetch(`${base}/content`, {
          method: "POST",
          headers: { authorization: `Bearer ${KEYS.ingest}`, "content-type": "image/png" },
          body: new Uint8Array(64 * 1024 + 1),
        });
        assert.equal(tooBig.status, 413);
        assert.equal((await tooBig.json()).code, "payload_too_large");
      });

      await t.step(
        "a bad upload event on the bus is dead-lettered and ends the item as failed",
        async () => {
          const bad = { id: "x1", type: "content.uploaded", version: 1, item_id: "bad_item_1" };
          await jetstream(nc).publish("content.uploaded.bad_item_1", JSON.stringify(bad));
          const events = await waitForEvents(nc, "bad_item_1", has("content.failed"));
          const failed = events.find((e) => e.type === "content.failed")!.event.data;
          assert.equal(failed.stage, "moderation");
          assert.equal(failed.code, "invalid_event");
          assert.equal(failed.dead_letter_subject, "deadletter.moderation.bad_item_1");
          const state = await waitForState(call, "bad_item_1", "failed");
          assert.equal(state.error.code, "invalid_event");
        },
      );

      await t.step(
        "schedules are created, listed, fired and cancelled over HTTP and NATS",
        async () => {
          const fired = nc.subscribe("digest.request.feedback", { max: 1, timeout: 5000 });
          const at = new Date(Date.now() + 300).toISOString();
          const created = await call("POST", "/schedules", KEYS.admin, {
            id: "soon",
            subject: "digest.request.feedback",
            payload: { window_ms: 60_000 },
            at,
          });
          assert.equal(created.status, 201);
          assert.equal(created.body.next_at, at);
          const bad = await call("POST", "/schedules", KEYS.admin, {
            subject: "digest.request.feedback",
            payload: {},
            cron: "every tuesday",
          });
          assert.equal(bad.status, 422);
          assert.equal(bad.body.field, "/cron");
          for await (const m of fired) {
            assert.deepEqual(m.json(), { window_ms: 60_000 });
            assert.equal(m.headers?.get("Weft-Schedule-Id"), "soon");
          }

          const h = headers();
          h.set("Authorization", `Bearer ${KEYS.admin}`);
          const ask = async (subject: string, body: string) =>
            (await nc.request(subject, body, { timeout: 5000, headers: h })).json<Json>();
          const viaNats = await ask(
            "weft.schedules.create",
            JSON.stringify({
              id: "nightly",
              subject: "digest.request.feedback",
              payload: {},
              cron: "0 3 * * *",
            }),
          );
          assert.equal(viaNats.cron, "0 3 * * *");
          const listed = await ask("weft.schedules.list", "");
          assert.ok(listed.items.some((e: Json) => e.id === "nightly"));
          // Marked done after it fires (the scheduler's write follows its publish): waited on.
          await waitFor(
            async () => (await ask("weft.schedules.get", "soon")).status === "done" || undefined,
            30_000,
            "the fired schedule marked done",
          );
          assert.deepEqual(await ask("weft.schedules.cancel", "nightly"), { cancelled: true });
          assert.equal((await call("GET", "/schedules/nightly", KEYS.admin)).status, 404);
          assert.equal((await call("DELETE", "/schedules/soon", KEYS.admin)).status, 204);
        },
      );

      await t.step("credentials: missing or unknown keys get 401, wrong roles 403", async () => {
        assert.equal((await call("POST", "/content", undefined, { text: SAFE })).status, 401);
        const unknown = await call("POST", "/content", "not-a-configured-key", { text: SAFE });
        assert.equal(unknown.status, 401);
        assert.equal(unknown.body.code, "unauthorized");
        assert.equal((await call("GET", "/reviews", undefined)).status, 401);
        const wrongRole = await call("GET", "/reviews", KEYS.ingest);
        assert.equal(wrongRole.status, 403);
        assert.equal(wrongRole.body.code, "forbidden");
        assert.equal((await call("POST", "/content", KEYS.alice, { text: SAFE })).status, 403);
        assert.equal((await call("GET", "/schedules", KEYS.alice)).status, 403);
        assert.equal((await call("GET", "/schedules", KEYS.admin)).status, 200);
        assert.equal((await call("POST", "/feedback", undefined, { text: SAFE })).status, 401);
        const { body } = await call("POST", "/content", KEYS.ingest, { text: `${TOXIC} loser` });
        await waitForEvents(nc, body.id, has("content.review_requested"));
        const impersonation = await call("POST", `/reviews/${body.id}/claim`, KEYS.alice, {
          reviewer: "bob",
        });
        assert.equal(impersonation.status, 403, "a key cannot act as another reviewer");
      });

      await t.step("the same review actions work over NATS requests", async () => {
        const auth = (key: string) => {
          const h = headers();
          h.set("Authorization", `Bearer ${key}`);
          return h;
        };
        const ask = async (subject: string, body: unknown, key?: string) =>
          (await nc.request(subject, JSON.stringify(body), {
            timeout: 5000,
            headers: key ? auth(key) : undefined,
          })).json<Json>();
        const submitted = await ask("weft.content.submit", { text: `${TOXIC} clown` }, KEYS.ingest);
        const id = submitted.id as string;
        await waitForEvents(nc, id, has("content.review_requested"));
        const denied = await ask("weft.reviews.list", { status: "pending" });
        assert.equal(denied.error.status, 401);
        const list = await ask("weft.reviews.list", { status: "pending" }, KEYS.bob);
        assert.ok(list.items.some((e: { id: string }) => e.id === id));
        const claim = await ask("weft.reviews.claim", { id }, KEYS.bob);
        assert.equal(claim.claim.reviewer, "bob");
        const conflict = await ask("weft.reviews.claim", { id }, KEYS.alice);
        assert.equal(conflict.error.status, 409);
        const decided = await ask(
          "weft.reviews.decide",
          { id, decision: "reject", reason: "name-calling" },
          KEYS.bob,
        );
        assert.equal(decided.status, "decided");
        await waitForEvents(nc, id, has("content.archived"));
        const second = await ask(
          "weft.reviews.decide",
          { id, decision: "approve", reason: "changed my mind" },
          KEYS.alice,
        );
        assert.equal(second.error.status, 409);
      });

      await t.step(
        "deno task rebuild-state --pipeline content: the stream rebuilds the live state",
        async () => {
          let figures: Record<string, number> = {};
          // Each item's last events reach the bucket within a state-writer flush or two.
          await waitFor(
            async () => {
              const r = await rebuildStateTask({ NATS_URL: server.url }, "content");
              figures = r.figures;
              return r.code === 0 ? true : undefined;
            },
            20_000,
            "rebuild-state to agree with the content bucket",
          );
          assert.ok(figures.items! >= 5, JSON.stringify(figures));
          assert.equal(figures.equal, figures.items);
          assert.equal(figures.different, 0);
        },
      );
    } finally {
      await nc.close();
    }
  },
});

// deno-lint-ignore no-explicit-any
type Json = Record<string, any>;

/** Polls GET /content/ID until it reports `status`: state is written asynchronously. */
async function waitForState(
  call: ReturnType<typeof client>,
  id: string,
  status: string,
  timeoutMs = 10_000,
): Promise<Json> {
  const deadline = Date.now() + timeoutMs;
  let last: Json | null = null;
  while (Date.now() < deadline) {
    const res = await call("GET", `/content/${id}`, KEYS.admin);
    last = res.body;
    if (res.status === 200 && res.body.status === status) return res.body;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`content ${id} did not reach ${status}: ${JSON.stringify(last)}`);
}
