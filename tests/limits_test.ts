/**
 * Stream limits never lose what was accepted: intake refuses new items (507 with
 * Retry-After) from a high-water mark, full streams refuse rather than discard, alerts fire
 * before that, and a start never shrinks a stream below what it stores unless told to.
 * Against a real nats-server with a deliberately small FEEDBACK stream.
 */
import assert from "node:assert/strict";
import type { Hono } from "hono";
import { jetstream } from "@nats-io/jetstream";
import {
  CapacityError,
  createCapacityGuard,
  isStreamFull,
  itemEventsByType,
} from "../src/capacity.ts";
import { ConfigError } from "../src/errors.ts";
import { createIntake } from "../pipelines/feedback/intake.ts";
import { meshMetrics } from "../src/gateway/mesh_metrics.ts";
import { WeftMetrics } from "../src/observability/metrics.ts";
import { FEEDBACK_STATE_SPEC } from "../pipelines/feedback/state.ts";
import { compareStates, rebuildStates } from "../src/rebuild.ts";
import { FEEDBACK_STREAM } from "../pipelines/feedback/subjects.ts";
import { ensureTopology } from "../src/topology.ts";
import { createApp } from "../src/gateway/app.ts";
import { createAuth } from "../src/gateway/auth.ts";
import { createModerationApi } from "../pipelines/moderation/api.ts";
import { moderationRoutes } from "../pipelines/moderation/routes.ts";
import { CONTENT_OBJECT_BUCKET } from "../pipelines/moderation/subjects.ts";
import { readStates, startTestNats } from "./helpers/nats.ts";
import { feedbackApp, startPipeline } from "./helpers/pipeline.ts";
import { waitFor } from "./helpers/wait.ts";
import { ONE_PROCESS, startMesh } from "./helpers/mesh.ts";

const JSON_TYPE = { "content-type": "application/json" };

Deno.test("at its limit, intake refuses new items with 507 and Retry-After, and every accepted item is processed: nothing is discarded", async () => {
  await using t = await startTestNats({ streamMaxBytes: 200 * 1024 });
  await using p = await startPipeline(t);
  using capacity = createCapacityGuard(t.jsm, {
    highWater: 0.9,
    alertAt: 0.8,
    refreshMs: 0,
    log: t.log,
  });
  const intake = await createIntake(t.nc, "weft-gateway", { capacity });
  const app: Hono = feedbackApp(t, intake);

  const accepted: string[] = [];
  let refused = 0;
  let retryAfter: string | null = null;
  for (let i = 0; i < 400 && refused < 20; i++) {
    const res = await app.request("/feedback", {
      method: "POST",
      headers: JSON_TYPE,
      body: JSON.stringify({ text: `Item ${i}: the export to PDF keeps failing with an error` }),
    });
    if (res.status === 202) accepted.push((await res.json()).id);
    else {
      assert.equal(res.status, 507, await res.clone().text());
      assert.match(res.headers.get("content-type") ?? "", /problem\+json/);
      const problem = await res.json();
      assert.equal(problem.code, "insufficient_storage");
      // Told how full and what to do, not only "Insufficient storage".
      assert.match(problem.detail, /stream FEEDBACK is (\d+% )?full.*retry later/);
      retryAfter = res.headers.get("retry-after");
      refused++;
    }
  }
  assert.ok(accepted.length > 20, `${accepted.length} accepted`);
  assert.ok(refused > 0, "intake refused new items at the limit");
  assert.ok(Number(retryAfter) > 0, "with Retry-After");

  // Every accepted item finishes; the stream discarded nothing to make room.
  await waitFor(
    async () => {
      const states = await readStates(jetstream(t.nc));
      return accepted.every((id) => states.get(id)?.status === "processed");
    },
    30_000,
    "every accepted item processed",
  );
  const info = await t.jsm.streams.info(FEEDBACK_STREAM);
  assert.equal(info.state.first_seq, 1, "the first message is still there");
  assert.ok(info.state.bytes <= 200 * 1024);

  // The state bucket and the stream agree.
  const diff = compareStates(
    (await rebuildStates(jetstream(t.nc), FEEDBACK_STATE_SPEC)).states,
    await readStates(jetstream(t.nc)),
  );
  assert.deepEqual(
    {
      different: diff.different,
      missingLive: diff.missingLive,
      missingRebuilt: diff.missingRebuilt,
    },
    { different: [], missingLive: [], missingRebuilt: [] },
  );
  assert.equal(diff.equal, accepted.length);

  // The alert fired before the refusals, in the logs and in /metrics.
  assert.ok(t.lines.some((l) => l.includes('"msg":"stream nearly full"')), "a warning was logged");
  const text = await (await meshMetrics(t.nc, t.jsm, new WeftMetrics(), {
    maxWaitMs: 200,
    pipelineStreams: ["FEEDBACK"],
  })).metrics();
  const ratio = Number(
    text.match(/weft_stream_usage_ratio\{stream="FEEDBACK",resource="bytes"\} ([0-9.]+)/)?.[1],
  );
  assert.ok(ratio >= 0.8, `usage ratio ${ratio}`);
  await p[Symbol.asyncDispose]();
});

