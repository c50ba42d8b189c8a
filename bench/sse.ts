/**
 * `deno task bench:sse`: ingest latency with and without many SSE clients on `/events`.
 *
 * Starts a private nats-server, the feedback services and the gateway as their own processes
 * (with the supervisor's arguments), then from this process: POSTs items at a steady rate
 * over HTTP with keep-alive and times each 202; has another process open N `/events`
 * clients (a third reading, a third reading slowly, a third never reading a byte;
 * bench/sse_clients.ts) and does it again while they connect and read. Prints, in a
 * stable `key value` format: POST p50/p99 without and with the clients, the gateway's RSS
 * and CPU time, the reading clients' p99 delivery lag (event time to receipt), how many
 * clients the gateway cut, and the server consumers left. A measurement, never a test.
 *
 * Options: --clients N (2000), --rate N items/s (50), --seconds N per phase (10),
 * --opens-per-s N (the gateway's WEFT_SSE_OPENS_PER_S; its default unless given; 0 unpaced),
 * --events-gateway (the clients read from a second gateway process).
 *
 * @module
 */
import { parseArgs } from "node:util";
import { jetstreamManager } from "@nats-io/jetstream";
import { loadConfig } from "../src/config.ts";
import { connectNats } from "../src/nats.ts";
import { freePort, startNatsServer } from "../src/nats_server.ts";
import { serviceArgs, SERVICES } from "../src/supervisor.ts";
import { ensureTopology } from "../src/topology.ts";

const ROOT = new URL("../", import.meta.url);
const args = parseArgs({
  args: Deno.args,
  options: {
    clients: { type: "string", default: "2000" },
    rate: { type: "string", default: "50" },
    seconds: { type: "string", default: "10" },
    "events-gateway": { type: "boolean", default: false },
    "opens-per-s": { type: "string" },
  },
});
const CLIENTS = Number(args.values.clients);
const RATE = Number(args.values.rate);
const SECONDS = Number(args.values.seconds);
const encoder = new TextEncoder();
const print = (k: string, v: unknown) => Deno.stdout.writeSync(encoder.encode(`${k} ${v}\n`));

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return Math.round((s[Math.min(s.length - 1, Math.floor(p * s.length))] ?? NaN) * 10) / 10;
}

async function statOf(pid: number): Promise<{ rssMiB: number; cpuS: number }> {
  const out = await new Deno.Command("ps", { args: ["-o", "rss=,times=", "-p", String(pid)] })
    .output();
  const [rss, times] = new TextDecoder().decode(out.stdout).trim().split(/\s+/);
  return { rssMiB: Math.round(Number(rss) / 1024), cpuS: Number(times) };
}

