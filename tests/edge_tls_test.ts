/**
 * An edge site's link to its hub over mutual TLS: the hub's leafnode listener presents a
 * certificate and asks every site for one signed by its CA (`WEFT_LEAF_TLS_CERT`, `_KEY`,
 * `_CA`); the site checks the hub's certificate against the same CA and presents its own.
 * A site's events then reach the hub as without TLS. A server holding the site's valid
 * nkey but the wrong certificates, or none, is refused. Certificates are made at test time
 * with openssl; everything runs on loopback.
 */
import assert from "node:assert/strict";
import { freePort, serverVersion, startNatsServer, versionAtLeast } from "../src/nats_server.ts";
import { edgeStreamConfigs, hubConf, siteConf, siteStatuses } from "../src/edge.ts";
import { ensureStream, streamConfigs } from "../src/topology.ts";
import { jetstreamManager } from "@nats-io/jetstream";
import { connectClient, testConfig } from "./helpers/nats.ts";
import { IDENTITY_DIR } from "../src/supervisor.ts";
import { type Ca, makeCa, makeCert } from "./helpers/certs.ts";
import { ONE_PROCESS, startMesh } from "./helpers/mesh.ts";
import { waitFor } from "./helpers/wait.ts";

/** Features of nats-server 2.10 and later (fsync interval, subject transforms for hubs): not run on 2.9. */
const CURRENT_SERVER = { ignore: !versionAtLeast((await serverVersion()) ?? "0.0.0", "2.10.0") };

async function getJson(url: string): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(url);
  return { status: res.status, body: await res.json() };
}

/**
 * Runs a bare nats-server configured as site "east" (the site's own nkey, so only TLS can
 * refuse it) with `tls`, under another name and domain, until its leafnode link to the hub
 * has been tried and closed; resolves with its log lines about the link.
 */
async function refusedLeaf(
  dir: string,
  name: string,
  hubLeafUrl: string,
  seed: string,
  tls: { ca?: string; cert?: string; key?: string } | undefined,
): Promise<string[]> {
  const base = `server_name: x\nlisten: 127.0.0.1:${freePort()}\n` +
    `jetstream {\n  store_dir: "${dir}/${name}-store"\n}\n`;
  const conf = siteConf(base, "east", hubLeafUrl, seed, tls)
    .replace('"weft-east"', `"weft-${name}"`)
    .replace('domain: "east"', `domain: "${name}"`);
  const file = `${dir}/${name}.conf`;
  await Deno.writeTextFile(file, conf);
  const lines: string[] = [];
  await using _server = await startNatsServer({
    configFile: file,
    cwd: dir,
    onLog: (l) => lines.push(l),
  });
  const closed = (l: string) => /leafnode connection closed/i.test(l);
  await waitFor(() => lines.some(closed) || undefined, 30_000, `${name}: its link tried`)
    .catch((err) => {
      throw new Error(`${err.message}; its log: ${lines.slice(-15).join("\n")}`);
    });
  return lines.filter((l) => /leafnode/i.test(l));
}

/** The server names of the hub's leafnode connections (its monitoring endpoint). */
async function hubLeaves(monitorPort: number): Promise<string[]> {
  const { body } = await getJson(`http://127.0.0.1:${monitorPort}/leafz`);
  return ((body.leafs ?? []) as { name: string }[]).map((l) => l.name).sort();
}

