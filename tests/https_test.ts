/**
 * The gateway serves HTTPS when given a certificate and its key: a client that trusts the
 * certificate's CA talks to it, one that does not is refused. Certificates are made at
 * test time with openssl; the gateway runs as its own process with the supervisor's
 * permissions.
 */
import assert from "node:assert/strict";
import { freePort } from "../src/nats_server.ts";
import { startTestNats } from "./helpers/nats.ts";
import { startService } from "./helpers/mesh.ts";
import { makeCa, makeCert } from "./helpers/certs.ts";

Deno.test("with WEFT_TLS_CERT and WEFT_TLS_KEY the gateway serves HTTPS, verified against its CA", async () => {
  const dir = await Deno.makeTempDir({ prefix: "weft-tls-" });
  try {
    const ca = await makeCa(dir, "ca");
    const gateway = await makeCert(ca, "gateway");

    await using t = await startTestNats();
    const port = freePort();
    await using _gateway = await startService("gateway", {
      NATS_URL: t.server.url,
      PORT: String(port),
      WEFT_TLS_CERT: gateway.cert,
      WEFT_TLS_KEY: gateway.key,
    });
    const client = Deno.createHttpClient({ caCerts: [await Deno.readTextFile(ca.pem)] });
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
