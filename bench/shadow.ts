/**
 * `deno task bench:shadow`: production's end-to-end latency with and without a live shadow.
 *
 * Runs the mesh as `deno task start` does (its own nats-server), then alternates rounds
 * without and with a shadow on the sentiment step (a `rules` candidate, allowed more items
 * per second than offered), in an order that flips every round so the machine's drift
 * weighs on both alike. Each round offers `--items` items at `--rate` per second and times
 * each from its `feedback.ingested` to its `feedback.processed` (as a subscriber sees them).
 * Prints, in a stable `key value` format: p50 and p99 per condition over all rounds, each
 * round's p50/p99, and the load average before and after. A measurement, never a test.
 *
 * Options: --rounds N (4), --items N per round (100), --rate N items/s (20).
 *
 * @module
 */
import { parseArgs } from "node:util";
import { jetstreamManager } from "@nats-io/jetstream";
import { connectNats } from "../src/nats.ts";
import { startMesh } from "../tests/helpers/mesh.ts";
import { SAMPLE_FEEDBACK } from "../tests/helpers/texts.ts";
import { deadline, waitFor } from "../tests/helpers/wait.ts";

const args = parseArgs({
  args: Deno.args,
  options: {
    rounds: { type: "string", default: "4" },
    items: { type: "string", default: "100" },
    rate: { type: "string", default: "20" },
  },
});
const ROUNDS = Number(args.values.rounds);
const ITEMS = Number(args.values.items);
const RATE = Number(args.values.rate);
const encoder = new TextEncoder();
const print = (k: string, v: unknown) => Deno.stdout.writeSync(encoder.encode(`${k} ${v}\n`));
const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(s.length * p))] ?? NaN;
};
const TEXTS = SAMPLE_FEEDBACK.slice(0, 6);

print("loadavg_before", Deno.loadavg().map((x) => x.toFixed(2)).join(","));
await using mesh = await startMesh();
await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "the mesh to be ready");
const nc = await connectNats(mesh.natsUrl, "bench-shadow", mesh.credentials("ops"));
const jsm = await jetstreamManager(nc);
const ingested = new Map<string, number>();
const processed = new Map<string, number>();
let waiting: { ids: string[]; resolve: () => void } | undefined;
nc.subscribe("feedback.*.*", {
  callback: (_e, m) => {
    const [, type, id] = m.subject.split(".");
    if (type === "ingested") ingested.set(id!, performance.now());
    if (type === "processed") processed.set(id!, performance.now());
    if (waiting && waiting.ids.every((i) => processed.has(i))) waiting.resolve();
  },
});

async function round(prefix: string): Promise<number[]> {
  const ids: string[] = [];
  const start = performance.now();
  const sends: Promise<unknown>[] = [];
  for (let i = 0; i < ITEMS; i++) {
    const wait = start + (i * 1000) / RATE - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    const id = `${prefix}${i}`;
    ids.push(id);
    sends.push(
      fetch(`${mesh.gatewayUrl}/feedback`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ id, text: TEXTS[i % TEXTS.length] }),
      }).then((r) => r.body?.cancel()),
    );
  }
  await Promise.all(sends);
  await deadline(
    new Promise<void>((resolve) => {
      if (ids.every((i) => processed.has(i))) return resolve();
      waiting = { ids, resolve };
    }),
    120_000,
    `round ${prefix}`,
  );
  waiting = undefined;
  return ids.map((i) => processed.get(i)! - ingested.get(i)!);
}

async function attach(id: string) {
  const r = await fetch(`${mesh.gatewayUrl}/shadows`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      id,
      step: "sentiment",
      candidate: { analyzers: "rules", rules: "rules/reference.json" },
      limits: { rps: RATE * 5, concurrency: 8 },
    }),
  });
  if (r.status !== 201) throw new Error(`attach: ${r.status} ${await r.text()}`);
  await r.body?.cancel();
  await mesh.waitForLog((l) => l.msg === "shadow started" && l.shadow === id, 30_000, id);
}

async function detach(id: string) {
  const r = await fetch(`${mesh.gatewayUrl}/shadows/${id}`, { method: "DELETE" });
  await r.body?.cancel();
  await waitFor(
    () => jsm.consumers.info("FEEDBACK", `shadow_${id}`).then(() => false, () => true),
    30_000,
    `${id} detached`,
  );
}

try {
  await round("warm");
  const all: Record<"off" | "on", number[]> = { off: [], on: [] };
  for (let r = 0; r < ROUNDS; r++) {
    const order: ("off" | "on")[] = r % 2 === 0 ? ["off", "on"] : ["on", "off"];
    for (const condition of order) {
      const id = `b${r}`;
      if (condition === "on") await attach(id);
      const ms = await round(`${condition}${r}-`);
      if (condition === "on") await detach(id);
      all[condition].push(...ms);
      print(
        `round_${r}_${condition}_p50_p99_ms`,
        `${pct(ms, 0.5).toFixed(2)} ${pct(ms, 0.99).toFixed(2)}`,
      );
    }
  }
  for (const c of ["off", "on"] as const) {
    print(`${c}_items`, all[c].length);
    print(`${c}_p50_ms`, pct(all[c], 0.5).toFixed(2));
    print(`${c}_p99_ms`, pct(all[c], 0.99).toFixed(2));
  }
} finally {
  await nc.close();
  print("loadavg_after", Deno.loadavg().map((x) => x.toFixed(2)).join(","));
}