Deno.test("a start with limits smaller than the stored data refuses to shrink the stream, and shrinks it only when told to", async () => {
  await using t = await startTestNats();
  const js = jetstream(t.nc);
  for (let i = 0; i < 50; i++) {
    await js.publish(`feedback.submit`, JSON.stringify({ text: "x".repeat(2000) }));
  }
  const before = (await t.jsm.streams.info(FEEDBACK_STREAM)).state;
  await assert.rejects(
    ensureTopology(t.nc, t.jsm, { ...t.config, streamMaxBytes: 16 * 1024 }),
    (err: unknown) =>
      err instanceof ConfigError && /refusing to shrink stream FEEDBACK/.test(err.message) &&
      /WEFT_ALLOW_SHRINK=1/.test(err.message),
  );
  await assert.rejects(
    ensureTopology(t.nc, t.jsm, { ...t.config, retentionMs: 1 }),
    /refusing to shrink stream FEEDBACK: max_age/,
  );
  const after = (await t.jsm.streams.info(FEEDBACK_STREAM)).state;
  assert.equal(after.messages, before.messages, "nothing was discarded");

  // Growing is always fine; shrinking on purpose discards, as asked.
  await ensureTopology(t.nc, t.jsm, { ...t.config, streamMaxBytes: 4 * 1024 * 1024 * 1024 });
  await ensureTopology(t.nc, t.jsm, { ...t.config, streamMaxBytes: 16 * 1024, allowShrink: true });
  const shrunk = await t.jsm.streams.info(FEEDBACK_STREAM);
  assert.equal(shrunk.config.max_bytes, 16 * 1024);
  assert.ok(shrunk.state.messages < before.messages);
});

Deno.test("a full stream refuses new messages rather than discard accepted ones, and intake answers its refusal with 507", async () => {
  await using t = await startTestNats({ streamMaxBytes: 64 * 1024 });
  const js = jetstream(t.nc);
  let refusal: unknown;
  for (let i = 0; i < 200 && !refusal; i++) {
    await js.publish(`feedback.submit`, JSON.stringify({ id: `full-${i}`, text: "x".repeat(1000) }))
      .catch((err) => (refusal = err));
  }
  assert.ok(isStreamFull(refusal), `refused as full: ${refusal}`);
  const info = await t.jsm.streams.info(FEEDBACK_STREAM);
  assert.equal(info.state.first_seq, 1, "nothing accepted was discarded");
  // Over HTTP, the stream's own refusal (behind the high-water mark) is a 507 too.
  const intake = await createIntake(t.nc);
  const app = feedbackApp(t, intake);
  const res = await app.request("/feedback", {
    method: "POST",
    headers: JSON_TYPE,
    body: JSON.stringify({ text: "one more" }),
  });
  assert.equal(res.status, 507, await res.clone().text());
  assert.equal(res.headers.get("retry-after"), "30");
  await res.body?.cancel();
});

