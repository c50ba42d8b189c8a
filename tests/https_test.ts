/**
 * The gateway serves HTTPS when given a certificate and its key: a client that trusts the
 * certificate's CA talks to it, one that does not is refused. Certificates are made at
 * test time with openssl; the gateway runs as its own process with the supervisor's
 * permissions.
 */
import assert from "node:assert/strict";
import { freePort } from "../src/nats_server.ts";
import { startTestNats } from "./helpers/nats.ts";
import { startService } from "./helpers/services.ts";

async function openssl(args: string[], cwd: string) {
  const out = await new Deno.Command("openssl", { args, cwd, stdout: "null", stderr: "piped" })
    .output();
  if (!out.success) throw new Error(new TextDecoder().decode(out.stderr));
}

Deno.test("with WEFT_TLS_CERT and WEFT_TLS_KEY the gateway serves HTTPS, verified against its CA", async () => {
  const dir = await Deno.makeTempDir({ prefix: "weft-tls-" });
  try {
    await openssl([
      "req",
      "-x509",
      "-newkey",
      "rsa:2048",
      "-nodes",
      "-days",
      "1",
      "-subj",
      "/CN=weft-test-ca",
      "-keyout",
      "ca.key",
      "-out",
      "ca.pem",
    ], dir);
    await openssl([
      "req",
      "-newkey",
      "rsa:2048",
      "-nodes",
      "-subj",
      "/CN=127.0.0.1",
      "-keyout",
      "gateway.key",
      "-out",
      "gateway.csr",
    ], dir);
    await Deno.writeTextFile(`${dir}/ext.cnf`, "subjectAltName=IP:127.0.0.1,DNS:localhost\n");
    await openssl([
      "x509",
      "-req",
      "-in",
      "gateway.csr",
      "-CA",
      "ca.pem",
      "-CAkey",
      "ca.key",
      "-CAcreateserial",
      "-days",
      "1",
      "-extfile",
      "ext.cnf",
      "-out",
      "gateway.pem",
    ], dir);

    await using t = await startTestNats();
    const port = freePort();
    await using _gateway = await startService("gateway", {
      NATS_URL: t.server.url,
      PORT: String(port),
      WEFT_TLS_CERT: `${dir}/gateway.pem`,
      WEFT_TLS_KEY: `${dir}/gateway.key`,
    });
    const client = Deno.createHttpClient({ caCerts: [await Deno.readTextFile(`${dir}/ca.pem`)] });
    try {
      const res = await fetch(`https://127.0.0.1:${port}/healthz`, { client });
      assert.equal(res.status, 200);
      assert.deepEqual(await res.json(), { status: "ok" });
      // Without the CA the certificate is not trusted.
      await assert.rejects(fetch(`https://127.0.0.1:${port}/healthz`));
    } finally {
      client.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
