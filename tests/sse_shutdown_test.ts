/**
 * Ctrl-C with event-stream clients connected: the gateway ends every SSE stream at once
 * (with a retry hint; clients resume elsewhere with Last-Event-ID) instead of waiting for
 * them, so the mesh drains and stops in about a second, nothing killed, in one process
 * per service (with a separate events gateway) and in one process for all.
 */
import assert from "node:assert/strict";
import { freePort } from "../src/nats_server.ts";
import { startMesh, submit } from "./helpers/mesh.ts";
import { sseFrames } from "./helpers/sse_frames.ts";

/** Reads an open SSE body to its end in the background: its text, and whether it broke. */
function drainBody(body: ReadableStream<Uint8Array>): Promise<{ text: string; broke: boolean }> {
  return (async () => {
    let text = "";
    try {
      for await (const chunk of body.pipeThrough(new TextDecoderStream())) text += chunk;
      return { text, broke: false };
    } catch {
      return { text, broke: true };
    }
  })();
}

/** Opens an SSE stream at `url` and checks it answers as one. */
async function openStream(url: string): Promise<ReadableStream<Uint8Array>> {
  const r = await fetch(url, { headers: { accept: "text/event-stream" } });
  assert.equal(r.status, 200, `${url}: ${r.status}`);
  assert.match(r.headers.get("content-type") ?? "", /text\/event-stream/);
  return r.body!;
}

for (const mode of ["one process per service", "one process (WEFT_TOGETHER=all)"]) {
  const together = mode.startsWith("one process (");
  Deno.test(`${mode}: SIGINT with SSE clients connected ends their streams and stops the mesh within seconds, nothing killed`, async () => {
    const eventsPort = together ? 0 : freePort();
    await using mesh = await startMesh({
      // Kill deadline 15 s: a stop that waits for the SSE clients takes that long.
      WEFT_DRAIN_MS: "10000",
      // The item below fails at topics and is retried only after a minute: its per-item
      // stream stays open, with no handler in flight to hold the stop.
      WEFT_FAIL_ON: "hold-me",
      WEFT_FAIL_STAGE: "topics",
      WEFT_RETRY_BASE_MS: "60000",
      WEFT_RETRY_MAX_MS: "60000",
      ...(together ? { WEFT_TOGETHER: "all" } : { WEFT_EVENTS_PORT: String(eventsPort) }),
    });
    // Every service answers and both gateways listen (the events gateway may listen first).
    await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "the mesh to be ready");
    if (!together) {
      await mesh.waitForLog(
        (l) => l.msg === "gateway listening" && String(l.url).endsWith(`:${eventsPort}`),
        60_000,
        "the events gateway to listen",
      );
    }
    const events = together ? mesh.gatewayUrl : `http://127.0.0.1:${eventsPort}`;
    const id = await submit(mesh.gatewayUrl, "please hold-me for a while");

    // A per-item stream, read until its first live frame: the stream is live.
    const item = await openStream(`${mesh.gatewayUrl}/feedback/${id}/events`);
    const [forFrames, forRest] = item.tee();
    const frames = sseFrames(forFrames);
    const first = await frames.next();
    assert.equal(first.value?.event, "feedback.ingested");
    const streams = [
      drainBody(forRest),
      drainBody(await openStream(`${events}/events`)),
      drainBody(await openStream(`${events}/events?type=ingested`)),
      drainBody(await openStream(`${mesh.gatewayUrl}/dashboard/stream`)),
    ];
    const framesDone = (async () => {
      for await (const _ of frames) { /* to the end */ }
    })().catch(() => {});

    const t0 = Date.now();
    const status = await mesh.stop("SIGINT");
    const took = Date.now() - t0;
    const ended = await Promise.all(streams);
    await framesDone;

    const killed = mesh.logs.filter((l) => /did not stop in time/.test(String(l.msg)));
    assert.deepEqual(killed, [], "no service was killed");
    const cut = mesh.logs.filter((l) => /connections still open/.test(String(l.msg)));
    assert.deepEqual(cut, [], "no gateway waited out its deadline");
    assert.equal(status.code, 0, "clean exit");
    assert.ok(took < 6_000, `stopped in ${took} ms, well within the 15 s kill deadline`);
    for (const [i, s] of ended.entries()) {
      assert.equal(s.broke, false, `stream ${i} ended cleanly`);
      assert.match(s.text, /retry: \d+/, `stream ${i} was told when to reconnect`);
    }
  });
}
