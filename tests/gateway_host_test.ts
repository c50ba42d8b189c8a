/**
 * DNS rebinding: with API keys off, the gateway answers only requests whose `Host` names it
 * (loopback, its WEFT_HOST, WEFT_ALLOWED_HOSTS). A page on a domain that resolves to
 * 127.0.0.1 once loaded is same-origin to the browser, and sent the gateway its own domain
 * as Host: it was served, read and write (found by a tester). Real nats-server, the gateway
 * service in its own process, raw HTTP so that Host is what the test says.
 */
import assert from "node:assert/strict";
import { startTestNats } from "./helpers/nats.ts";
import { spawnService } from "./helpers/mesh.ts";
import { freePort } from "../src/nats_server.ts";
import { hashKey } from "../src/gateway/auth.ts";
import { FEEDBACK_STREAM } from "../pipelines/feedback/subjects.ts";

/** One HTTP/1.1 request over its own connection, `host` as its Host header. */
async function send(port: number, host: string, method = "GET", path = "/healthz", body = "") {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    const head = `${method} ${path} HTTP/1.1\r\nHost: ${host}\r\nconnection: close\r\n` +
      (body ? `content-type: application/json\r\ncontent-length: ${body.length}\r\n` : "") +
      "\r\n";
    await conn.write(new TextEncoder().encode(head + body));
    let text = "";
    const buf = new Uint8Array(16_384);
    for (let n; (n = await conn.read(buf)) !== null;) {
      text += new TextDecoder().decode(buf.subarray(0, n));
    }
    const [top = "", rest = ""] = text.split("\r\n\r\n", 2);
    return {
      status: Number(top.split(" ")[1]),
      type: top.match(/^content-type: *(.*)$/im)?.[1] ?? "",
      body: rest,
    };
  } finally {
    conn.close();
  }
}

Deno.test("the gateway with API keys off refuses a foreign Host with a 403 naming host and stores nothing; loopback and allow-listed hosts are served", async () => {
  await using t = await startTestNats();
  const port = freePort();
  await using gateway = spawnService("gateway", {
    NATS_URL: t.server.url,
    PORT: String(port),
    WEFT_ALLOWED_HOSTS: "weft.test, ops.test:" + port,
  });
  await gateway.waitForLog((l) => l.msg === "gateway listening", 30_000);
  const stored = async () => (await t.jsm.streams.info(FEEDBACK_STREAM)).state.messages;
  const item = JSON.stringify({ text: "a page on a rebinding domain wrote this" });
  const before = await stored();

  for (
    const host of [
      `evil.example:${port}`,
      "evil.example",
      `ops.test:${port + 1}`,
      "127.0.0.1.evil.example",
    ]
  ) {
    for (
      const [method, path, body] of [["POST", "/feedback", item], ["GET", "/healthz", ""]] as const
    ) {
      const res = await send(port, host, method, path, body);
      assert.equal(res.status, 403, `${method} ${path} Host ${host}: ${res.body}`);
      assert.match(res.type, /^application\/problem\+json/);
      const problem = JSON.parse(res.body);
      assert.equal(problem.code, "forbidden");
      assert.equal(problem.field, "host");
    }
  }
  assert.equal(await stored(), before, "a refused request stored nothing");

  const served = [
    `127.0.0.1:${port}`,
    `localhost:${port}`,
    `[::1]:${port}`,
    `127.8.9.10:${port}`,
    `app.localhost:${port}`,
    `weft.test:${port}`,
    "weft.test",
    `ops.test:${port}`,
  ];
  for (const host of served) {
    const res = await send(port, host, "POST", "/feedback", item);
    assert.equal(res.status, 202, `Host ${host}: ${res.body}`);
    assert.equal((await send(port, host)).status, 200, `GET /healthz Host ${host}`);
  }
  assert.equal(await stored(), before + served.length);
});

Deno.test("the gateway with API keys on does not check Host: a rebinding page cannot send a key", async () => {
  await using t = await startTestNats();
  const port = freePort();
  await using gateway = spawnService("gateway", {
    NATS_URL: t.server.url,
    PORT: String(port),
    WEFT_API_KEYS: JSON.stringify([{ sha256: hashKey("k-admin"), role: "admin", name: "ops" }]),
  });
  await gateway.waitForLog((l) => l.msg === "gateway listening", 30_000);
  assert.equal((await send(port, "weft.example.com")).status, 200);
  const item = JSON.stringify({ text: "no key" });
  const res = await send(port, "evil.example", "POST", "/feedback", item);
  assert.equal(res.status, 401, res.body);
});

Deno.test("the gateway refuses to start with a WEFT_ALLOWED_HOSTS entry that is no host or host:port, naming the setting", async () => {
  for (
    const bad of ["https://weft.test", "weft.test/path", "*.weft.test", "weft.test:99999", "a b"]
  ) {
    const out = await new Deno.Command("deno", {
      args: ["run", "--allow-all", "services/gateway.ts"],
      env: { NATS_URL: "nats://127.0.0.1:1", PORT: String(freePort()), WEFT_ALLOWED_HOSTS: bad },
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    assert.notEqual(out.code, 0, `${bad}: ${text}`);
    assert.match(text, /WEFT_ALLOWED_HOSTS/, bad);
    assert.doesNotMatch(text, /gateway listening/, bad);
  }
});
