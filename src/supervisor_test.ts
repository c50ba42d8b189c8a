import assert from "node:assert/strict";
import { Kvm } from "@nats-io/kv";
import { startTestNats } from "../tests/helpers/nats.ts";
import { ensureTopology, streamConfigs } from "./topology.ts";
import { loadPipelines, pipelineTopology } from "./pipeline/runtime.ts";
import { loadConfig } from "./config.ts";
import {
  confPorts,
  edgeServerConf,
  eventsGateway,
  meshPermissions,
  OPERATOR_IDENTITIES,
  plannedPorts,
  portClashes,
  processArgs,
  processGroups,
  serviceArgs,
  SERVICES,
  siteDurables,
  startWarnings,
  strayStreams,
  strayStreamsHint,
} from "./supervisor.ts";

const config = (env: Record<string, string> = {}) =>
  loadConfig({ env: (name) => env[name], args: [] });
const spec = (name: string) => SERVICES.find((s) => s.name === name)!;
const v8 = (args: string[]) => args.find((a) => a.startsWith("--v8-flags="));

Deno.test("services on an item's path run with V8's defaults, background ones optimised for size", () => {
  for (const name of ["gateway", "ingest", "sentiment", "state", "moderation"]) {
    assert.equal(v8(serviceArgs(spec(name), config())), undefined, name);
  }
  for (const name of ["scheduler", "digest", "shadow"]) {
    assert.equal(v8(serviceArgs(spec(name), config())), "--v8-flags=--optimize-for-size", name);
  }
  // Together with a service on the path, the process keeps V8's defaults.
  const together = processArgs([spec("scheduler"), spec("ingest")], config(), ["x.ts"], []);
  assert.equal(v8(together), undefined);
});

Deno.test("a process that serves HTTP has request signals abort only when a client goes away, so Deno prints no free-text warning among the JSON log lines", () => {
  const flag = "--unstable-no-legacy-abort";
  assert.ok(serviceArgs(spec("gateway"), config()).includes(flag));
  assert.ok(processArgs([spec("ingest"), spec("gateway")], config(), ["x.ts"], []).includes(flag));
  for (const name of ["ingest", "sentiment", "scheduler"]) {
    assert.ok(!serviceArgs(spec(name), config()).includes(flag), name);
  }
});

Deno.test("WEFT_V8_FLAGS reaches every service process, before the entry module", () => {
  const c = config({ WEFT_V8_FLAGS: "--max-semi-space-size=2" });
  const ingest = serviceArgs(spec("ingest"), c);
  assert.equal(v8(ingest), "--v8-flags=--max-semi-space-size=2");
  assert.ok(ingest.indexOf(v8(ingest)!) < ingest.indexOf(spec("ingest").entry));
  assert.equal(
    v8(serviceArgs(spec("digest"), c)),
    "--v8-flags=--max-semi-space-size=2,--optimize-for-size",
  );
  assert.throws(() => config({ WEFT_V8_FLAGS: "--x; rm -rf /" }), /WEFT_V8_FLAGS/);
});

Deno.test("WEFT_EVENTS_PORT: a second gateway, alone in its process, may listen on its own port only", () => {
  const c = config({ PORT: "8000", WEFT_EVENTS_PORT: "8001" });
  const events = eventsGateway(SERVICES, c.eventsPort);
  const allowNet = (args: string[]) => args.find((a) => a.startsWith("--allow-net="))!;
  assert.match(allowNet(serviceArgs(events, c)), /127\.0\.0\.1:8001/);
  assert.doesNotMatch(allowNet(serviceArgs(events, c)), /:8000\b/);
  assert.match(allowNet(serviceArgs(spec("gateway"), c)), /127\.0\.0\.1:8000/);
  // Even under --together (all): never in the process that takes ingest.
  const groups = processGroups("all", [...SERVICES, events]);
  assert.ok(groups[0]!.includes(spec("gateway")));
  assert.ok(!groups[0]!.includes(events));
  assert.ok(groups.some((g) => g.length === 1 && g[0] === events));
  // One NATS identity for the gateway, however many processes run it.
  const mesh = { services: [...SERVICES, events], operators: OPERATOR_IDENTITIES };
  assert.equal(meshPermissions(mesh).filter((p) => p.name === "gateway").length, 1);
});

