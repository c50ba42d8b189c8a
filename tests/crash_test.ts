/**
 * The reference failure case end to end, on real processes: a topics handler that fails
 * on any text containing "crash" (WEFT_FAIL_ON=crash, WEFT_FAIL_STAGE=topics).
 */
import assert from "node:assert/strict";
import type { FeedbackState } from "../pipelines/feedback/events.gen.ts";
import { DEADLETTERS_LIST_SUBJECT, DEADLETTERS_REDRIVE_SUBJECT } from "../src/redrive.ts";
import type { DeadLetterEntry } from "../src/redrive.ts";
import { startServices, TEST_ENV } from "./helpers/mesh.ts";
import { countsByItem, PATIENT } from "./helpers/nats.ts";
import { waitUntil } from "./helpers/wait.ts";
import { sseFrames } from "./helpers/sse_frames.ts";
import { readSse } from "./helpers/sse.ts";
import { FAULT_MODES } from "./helpers/fault_scenarios.ts";

const json = { "content-type": "application/json" };

// Every service its own process, then all in one (`--together`), where restarting the fixed
// stage restarts the one process.
for (const mode of FAULT_MODES) {
  Deno.test(`${mode.name}an item whose text contains 'crash' is retried with backoff, dead-lettered with its original, ends its SSE stream with the error, and completes after redrive`, async () => {
    await using mesh = await startServices({
      env: { WEFT_FAIL_ON: "crash", WEFT_FAIL_STAGE: "topics" },
      together: mode.together,
    });
    const base = mesh.gatewayUrl;
    const others = Array.from({ length: 20 }, (_, i) => ({ id: `ok-${i}`, text: `fine ${i}` }));
    for (const item of [{ id: "boom", text: "This will CrAsH the app" }, ...others]) {
      const res = await fetch(`${base}/feedback`, {
        method: "POST",
        headers: json,
        body: JSON.stringify(item),
      });
      assert.equal(res.status, 202, await res.text());
    }

    // The SSE stream shows the error event and ends.
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), 20_000);
    const res = await fetch(`${base}/feedback/boom/events`, { signal: abort.signal });
    assert.equal(res.status, 200);
    const frames = [];
    try {
      for await (const f of sseFrames(res.body!)) frames.push(f);
    } catch (err) {
      const logs = [...mesh.procs.values()].map((p) =>
        `${p.name}:\n${p.lines.slice(-15).map((l) => JSON.stringify(l)).join("\n")}`
      );
      clearTimeout(timer);
      throw new Error(`SSE did not end: ${JSON.stringify(frames)}\n${logs.join("\n")}`, {
        cause: err,
      });
    }
    clearTimeout(timer);
    assert.deepEqual(frames.map((f) => f.event), [
      "feedback.ingested",
      "feedback.sentiment_analyzed",
      "feedback.failed",
    ]);
    const failed = JSON.parse(frames[2]!.data);
    const maxAttempts = Number(TEST_ENV.WEFT_MAX_ATTEMPTS);
    assert.equal(failed.data.stage, "topics");
    assert.equal(failed.data.code, "handler_failed");
    assert.equal(failed.data.attempts, maxAttempts);
    assert.match(failed.data.reason, /injected fault/);
    assert.deepEqual(failed.data.original, JSON.parse(frames[1]!.data), "carries the original");

    // Retried with exponential backoff and jitter before giving up.
    const retries = mesh.logs
      .filter((l) => l.msg === "retrying" && l.stage === "topics" && l.item_id === "boom") as {
        attempt: number;
        delay_ms: number;
      }[];
    assert.deepEqual(retries.map((r) => r.attempt), [1, 2, 3]);
    const baseMs = Number(TEST_ENV.WEFT_RETRY_BASE_MS);
    for (const r of retries) {
      const cap = Math.min(Number(TEST_ENV.WEFT_RETRY_MAX_MS), baseMs * 2 ** (r.attempt - 1));
      assert.ok(r.delay_ms >= cap / 2 && r.delay_ms <= cap, `delay ${r.delay_ms} within backoff`);
    }

    // State is failed; the original is kept in DEADLETTER.
    let state: FeedbackState;
    await waitUntil(async () => {
      state = await (await fetch(`${base}/feedback/boom`)).json();
      return state.status === "failed";
    }, 10_000);
    assert.equal(state!.error?.stage, "topics");
    assert.equal(state!.error?.attempts, maxAttempts);
    const listed = await (await fetch(`${base}/deadletters?item_id=boom`)).json() as {
      items: DeadLetterEntry[];
    };
    assert.equal(listed.items.length, 1);
    const letter = listed.items[0]!;
    assert.equal(letter.letter.stage, "topics");
    assert.equal(letter.letter.attempts, maxAttempts);
    assert.equal(letter.letter.subject, "feedback.sentiment_analyzed.boom");
    assert.deepEqual(JSON.parse(letter.letter.payload), failed.data.original);

    // Other items flow on; nothing else is dead-lettered.
    await waitUntil(async () => {
      const done = await countsByItem(mesh.jsm, "feedback.processed.*");
      return others.every((o) => done.get(o.id) === 1);
    }, 20_000);
    const all = await (await fetch(`${base}/deadletters`)).json() as { items: DeadLetterEntry[] };
    assert.equal(all.items.length, 1);

    // Nothing further happens to the item.
    const before = await countsByItem(mesh.jsm, "feedback.*.boom");
    assert.equal(before.size, 1);

    // Fix the stage (restart topics without the fault), then redrive over NATS.
    await mesh.kill("topics", "SIGTERM");
    await mesh.start("topics", { WEFT_FAIL_ON: "" });
    const viaNats = JSON.parse(
      (await mesh.nc.request(DEADLETTERS_LIST_SUBJECT, JSON.stringify({ pending: true }), PATIENT))
        .string(),
    );
    assert.deepEqual(viaNats.items.map((e: DeadLetterEntry) => e.seq), [letter.seq]);
    const redriven = JSON.parse(
      (await mesh.nc.request(
        DEADLETTERS_REDRIVE_SUBJECT,
        JSON.stringify({ ids: [letter.seq] }),
        PATIENT,
      ))
        .string(),
    );
    assert.equal(redriven.redriven.length, 1);
    await waitUntil(async () => {
      state = await (await fetch(`${base}/feedback/boom`)).json();
      return state.status === "processed";
    }, 15_000);
    assert.equal(state!.error, undefined);

    // The history shows both attempts.
    const history = new Map<string, number>();
    for (const t of ["sentiment_analyzed", "failed", "processed"]) {
      history.set(t, (await countsByItem(mesh.jsm, `feedback.${t}.boom`)).get("boom") ?? 0);
    }
    assert.deepEqual(Object.fromEntries(history), {
      sentiment_analyzed: 2,
      failed: 1,
      processed: 1,
    });

    // Its SSE replay shows both attempts: it passes the old failure and ends at processed.
    const replay = await readSse(await fetch(`${base}/feedback/boom/events`));
    const types = replay.map((e) => e.event);
    assert.ok(types.indexOf("feedback.failed") < types.lastIndexOf("feedback.sentiment_analyzed"));
    assert.equal(types.at(-1), "feedback.processed");

    // Redriven letters are not pending any more; a second redrive of "all" does nothing.
    const pending = await (await fetch(`${base}/deadletters?pending=true`)).json();
    assert.equal(pending.items.length, 0);
    const again = await fetch(`${base}/deadletters/redrive`, {
      method: "POST",
      headers: json,
      body: JSON.stringify({ all: true }),
    });
    assert.deepEqual((await again.json()).redriven, []);
    assert.deepEqual(mesh.crashed(), []);
  });
}