Deno.test("a fill faster than the guard's refresh is refused from the high-water mark, not by the full stream", async () => {
  await using t = await startTestNats({ streamMaxBytes: 128 * 1024 });
  // A reading never renewed by age alone: the fill outruns it, as 100 items/s outran the
  // default second into a 2 MiB stream (refused only when full, 99.97%).
  using capacity = createCapacityGuard(t.jsm, { refreshMs: 60_000, log: t.log });
  const intake = await createIntake(t.nc, "weft-gateway", { capacity });
  const app: Hono = feedbackApp(t, intake);
  let refusal: number | undefined;
  for (let i = 0; i < 1000 && !refusal; i++) {
    const res = await app.request("/feedback", {
      method: "POST",
      headers: JSON_TYPE,
      body: JSON.stringify({ text: `Item ${i}: ${"the export to PDF keeps failing ".repeat(8)}` }),
    });
    if (res.status === 202) await res.body?.cancel();
    else refusal = (await res.body?.cancel(), res.status);
  }
  assert.equal(refusal, 507);
  const info = await t.jsm.streams.info(FEEDBACK_STREAM);
  const usage = info.state.bytes / (128 * 1024);
  assert.ok(
    usage >= 0.85 && usage < 0.92,
    `refused at ${Math.round(usage * 1000) / 10}%, from the 90% mark`,
  );
  assert.ok(t.lines.some((l) => l.includes('"msg":"stream nearly full"')), "the alert fired first");
});

Deno.test("near its mark the guard reads the stream again before answering, so growth it did not admit counts too", async () => {
  await using t = await startTestNats({ streamMaxBytes: 64 * 1024 });
  const js = jetstream(t.nc);
  const fillTo = async (ratio: number) => {
    for (
      let i = 0;
      (await t.jsm.streams.info(FEEDBACK_STREAM)).state.bytes < ratio * 64 * 1024;
      i++
    ) {
      await js.publish("feedback.submit", JSON.stringify({ text: "x".repeat(500) }));
    }
  };
  // Far from the mark a reading lasts its refresh interval; near it, at most nearMs (0 here).
  using capacity = createCapacityGuard(t.jsm, { refreshMs: 60_000, nearMs: 0, log: t.log });
  await fillTo(0.82);
  await capacity.check(FEEDBACK_STREAM);
  // The items' later events (here: another publisher) take the stream past the mark.
  await fillTo(0.91);
  await assert.rejects(capacity.check(FEEDBACK_STREAM), CapacityError);
});

Deno.test("the upload object store has a byte limit: uploads are refused with 507 before it is full, and a start never shrinks it below what it holds", async () => {
  const max = 2 * 1024 * 1024;
  await using t = await startTestNats({ objectStoreMaxBytes: max });
  const objects = `OBJ_${CONTENT_OBJECT_BUCKET}`;
  assert.equal((await t.jsm.streams.info(objects)).config.max_bytes, max);
  using capacity = createCapacityGuard(t.jsm, { log: t.log });
  const moderation = await createModerationApi({
    nc: t.nc,
    config: t.config,
    log: t.log,
    authEnabled: false,
    capacity,
  });
  const app = createApp({
    nc: t.nc,
    jetStream: await createIntake(t.nc),
    config: t.config,
    log: t.log,
    auth: createAuth([]),
    extensions: [moderationRoutes(moderation)],
  });
  const upload = new Uint8Array(128 * 1024).fill(7);
  let accepted = 0;
  let refused: Response | undefined;
  for (let i = 0; i < 40 && !refused; i++) {
    const res = await app.request("/content", {
      method: "POST",
      headers: { "content-type": "application/octet-stream" },
      body: upload,
    });
    if (res.status === 202) accepted++, await res.body?.cancel();
    else refused = res;
  }
  assert.ok(refused, `all ${accepted} uploads accepted`);
  assert.equal(refused.status, 507, await refused.clone().text());
  assert.equal(refused.headers.get("retry-after"), "30");
  assert.equal((await refused.json()).code, "insufficient_storage");
  const held = (await t.jsm.streams.info(objects)).state.bytes;
  assert.ok(held / max >= 0.85 && held / max < 0.95, `refused at ${held / max} of the limit`);
  assert.ok(accepted >= 12, `${accepted} accepted`);

  // A start with a smaller limit than the store holds is refused; a larger one applies.
  await assert.rejects(
    ensureTopology(t.nc, t.jsm, { ...t.config, objectStoreMaxBytes: 1024 * 1024 }),
    (err: unknown) =>
      err instanceof ConfigError &&
      /refusing to shrink object store weft_content_objects/.test(err.message) &&
      /WEFT_OBJECT_STORE_MAX_BYTES/.test(err.message),
  );
  await assert.rejects(
    ensureTopology(t.nc, t.jsm, {
      ...t.config,
      objectStoreMaxBytes: 1024 * 1024,
      allowShrink: true,
    }),
    ConfigError,
  );
  assert.equal((await t.jsm.streams.info(objects)).state.bytes, held, "nothing was dropped");
  await ensureTopology(t.nc, t.jsm, { ...t.config, objectStoreMaxBytes: 2 * max });
  assert.equal((await t.jsm.streams.info(objects)).config.max_bytes, 2 * max);
});

