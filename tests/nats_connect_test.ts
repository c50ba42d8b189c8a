/**
 * Connecting to NATS: a connection the server refuses is an error returned to the caller,
 * never an uncaught one that ends the process.
 */
import assert from "node:assert/strict";
import { connectNats } from "../src/nats.ts";
import { ensureIdentities, type Identity } from "../src/identities.ts";
import { freePort, startNatsServer } from "../src/nats_server.ts";

Deno.test("a refused connection rejects, and leaves no uncaught socket error behind", async () => {
  const dir = await Deno.makeTempDir({ prefix: "weft-connect-" });
  try {
    const [known, stranger] = (await ensureIdentities(`${dir}/ids`, ["known", "stranger"])) as [
      Identity,
      Identity,
    ];
    await Deno.writeTextFile(
      `${dir}/nats.conf`,
      `authorization { users = [ { nkey: "${known.publicKey}" } ] }\n`,
    );
    await using server = await startNatsServer({
      configFile: `${dir}/nats.conf`,
      port: freePort(),
      cwd: dir,
    });
    // The server closes each refused connection at once; the late reset on its socket used
    // to surface as an uncaught ECONNRESET in about one attempt in five.
    for (let i = 0; i < 100; i++) {
      await assert.rejects(
        connectNats(server.url, "stranger", { nkeySeedFile: stranger.seedFile }),
        /authorization/i,
      );
      await assert.rejects(connectNats(server.url, "anonymous"), /authorization/i);
    }
    const nc = await connectNats(server.url, "known", { nkeySeedFile: known.seedFile });
    await nc.flush();
    await nc.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
