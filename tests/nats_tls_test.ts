/**
 * NATS over TLS: clients verify the server's certificate against the CA in WEFT_NATS_CA,
 * cluster routes verify each other both ways, and a Weft stage runs over it. Certificates
 * are made at test time with openssl; the servers are real, on loopback.
 */
import assert from "node:assert/strict";
import { jetstreamManager } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import { connectNats, type NatsCredentials } from "../src/nats.ts";
import { freePort, type NatsServer, startNatsServer } from "../src/nats_server.ts";
import { loadConfig } from "../src/config.ts";
import { ensureTopology } from "../src/topology.ts";
import { type Ca, makeCa, makeCert } from "./helpers/certs.ts";
import { startService } from "./helpers/mesh.ts";
import { waitFor } from "./helpers/wait.ts";

interface Node {
  server: NatsServer;
  log: string[];
}

/** Starts one cluster node whose client port and routes both require TLS from `ca`. */
async function startNode(
  dir: string,
  name: string,
  ca: Ca,
  routePort: number,
  routes: number[],
): Promise<Node> {
  const { cert, key } = await makeCert(ca, name);
  const tls = `{ cert_file: "${cert}", key_file: "${key}", ca_file: "${ca.pem}", timeout: 5`;
  const conf = `${dir}/${name}.conf`;
  await Deno.writeTextFile(
    conf,
    `server_name: ${name}
listen: 127.0.0.1:${freePort()}
tls ${tls} }
jetstream { store_dir: "${dir}/${name}-store" }
cluster {
  name: weft-tls
  listen: 127.0.0.1:${routePort}
  routes: [${routes.map((p) => `"nats-route://127.0.0.1:${p}"`).join(", ")}]
  # Routes present certificates both ways, and each end checks the other's against the CA.
  tls ${tls}, verify: true }
}
`,
  );
  const log: string[] = [];
  const server = await startNatsServer({ configFile: conf, cwd: dir, onLog: (l) => log.push(l) });
  return { server, log };
}

Deno.test("NATS over TLS: clients and routes verify certificates, and a stage runs over it", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "weft-nats-tls-" });
  const nodes: Node[] = [];
  try {
    const ca = await makeCa(dir, "ca");
    const rogue = await makeCa(dir, "rogue");
    const [routeA, routeB, routeR] = [freePort(), freePort(), freePort()];
    nodes.push(await startNode(dir, "node-a", ca, routeA!, [routeB!]));
    nodes.push(await startNode(dir, "node-b", ca, routeB!, [routeA!]));
    const [a, b] = nodes as [Node, Node];

    await t.step("the two nodes form a cluster over verified TLS routes", async () => {
      await waitFor(
        () => a.log.some((l) => /Route connection created/.test(l)) || undefined,
        20_000,
        "a route between the nodes",
      );
      const pub = await connectNats(a.server.url, "tls-pub", { caFile: ca.pem });
      const sub = await connectNats(b.server.url, "tls-sub", { caFile: ca.pem });
      try {
        const got = sub.subscribe("tls.hello", { max: 1 });
        await sub.flush();
        // The interest reaches node A over the route; publish until it does.
        const received = (async () => {
          for await (const m of got) return m.string();
        })();
        await waitFor(
          async () => {
            pub.publish("tls.hello", "over the route");
            await pub.flush();
            return got.getReceived() > 0 || undefined;
          },
          20_000,
          "a message across the route",
        );
        assert.equal(await received, "over the route");
      } finally {
        await pub.close();
        await sub.close();
      }
    });

    await t.step("a client that does not trust the server's CA is refused", async () => {
      await assert.rejects(connect({ servers: a.server.url, reconnect: false }));
      await assert.rejects(
        connect({ servers: a.server.url, reconnect: false, tls: { caFile: rogue.pem } }),
        "a CA other than the server's",
      );
    });

    await t.step("a node whose certificate another CA signed cannot join", async () => {
      const seen = a.log.length;
      const r = await startNode(dir, "node-r", rogue, routeR!, [routeA!]);
      nodes.push(r);
      // The rogue dials node A's route port: a route (rid), refused in the TLS handshake.
      await waitFor(
        () =>
          [...a.log.slice(seen), ...r.log].some((l) => /rid:\d+ .*TLS.*handshake error/i.test(l)) ||
          undefined,
        20_000,
        "the rogue route refused",
      );
      assert.ok(!r.log.some((l) => /Route connection created/.test(l)), "no route to the rogue");
    });

    await t.step("a Weft stage connects with WEFT_NATS_CA and runs over TLS", async () => {
      const nc = await connectNats(a.server.url, "tls-test", { caFile: ca.pem });
      try {
        const config = { ...loadConfig({ env: () => undefined, args: [] }), natsUrl: a.server.url };
        // JetStream elects its meta leader once the cluster is up.
        await waitFor(
          async () => {
            await ensureTopology(nc, await jetstreamManager(nc), config);
            return true;
          },
          30_000,
          "JetStream ready on the cluster",
        );
        await using _ingest = await startService("ingest", {
          NATS_URL: a.server.url,
          WEFT_NATS_CA: ca.pem,
        });
        nc.publish("feedback.submit", JSON.stringify({ id: "TLS1", text: "over TLS" }));
        const jsm = await jetstreamManager(nc);
        const stored = await waitFor(
          async () =>
            (await jsm.streams.getMessage("FEEDBACK", {
              last_by_subj: "feedback.ingested.TLS1",
            })) ??
              undefined,
          20_000,
          "the ingested event",
        );
        assert.equal(stored.json<{ item_id: string }>().item_id, "TLS1");
      } finally {
        await nc.close();
      }
    });
  } finally {
    for (const n of nodes.reverse()) await n.server.stop();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});