Deno.test(
  "an edge site reaches its hub over mutual TLS, and servers without the right certificates are refused",
  CURRENT_SERVER,
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "weft-leaf-tls-" });
    try {
      const ca: Ca = await makeCa(dir, "ca");
      const rogueCa: Ca = await makeCa(dir, "rogue");
      const hubCert = await makeCert(ca, "hub");
      const eastCert = await makeCert(ca, "east");
      const rogueCert = await makeCert(rogueCa, "impostor");
      const leafPort = freePort();
      const monitorPort = freePort();
      await using hub = await startMesh({
        WEFT_NATS_MONITOR_PORT: String(monitorPort),
        ...ONE_PROCESS,
        WEFT_HUB: "east",
        WEFT_LEAF_PORT: String(leafPort),
        WEFT_LEAF_TLS_CERT: hubCert.cert,
        WEFT_LEAF_TLS_KEY: hubCert.key,
        WEFT_LEAF_TLS_CA: ca.pem,
      });
      await hub.waitForLog((l) => l.msg === "weft is ready", 90_000, "the hub ready");
      const ready = hub.logs.find((l) => l.msg === "weft is ready")!;
      assert.equal(
        (ready.edge as { leafnodes: string }).leafnodes,
        `tls://127.0.0.1:${leafPort}`,
        "the hub announces its leafnode URL as TLS",
      );
      const seedFile = `${hub.storeDir}/${IDENTITY_DIR}/leaf-east.nk`;
      const hubLeafUrl = `nats-leaf://127.0.0.1:${leafPort}`;
      await using east = await startMesh({
        ...ONE_PROCESS,
        WEFT_LEAF: hubLeafUrl,
        WEFT_SITE: "east",
        WEFT_LEAF_NKEY: seedFile,
        WEFT_LEAF_TLS_CA: ca.pem,
        WEFT_LEAF_TLS_CERT: eastCert.cert,
        WEFT_LEAF_TLS_KEY: eastCert.key,
      });
      await east.waitForLog((l) => l.msg === "weft is ready", 90_000, "the site ready");

      // The hub sources the site across the TLS link, and an item posted there reaches it.
      await waitFor(
        async () => {
          const { body } = await getJson(`${hub.gatewayUrl}/sites`);
          const [site] = body.sites as { last_seen_ms: number | null }[];
          return (site?.last_seen_ms !== null && site!.last_seen_ms < 10_000) || undefined;
        },
        120_000,
        "the hub sourcing east over TLS",
      );
      const res = await fetch(`${east.gatewayUrl}/feedback`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ text: "over TLS: the export works again" }),
      });
      assert.equal(res.status, 202);
      const { id } = await res.json() as { id: string };
      const state = await waitFor(
        async () => {
          const { status, body } = await getJson(`${hub.gatewayUrl}/sites/east/feedback/${id}`);
          return status === 200 && body.status === "processed" ? body : undefined;
        },
        60_000,
        "the site's item processed, seen from the hub",
      );
      assert.equal(state.site, "east");

      assert.deepEqual(await hubLeaves(monitorPort), ["weft-east"]);

      // The site's valid nkey is not enough without the right certificates: each of these is
      // refused, and the hub still has exactly its one leaf.
      const seed = (await Deno.readTextFile(seedFile)).trim();
      // A server that does not trust the hub's certificate (another CA) refuses the hub.
      const untrusting = await refusedLeaf(dir, "untrusting", hubLeafUrl, seed, {
        ca: rogueCa.pem,
        cert: eastCert.cert,
        key: eastCert.key,
      });
      assert.ok(untrusting.some((l) => /x509: certificate signed by unknown authority/.test(l)));
      // One whose certificate another CA signed, or that has none, the hub refuses, and its
      // log says so (the server's own line is at its level only).
      for (
        const [name, tls] of [
          ["impostor", { ca: ca.pem, cert: rogueCert.cert, key: rogueCert.key }],
          ["anonymous", { ca: ca.pem }],
        ] as const
      ) {
        await refusedLeaf(dir, name, hubLeafUrl, seed, tls);
        assert.deepEqual(await hubLeaves(monitorPort), ["weft-east"], `${name} refused`);
      }
      const hubSaid = hub.logs.filter((l) =>
        l.level === "warn" && /^a site's leafnode connection .* fails its TLS handshake/.test(
          String(l.msg),
        )
      );
      // (Once a minute at most: src/edge_test.ts counts; this run may last longer than one.)
      assert.ok(hubSaid.length >= 1, "the hub says a site fails its TLS handshake");
      assert.match(String(hubSaid[0]!.msg), /WEFT_LEAF_TLS_CA/);
      // Still linked: the site's next item reaches the hub.
      const again = await fetch(`${east.gatewayUrl}/feedback`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ text: "still over TLS" }),
      });
      const next = (await again.json() as { id: string }).id;
      await waitFor(
        async () => {
          const { status } = await getJson(`${hub.gatewayUrl}/sites/east/feedback/${next}`);
          return status === 200 || undefined;
        },
        60_000,
        "the site's next item at the hub",
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);

Deno.test(
  "a site whose WEFT_LEAF_TLS_CA did not sign the hub's certificate says so in its log (the link, the x509 reason, what to check), and the hub's /sites hint names TLS as well as the key",
  CURRENT_SERVER,
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "weft-leaf-tls-ca-" });
    try {
      const ca: Ca = await makeCa(dir, "ca");
      const rogueCa: Ca = await makeCa(dir, "rogue");
      const hubCert = await makeCert(ca, "hub");
      // The hub's server as `--hub east` configures it, over TLS.
      const leafPort = freePort();
      await Deno.writeTextFile(
        `${dir}/hub.conf`,
        hubConf("", leafPort, { tls: { cert: hubCert.cert, key: hubCert.key } }),
      );
      await using hubServer = await startNatsServer({
        configFile: `${dir}/hub.conf`,
        port: freePort(),
        storeDir: `${dir}/hub`,
      });
      // The site, run by its supervisor, trusting another CA than the hub's.
      await using east = await startMesh({
        ...ONE_PROCESS,
        WEFT_LEAF: `nats-leaf://127.0.0.1:${leafPort}`,
        WEFT_SITE: "east",
        WEFT_LEAF_TLS_CA: rogueCa.pem,
      });
      const said = await east.waitForLog(
        (l) => l.level === "warn" && /fails its TLS handshake/.test(String(l.msg)),
        60_000,
        "the site saying its link fails its TLS handshake",
      );
      assert.match(
        String(said.msg),
        new RegExp(
          `^this site's link to the hub \\(127\\.0\\.0\\.1:${leafPort}\\) fails its TLS handshake: ` +
            `.*x509: certificate signed by unknown authority; this site does not trust the ` +
            `hub's certificate: WEFT_LEAF_TLS_CA`,
        ),
      );
      assert.equal(said.site, "east");
      assert.equal(said.failed, 1, "the first failure, said at once");
      // (Then at most once a minute, with a count: src/edge_test.ts.)
      await east.waitForLog((l) => l.msg === "weft is ready", 90_000, "the site ready unlinked");
      // The hub has not heard from the site: its hint names TLS as well as the key.
      const nc = await connectClient(hubServer.url, "test-hub");
      try {
        const jsm = await jetstreamManager(nc);
        const [stream] = edgeStreamConfigs(["east"], streamConfigs(testConfig(hubServer.url))[0]!);
        await ensureStream(jsm, stream!);
        const [status] = await siteStatuses(jsm, ["east"]);
        assert.match(status!.error ?? "", /^not heard from yet: .*leaf-east\.nk.*TLS/);
        assert.match(status!.error ?? "", /WEFT_LEAF_TLS_CA/);
      } finally {
        await nc.close();
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);