Deno.test("the guard reads a stream on its own: the alert fires from growth without intake, and the next intake is refused", async () => {
  // Found by an operator's probe: a definition's stream grew to 99.9% from items' later
  // events while no item came in; no "stream nearly full" was logged for 30 s, and the next
  // POST was admitted from a reading taken at a lower level.
  await using t = await startTestNats({ streamMaxBytes: 64 * 1024 });
  const js = jetstream(t.nc);
  using capacity = createCapacityGuard(t.jsm, { refreshMs: 100, log: t.log });
  await capacity.check(FEEDBACK_STREAM);
  while ((await t.jsm.streams.info(FEEDBACK_STREAM)).state.bytes < 0.95 * 64 * 1024) {
    await js.publish("feedback.submit", JSON.stringify({ text: "x".repeat(500) }));
  }
  await waitFor(
    () => t.lines.some((l) => l.includes('"msg":"stream nearly full"')),
    10_000,
    "the alert, with no intake",
  );
  // Refused from a reading of the stream as it is now: a reading younger than `nearMs` (50 ms),
  // taken while the loop above still filled the stream, may still answer the first check
  // (found under load: the alert came from a reading at 80-95%, and the check right after it
  // was answered from it). Each check admitted is released again.
  await waitFor(
    async () => {
      const answer = await capacity.check(FEEDBACK_STREAM).catch((err: unknown) => err);
      if (answer instanceof CapacityError) return true;
      if (typeof answer === "function") answer();
      else throw answer;
      return undefined;
    },
    10_000,
    "an intake refused",
  );
});

Deno.test("past the mark with nothing new since its reading, the guard refuses without asking the server again", async () => {
  // A flood of requests at the mark is answered from one reading, not one stream-info
  // request per refusal.
  await using t = await startTestNats({ streamMaxBytes: 64 * 1024 });
  const js = jetstream(t.nc);
  while ((await t.jsm.streams.info(FEEDBACK_STREAM)).state.bytes < 0.95 * 64 * 1024) {
    await js.publish("feedback.submit", JSON.stringify({ text: "x".repeat(500) }));
  }
  using capacity = createCapacityGuard(t.jsm, { refreshMs: 60_000, nearMs: 60_000 });
  await assert.rejects(capacity.check(FEEDBACK_STREAM), CapacityError);
  // The server's side of it: every stream-info request, seen on the bus.
  let asked = 0;
  const sub = t.nc.subscribe(`$JS.API.STREAM.INFO.${FEEDBACK_STREAM}`, {
    callback: () => void asked++,
  });
  try {
    await t.nc.flush();
    for (let i = 0; i < 20; i++) {
      await assert.rejects(capacity.check(FEEDBACK_STREAM), CapacityError);
    }
    await t.nc.flush();
    assert.equal(asked, 0);
  } finally {
    sub.unsubscribe();
  }
});

Deno.test("POST /content answers a full CONTENT stream's own refusal with 507 and Retry-After, not 500", async () => {
  // Found by a re-probe: the stream's refusal (10077, discard-new) came back as 500
  // handler_failed from POST /content, while feedback and definitions answer 507.
  await using t = await startTestNats({ streamMaxBytes: 64 * 1024 });
  // No capacity guard: the stream's own refusal is what intake meets.
  const moderation = await createModerationApi({
    nc: t.nc,
    config: t.config,
    log: t.log,
    authEnabled: false,
  });
  const app = createApp({
    nc: t.nc,
    jetStream: await createIntake(t.nc),
    config: t.config,
    log: t.log,
    auth: createAuth([]),
    extensions: [moderationRoutes(moderation)],
  });
  const text = "the export to PDF fails again ".repeat(100); // ~3 KB
  let accepted = 0;
  let refused: Response | undefined;
  for (let i = 0; i < 100 && !refused; i++) {
    const res = await app.request("/content", {
      method: "POST",
      headers: JSON_TYPE,
      body: JSON.stringify({ text }),
    });
    if (res.status === 202) accepted++, await res.body?.cancel();
    else refused = res;
  }
  assert.ok(refused, `all ${accepted} submissions accepted`);
  assert.equal(refused.status, 507, await refused.clone().text());
  assert.equal(refused.headers.get("retry-after"), "30");
  assert.match(refused.headers.get("content-type") ?? "", /application\/problem\+json/);
  const problem = await refused.json();
  assert.equal(problem.code, "insufficient_storage");
  assert.match(problem.detail, /stream CONTENT is full/);
  assert.ok(accepted > 0, "some were accepted first");
});