Deno.test("mutual TLS: a server that verifies clients admits only certificates its CA signed, and a Weft stage presents WEFT_NATS_CERT", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "weft-nats-mtls-" });
  let server: NatsServer | undefined;
  try {
    const ca = await makeCa(dir, "ca");
    const rogue = await makeCa(dir, "rogue");
    const serverCert = await makeCert(ca, "server");
    const client = await makeCert(ca, "client");
    const forged = await makeCert(rogue, "forged");
    const conf = `${dir}/mtls.conf`;
    await Deno.writeTextFile(
      conf,
      `listen: 127.0.0.1:${freePort()}
# verify: true asks every client for a certificate and checks it against ca_file.
tls { cert_file: "${serverCert.cert}", key_file: "${serverCert.key}", ca_file: "${ca.pem}", verify: true, timeout: 5 }
jetstream { store_dir: "${dir}/store" }
`,
    );
    server = await startNatsServer({ configFile: conf, cwd: dir });
    const url = server.url;
    // Through connectNats, as every service connects: the refusal rejects the connect, and
    // the TLS alert the server sends after it (`received fatal alert: CertificateRequired`
    // or `UnknownCA`) must not surface as an uncaught error that ends the process. A few
    // attempts each, since the alert's timing varies; each ends at the 2 s connect timeout.
    const refused = async (creds: NatsCredentials) => {
      for (let i = 0; i < 3; i++) {
        await assert.rejects(connectNats(url, "mtls-refused", creds, { timeoutMs: 2_000 }));
      }
    };

    await t.step("a client with no certificate, or one another CA signed, is refused", async () => {
      await refused({ caFile: ca.pem });
      await refused({ caFile: ca.pem, certFile: forged.cert, keyFile: forged.key });
    });

    await t.step(
      "a stage with WEFT_NATS_CA, WEFT_NATS_CERT and WEFT_NATS_KEY runs over it",
      async () => {
        const creds = { caFile: ca.pem, certFile: client.cert, keyFile: client.key };
        const nc = await connectNats(url, "mtls-test", creds);
        try {
          const config = { ...loadConfig({ env: () => undefined, args: [] }), natsUrl: url };
          const jsm = await jetstreamManager(nc);
          await ensureTopology(nc, jsm, config);
          await using _ingest = await startService("ingest", {
            NATS_URL: url,
            WEFT_NATS_CA: ca.pem,
            WEFT_NATS_CERT: client.cert,
            WEFT_NATS_KEY: client.key,
          });
          nc.publish("feedback.submit", JSON.stringify({ id: "MTLS1", text: "over mutual TLS" }));
          const stored = await waitFor(
            async () =>
              (await jsm.streams.getMessage("FEEDBACK", {
                last_by_subj: "feedback.ingested.MTLS1",
              }).catch(() => null)) ?? undefined,
            20_000,
            "the ingested event",
          );
          assert.equal(stored.json<{ item_id: string }>().item_id, "MTLS1");
        } finally {
          await nc.close();
        }
      },
    );

    await t.step("the configuration refuses a client certificate without its key", () => {
      assert.throws(
        () =>
          loadConfig({
            env: (n) => (n === "WEFT_NATS_CERT" ? client.cert : undefined),
            args: [],
          }),
        /WEFT_NATS_CERT and WEFT_NATS_KEY go together/,
      );
    });
  } finally {
    await server?.stop();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});