Deno.test("strayStreams names the streams of no running pipeline (an earlier definition's), with how to remove one", async () => {
  await using t = await startTestNats();
  const loaded = await loadPipelines(["pipelines/examples/tickets.ts"]);
  const topology = pipelineTopology(loaded, t.config.retentionMs);
  await ensureTopology(t.nc, t.jsm, t.config, topology);
  const running = streamConfigs(t.config, topology).map((s) => s.name);
  assert.deepEqual(await strayStreams(t.jsm, running), [], "the running ones are not stray");
  assert.equal(strayStreamsHint([]), "");
  // An earlier experiment's definitions, no longer run; and a bucket, which is no stream's.
  for (const [name, bytes] of [["BADB", 2 * 1024 ** 2], ["BADC", 1024 ** 2]] as const) {
    await t.jsm.streams.add({ name, subjects: [`${name.toLowerCase()}.>`], max_bytes: bytes });
  }
  await (await new Kvm(t.nc).create("weft_badb_state")).status();
  const stray = await strayStreams(t.jsm, running);
  assert.deepEqual(stray, [{ name: "BADB", maxBytes: 2 * 1024 ** 2 }, {
    name: "BADC",
    maxBytes: 1024 ** 2,
  }]);
  const said = strayStreamsHint(stray, "data/identities/admin.nk", t.server.url);
  assert.match(said, /BADB \(2 MiB\), BADC \(1 MiB\)/);
  assert.ok(
    said.includes(`nats stream rm NAME --server ${t.server.url} --nkey data/identities/admin.nk`),
    said,
  );
  assert.equal(strayStreamsHint([{ name: "X", maxBytes: 1024 ** 3 }]).includes("X (1 GiB)"), true);
  assert.ok(!said.includes("while a start"), "a server Weft did not start keeps running");
  // A refused start stops the nats-server it began: its command needs a start that fits
  // (found by probing: the printed command answered "no servers available").
  const stopped = strayStreamsHint(stray, "data/identities/admin.nk", t.server.url, true);
  assert.match(
    stopped,
    /nats stream rm NAME .*, while a start that fits runs \(this one stops its nats-server/,
  );
});

Deno.test("the ports a start listens on: NATS's only with its own server, the conf's unless overridden", async () => {
  const conf = await Deno.readTextFile(new URL("../nats.conf", import.meta.url));
  assert.deepEqual(confPorts(conf), { client: 4222, monitor: 8222 });
  // A block's own listen (a hub's leafnodes) is not the client port.
  assert.deepEqual(
    confPorts('port: 4300\nhttp_port: 9000\nleafnodes {\n  listen: "127.0.0.1:7422"\n}'),
    { client: 4300, monitor: 9000 },
  );
  const hub = config({ WEFT_HUB: "east", WEFT_CLUSTER: "3", PORT: "7424" });
  assert.match(
    portClashes(plannedPorts(hub, { ownNats: true, conf })),
    /^PORT \(the gateway\) and WEFT_LEAF_PORT\+2 \(the hub's leafnode listener of cluster node weft-3\) are both port 7424/,
  );
  // Against a server in NATS_URL, its ports are not this start's.
  const remote = config({ PORT: "4222", WEFT_NATS_MONITOR_PORT: "4222" });
  assert.equal(portClashes(plannedPorts(remote, { ownNats: false, conf })), "");
  assert.equal(portClashes(plannedPorts(config(), { ownNats: true, conf })), "");
  // PORT=0 picks a free port: it clashes with nothing.
  assert.equal(portClashes(plannedPorts(config({ PORT: "0" }), { ownNats: true, conf })), "");
  assert.equal(startWarnings(config({ WEFT_CLUSTER: "3" })).length, 0);
  assert.equal(startWarnings(config({ WEFT_CLUSTER: "2" })).length, 1);
});

Deno.test("an edge site's server refuses the hub any request on each durable its services consume, once each", () => {
  const durables = siteDurables(SERVICES);
  assert.ok(durables.some((d) => d.stream === "FEEDBACK" && d.durable === "sentiment"));
  assert.equal(new Set(durables.map((d) => `${d.stream}/${d.durable}`)).size, durables.length);
  const conf = edgeServerConf("", { site: { name: "east", urls: "nats-leaf://h:7422", durables } });
  for (const { stream, durable } of durables) {
    assert.ok(conf.includes(`"$JS.east.API.CONSUMER.*.${stream}.${durable}"`), durable);
    assert.ok(conf.includes(`"$JS.east.API.CONSUMER.*.${stream}.${durable}.>"`), durable);
  }
});