Deno.test("under deno task start, feedback's and content's intakes keep room for the items in flight: every accepted item settles, none is dead-lettered for lack of room", async () => {
  // Found by re-probing: with a 2 MiB stream and 8 KB texts sent one at a time, 53 feedback
  // items were accepted and 8 of them dead-lettered "its stream is full" (each stores five
  // events repeating its text); only definitions' items in flight were reserved for.
  await using mesh = await startMesh({
    ...ONE_PROCESS,
    WEFT_STREAM_MAX_BYTES: String(2 * 1024 * 1024),
  });
  await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
  const text = "The invoice is wrong and I was charged twice this month. ".repeat(160)
    .slice(0, 8000);
  for (const [path, state] of [["/feedback", "/feedback"], ["/content", "/content"]]) {
    const ids: string[] = [];
    let refusal: { status: number; detail: string } | undefined;
    for (let i = 0; i < 400 && !refusal; i++) {
      const r = await fetch(`${mesh.gatewayUrl}${path}`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ text: `${i} ${text}` }),
      });
      if (r.status === 202) ids.push((await r.json()).id);
      else refusal = { status: r.status, detail: (await r.json()).detail };
    }
    assert.equal(refusal?.status, 507, `${path}: ${JSON.stringify(refusal)}`);
    assert.ok(ids.length > 0, path);
    const settledStatuses = await waitFor(
      async () => {
        const s = await Promise.all(ids.map(async (id) => {
          const r = await fetch(`${mesh.gatewayUrl}${state}/${id}`);
          return r.status === 200 ? ((await r.json()) as { status: string }).status : "";
        }));
        return s.every((x) =>
          ["processed", "published", "pending_review", "archived", "failed"].includes(x)
        ) &&
          s;
      },
      90_000,
      `${path}: every accepted item settled`,
    );
    assert.ok(!settledStatuses.includes("failed"), `${path}: ${JSON.stringify(settledStatuses)}`);
  }
  const letters = await (await fetch(`${mesh.gatewayUrl}/deadletters`)).json();
  assert.deepEqual(letters.items, [], "no dead letters");
});

/**
 * A feedback intake whose guard follows its items in flight, over a 1 MiB FEEDBACK stream
 * with no stage running (every accepted item stays in flight), and one 8 KB item accepted
 * and followed: from then on the guard takes an item to store five events of that size.
 */
async function intakeFollowingItems(t: Awaited<ReturnType<typeof startTestNats>>) {
  const capacity = createCapacityGuard(t.jsm, { highWater: 0.9, log: t.log });
  await capacity.track(
    FEEDBACK_STREAM,
    itemEventsByType(t.nc, "feedback", {
      entry: "feedback.ingested",
      ends: ["feedback.processed", "feedback.failed"],
      eventsPerItem: 5,
    }),
  );
  const intake = await createIntake(t.nc, "weft-gateway", { capacity });
  const app: Hono = feedbackApp(t, intake);
  const text = (i: number | string) =>
    `${i} ${"The invoice is wrong and I was charged twice this month. ".repeat(150)}`
      .slice(0, 8000);
  const first = await app.request("/feedback", {
    method: "POST",
    headers: JSON_TYPE,
    body: JSON.stringify({ text: text("first") }),
  });
  assert.equal(first.status, 202, await first.text());
  await waitFor(() => capacity.following(FEEDBACK_STREAM)?.items === 1, 10_000, "followed");
  return { capacity, app, text };
}

/** What the accepted items will store once each has its five events: bytes of the stream. */
async function storedWhenDone(t: Awaited<ReturnType<typeof startTestNats>>, items: number) {
  const info = await t.jsm.streams.info(FEEDBACK_STREAM);
  return items * 5 * (info.state.bytes / info.state.messages);
}

