/**
 * `deno task bench:footprint`: the whole mesh's memory, as `deno task start` runs it, in
 * both modes (one process per service, and `--together`): RSS and PSS summed over the
 * supervisor, nats-server and every service process (from /proc), idle and while items
 * arrive over HTTP at `--rate` items/s for `--seconds`, plus the time to "weft is ready".
 * Prints `key value` lines. A measurement, never a test.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { freePort } from "../src/nats_server.ts";

const ROOT = new URL("../", import.meta.url);
const args = parseArgs({
  args: Deno.args,
  options: {
    rate: { type: "string", default: "1000" },
    seconds: { type: "string", default: "10" },
  },
});
const RATE = Number(args.values.rate);
const SECONDS = Number(args.values.seconds);
const encoder = new TextEncoder();
const print = (k: string, v: unknown) => Deno.stdout.writeSync(encoder.encode(`${k} ${v}\n`));

/** The start task's `deno run` arguments, from deno.json. */
async function startArgs(): Promise<string[]> {
  const deno = JSON.parse(await Deno.readTextFile(new URL("deno.json", ROOT)));
  return (deno.tasks.start.command as string).split(/\s+/).slice(1);
}

/** Runs a command and returns its stdout ("" when it fails). */
async function run(cmd: string, args: string[]): Promise<string> {
  const out = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "null" }).output();
  return out.success ? new TextDecoder().decode(out.stdout) : "";
}

/** `pid` and its descendants, with their RSS (KiB), from `ps`. */
async function tree(pid: number): Promise<{ pid: number; rss: number }[]> {
  const rows = (await run("ps", ["-e", "-o", "pid=,ppid=,rss="])).trim().split("\n")
    .map((l) => l.trim().split(/\s+/).map(Number)) as [number, number, number][];
  const out: { pid: number; rss: number }[] = [];
  const want = new Set([pid]);
  for (let grew = true; grew;) {
    grew = false;
    for (const [p, parent] of rows) {
      if (!want.has(p) && want.has(parent)) (want.add(p), grew = true);
    }
  }
  for (const [p, , rss] of rows) if (want.has(p)) out.push({ pid: p, rss });
  return out;
}

/**
 * Summed RSS and PSS (MiB) of `procs`. Deno lets only --allow-all read /proc, so PSS
 * comes from `cat /proc/<pid>/smaps_rollup` (the bench's --allow-run names cat and ps).
 */
async function memory(
  procs: { pid: number; rss: number }[],
): Promise<{ rss: number; pss: number; processes: number }> {
  let rss = 0, pss = 0;
  for (const p of procs) {
    rss += p.rss;
    pss += Number(
      /^Pss:\s+(\d+)/m.exec(await run("cat", [`/proc/${p.pid}/smaps_rollup`]))?.[1] ?? 0,
    );
  }
  return { rss: Math.round(rss / 1024), pss: Math.round(pss / 1024), processes: procs.length };
}

async function measure(mode: "per_process" | "together") {
  const dir = await Deno.makeTempDir({
    dir: new URL("data/", ROOT).pathname,
    prefix: "footprint-",
  });
  const port = freePort();
  const started = performance.now();
  const child = new Deno.Command("deno", {
    args: await startArgs(),
    cwd: ROOT,
    env: {
      PORT: String(port),
      WEFT_NATS_PORT: String(freePort()),
      WEFT_NATS_MONITOR_PORT: String(freePort()),
      WEFT_NATS_DIR: dir,
      ...(mode === "together" ? { WEFT_TOGETHER: "all" } : {}),
    },
    stdin: "null",
    stdout: "piped",
    stderr: "null",
  }).spawn();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  while (!buf.includes('"weft is ready"')) {
    const { value, done } = await lines.read();
    if (done) throw new Error(`${mode}: the mesh stopped before it was ready`);
    buf = (buf + value).slice(-4000);
  }
  print(`${mode}.ready_s`, ((performance.now() - started) / 1000).toFixed(1));
  (async () => {
    while (!(await lines.read()).done) { /* drain the logs */ }
  })();
  await new Promise((r) => setTimeout(r, 3000)); // settle
  const idle = await memory(await tree(child.pid));
  print(`${mode}.processes`, idle.processes);
  print(`${mode}.idle.rss_mib`, idle.rss);
  print(`${mode}.idle.pss_mib`, idle.pss);

  // Load: items over HTTP with keep-alive, at the offered rate.
  let accepted = 0, peak = idle;
  const end = performance.now() + SECONDS * 1000;
  const sampler = setInterval(async () => {
    const m = await memory(await tree(child.pid));
    if (m.rss > peak.rss) peak = m;
  }, 1000);
  const pending: Promise<void>[] = [];
  for (let i = 0; performance.now() < end; i++) {
    pending.push(
      fetch(`http://127.0.0.1:${port}/feedback`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ text: `footprint item ${i}: the export is broken` }),
      }).then(async (r) => {
        await r.body?.cancel();
        if (r.status === 202) accepted++;
      }).catch(() => {}),
    );
    if (i % Math.max(1, Math.round(RATE / 100)) === 0) await new Promise((r) => setTimeout(r, 10));
  }
  await Promise.all(pending);
  clearInterval(sampler);
  print(`${mode}.load.accepted_per_s`, Math.round(accepted / SECONDS));
  print(`${mode}.load.peak_rss_mib`, peak.rss);
  print(`${mode}.load.peak_pss_mib`, peak.pss);
  child.kill("SIGINT");
  await child.status;
  await Deno.remove(dir, { recursive: true }).catch(() => {});
}

print("config.rate_per_s", RATE);
print("config.seconds", SECONDS);
await measure("per_process");
await measure("together");
