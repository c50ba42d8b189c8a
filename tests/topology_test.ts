/**
 * Creating the topology is idempotent: a second start changes nothing and loses nothing. A
 * service run alone sets up only its own pipeline's topology, and one whose identity may not
 * set it up says so in one line.
 */
import assert from "node:assert/strict";
import { AckPolicy, jetstream, type JetStreamManager, jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { BACKLOG_SEQ_KEY, ensureConsumer, ensureTopology } from "../src/topology.ts";
import { freePort, serverVersion, startNatsServer, versionAtLeast } from "../src/nats_server.ts";
import { serviceArgs, SERVICES, writeAuthConfig } from "../src/supervisor.ts";
import { connectClient, startTestNats, testConfig } from "./helpers/nats.ts";
import { waitFor } from "./helpers/wait.ts";

const ROOT = new URL("../", import.meta.url);

/** Consumer metadata, and so the backlog mark, came with nats-server 2.10. */
const MARKS = { ignore: !versionAtLeast((await serverVersion()) ?? "0.0.0", "2.10.0") };

/** The sentiment step as the supervisor would start it, but alone: topology ensured. */
function sentiment(
  natsUrl: string,
  nkey = "",
  env: Record<string, string> = {},
): Deno.ChildProcess {
  const spec = SERVICES.find((s) => s.name === "sentiment")!;
  return new Deno.Command("deno", {
    args: serviceArgs(spec, { ...testConfig(natsUrl), natsNkey: nkey }),
    cwd: ROOT,
    env: { NATS_URL: natsUrl, ...(nkey ? { WEFT_NATS_NKEY: nkey } : {}), ...env },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
}

/** A service's start refused: exit 1, no stack trace, its last log line the refusal. */
function refusedInOneLine(out: Deno.CommandOutput): { err: { message: string } } {
  const stdout = new TextDecoder().decode(out.stdout);
  const stderr = new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 1, stdout + stderr);
  assert.equal(stderr, "", "no stack trace");
  const last = JSON.parse(stdout.trim().split("\n").at(-1)!);
  assert.equal(last.level, "error");
  assert.equal(last.msg, "start refused");
  return last;
}

Deno.test("ensureTopology() run again keeps every stream, bucket and message", async () => {
  await using t = await startTestNats();
  await jetstream(t.nc).publish("feedback.submit", JSON.stringify({ text: "kept" }));
  const kv = await new Kvm(t.nc).open("weft_feedback_state");
  await kv.put("fb1", JSON.stringify({ kept: true }));
  const before = await t.jsm.streams.info("FEEDBACK");
  await ensureTopology(t.nc, t.jsm, t.config);
  const after = await t.jsm.streams.info("FEEDBACK");
  assert.equal(after.state.messages, 1);
  assert.equal(after.created, before.created, "not recreated");
  assert.deepEqual(after.config, before.config);
  assert.deepEqual((await kv.get("fb1"))?.json(), { kept: true });
});

Deno.test("ensureTopology() updates a changed limit in place without losing messages", async () => {
  await using t = await startTestNats();
  await jetstream(t.nc).publish("feedback.submit", JSON.stringify({ text: "kept" }));
  await ensureTopology(t.nc, t.jsm, { ...t.config, retentionMs: 3_600_000 });
  const info = await t.jsm.streams.info("FEEDBACK");
  assert.equal(info.config.max_age, 3_600_000 * 1_000_000);
  assert.equal(info.state.messages, 1);
});

Deno.test("a step service run alone sets up its own pipeline's streams, not every pipeline's", async () => {
  await using server = await startNatsServer();
  const nc = await connectClient(server.url, "weft-test");
  const child = sentiment(server.url);
  try {
    const jsm = await jetstreamManager(nc);
    await waitFor(
      async () => (await jsm.consumers.list("FEEDBACK").next()).some((c) => c.name === "sentiment"),
      60_000,
      "the sentiment consumer",
    );
    const streams = (await jsm.streams.names().next()).sort();
    assert.ok(streams.includes("FEEDBACK"), streams.join(", "));
    assert.ok(streams.includes("DEADLETTER"), streams.join(", "));
    assert.ok(!streams.includes("CONTENT"), `another pipeline's stream: ${streams.join(", ")}`);
  } finally {
    child.kill("SIGTERM");
    await child.output();
    await nc.close();
  }
});

Deno.test("a step run alone with no NATS server there is refused in one line naming the URL, exit 1", async () => {
  // Nothing listens on this port: the connect is refused at once.
  const url = `nats://127.0.0.1:${freePort()}`;
  const out = await sentiment(url).output();
  const last = refusedInOneLine(out);
  assert.ok(last.err.message.includes(`cannot connect to NATS at ${url}`), last.err.message);
  assert.match(last.err.message, /set NATS_URL/);
});

Deno.test("a step's own key run alone without WEFT_ENSURE_TOPOLOGY=false is refused in one line, exit 1", async () => {
  const dir = await Deno.makeTempDir({ prefix: "weft-topology-" });
  try {
    await Deno.writeTextFile(`${dir}/base.conf`, "max_payload: 1MB\n");
    const auth = await writeAuthConfig(`${dir}/base.conf`, dir);
    await using server = await startNatsServer({
      configFile: auth.configFile,
      port: freePort(),
      storeDir: `${dir}/store`,
      cwd: dir,
    });
    // The mesh's topology is in place (the admin key set it up), as under deno task start.
    const admin = await connectClient(server.url, "weft-admin", {
      nkeySeedFile: auth.seeds.get("admin")!,
    });
    await ensureTopology(admin, await jetstreamManager(admin), testConfig(server.url));
    await admin.close();
    const out = await sentiment(server.url, auth.seeds.get("sentiment")!).output();
    const last = refusedInOneLine(out);
    assert.match(last.err.message, /may not set up streams or buckets/);
    assert.match(last.err.message, /Permissions Violation/);
    assert.match(last.err.message, /run it with WEFT_ENSURE_TOPOLOGY=false/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a step run alone with another service's key is refused in one line naming the key, exit 1", async () => {
  const dir = await Deno.makeTempDir({ prefix: "weft-topology-" });
  try {
    await Deno.writeTextFile(`${dir}/base.conf`, "max_payload: 1MB\n");
    const auth = await writeAuthConfig(`${dir}/base.conf`, dir);
    await using server = await startNatsServer({
      configFile: auth.configFile,
      port: freePort(),
      storeDir: `${dir}/store`,
      cwd: dir,
    });
    const admin = await connectClient(server.url, "weft-admin", {
      nkeySeedFile: auth.seeds.get("admin")!,
    });
    await ensureTopology(admin, await jetstreamManager(admin), testConfig(server.url));
    await admin.close();
    for (const other of ["topics", "ops"]) {
      const key = auth.seeds.get(other)!;
      const out = await sentiment(server.url, key, { WEFT_ENSURE_TOPOLOGY: "false" }).output();
      const last = refusedInOneLine(out);
      assert.ok(last.err.message.includes(key), last.err.message);
      assert.match(last.err.message, /Permissions Violation/);
      assert.match(last.err.message, /data\/identities\/<service>\.nk/);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name: "ensureConsumer() beside a replica creating the consumer meanwhile takes it, its mark kept",
  ...MARKS,
  async fn() {
    await using server = await startNatsServer();
    const nc = await connectClient(server.url, "weft-test");
    const replica = await connectClient(server.url, "weft-test-replica");
    try {
      const jsm = await jetstreamManager(nc);
      const other = await jetstreamManager(replica);
      await jsm.streams.add({ name: "ORDERS", subjects: ["orders.>"] });
      const js = jetstream(nc);
      await js.publish("orders.placed.a", "{}");
      const want = {
        durable_name: "orders-step",
        ack_policy: AckPolicy.Explicit,
        filter_subject: "orders.>",
      };
      // The real manager, with the other replica's whole start put where it can fall on its
      // own: after this one read the stream's last sequence (1), before it creates the
      // consumer. An order stored meanwhile gives the replica's consumer the mark 2.
      const racing = {
        consumers: jsm.consumers,
        streams: {
          info: async (...args: Parameters<JetStreamManager["streams"]["info"]>) => {
            const info = await jsm.streams.info(...args);
            await js.publish("orders.placed.b", "{}");
            await ensureConsumer(other, "ORDERS", want, { markBacklog: true });
            return info;
          },
        },
      } as unknown as JetStreamManager;
      // It refused the create ("consumer already exists"): the replica failed to start.
      await ensureConsumer(racing, "ORDERS", want, { markBacklog: true });
      const ci = await jsm.consumers.info("ORDERS", "orders-step");
      assert.equal(ci.config.metadata?.[BACKLOG_SEQ_KEY], "2", "the replica's mark stands");
      assert.equal(ci.num_pending, 2, "both orders still to deliver");
      const names = [];
      for await (const c of jsm.consumers.list("ORDERS")) names.push(c.name);
      assert.deepEqual(names, ["orders-step"]);
    } finally {
      await replica.close();
      await nc.close();
    }
  },
});

Deno.test({
  name: "ensureConsumer() marks what the stream stored while the consumer was being created",
  ...MARKS,
  async fn() {
    await using server = await startNatsServer();
    const nc = await connectClient(server.url, "weft-test");
    try {
      const jsm = await jetstreamManager(nc);
      await jsm.streams.add({ name: "ORDERS", subjects: ["orders.>"] });
      const js = jetstream(nc);
      await js.publish("orders.placed.a", "{}");
      // The real manager, with an order stored right after the stream's last sequence is read
      // (1), before the consumer is created: it is behind the consumer, so in its backlog.
      let first = true;
      const racing = {
        consumers: jsm.consumers,
        streams: {
          info: async (...args: Parameters<JetStreamManager["streams"]["info"]>) => {
            const info = await jsm.streams.info(...args);
            if (first) await js.publish("orders.placed.b", "{}");
            first = false;
            return info;
          },
        },
      } as unknown as JetStreamManager;
      await ensureConsumer(racing, "ORDERS", {
        durable_name: "orders-step",
        ack_policy: AckPolicy.Explicit,
        filter_subject: "orders.>",
      }, { markBacklog: true });
      const ci = await jsm.consumers.info("ORDERS", "orders-step");
      // It was marked 1: the order stored meanwhile went on unchecked, as if stored after.
      assert.equal(ci.config.metadata?.[BACKLOG_SEQ_KEY], "2", "both orders in the backlog");
    } finally {
      await nc.close();
    }
  },
});