Deno.test("concurrent submissions each keep room for their item in flight: together they are refused at the mark, not admitted past it", async () => {
  // Found by re-probing: 30 POSTs at a time of 8 KB texts into a 2 MiB stream under deno task
  // start: 49 accepted and 2 of them dead-lettered "its stream is full". Each check counted
  // the items in flight the follower had seen, none of the others admitted at the same time.
  const max = 1024 * 1024;
  await using t = await startTestNats({ streamMaxBytes: max });
  const { capacity, app, text } = await intakeFollowingItems(t);
  using _ = capacity;
  const answers = await Promise.all(
    Array.from({ length: 40 }, (_, i) =>
      app.request("/feedback", {
        method: "POST",
        headers: JSON_TYPE,
        body: JSON.stringify({ text: text(i) }),
      })),
  );
  const statuses = answers.map((r) => r.status);
  const refused = answers.find((r) => r.status !== 202);
  assert.ok(refused, `all 40 accepted: ${statuses}`);
  assert.equal(refused.status, 507);
  assert.equal(refused.headers.get("content-type"), "application/problem+json");
  assert.equal(refused.headers.get("retry-after"), "30");
  for (const r of answers) await r.body?.cancel();
  const accepted = 1 + statuses.filter((s) => s === 202).length;
  const need = await storedWhenDone(t, accepted);
  assert.ok(need <= max, `${accepted} items accepted will store ${need} bytes of ${max}`);
});

Deno.test("a batch keeps room for each of its items in flight: one the stream cannot finish is refused with 507, a smaller one accepted", async () => {
  // Found by re-probing: two batches of 30 8 KB texts into a 2 MiB stream under deno task
  // start were both accepted and 20 of their items dead-lettered "its stream is full": a
  // batch was checked as one item.
  const max = 1024 * 1024;
  await using t = await startTestNats({ streamMaxBytes: max });
  const { capacity, app, text } = await intakeFollowingItems(t);
  using _ = capacity;
  const batch = (n: number, tag: string) =>
    app.request("/feedback/batch", {
      method: "POST",
      headers: JSON_TYPE,
      body: JSON.stringify({
        items: Array.from({ length: n }, (_, i) => ({ text: text(tag + i) })),
      }),
    });
  const big = await batch(30, "big");
  assert.equal(big.status, 507, await big.clone().text());
  const problem = await big.json();
  assert.equal(big.headers.get("content-type"), "application/problem+json");
  assert.equal(problem.code, "insufficient_storage");
  const info = await t.jsm.streams.info(FEEDBACK_STREAM);
  assert.equal(info.state.messages, 1, "nothing of the refused batch stored");
  const small = await batch(10, "small");
  assert.equal(small.status, 202, await small.text());
  const need = await storedWhenDone(t, 11);
  assert.ok(need <= max * 0.9, `the 11 items will store ${need} bytes of ${max}`);
});

Deno.test("a request that stores no item gives back the room its check kept: refusals and replays near the mark do not refuse the next item", async () => {
  // The room each admission keeps until its entry is seen (the test above) is given back
  // when the request stores nothing; else each refusal or replay held an item's room for 30 s.
  const max = 1024 * 1024;
  await using t = await startTestNats({ streamMaxBytes: max });
  const { capacity, app, text } = await intakeFollowingItems(t);
  using _ = capacity;
  const post = (body: unknown, headers: Record<string, string> = {}) =>
    app.request("/feedback", {
      method: "POST",
      headers: { ...JSON_TYPE, ...headers },
      body: JSON.stringify(body),
    });
  const mine = await post({ id: "mine", text: text("mine") });
  assert.equal(mine.status, 202, await mine.text());
  const keyed = await post({ text: text("keyed") }, { "idempotency-key": "k1" });
  assert.equal(keyed.status, 202, await keyed.text());
  // 40 one after another, each worth an item's room (about 40 KB) in a 1 MiB stream: an id
  // taken with another body (422), and the same key and body again (a replay).
  for (let i = 0; i < 40; i++) {
    const r = i % 2 === 0
      ? await post({ id: "mine", text: text(`other ${i}`) })
      : await post({ text: text("keyed") }, { "idempotency-key": "k1" });
    assert.equal(r.status, i % 2 === 0 ? 422 : 202, `${i}: ${await r.text()}`);
  }
  await waitFor(() => capacity.following(FEEDBACK_STREAM)?.items === 3, 10_000, "3 followed");
  // Before: 507, 40 admissions that stored nothing counted in flight.
  const next = await post({ text: text("next") });
  assert.equal(next.status, 202, await next.text());
});
