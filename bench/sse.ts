/**
 * `deno task bench:sse`: ingest latency with and without many SSE clients on `/events`.
 *
 * Starts a private nats-server, the feedback services and the gateway as their own processes
 * (with the supervisor's arguments), then from this process: POSTs items at a steady rate
 * over HTTP with keep-alive and times each 202; opens N `/events` clients (a third reading,
 * a third reading slowly, a third never reading a byte) and does it again. Prints, in a
 * stable `key value` format: POST p50/p99 without and with the clients, the gateway's RSS
 * and CPU time, the reading clients' p99 delivery lag (event time to receipt), how many
 * clients the gateway cut, and the server consumers left. A measurement, never a test.
 *
 * Options: --clients N (2000), --rate N items/s (50), --seconds N per phase (10).
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
};
const config = loadConfig({ env: (n) => (env as Record<string, string>)[n], args: [] });
const nc = await connectNats(server.url, "bench-sse");
await ensureTopology(nc, await jetstreamManager(nc), config);
const names = ["state", "ingest", "sentiment", "topics", "dispatch", "gateway"];
const procs = SERVICES.filter((s) => names.includes(s.name)).map((spec) => ({
  spec,
  child: new Deno.Command("deno", {
    args: serviceArgs(spec, config),
    cwd: ROOT,
    env,
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn(),
}));
const gateway = procs.find((p) => p.spec.name === "gateway")!.child;
const base = `http://127.0.0.1:${port}`;
for (let i = 0; i < 300; i++) {
  try {
    if ((await fetch(`${base}/readyz`).then((r) => (r.body?.cancel(), r.status))) === 200) break;
  } catch { /* not listening yet */ }
  await new Promise((r) => setTimeout(r, 100));
}

async function postPhase(): Promise<number[]> {
  const times: number[] = [];
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
      times.push(res.status === 202 ? performance.now() - t0 : Infinity);
    })());
  }
  await Promise.all(pending);
  return times;
}

const quiet = await postPhase();
print("sse.clients", CLIENTS);
print("sse.rate_items_per_s", RATE);
print("post.quiet.p50_ms", pct(quiet, 0.5));
print("post.quiet.p99_ms", pct(quiet, 0.99));
const before = await statOf(gateway.pid);

// The clients: reading, slow (one read a second), and silent (raw sockets never read).
const lags: number[] = [];
const aborts = new AbortController();
const sockets: Deno.Conn[] = [];
let opened = 0;
for (let i = 0; i < CLIENTS; i++) {
  const kind = i % 3;
  if (kind === 2) {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    await conn.write(new TextEncoder().encode(
      "GET /events HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n",
    ));
    sockets.push(conn);
    opened++;
    continue;
  }
  fetch(`${base}/events`, { signal: aborts.signal }).then(async (res) => {
    opened++;
    const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    while (true) {
      if (kind === 1) await new Promise((r) => setTimeout(r, 1000));
      const { value, done } = await reader.read();
      if (done) return;
      buf += value;
      let at;
      while ((at = buf.indexOf("\n\n")) >= 0) {
        const frame = buf.slice(0, at);
        buf = buf.slice(at + 2);
        const data = frame.split("\n").find((l) => l.startsWith("data:"));
        const time = data ? JSON.parse(data.slice(5)).time : undefined;
        if (time && kind === 0) lags.push(Date.now() - Date.parse(time));
      }
    }
  }).catch(() => {});
}
const loaded = await postPhase();
const after = await statOf(gateway.pid);
let consumers = 0;
for await (const c of (await jetstreamManager(nc)).consumers.list("FEEDBACK")) {
  if (!c?.config?.durable_name) consumers++;
}
print("sse.opened", opened);
print("post.with_clients.p50_ms", pct(loaded, 0.5));
print("post.with_clients.p99_ms", pct(loaded, 0.99));
print("post.with_clients.failed", loaded.filter((t) => t === Infinity).length);
print("gateway.rss_mib.quiet", before.rssMiB);
print("gateway.rss_mib.with_clients", after.rssMiB);
print("gateway.cpu_s.during_load_phase", Math.round((after.cpuS - before.cpuS) * 10) / 10);
print("sse.reading_clients.lag_p50_ms", pct(lags, 0.5));
print("sse.reading_clients.lag_p99_ms", pct(lags, 0.99));
print("nats.ephemeral_consumers", consumers);

aborts.abort();
for (const s of sockets) s.close();
for (const p of procs) p.child.kill("SIGTERM");
await Promise.all(procs.map((p) => p.child.status));
await nc.close();
