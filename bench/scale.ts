/**
 * `deno task bench:scale`: Weft's items/s with 1, 2 and 3 processes per step, on one
 * nats-server (streams at R1) and on a 3-node cluster (streams at R3), all on this machine.
 *
 * Each configuration is one run of `bench/pipeline.ts --only weft` (bus-fed: the
 * gateway's intake code in the bench process) in its own process, one after another, so
 * the figures share the machine with nothing else the bench starts. Prints one
 * `scale.<R>.<replicas>.<figure> value` line per figure and a Markdown table at the end;
 * `--json FILE` writes the figures as JSON.
 *
 * Flags: --replicas LIST (1,2,3), --cluster LIST (1,3: nodes; R = min(nodes, 3)), --items N
 * (10000), --rate N (100 items/s for the latency run), --duration S (10), --rounds N (1),
 * --json FILE. Environment: WEFT_* settings reach the services, as in `deno task bench`.
 *
 * @module
 */
import { parseArgs } from "node:util";

interface Row {
  nodes: number;
  replicas: number;
  itemsPerS: number;
  p50: number;
  p99: number;
  rate: number;
  allProcessed: boolean;
}

interface Options {
  items: string;
  rate: string;
  duration: string;
  rounds: string;
}

const ROOT = new URL("..", import.meta.url).pathname;
const encoder = new TextEncoder();
const say = (line: string) => Deno.stdout.writeSync(encoder.encode(`${line}\n`));

function list(v: string | undefined, d: number[], name: string): number[] {
  if (v === undefined) return d;
  const out = v.split(",").map((x) => Number(x.trim()));
  if (out.some((n) => !Number.isInteger(n) || n < 1)) {
    throw new Error(`--${name} takes a comma-separated list of positive whole numbers`);
  }
  return out;
}

async function run(nodes: number, replicas: number, o: Options): Promise<Row> {
  const json = await Deno.makeTempFile({ prefix: "weft-scale-", suffix: ".json" });
  try {
    const args = [
      "run",
      "--allow-run=nats-server,deno",
      "--allow-net=127.0.0.1,localhost",
      "--allow-read",
      "--allow-write",
      "--allow-env",
      "--allow-sys=loadavg",
      "bench/pipeline.ts",
      "--only",
      "weft",
      "--step-replicas",
      String(replicas),
      "--cluster",
      String(nodes),
      "--items",
      o.items,
      "--warmup",
      String(Math.min(1000, Math.ceil(Number(o.items) / 10))),
      "--rate",
      o.rate,
      "--duration",
      o.duration,
      "--rounds",
      o.rounds,
      "--json",
      json,
    ];
    const child = new Deno.Command("deno", {
      args,
      cwd: ROOT,
      stdout: "inherit",
      stderr: "inherit",
    }).spawn();
    const status = await child.status;
    if (!status.success) {
      throw new Error(`the run with ${nodes} node(s), ${replicas} replica(s) failed`);
    }
    const r = JSON.parse(await Deno.readTextFile(json)) as Record<string, unknown>;
    return {
      nodes,
      replicas,
      itemsPerS: Number(r["weft.items_per_s"]),
      p50: Number(r["weft.p50_ms"]),
      p99: Number(r["weft.p99_ms"]),
      rate: Number(r["weft.offered_per_s"]),
      allProcessed: r["target.state_all_processed"] === "met",
    };
  } finally {
    await Deno.remove(json).catch(() => {});
  }
}

async function main() {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      replicas: { type: "string" },
      cluster: { type: "string" },
      items: { type: "string", default: "10000" },
      rate: { type: "string", default: "100" },
      duration: { type: "string", default: "10" },
      rounds: { type: "string", default: "1" },
      json: { type: "string" },
    },
  });
  const replicaList = list(values.replicas, [1, 2, 3], "replicas");
  const clusterList = list(values.cluster, [1, 3], "cluster");
  const o: Options = {
    items: values.items!,
    rate: values.rate!,
    duration: values.duration!,
    rounds: values.rounds!,
  };
  const rows: Row[] = [];
  for (const nodes of clusterList) {
    for (const replicas of replicaList) {
      const row = await run(nodes, replicas, o);
      rows.push(row);
      const key = `scale.R${Math.min(3, nodes)}.${replicas}`;
      say(`${key}.items_per_s ${row.itemsPerS}`);
      say(`${key}.p50_ms ${row.p50}`);
      say(`${key}.p99_ms ${row.p99}`);
      say(`${key}.all_processed ${row.allProcessed}`);
    }
  }
  say("");
  say(
    `| streams | nodes | processes per step | items/s | p50 / p99 at ${o.rate}/s | all processed |`,
  );
  say("| --- | ---: | ---: | ---: | ---: | --- |");
  for (const r of rows) {
    say(
      `| R${Math.min(3, r.nodes)} | ${r.nodes} | ${r.replicas} | ${Math.round(r.itemsPerS)} | ` +
        `${r.p50} / ${r.p99} ms | ${r.allProcessed ? "yes" : "NO"} |`,
    );
  }
  if (values.json) await Deno.writeTextFile(values.json, JSON.stringify(rows, null, 2) + "\n");
}

if (import.meta.main) await main();