await using server = await startNatsServer();
const port = freePort();
const env = {
  NATS_URL: server.url,
  PORT: String(port),
  WEFT_SSE_MAX_CLIENTS: String(CLIENTS + 10),
  ...(args.values["opens-per-s"] !== undefined
    ? { WEFT_SSE_OPENS_PER_S: args.values["opens-per-s"] }
    : {}),
};
const config = loadConfig({ env: (n) => (env as Record<string, string>)[n], args: [] });
const nc = await connectNats(server.url, "bench-sse");
await ensureTopology(nc, await jetstreamManager(nc), config);
const names = ["state", "ingest", "sentiment", "topics", "dispatch", "gateway"];
// WEFT_BENCH_PROF=DIR: a V8 tick profile of the gateway in DIR/gateway.v8.log (read it with
// `node --prof-process`).
const PROF = Deno.env.get("WEFT_BENCH_PROF");
const procs = SERVICES.filter((s) => names.includes(s.name)).map((spec) => ({
  spec,
  child: new Deno.Command("deno", {
    args: PROF && spec.name === "gateway"
      ? [
        "run",
        `--v8-flags=--prof,--no-logfile-per-isolate,--logfile=${PROF}/gateway.v8.log`,
        ...serviceArgs(spec, config).slice(1),
      ]
      : serviceArgs(spec, config),
    cwd: ROOT,
    env,
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn(),
}));
const gateway = procs.find((p) => p.spec.name === "gateway")!.child;
const base = `http://127.0.0.1:${port}`;
// --events-gateway: the clients read from a second gateway process on a port of its own (as
// WEFT_EVENTS_PORT runs one), so the gateway taking POSTs never sets up or writes a stream.
const eventsPort = args.values["events-gateway"] ? freePort() : port;
const eventsBase = `http://127.0.0.1:${eventsPort}`;
let eventsGateway: Deno.ChildProcess | undefined;
if (eventsPort !== port) {
  const envE = { ...env, PORT: String(eventsPort) };
  const configE = loadConfig({ env: (n) => (envE as Record<string, string>)[n], args: [] });
  const spec = SERVICES.find((s) => s.name === "gateway")!;
  eventsGateway = new Deno.Command("deno", {
    args: serviceArgs(spec, configE),
    cwd: ROOT,
    env: envE,
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  procs.push({ spec, child: eventsGateway });
}
for (let i = 0; i < 300 && eventsGateway; i++) {
  try {
    if ((await fetch(`${eventsBase}/readyz`).then((r) => (r.body?.cancel(), r.status))) === 200) {
      break;
    }
  } catch { /* not listening yet */ }
  await new Promise((r) => setTimeout(r, 100));
}
for (let i = 0; i < 300; i++) {
  try {
    if ((await fetch(`${base}/readyz`).then((r) => (r.body?.cancel(), r.status))) === 200) break;
  } catch { /* not listening yet */ }
  await new Promise((r) => setTimeout(r, 100));
}

/** Each POST's start (performance.now()) and time to its 202 (Infinity when it failed). */
async function postPhase(): Promise<{ at: number; ms: number }[]> {
  const times: { at: number; ms: number }[] = [];
  const started = performance.now();
  const pending: Promise<void>[] = [];
  for (let i = 0; i < RATE * SECONDS; i++) {
    const due = started + (i * 1000) / RATE;
    const wait = due - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    pending.push((async () => {
      const t0 = performance.now();
      const res = await fetch(`${base}/feedback`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ text: `sse bench item ${i}: the export crashes` }),
      });
      await res.body?.cancel();
      times.push({ at: t0, ms: res.status === 202 ? performance.now() - t0 : Infinity });
    })());
  }
  await Promise.all(pending);
  return times;
}

const quiet = (await postPhase()).map((t) => t.ms);
print("sse.clients", CLIENTS);
print("sse.opens_per_s", config.sseOpensPerSecond);
print("sse.rate_items_per_s", RATE);
print("post.quiet.p50_ms", pct(quiet, 0.5));
print("post.quiet.p99_ms", pct(quiet, 0.99));
const before = await statOf(gateway.pid);
const eventsBefore = eventsGateway ? await statOf(eventsGateway.pid) : undefined;

// The clients, in their own process (bench/sse_clients.ts): reading, slow (one read a
// second), and silent (raw sockets never read). They connect while the POSTs go on.
const clients = new Deno.Command("deno", {
  args: [
    "run",
    `--allow-net=127.0.0.1:${eventsPort}`,
    "bench/sse_clients.ts",
    "--url",
    eventsBase,
    "--clients",
    String(CLIENTS),
  ],
  cwd: ROOT,
  stdin: "piped",
  stdout: "piped",
  stderr: "inherit",
}).spawn();
const clientLines = clients.stdout.pipeThrough(new TextDecoderStream()).getReader();
let clientOut = "";
const readLine = async (): Promise<string> => {
  while (!clientOut.includes("\n")) {
    const { value, done } = await clientLines.read();
    if (done) throw new Error("the SSE clients' process ended early");
    clientOut += value;
  }
  const at = clientOut.indexOf("\n");
  const line = clientOut.slice(0, at);
  clientOut = clientOut.slice(at + 1);
  return line;
};
let allOpenAt = Infinity;
const openedLine = readLine().then((line) => {
  allOpenAt = performance.now();
  return line;
});
const clientsBefore = await statOf(clients.pid);
const natsBefore = await statOf(server.pid);
const loadedTimes = await postPhase();
const clientsAfter = await statOf(clients.pid);
const natsAfter = await statOf(server.pid);
const loaded = loadedTimes.map((t) => t.ms);
// While the 2,000 connect, and once all are open and reading (or not).
const connecting = loadedTimes.filter((t) => t.at < allOpenAt).map((t) => t.ms);
const connected = loadedTimes.filter((t) => t.at >= allOpenAt).map((t) => t.ms);
const after = await statOf(gateway.pid);
let consumers = 0;
for await (const c of (await jetstreamManager(nc)).consumers.list("FEEDBACK")) {
  if (!c?.config?.durable_name) consumers++;
}
const opened = Number((await openedLine).split(" ")[1]);
await clients.stdin.close();
const { lags, opens } = JSON.parse(await readLine()) as { lags: number[]; opens: number[] };
await clients.status;
print("sse.opened", opened);
print("post.with_clients.p50_ms", pct(loaded, 0.5));
print("post.with_clients.p99_ms", pct(loaded, 0.99));
print("post.with_clients.failed", loaded.filter((t) => t === Infinity).length);
print("post.while_connecting.count", connecting.length);
print("post.while_connecting.p50_ms", pct(connecting, 0.5));
print("post.while_connecting.p99_ms", pct(connecting, 0.99));
print("post.all_connected.count", connected.length);
print("post.all_connected.p50_ms", pct(connected, 0.5));
print("post.all_connected.p99_ms", pct(connected, 0.99));
// The slowest POSTs, with when they were sent (s after all clients were open; negative:
// while they connected): spikes that line up show what caused them.
print(
  "post.slowest",
  [...loadedTimes].sort((a, b) => b.ms - a.ms).slice(0, 8)
    .map((t) => `${((t.at - allOpenAt) / 1000).toFixed(2)}s:${Math.round(t.ms)}ms`).join(","),
);
print("gateway.rss_mib.quiet", before.rssMiB);
print("gateway.rss_mib.with_clients", after.rssMiB);
print("gateway.cpu_s.during_load_phase", Math.round((after.cpuS - before.cpuS) * 10) / 10);
if (eventsGateway && eventsBefore) {
  // The second gateway, which the clients read from (--events-gateway).
  const eventsAfter = await statOf(eventsGateway.pid);
  print("events_gateway.rss_mib.with_clients", eventsAfter.rssMiB);
  print(
    "events_gateway.cpu_s.during_load_phase",
    Math.round((eventsAfter.cpuS - eventsBefore.cpuS) * 10) / 10,
  );
}
// The clients share this machine's cores with the mesh: what they and the server took.
print("clients.cpu_s.during_load_phase", clientsAfter.cpuS - clientsBefore.cpuS);
print("nats.cpu_s.during_load_phase", natsAfter.cpuS - natsBefore.cpuS);
print("phase_s", SECONDS);
print("sse.reading_clients.lag_p50_ms", pct(lags, 0.5));
print("sse.reading_clients.lag_p99_ms", pct(lags, 0.99));
// How long a client of the storm waited for its stream's headers (pacing's price).
print("sse.open_ms.p50", Math.round(pct(opens, 0.5)));
print("sse.open_ms.p99", Math.round(pct(opens, 0.99)));
print("sse.open_ms.max", Math.round(Math.max(...opens)));
print("nats.ephemeral_consumers", consumers);

for (const p of procs) p.child.kill("SIGTERM");
await Promise.all(procs.map((p) => p.child.status));
await nc.close();
