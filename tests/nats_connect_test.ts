/**
 * Connecting to NATS: a connection the server refuses is an error returned to the caller,
 * never an uncaught one that ends the process.
 */
import assert from "node:assert/strict";
import { connectNats, whileUnavailable } from "../src/nats.ts";
import { jetstreamManager } from "@nats-io/jetstream";
import { createLogger } from "../src/observability/log.ts";
import { ensureIdentities, type Identity } from "../src/identities.ts";
import { freePort, startNatsServer } from "../src/nats_server.ts";
import { ConfigError } from "../src/errors.ts";
import { meshTempDir, removedAtEnd, taskArgs } from "./helpers/mesh.ts";

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

Deno.test("with patience, a first connect that times out on a server too busy to answer is tried again", async () => {
  const dir = await Deno.makeTempDir({ prefix: "weft-connect-" });
  await using server = await startNatsServer({ port: freePort(), cwd: dir });
  const natsPort = Number(new URL(server.url).port);
  // A front door to the server that leaves its first `silent` connections unanswered, as a
  // server does whose cores are busy, and relays the rest.
  let silent = 2;
  const held: Deno.Conn[] = [];
  const relays: Promise<unknown>[] = [];
  const front = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const accepting = (async () => {
    for await (const conn of front) {
      if (silent-- > 0) {
        held.push(conn);
        continue;
      }
      const back = await Deno.connect({ hostname: "127.0.0.1", port: natsPort });
      held.push(conn, back);
      relays.push(
        conn.readable.pipeTo(back.writable).catch(() => {}),
        back.readable.pipeTo(conn.writable).catch(() => {}),
      );
    }
  })();
  const url = `nats://127.0.0.1:${(front.addr as Deno.NetAddr).port}`;
  try {
    // By default the first timeout is the answer (a refused TLS client times out too).
    await assert.rejects(connectNats(url, "hasty", {}, { timeoutMs: 300 }), {
      name: "TimeoutError",
    });
    // With it, the next attempt past the silent one connects.
    const nc = await connectNats(url, "patient", {}, { timeoutMs: 300, patienceMs: 10_000 });
    await nc.flush();
    await nc.close();
    assert.equal(silent, -1, "the patient connect was answered on its second attempt");
  } finally {
    front.close();
    for (const c of held) {
      try {
        c.close();
      } catch { /* already closed */ }
    }
    await accepting.catch(() => {});
    await Promise.all(relays);
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a key file that cannot be read is a configuration error naming it and where keys live, not a stack trace", async () => {
  await assert.rejects(
    connectNats("nats://127.0.0.1:1", "no-key-test", { nkeySeedFile: "/nonexistent/ops.nk" }),
    (err: Error) => {
      assert.ok(err instanceof ConfigError, `${err.name}: ${err.message}`);
      assert.match(err.message, /WEFT_NATS_NKEY: cannot read the key file \/nonexistent\/ops\.nk/);
      assert.match(err.message, /data\/identities\//);
      return true;
    },
  );
});

Deno.test("a key file that holds no user nkey seed is a configuration error naming it, not a stack trace", async () => {
  const dir = await Deno.makeTempDir({ prefix: "weft-badkey-" });
  try {
    const { nkeys } = await import("@nats-io/nats-core");
    const pair = nkeys.createAccount();
    const cases = {
      account: new TextDecoder().decode(pair.getSeed()),
      public: pair.getPublicKey(),
      truncated: new TextDecoder().decode(nkeys.createUser().getSeed()).slice(0, 30),
    };
    for (const [what, text] of Object.entries(cases)) {
      const file = `${dir}/${what}.nk`;
      await Deno.writeTextFile(file, text + "\n");
      await assert.rejects(
        connectNats("nats://127.0.0.1:1", "bad-key-test", { nkeySeedFile: file }),
        (err: Error) => {
          assert.ok(err instanceof ConfigError, `${what}: ${err.name}: ${err.message}`);
          assert.ok(
            err.message.includes(`the key file ${file} holds no user nkey seed`),
            err.message,
          );
          return true;
        },
      );
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a service task given a key of a mesh started with WEFT_NATS_DIR says where it may read keys and what to do, in one line", async () => {
  // `deno task start` with WEFT_NATS_DIR=data/<dir> writes its keys to data/<dir>/data/identities/,
  // which a service task's --allow-read=data/identities does not reach.
  const dir = await meshTempDir("weft-keydir-");
  await using _dir = removedAtEnd(dir);
  const root = new URL("../", import.meta.url).pathname;
  await ensureIdentities(`${dir}/data/identities`, ["sentiment"]);
  const key = `${dir.slice(root.length)}/data/identities/sentiment.nk`;
  const out = await new Deno.Command("deno", {
    args: await taskArgs("sentiment"),
    cwd: root,
    env: {
      NATS_URL: `nats://127.0.0.1:${freePort()}`,
      WEFT_NATS_NKEY: key,
      WEFT_ENSURE_TOPOLOGY: "false",
    },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const said = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 1, said);
  const refused = said.split("\n").filter((l) => l.includes("start refused"));
  assert.equal(refused.length, 1, said);
  const message: string = JSON.parse(refused[0]!).err.message;
  assert.match(
    message,
    new RegExp(`cannot read the key file ${key.replaceAll(".", "\\.")} \\(NotCapable`),
  );
  assert.match(message, /a service task reads keys only from data\/identities\//);
  assert.match(message, /WEFT_NATS_DIR=<dir> keeps them in <dir>\/data\/identities\//);
  assert.match(message, /copy the key into data\/identities\/ \(mode 0600\)/);
});

Deno.test("start-up work whose JetStream request a stalled server leaves unanswered is tried again until it answers; other errors are not", async () => {
  // Found by a full run on a loaded machine: a service's first JetStream request (setting
  // up its streams) timed out, and the service exited before it was ready.
  const dir = await Deno.makeTempDir({ prefix: "weft-unavailable-" });
  await using server = await startNatsServer({ port: freePort(), cwd: dir });
  const nc = await connectNats(server.url, "patient");
  const jsm = await jetstreamManager(nc, { timeout: 500 });
  const lines: string[] = [];
  const retried = Promise.withResolvers<void>();
  const log = createLogger("test", "debug", (l) => {
    lines.push(l);
    if (l.includes("trying again")) retried.resolve();
  });
  try {
    // A server that cannot answer for a while (its process stopped, as a starved one is).
    await new Deno.Command("kill", { args: ["-STOP", String(server.pid)] }).output();
    let continued = false;
    try {
      const made = whileUnavailable(
        "set up a stream",
        () => jsm.streams.add({ name: "PATIENT", subjects: ["patient.>"] }),
        { patienceMs: 60_000, log, retryDelayMs: 100 },
      );
      await retried.promise;
      await new Deno.Command("kill", { args: ["-CONT", String(server.pid)] }).output();
      continued = true;
      assert.equal((await made).config.name, "PATIENT");
    } finally {
      if (!continued) {
        await new Deno.Command("kill", { args: ["-CONT", String(server.pid)] }).output();
      }
    }
    const warned = JSON.parse(lines.find((l) => l.includes("trying again"))!);
    assert.equal(warned.what, "set up a stream");
    // Not every error is worth waiting for: a refusal is the answer.
    const before = lines.length;
    await assert.rejects(
      whileUnavailable(
        "set up a bad stream",
        () => jsm.streams.add({ name: "BAD.NAME", subjects: ["bad.>"] }),
        { patienceMs: 60_000, log, retryDelayMs: 100 },
      ),
    );
    assert.equal(lines.length, before, "no retry for a refusal");
  } finally {
    await nc.close();
    await Deno.remove(dir, { recursive: true });
  }
});
