/**
 * Half-sent request bodies over a real socket against the gateway on Deno.serve and a real
 * nats-server: a body that does not arrive in time is answered 408, and at most
 * `bodyReadsMax` bodies are read at once (503 with Retry-After beyond), so stalled uploads
 * cannot take the gateway's memory.
 */
import assert from "node:assert/strict";
import { createIntake } from "../pipelines/feedback/intake.ts";
import { feedbackApp } from "./helpers/pipeline.ts";
import { startTestNats, type TestNats } from "./helpers/nats.ts";
import { deadline, waitFor } from "./helpers/wait.ts";

async function serveGateway(t: TestNats) {
  const intake = await createIntake(t.nc);
  const app = feedbackApp(t, intake);
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, app.fetch);
  return { server, port: server.addr.port };
}

/**
 * A raw connection that sends a POST /feedback's headers, declaring `declared` bytes, and
 * `sent` bytes of its body, then stalls.
 */
async function stalledUpload(port: number, declared = 65_000, sent = 60_000) {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  const head = `POST /feedback HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n` +
    `content-length: ${declared}\r\n\r\n`;
  const body = '{"text":"' + "a".repeat(sent - 9);
  const bytes = new TextEncoder().encode(head + body);
  for (let off = 0; off < bytes.length;) off += await conn.write(bytes.subarray(off));
  return conn;
}

/** What the server answers on `conn`: its status line, headers and body (read until `}`). */
async function answerOf(conn: Deno.Conn) {
  const buf = new Uint8Array(8192);
  let text = "";
  while (!/\r\n\r\n[\s\S]*\}/.test(text)) {
    const n = await conn.read(buf);
    if (n === null) break;
    text += new TextDecoder().decode(buf.subarray(0, n));
  }
  const [head = "", body = ""] = text.split("\r\n\r\n");
  return { head, body };
}

const submit = (port: number) =>
  fetch(`http://127.0.0.1:${port}/feedback`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ text: "the app works well" }),
  });

Deno.test("a request body not in full within WEFT_BODY_TIMEOUT_MS is answered 408 problem+json naming the body, and nothing is accepted", async () => {
  await using t = await startTestNats({ bodyTimeoutMs: 500 });
  const { server, port } = await serveGateway(t);
  const conn = await stalledUpload(port);
  try {
    const { head, body } = await deadline(answerOf(conn), 20_000, "an answer to a stalled body");
    assert.match(head, /^HTTP\/1\.1 408 /, head);
    assert.match(head, /content-type: application\/problem\+json/i, head);
    assert.match(head, /connection: close/i, head);
    const p = JSON.parse(body);
    assert.equal(p.code, "request_timeout");
    assert.equal(p.status, 408);
    assert.equal(p.field, "/");
    assert.match(p.detail, /WEFT_BODY_TIMEOUT_MS/);
    // The stream holds nothing from it; a whole request is still accepted.
    assert.equal((await t.jsm.streams.info("FEEDBACK")).state.messages, 0);
    const ok = await submit(port);
    assert.equal(ok.status, 202, await ok.text());
  } finally {
    conn.close();
    await server.shutdown();
  }
});

Deno.test("at most WEFT_BODY_READS_MAX bodies are read at once: the next request with a body is 503 with Retry-After, unread; reads go on, and a freed slot serves again", async () => {
  await using t = await startTestNats({ bodyReadsMax: 2, bodyTimeoutMs: 600_000 });
  const { server, port } = await serveGateway(t);
  const stalled = [await stalledUpload(port), await stalledUpload(port)];
  try {
    // Once both stalled bodies hold their slots, a whole request is refused before its body
    // is read (an earlier one may pass while they are still arriving).
    const refused = await waitFor(
      async () => {
        const res = await submit(port);
        if (res.status === 202) return void await res.body?.cancel();
        return res;
      },
      20_000,
      "a request refused while two bodies are being read",
    );
    const text = await refused.text();
    assert.equal(refused.status, 503, text);
    assert.match(refused.headers.get("content-type") ?? "", /^application\/problem\+json/);
    assert.ok(Number(refused.headers.get("retry-after")) >= 1);
    const p = JSON.parse(text);
    assert.equal(p.code, "unavailable");
    assert.match(p.detail, /WEFT_BODY_READS_MAX/);
    // Reads are not bodies: they are served.
    const health = await fetch(`http://127.0.0.1:${port}/healthz`);
    assert.equal(health.status, 200);
    await health.body?.cancel();
    // A stalled client that goes away frees its slot: whole requests are accepted again.
    stalled.shift()!.close();
    const ok = await waitFor(
      async () => {
        const res = await submit(port);
        if (res.status !== 202) return void await res.body?.cancel();
        return res;
      },
      20_000,
      "a request accepted once a slot is free",
    );
    await ok.body?.cancel();
  } finally {
    for (const c of stalled) c.close();
    await server.shutdown();
  }
});
