/**
 * `deno task bench`: Weft's end-to-end throughput and latency against a bare JetStream
 * pipeline and the same pipeline on BullMQ + Redis, in the same run on the same machine.
 *
 * (a) bare: four `bench/bare_stage.ts` processes, each a durable pull consumer with
 *     explicit acks forwarding every message to the next subject with a publish ack
 *     (bench.s1 -> bench.s2 -> bench.s3 -> bench.s4 -> bench.done, stream BENCH).
 * (b) weft: the real services (state, sentiment, topics, dispatch) as separate processes
 *     started with the supervisor's arguments, measured up to each item's
 *     `feedback.processed.<id>` event; afterwards every item's entry in the state bucket
 *     must say `processed`. Fed three ways, one at a time:
 *     - `weft`: through the gateway's own intake code (`createIntake(nc).submit()`, what
 *       POST /feedback calls) in the bench process, without HTTP (bus-fed);
 *     - `weft_http`: POST /feedback, one item a request, and
 *     - `weft_http_batch`: POST /feedback/batch (`--batch` items a request), both to the
 *       real gateway (services/gateway.ts, started as the supervisor starts it) over
 *       keep-alive HTTP from a separate load generator process (`bench/http_load.ts`).
 * (c) bullmq: the same four stages on BullMQ workers (`bench/bullmq_stage.ts`, one
 *     process each, forwarding each job unchanged to the next queue) on a redis-server
 *     the bench starts (append-only file, `appendfsync everysec`); skipped with a note
 *     when redis-server is not on PATH.
 *
 * For each: items/s pushing N items with a bounded number of submissions in flight, then
 * latency at an offered load paced by the clock (not by completions) for a fixed time,
 * measured from each item's scheduled send time, so a stalled sender cannot hide delay.
 * Prints `key value` lines; `--json FILE` writes the same figures as JSON.
 *
 * Flags: --items N (20000), --warmup N (1000), --window N (256 in flight), --rate N
 * (500 items/s), --duration S (10), --rounds N (3; figures are medians over rounds),
 * --quick (3000 items, 300 warm-up, 3 s, 1 round), --only LIST (comma-separated sides:
 * bare, weft, http (both HTTP feeds), http-single, http-batch, bullmq; for profiling),
 * --batch N (50 items per POST /feedback/batch), --connections N (64 keep-alive HTTP
 * connections, the load generator's requests in flight at most), --bullmq-concurrency N
 * (Weft's concurrency: WEFT_CONCURRENCY or its default), --prof NAMES (V8 tick profiles of those processes, e.g. gateway,http-load,
 * sentiment, bare1, bullmq-ingest; the folder is printed), --hops (per-hop latency of
 * Weft), --bare-subjects stage|item (`item`: the bare pipeline publishes each message on
 * `bench.sN.<id>` under wildcard filters, the shape of Weft's subjects; see
 * docs/BENCH.md), --step-replicas N (1: processes of each Weft step, sentiment, topics and
 * dispatch, on its one durable consumer), --cluster N (1: Weft on an N-node nats-server
 * cluster on loopback, every stream and bucket at R min(N, 3), the services connected to
 * every node; only with --only weft/http), --together (Weft's services in one process, as
 * `deno task start --together`), --json FILE. `deno task bench:scale` runs the
 * replica and R1/R3 matrix (bench/scale.ts).
 * Environment: WEFT_* settings (e.g. WEFT_CONCURRENCY) reach the Weft services.
 *
 * @module
 */
import { benchAnalyzers } from "../src/ai/analyzers/bench.ts";
import { parseArgs } from "node:util";
import type { NatsConnection } from "@nats-io/nats-core";
import {
  AckPolicy,
  DeliverPolicy,
  jetstream,
  type JetStreamClient,
  type JetStreamManager,
  jetstreamManager,
  RetentionPolicy,
  StorageType,
} from "@nats-io/jetstream";
import { type Config, loadConfig, unknownFlags } from "../src/config.ts";
import { ConfigError } from "../src/errors.ts";
import { connectNats } from "../src/nats.ts";
import {
  freePort,
  type NatsServer,
  parseSyncInterval,
  portFree,
  startNatsServer,
  withSyncInterval,
} from "../src/nats_server.ts";
import { createLogger } from "../src/observability/log.ts";
import { BENCH_TEXTS } from "./texts.ts";
import { createIntake } from "../pipelines/feedback/intake.ts";
import {
  processArgs,
  serviceArgs,
  SERVICES,
  startCluster,
  TOGETHER_ENTRY,
  writeAuthConfig,
} from "../src/supervisor.ts";
import { FEEDBACK_STREAM, STATE_BUCKET } from "../pipelines/feedback/subjects.ts";
import { FeedbackEventType } from "../pipelines/feedback/events.ts";
import { FEEDBACK_STATE_SPEC } from "../pipelines/feedback/state.ts";
import { ensureTopology } from "../src/topology.ts";
import type { FeedbackState } from "../pipelines/feedback/events.gen.ts";
import { Queue } from "bullmq";
import { Redis } from "ioredis";
import { DONE_CHANNEL, JOB_OPTIONS } from "./bullmq_stage.ts";
import { clockOffset, type ClockSample, dueSends, percentile } from "./stats.ts";

/** Each NATS identity's seed file: the bench's server authenticates like deno task start's. */
let seeds: Map<string, string> | undefined;

const ROOT = new URL("..", import.meta.url).pathname;
const BARE_STREAM = "BENCH";
const BARE_STAGES = 4;
const BARE_FINAL = "bench.done";
const WEFT_SERVICES = ["state", "sentiment", "topics", "dispatch"];
/** The steps `--step-replicas` runs several of (the state writer stays one process). */
const STEPS = ["sentiment", "topics", "dispatch"];
/** Issue 15's aims, as ratios within one run: Weft's items/s to bare's and to BullMQ's. */
const AIM_VS_BARE = 0.9;
const AIM_VS_BULLMQ = 1.2;
/** And Weft's p99 at the offered rate to bare's. */
const AIM_P99_VS_BARE = 1.5;

const TEXTS = BENCH_TEXTS;

/** The sides a run can measure, in the order they run in each phase. */
const SIDES = ["bare", "weft", "weft_http", "weft_http_batch", "bullmq"] as const;
type SideName = typeof SIDES[number];

/** `--only` names: each side by its flag name, `http` for both HTTP feeds. */
const ONLY: Record<string, SideName[]> = {
  bare: ["bare"],
  weft: ["weft"],
  http: ["weft_http", "weft_http_batch"],
  "http-single": ["weft_http"],
  "http-batch": ["weft_http_batch"],
  bullmq: ["bullmq"],
};

interface Options {
  items: number;
  warmup: number;
  window: number;
  rate: number;
  durationS: number;
  json?: string;
  /** The sides to run (`--only`, for profiling); every side by default. */
  sides: Set<SideName>;
  /** Items per POST /feedback/batch. */
  batch: number;
  /** Jobs each BullMQ worker runs at once. */
  bullmqConcurrency: number;
  /** The HTTP load generator's keep-alive connections (its requests in flight at most). */
  connections: number;
  /** Processes (e.g. gateway,http-load,sentiment) to run with V8's tick profiler. */
  prof: string[];
  /** Throughput and latency runs per side, alternating; figures are medians. */
  rounds: number;
  /** Also time each hop of Weft's latency runs (costs the bench a subscription). */
  hops: boolean;
  /**
   * The bare pipeline's subjects: `stage` (`bench.s1`, one per stage: the reference) or
   * `item` (`bench.s1.<id>` under a wildcard filter, the shape of Weft's subjects).
   */
  bareSubjects: "stage" | "item";
  /** Processes of each Weft step (sentiment, topics, dispatch) on its durable consumer. */
  stepReplicas: number;
  /** Nodes of the nats-server cluster Weft runs on (1: one server). */
  cluster: number;
  /** The server's `sync_interval` (`always`, `1s`, `2m`...): WEFT_NATS_SYNC's, as `deno task start`. */
  sync: string;
  /** Weft's services in one process (`--together`, as `deno task start --together` runs them). */
  together: boolean;
}

/** `--sync`: a `sync_interval` nats-server takes. */
function sync(raw: string): string {
  const v = parseSyncInterval(raw);
  if (!v) throw new ConfigError("--sync takes always or a duration such as 1s or 500ms");
  return v;
}

/** What `deno task bench --help` prints (docs/BENCH.md says more). */
const USAGE = `deno task bench: Weft end to end against a bare JetStream pipeline and BullMQ + Redis
(docs/BENCH.md). It starts its own nats-server, services and redis-server on free random
loopback ports (20000-32000): it needs none of the mesh's ports and no mesh running.

  deno task bench [flags]             20,000 items, 10 s at 500 items/s, 3 rounds (~10 min)

Flags:
  --items N                 items of each throughput run (20000)
  --warmup N                warm-up items before each run (1000)
  --window N                submissions in flight in a throughput run (256)
  --rate N                  offered load of the latency runs, items/s (500)
  --duration S              seconds of each latency run (10)
  --rounds N                runs per side, alternating; figures are medians (3)
  --quick                   3,000 items, 300 warm-up, 3 s, 1 round
  --only LIST               some sides only, comma-separated: bare, weft (bus-fed), http (both
                            HTTP feeds), http-single, http-batch, bullmq
  --batch N                 items per POST /feedback/batch (50)
  --connections N           the HTTP load generator's keep-alive connections (64)
  --bullmq-concurrency N    jobs each BullMQ worker runs at once (WEFT_CONCURRENCY, 256)
  --prof NAMES              V8 tick profiles of those processes (gateway, http-load, sentiment,
                            bare1, bullmq-ingest, ...); the folder of the logs is printed
  --json FILE               also write the figures as JSON
  --hops                    also print p50/p90/p99 of each hop of Weft's latency runs
  --bare-subjects stage|item  one subject per stage (stage), or per item like Weft's (item)
  --sync always|DURATION    the server's sync_interval (WEFT_NATS_SYNC, 1s)
  --step-replicas N         processes of each Weft step on its durable consumer (1)
  --cluster N               Weft on an N-node nats-server cluster (1; with --only weft or http)
  --together                Weft's services in one process, as deno task start --together
  -h, --help                this text

WEFT_* settings in the environment (e.g. WEFT_CONCURRENCY=32) reach the Weft services.`;

/** The bench's flags, without `--`. */
const FLAGS = {
  items: { type: "string" },
  warmup: { type: "string" },
  window: { type: "string" },
  rate: { type: "string" },
  duration: { type: "string" },
  quick: { type: "boolean" },
  json: { type: "string" },
  only: { type: "string" },
  batch: { type: "string" },
  "bullmq-concurrency": { type: "string" },
  connections: { type: "string" },
  prof: { type: "string" },
  rounds: { type: "string" },
  hops: { type: "boolean" },
  "bare-subjects": { type: "string" },
  "step-replicas": { type: "string" },
  cluster: { type: "string" },
  sync: { type: "string" },
  together: { type: "boolean" },
} as const;

/**
 * Refuses a flag that is none of the bench's (naming it, and the likely one meant) and any
 * argument that is no flag's value, before anything starts: a typo never runs ten minutes
 * of bench with the defaults.
 */
function refuseUnknown(args: string[]): void {
  const hint = "`deno task bench --help` lists them";
  const unknown = unknownFlags(args, Object.keys(FLAGS));
  const strays: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    if (arg.startsWith("--")) {
      const name = arg.slice(2).split("=", 1)[0]!;
      // A string flag's value follows it unless given with `=`; a boolean flag takes none.
      if (!arg.includes("=") && FLAGS[name as keyof typeof FLAGS]?.type === "string") i++;
    } else if (arg.startsWith("-")) unknown.push(arg);
    else strays.push(arg);
  }
  if (unknown.length > 0) {
    throw new ConfigError(
      `unknown flag${unknown.length > 1 ? "s" : ""}: ${unknown.join(", ")}; ${hint}`,
    );
  }
  if (strays.length > 0) {
    throw new ConfigError(
      `unexpected argument${strays.length > 1 ? "s" : ""}: ${strays.join(" ")}; ${hint}`,
    );
  }
}

/**
 * The flags' values; a string flag without its value (`--rate` last) or a boolean given one
 * (`--quick=yes`) is one line, as an unknown flag is, not parseArgs' TypeError and stack.
 */
function parsedFlags(args: string[]) {
  try {
    return parseArgs({ args, options: FLAGS });
  } catch (err) {
    if ((err as { code?: string }).code !== "ERR_PARSE_ARGS_INVALID_OPTION_VALUE") throw err;
    throw new ConfigError(`${(err as Error).message}; \`deno task bench --help\` lists them`);
  }
}

function options(args: string[]): Options {
  refuseUnknown(args);
  const { values } = parsedFlags(args);
  const sides = new Set<SideName>();
  for (const name of (values.only ?? Object.keys(ONLY).join(",")).split(",")) {
    const named = ONLY[name.trim()];
    if (!named) throw new ConfigError(`--only takes a list of ${Object.keys(ONLY).join(", ")}`);
    for (const side of named) sides.add(side);
  }
  const bareSubjects = values["bare-subjects"] ?? "stage";
  if (bareSubjects !== "stage" && bareSubjects !== "item") {
    throw new ConfigError("--bare-subjects must be stage or item");
  }
  const quick = values.quick === true;
  const num = (v: string | undefined, d: number, name: string) => {
    if (v === undefined) return d;
    const n = Number(v);
    if (!Number.isFinite(n) || n <= 0) throw new ConfigError(`--${name} must be a positive number`);
    return n;
  };
  // A count: a whole number, so 0.5 items is refused rather than floored to none.
  const int = (v: string | undefined, d: number, name: string) => {
    const n = num(v, d, name);
    if (!Number.isSafeInteger(n)) {
      throw new ConfigError(`--${name} must be a positive whole number`);
    }
    return n;
  };
  return {
    items: int(values.items, quick ? 3000 : 20_000, "items"),
    warmup: int(values.warmup, quick ? 300 : 1000, "warmup"),
    window: int(values.window, 256, "window"),
    rate: num(values.rate, 500, "rate"),
    durationS: num(values.duration, quick ? 3 : 10, "duration"),
    json: values.json,
    sides,
    batch: Math.min(1000, int(values.batch, 50, "batch")),
    // BullMQ handles as many jobs at once as a Weft stage does, unless told otherwise.
    bullmqConcurrency: int(
      values["bullmq-concurrency"],
      weftDefaults().concurrency,
      "bullmq-concurrency",
    ),
    connections: int(values.connections, 64, "connections"),
    prof: values.prof?.split(",").map((n) => n.trim()).filter((n) => n !== "") ?? [],
    rounds: int(values.rounds, quick ? 1 : 3, "rounds"),
    hops: values.hops === true,
    bareSubjects,
    stepReplicas: int(values["step-replicas"], 1, "step-replicas"),
    cluster: clusterNodes(int(values.cluster, 1, "cluster"), sides),
    sync: sync(values.sync ?? weftDefaults().natsSync),
    together: values.together === true,
  };
}

/** `--cluster N`: a cluster runs Weft only (the bare and BullMQ sides have no replicas). */
function clusterNodes(n: number, sides: Set<SideName>): number {
  if (n > 1 && (sides.has("bare") || sides.has("bullmq"))) {
    throw new ConfigError("--cluster runs Weft only: add --only weft (or http)");
  }
  if (n > 5) throw new ConfigError("--cluster takes 1 to 5 nodes");
  return n;
}

// ---------------------------------------------------------------- child processes

interface Proc {
  name: string;
  child: Deno.ChildProcess;
  tail: string[];
  stopping: boolean;
}

const procs = new Set<Proc>();
/** `--prof NAMES`: the processes to run with V8's tick profiler, and where their logs go. */
let profile: { names: Set<string>; dir: string } | undefined;
let failure: (err: Error) => void = () => {};
/** Rejects as soon as a child process dies unexpectedly; every wait races it. */
const failed = new Promise<never>((_, reject) => (failure = reject));
failed.catch(() => {});

async function keepTail(stream: ReadableStream<Uint8Array>, tail: string[]) {
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    for (const line of chunk.split("\n")) {
      if (line.trim() === "") continue;
      tail.push(line);
      if (tail.length > 30) tail.shift();
    }
  }
}

/**
 * Starts a child process the bench watches: its output's tail is kept, and its dying
 * unexpectedly fails the run. With `piped`, stdin is the caller's and so is stdout.
 */
function spawn(
  name: string,
  args: string[],
  env: Record<string, string> = {},
  opts: { command?: string; piped?: boolean } = {},
): Proc {
  const command = opts.command ?? "deno";
  if (command === "deno" && profile?.names.has(name)) {
    // A V8 tick profile of this process (`--prof`): read it with `node --prof-process`.
    args = [
      args[0]!,
      `--v8-flags=--prof,--no-logfile-per-isolate,--logfile=${profile.dir}/${name}.v8.log`,
      ...args.slice(1),
    ];
  }
  const child = new Deno.Command(command, {
    args,
    cwd: ROOT,
    env,
    stdin: opts.piped ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const p: Proc = { name, child, tail: [], stopping: false };
  procs.add(p);
  if (!opts.piped) keepTail(child.stdout, p.tail).catch(() => {});
  keepTail(child.stderr, p.tail).catch(() => {});
  child.status.then((s) => {
    procs.delete(p);
    if (!p.stopping) {
      failure(new Error(`${name} exited unexpectedly (${s.code}):\n${p.tail.join("\n")}`));
    }
  });
  return p;
}

async function stopProc(p: Proc, signal: Deno.Signal = "SIGTERM"): Promise<void> {
  p.stopping = true;
  try {
    p.child.kill(signal);
  } catch { /* already gone */ }
  let timer: ReturnType<typeof setTimeout> | undefined;
  const killed = new Promise<void>((r) => {
    timer = setTimeout(() => {
      try {
        p.child.kill("SIGKILL");
      } catch { /* gone */ }
      r();
    }, 15_000);
  });
  await Promise.race([p.child.status.then(() => {}), killed]);
  clearTimeout(timer);
  await p.child.status;
}

// ---------------------------------------------------------------- measuring

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Races `p` with a deadline and with any child dying. */
async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([p, deadline, failed]);
  } finally {
    clearTimeout(timer);
  }
}

/** Matches final events to submissions (a final event may beat its submit's reply). */
class Tracker {
  readonly sentAt = new Map<string, number>();
  readonly early = new Map<string, number>();
  readonly latencies: number[] = [];
  firstSent = Infinity;
  lastFinal = 0;
  private done = 0;
  private expected = Infinity;
  private resolve: () => void = () => {};
  readonly all = new Promise<void>((r) => (this.resolve = r));

  sent(id: string, at: number) {
    if (at < this.firstSent) this.firstSent = at;
    const t = this.early.get(id);
    if (t !== undefined) {
      this.early.delete(id);
      this.finish(t - at, t);
    } else this.sentAt.set(id, at);
  }

  final(id: string, at: number) {
    const t = this.sentAt.get(id);
    if (t === undefined) {
      this.early.set(id, at);
      return;
    }
    this.sentAt.delete(id);
    this.finish(at - t, at);
  }

  expect(n: number) {
    this.expected = n;
    if (this.done >= n) this.resolve();
  }

  get count() {
    return this.done;
  }

  private finish(latency: number, at: number) {
    this.latencies.push(latency);
    if (at > this.lastFinal) this.lastFinal = at;
    if (++this.done >= this.expected) this.resolve();
  }
}

/**
 * A pipeline under test, and how it is fed: by `submit` in this process (one item, its id
 * once accepted), or by an outside load generator (`load`) that reports accepted ids.
 */
interface Target {
  name: SideName;
  submit?(i: number): Promise<string>;
  load?: ExternalLoad;
  /** Receives final events; routes them to the current tracker. */
  tracker: Tracker;
  /** Resolves when work off the item's path (e.g. the state writer) has caught up too. */
  drained(): Promise<void>;
  /** With `--hops`: times each hop of the items seen since `reset()`. */
  hops?: HopProbe;
}

/**
 * `--hops`: when each of an item's events reached a core subscription on every event
 * subject, so a latency run can be split into its hops. One clock (the bench's) for all.
 */
class HopProbe {
  private seen = new Map<string, Map<string, number>>();
  constructor(readonly types: readonly string[]) {}

  event(type: string, id: string, at: number) {
    let item = this.seen.get(id);
    if (!item) this.seen.set(id, item = new Map());
    item.set(type, at);
  }

  reset() {
    this.seen.clear();
  }

  /** p50/p90/p99 ms of each hop, over the items that went through every type. */
  report(): string[] {
    const gaps = this.types.slice(1).map(() => [] as number[]);
    for (const item of this.seen.values()) {
      const times = this.types.map((t) => item.get(t));
      if (times.some((t) => t === undefined)) continue;
      for (let i = 1; i < times.length; i++) gaps[i - 1]!.push(times[i]! - times[i - 1]!);
    }
    const round = (x: number) => Math.round(x * 10) / 10;
    return gaps.map((g, i) => {
      g.sort((a, b) => a - b);
      const q = [0.5, 0.9, 0.99].map((p) => round(percentile(g, p))).join(" / ");
      return `${this.types[i]} -> ${this.types[i + 1]} p50 / p90 / p99 ms ${q} (${g.length} items)`;
    });
  }
}

/** A load generator in another process: it reports each accepted item's send time. */
interface ExternalLoad {
  /** `n` items with at most `window` awaiting an answer; resolves once all are answered. */
  throughput(n: number, window: number, tracker: Tracker): Promise<void>;
  /** `rate` items/s for `seconds`; resolves with the seconds sending took, once answered. */
  latency(rate: number, seconds: number, tracker: Tracker): Promise<number>;
}

async function throughput(
  t: Target,
  n: number,
  window: number,
): Promise<{ itemsPerS: number; drainedPerS: number }> {
  t.tracker = new Tracker();
  const tracker = t.tracker;
  const run = (async () => {
    if (t.load) {
      await t.load.throughput(n, window, tracker);
      tracker.expect(n);
      await tracker.all;
      await t.drained();
      return performance.now();
    }
    const submit = t.submit!;
    let inFlight = 0;
    let wake: (() => void) | undefined;
    for (let i = 0; i < n; i++) {
      while (inFlight >= window) await new Promise<void>((r) => (wake = r));
      inFlight++;
      const at = performance.now();
      submit(i).then((id) => {
        tracker.sent(id, at);
        inFlight--;
        wake?.();
      }, (err) => failure(err));
    }
    tracker.expect(n);
    await tracker.all;
    await t.drained();
    return performance.now();
  })();
  const drainedAt = await within(
    run,
    120_000 + n * 10,
    `${t.name}: ${n} items (${tracker.count} done)`,
  );
  return {
    itemsPerS: n / ((tracker.lastFinal - tracker.firstSent) / 1000),
    drainedPerS: n / ((drainedAt - tracker.firstSent) / 1000),
  };
}

interface Latency {
  offered_per_s: number;
  p50_ms: number;
  p90_ms: number;
  p99_ms: number;
  max_ms: number;
}

async function latency(t: Target, rate: number, durationS: number): Promise<Latency> {
  t.tracker = new Tracker();
  const tracker = t.tracker;
  const total = Math.round(rate * durationS);
  const run = (async () => {
    if (t.load) {
      const sendS = await t.load.latency(rate, durationS, tracker);
      tracker.expect(total);
      await tracker.all;
      return sendS;
    }
    const submit = t.submit!;
    const start = performance.now();
    let sent = 0;
    while (sent < total) {
      const due = dueSends(performance.now() - start, rate, total);
      for (; sent < due; sent++) {
        const scheduled = start + (sent * 1000) / rate;
        submit(sent).then((id) => tracker.sent(id, scheduled), (err) => failure(err));
      }
      await sleep(1);
    }
    const sendS = (performance.now() - start) / 1000;
    tracker.expect(total);
    await tracker.all;
    return sendS;
  })();
  const sendS = await within(run, 60_000 + durationS * 2000, `${t.name}: latency run`);
  const sorted = tracker.latencies.sort((a, b) => a - b);
  const round = (x: number) => Math.round(x * 10) / 10;
  return {
    offered_per_s: Math.round(total / sendS),
    p50_ms: round(percentile(sorted, 0.5)),
    p90_ms: round(percentile(sorted, 0.9)),
    p99_ms: round(percentile(sorted, 0.99)),
    max_ms: round(sorted[sorted.length - 1]!),
  };
}

interface PhaseResult extends Latency {
  /** From the first submission to the last final event. */
  items_per_s: number;
  /** The same, up to when every consumer (the state writer too) had caught up. */
  items_per_s_drained: number;
  /** Each round's figure; the others are medians over rounds. */
  rounds_items_per_s: string;
  rounds_p99_ms: string;
}

/** A progress line on stderr, so stdout keeps only the figures. */
function progress(line: string) {
  Deno.stderr.writeSync(new TextEncoder().encode(`# ${line}\n`));
}

/** A pipeline set up and ready (fed one or more ways), and how to take it down. */
interface Side {
  targets: Target[];
  close(): Promise<void>;
}

/**
 * Measures every target phase by phase, alternating between them, so that load from other
 * processes on the machine falls on all alike rather than on whichever ran last.
 */
async function measure(targets: Target[], o: Options): Promise<PhaseResult[]> {
  for (const target of targets) await throughput(target, o.warmup, o.window);
  const tp = targets.map(() => [] as { itemsPerS: number; drainedPerS: number }[]);
  const lat = targets.map(() => [] as Latency[]);
  for (let r = 0; r < o.rounds; r++) {
    for (const [i, target] of targets.entries()) {
      tp[i]!.push(await throughput(target, o.items, o.window));
      progress(
        `round ${r + 1} ${target.name} items/s ${Math.round(tp[i]!.at(-1)!.itemsPerS)}` +
          ` (load ${loadAvg()})`,
      );
    }
    for (const target of targets) await throughput(target, Math.min(o.warmup, 200), o.window);
    for (const [i, target] of targets.entries()) {
      target.hops?.reset();
      lat[i]!.push(await latency(target, o.rate, o.durationS));
      progress(`round ${r + 1} ${target.name} p99_ms ${lat[i]!.at(-1)!.p99_ms}`);
      for (const line of target.hops?.report() ?? []) {
        progress(`round ${r + 1} ${target.name} hop ${line}`);
      }
    }
  }
  const med = (xs: number[]) => xs.toSorted((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  return targets.map((_, i) => {
    const l = lat[i]!;
    const pick = (k: keyof Latency) => med(l.map((x) => x[k]));
    return {
      items_per_s: Math.round(med(tp[i]!.map((x) => x.itemsPerS))),
      items_per_s_drained: Math.round(med(tp[i]!.map((x) => x.drainedPerS))),
      offered_per_s: pick("offered_per_s"),
      p50_ms: pick("p50_ms"),
      p90_ms: pick("p90_ms"),
      p99_ms: pick("p99_ms"),
      max_ms: pick("max_ms"),
      rounds_items_per_s: tp[i]!.map((x) => Math.round(x.itemsPerS)).join(","),
      rounds_p99_ms: l.map((x) => x.p99_ms).join(","),
    };
  });
}

/** Resolves once none of `consumers` has pending or unacknowledged messages. */
async function consumersDrained(jsm: JetStreamManager, stream: string, consumers: string[]) {
  for (const name of consumers) {
    while (true) {
      const info = await jsm.consumers.info(stream, name);
      if (info.num_pending === 0 && info.num_ack_pending === 0) break;
      await sleep(10);
    }
  }
}

// ---------------------------------------------------------------- (a) bare pipeline

const encoder = new TextEncoder();
const decoder = new TextDecoder();

async function startBare(
  nc: NatsConnection,
  server: NatsServer,
  subjects: Options["bareSubjects"],
): Promise<Side> {
  // Per item: every message on its own subject, consumers on a wildcard (as Weft's).
  const perItem = subjects === "item";
  const filter = (subject: string) => perItem ? `${subject}.*` : subject;
  const jsm = await jetstreamManager(nc);
  const js = jetstream(nc);
  await jsm.streams.add({
    name: BARE_STREAM,
    subjects: ["bench.>"],
    retention: RetentionPolicy.Limits,
    storage: StorageType.File,
  });
  const stages: Proc[] = [];
  for (let s = 1; s <= BARE_STAGES; s++) {
    await jsm.consumers.add(BARE_STREAM, {
      durable_name: `bare${s}`,
      filter_subject: filter(`bench.s${s}`),
      ack_policy: AckPolicy.Explicit,
      deliver_policy: DeliverPolicy.All,
    });
    const next = s === BARE_STAGES ? BARE_FINAL : `bench.s${s + 1}`;
    stages.push(spawn(`bare${s}`, [
      "run",
      "--no-prompt",
      `--allow-net=127.0.0.1:${server.port}`,
      ...(seeds ? [`--allow-read=${seeds.get("admin")}`] : []),
      "bench/bare_stage.ts",
      server.url,
      BARE_STREAM,
      `bare${s}`,
      next,
      perItem ? "item" : "one",
      ...(seeds ? [seeds.get("admin")!] : []),
    ]));
  }
  // The id is a fixed-width prefix, so the final subscriber reads it without parsing JSON.
  let seq = 0;
  const consumers = stages.map((p) => p.name);
  const target: Target = {
    name: "bare",
    tracker: new Tracker(),
    drained: () => consumersDrained(jsm, BARE_STREAM, consumers),
    async submit(i) {
      const id = String(seq++).padStart(10, "0");
      const body = `{"id":"${id}","text":${JSON.stringify(TEXTS[i % TEXTS.length])}}`;
      await js.publish(perItem ? `bench.s1.${id}` : "bench.s1", encoder.encode(body));
      return id;
    },
  };
  const sub = nc.subscribe(filter(BARE_FINAL), {
    callback: (_err, m) =>
      target.tracker.final(decoder.decode(m.data.subarray(7, 17)), performance.now()),
  });
  return {
    targets: [target],
    async close() {
      sub.unsubscribe();
      await Promise.all(stages.map((p) => stopProc(p)));
      await jsm.streams.delete(BARE_STREAM).catch(() => {});
    },
  };
}

// ---------------------------------------------------------------- (b) Weft

async function waitForConsumers(jsm: JetStreamManager, names: string[]) {
  const ready = (async () => {
    for (const name of names) {
      while (true) {
        try {
          await jsm.consumers.info(FEEDBACK_STREAM, name);
          break;
        } catch {
          await sleep(50);
        }
      }
    }
  })();
  await within(ready, 60_000, `consumers ${names.join(", ")}`);
}

/** Waits for the state writer to catch up, then counts the bucket's entries by status. */
async function stateCounts(
  nc: NatsConnection,
  jsm: JetStreamManager,
): Promise<Record<string, number>> {
  await within(
    consumersDrained(jsm, FEEDBACK_STREAM, [FEEDBACK_STATE_SPEC.durable]),
    120_000,
    "state writer",
  );
  const stream = `KV_${STATE_BUCKET}`;
  const entries = (await jsm.streams.info(stream)).state.messages;
  const counts: Record<string, number> = {};
  if (entries === 0) return counts;
  const js: JetStreamClient = jetstream(nc);
  const oc = await js.consumers.get(stream, { deliver_policy: DeliverPolicy.LastPerSubject });
  const it = await oc.consume();
  const read = (async () => {
    for await (const m of it) {
      const status = m.data.length === 0 ? "deleted" : m.json<FeedbackState>().status;
      counts[status] = (counts[status] ?? 0) + 1;
      if (m.info.pending === 0) break;
    }
  })();
  try {
    await within(read, 60_000, "reading the state bucket");
  } finally {
    await it.close();
  }
  return counts;
}

interface WeftSide extends Side {
  /** Waits for the state writer, counts the bucket, stops the services: the extra figures. */
  finish(): Promise<{ state_processed: number; state_expected: number; service_stats: string }>;
}

/**
 * The HTTP load generator (`bench/http_load.ts`) in a process of its own, driven over its
 * stdin; the send times it reports are moved onto this process's clock.
 */
class LoadGen {
  /** Items the gateway accepted from it. */
  accepted = 0;
  private offset = 0;
  private tracker?: Tracker;
  private reply?: (line: string) => void;
  private readonly writer: WritableStreamDefaultWriter<Uint8Array>;

  private constructor(private readonly proc: Proc) {
    this.writer = proc.child.stdin.getWriter();
    this.read().catch((err) => failure(err));
  }

  /** Starts the generator against the gateway at `url` and aligns the two clocks. */
  static async start(url: string, port: number, connections: number): Promise<LoadGen> {
    const proc = spawn(
      "http-load",
      [
        "run",
        "--no-prompt",
        `--allow-net=127.0.0.1:${port}`,
        "bench/http_load.ts",
        url,
        String(connections),
      ],
      {},
      { piped: true },
    );
    const gen = new LoadGen(proc);
    const samples: ClockSample[] = [];
    for (let i = 0; i < 20; i++) {
      const sentAt = performance.now();
      const line = await gen.command({ cmd: "ping" });
      samples.push({ sentAt, remote: Number(line.split(" ")[1]), receivedAt: performance.now() });
    }
    gen.offset = clockOffset(samples);
    return gen;
  }

  private async read() {
    let buf = "";
    for await (const chunk of this.proc.child.stdout.pipeThrough(new TextDecoderStream())) {
      buf += chunk;
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.startsWith("s ")) {
          const parts = line.split(" ");
          const at = Number(parts[1]) - this.offset;
          for (let k = 2; k < parts.length; k++) this.tracker?.sent(parts[k]!, at);
          this.accepted += parts.length - 2;
        } else if (line.startsWith("pong ") || line.startsWith("done ")) {
          const reply = this.reply;
          this.reply = undefined;
          reply?.(line);
        }
      }
    }
  }

  private async command(cmd: Record<string, unknown>): Promise<string> {
    const answered = new Promise<string>((r) => (this.reply = r));
    await this.writer.write(encoder.encode(JSON.stringify(cmd) + "\n"));
    return await answered;
  }

  /** The {@link ExternalLoad} of POSTs of `batch` items (1: POST /feedback). */
  feed(batch: number): ExternalLoad {
    return {
      throughput: async (items, window, tracker) => {
        this.tracker = tracker;
        await this.command({ cmd: "throughput", items, window, batch });
      },
      latency: async (rate, seconds, tracker) => {
        this.tracker = tracker;
        const line = await this.command({ cmd: "latency", rate, seconds, batch });
        return Number(line.split(" ")[2]) / 1000;
      },
    };
  }

  async close() {
    await this.writer.close().catch(() => {});
    await stopProc(this.proc);
  }
}

/** Waits until the gateway at `url` answers /readyz. */
async function gatewayReady(url: string) {
  const ready = (async () => {
    while (true) {
      try {
        const res = await fetch(`${url}/readyz`);
        await res.body?.cancel();
        if (res.ok) return;
      } catch { /* not listening yet */ }
      await sleep(100);
    }
  })();
  await within(ready, 60_000, `gateway at ${url}`);
}

/** Weft's settings as its services in this bench read them: WEFT_* or their defaults. */
function weftDefaults(): Config {
  return loadConfig({ env: (name) => Deno.env.get(name), args: [] });
}

async function startWeft(
  nc: NatsConnection,
  natsUrl: string,
  o: Options,
): Promise<WeftSide> {
  const http = o.sides.has("weft_http") || o.sides.has("weft_http_batch");
  const port = freePort();
  const config = loadConfig({
    env: (name) =>
      name === "NATS_URL" ? natsUrl : name === "PORT" ? String(port) : Deno.env.get(name),
    args: [],
  });
  // A new cluster elects its JetStream meta leader a few seconds after its nodes start;
  // until then requests time out (as the supervisor does, try again for up to 60 s).
  const until = Date.now() + (o.cluster > 1 ? 60_000 : 0);
  let jsm: JetStreamManager;
  for (;;) {
    try {
      jsm = await jetstreamManager(nc);
      await ensureTopology(nc, jsm, { ...config, replicas: Math.min(3, o.cluster) });
      break;
    } catch (err) {
      if (Date.now() >= until) throw err;
      await new Promise((r) => setTimeout(r, 1000));
    }
  }
  const services: Proc[] = [];
  const names = [...WEFT_SERVICES, ...(http ? ["gateway"] : [])];
  if (o.together) {
    // One process, each service on its own identity from the identity folder, as the
    // supervisor runs a group.
    const specs = SERVICES.filter((s) => names.includes(s.name));
    const dir = seeds ? seeds.get("admin")!.replace(/\/[^/]+$/, "") : "";
    services.push(spawn(
      "together",
      processArgs(specs, config, [TOGETHER_ENTRY, ...specs.map((s) => s.name)], [
        ...(seeds ? specs.map((s) => seeds!.get(s.name)!) : []),
      ]),
      {
        NATS_URL: natsUrl,
        PORT: String(port),
        ...(seeds ? { WEFT_NATS_IDENTITY_DIR: dir, WEFT_ENSURE_TOPOLOGY: "false" } : {}),
      },
    ));
  }
  for (const spec of SERVICES.filter((s) => !o.together && names.includes(s.name))) {
    // Each service as its own NATS identity, as under deno task start; a step's replicas
    // share its identity and its durable consumer, as WEFT_REPLICAS runs them.
    const seed = seeds?.get(spec.name);
    const copies = STEPS.includes(spec.name) ? o.stepReplicas : 1;
    for (let r = 0; r < copies; r++) {
      services.push(spawn(
        copies > 1 ? `${spec.name}-${r + 1}` : spec.name,
        serviceArgs(spec, seed ? { ...config, natsNkey: seed } : config),
        {
          NATS_URL: natsUrl,
          PORT: String(port),
          ...(seed ? { WEFT_NATS_NKEY: seed, WEFT_ENSURE_TOPOLOGY: "false" } : {}),
        },
      ));
    }
  }
  await waitForConsumers(jsm, WEFT_SERVICES);
  const url = `http://${config.host}:${port}`;
  let gen: LoadGen | undefined;
  if (http) {
    await gatewayReady(url);
    gen = await LoadGen.start(url, port, o.connections);
  }
  const intake = await createIntake(nc);
  let submitted = 0;
  // One final-event subscription for every feed: only one is measured at a time.
  let active = new Tracker();
  let probe: HopProbe | undefined;
  const feed = (name: SideName, how: Pick<Target, "submit" | "load">): Target => ({
    name,
    get tracker() {
      return active;
    },
    set tracker(t: Tracker) {
      active = t;
    },
    drained: () => consumersDrained(jsm, FEEDBACK_STREAM, WEFT_SERVICES),
    get hops() {
      return probe;
    },
    ...how,
  });
  const targets: Target[] = [];
  if (o.sides.has("weft")) {
    targets.push(feed("weft", {
      async submit(i) {
        submitted++;
        return (await intake.submit({ text: TEXTS[i % TEXTS.length]!, channel: "bench" })).body
          .id;
      },
    }));
  }
  if (gen && o.sides.has("weft_http")) targets.push(feed("weft_http", { load: gen.feed(1) }));
  if (gen && o.sides.has("weft_http_batch")) {
    targets.push(feed("weft_http_batch", { load: gen.feed(o.batch) }));
  }
  const prefix = `${FeedbackEventType.Processed}.`;
  const sub = nc.subscribe(`${prefix}*`, {
    callback: (_err, m) => active.final(m.subject.slice(prefix.length), performance.now()),
  });
  let hopSub: ReturnType<NatsConnection["subscribe"]> | undefined;
  if (o.hops) {
    const T = FeedbackEventType;
    const hops = probe = new HopProbe([
      T.Ingested,
      T.SentimentAnalyzed,
      T.TopicsExtracted,
      T.Dispatched,
      T.Processed,
    ]);
    hopSub = nc.subscribe("feedback.*.*", {
      callback: (_err, m) => {
        const at = performance.now();
        const [, type, id] = m.subject.split(".");
        hops.event(`feedback.${type}`, id!, at);
      },
    });
  }
  const close = async () => {
    sub.unsubscribe();
    hopSub?.unsubscribe();
    await gen?.close();
    await Promise.all(services.map((p) => stopProc(p)));
  };
  return {
    targets,
    close,
    async finish() {
      const counts = await stateCounts(nc, jsm);
      await close();
      return {
        state_processed: counts.processed ?? 0,
        state_expected: submitted + (gen?.accepted ?? 0),
        service_stats: serviceStats(services),
      };
    },
  };
}

// ---------------------------------------------------------------- (c) BullMQ + Redis

/** The comparison pipeline's queues: ingest -> sentiment -> topics -> dispatch. */
const BULLMQ_QUEUES = ["ingest", "sentiment", "topics", "dispatch"];

/** redis-server's version line, or undefined when it is not on PATH. */
async function redisVersion(): Promise<string | undefined> {
  try {
    const out = await new Deno.Command("redis-server", { args: ["--version"], stdout: "piped" })
      .output();
    return new TextDecoder().decode(out.stdout).trim();
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return undefined;
    throw err;
  }
}

/**
 * A redis-server of its own (free loopback port, temporary directory, append-only file
 * with `appendfsync everysec`, no RDB snapshots), four BullMQ stage processes, and a
 * source adding jobs to the first queue from this process.
 */
async function startBullmq(o: Options): Promise<Side> {
  const dir = await Deno.makeTempDir({ prefix: "weft-bench-redis-" });
  const port = freePort();
  const redisProc = spawn(
    "redis-server",
    [
      "--port",
      String(port),
      "--bind",
      "127.0.0.1",
      "--dir",
      dir,
      "--appendonly",
      "yes",
      "--appendfsync",
      "everysec",
      "--save",
      "",
      "--daemonize",
      "no",
    ],
    {},
    { command: "redis-server" },
  );
  // Connect once it listens (ioredis reports every refused attempt as an error).
  await within(
    (async () => {
      while (true) {
        try {
          (await Deno.connect({ hostname: "127.0.0.1", port })).close();
          return;
        } catch {
          await sleep(20);
        }
      }
    })(),
    30_000,
    "redis-server listening",
  );
  const connection = new Redis({ host: "127.0.0.1", port, maxRetriesPerRequest: null });
  const subscriber = new Redis({ host: "127.0.0.1", port, maxRetriesPerRequest: null });
  const stages: Proc[] = [];
  const queues: Queue[] = [];
  const close = async () => {
    await Promise.all(stages.map((p) => stopProc(p)));
    await Promise.all(queues.map((q) => q.close().catch(() => {})));
    subscriber.disconnect();
    connection.disconnect();
    await stopProc(redisProc);
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  };
  try {
    await within(connection.ping(), 30_000, "redis-server");
    for (const [s, from] of BULLMQ_QUEUES.entries()) {
      stages.push(spawn(`bullmq-${from}`, [
        "run",
        "--no-prompt",
        `--allow-net=127.0.0.1:${port}`,
        "--allow-env",
        "bench/bullmq_stage.ts",
        String(port),
        from,
        BULLMQ_QUEUES[s + 1] ?? "done",
        String(o.bullmqConcurrency),
      ]));
      queues.push(new Queue(from, { connection, defaultJobOptions: JOB_OPTIONS }));
    }
    await within(
      (async () => {
        while (!stages.every((p) => p.tail.includes("ready"))) await sleep(50);
      })(),
      60_000,
      "BullMQ workers",
    );
    let seq = 0;
    const target: Target = {
      name: "bullmq",
      tracker: new Tracker(),
      drained: async () => {
        for (const q of queues) {
          while (true) {
            const c = await q.getJobCounts("waiting", "active", "delayed", "prioritized");
            if (Object.values(c).every((n) => n === 0)) break;
            await sleep(10);
          }
        }
      },
      async submit(i) {
        const id = String(seq++);
        await queues[0]!.add("item", { id, text: TEXTS[i % TEXTS.length] });
        return id;
      },
    };
    subscriber.on("message", (_channel: string, id: string) => {
      target.tracker.final(id, performance.now());
    });
    await subscriber.subscribe(DONE_CHANNEL);
    return { targets: [target], close };
  } catch (err) {
    await close();
    throw err;
  }
}

/** The counters each service logs when it stops (retries, dead letters, state writes). */
function serviceStats(services: Proc[]): string {
  const parts: string[] = [];
  for (const p of services) {
    for (const line of p.tail) {
      if (!line.includes('"stage stopped"') && !line.includes('"state writer stopped"')) continue;
      const f = JSON.parse(line) as Record<string, unknown>;
      const keys = ["received", "processed", "retried", "deadLettered", "published"]
        .concat(["events", "writes", "conflicts", "batches"]);
      const kv = keys.filter((k) => k in f).map((k) => `${k}=${f[k]}`);
      parts.push(`${p.name}(${kv.join(",")})`);
    }
  }
  return parts.join(" ");
}

// ---------------------------------------------------------------- main

function loadAvg(): string {
  try {
    return Deno.loadavg().map((x) => x.toFixed(2)).join(" ");
  } catch {
    return "unknown";
  }
}

async function main() {
  if (Deno.args.includes("--help") || Deno.args.includes("-h")) {
    Deno.stdout.writeSync(encoder.encode(USAGE + "\n"));
    return;
  }
  const o = options(Deno.args);
  const out: Record<string, unknown> = {};
  const print = (key: string, value: unknown) => {
    out[key] = value;
    Deno.stdout.writeSync(encoder.encode(`${key} ${value}\n`));
  };
  let server: NatsServer | undefined;
  let nodes: NatsServer[] = [];
  let nc: NatsConnection | undefined;
  let natsDir: string | undefined;
  const closers: (() => Promise<void>)[] = [];
  const cleanup = async () => {
    for (const close of closers.splice(0)) await close().catch(() => {});
    await Promise.all([...procs].map((p) => stopProc(p, "SIGKILL")));
    await nc?.close().catch(() => {});
    await Promise.all(nodes.map((n) => n.stop("SIGTERM").catch(() => {})));
    if (nodes.length === 0) await server?.[Symbol.asyncDispose]();
    if (natsDir) await Deno.remove(natsDir, { recursive: true }).catch(() => {});
  };
  const onSignal = async () => {
    Deno.stderr.writeSync(encoder.encode("interrupted: stopping everything the bench started\n"));
    await cleanup();
    Deno.exit(130);
  };
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  try {
    // The server authenticates as deno task start's does: one least-privilege key per
    // service (the bench itself and the bare stages use the admin key).
    natsDir = await Deno.makeTempDir({ prefix: "weft-bench-nats-" });
    // A cluster's nodes each put their store under natsDir/data/jetstream/node<N>
    // (startCluster rewrites store_dir); one server gets its store with -sd.
    const base = o.cluster > 1
      ? `max_payload: 1MB\njetstream {\n  store_dir: "./store"\n}\n`
      : "max_payload: 1MB\n";
    await Deno.writeTextFile(
      `${natsDir}/base.conf`,
      o.sync ? withSyncInterval(base, o.sync) : base,
    );
    const auth = await writeAuthConfig(`${natsDir}/base.conf`, natsDir);
    seeds = auth.seeds;
    let natsUrl: string;
    if (o.cluster > 1) {
      await Deno.mkdir(`${natsDir}/data`, { recursive: true });
      nodes = await startCluster(o.cluster, {
        configFile: auth.configFile,
        cwd: natsDir,
        port: clusterPorts(o.cluster),
        log: createLogger("bench", "warn", () => {}),
      });
      server = nodes[0]!;
      natsUrl = nodes.map((n) => n.url).join(",");
    } else {
      server = await startNatsServer({
        configFile: auth.configFile,
        port: freePort(),
        storeDir: `${natsDir}/store`,
        cwd: natsDir,
      });
      natsUrl = server.url;
    }
    nc = await connectNats(natsUrl, "weft-bench", {
      nkeySeedFile: seeds.get("admin"),
      identity: "admin",
    });
    print("config.items", o.items);
    print("config.window", o.window);
    print("config.rate_per_s", o.rate);
    print("config.duration_s", o.durationS);
    print("config.rounds", o.rounds);
    print("config.bare_subjects", o.bareSubjects);
    print("config.sides", [...o.sides].join(","));
    print("config.http_batch_items", o.batch);
    print("config.http_connections", o.connections);
    print("config.bullmq_concurrency", o.bullmqConcurrency);
    print("config.step_replicas", o.stepReplicas);
    print("config.together", o.together);
    print("config.sync_interval", o.sync);
    print("config.cluster_nodes", o.cluster);
    print("config.stream_replicas", Math.min(3, o.cluster));
    if (o.prof.length > 0) {
      profile = { names: new Set(o.prof), dir: await Deno.makeTempDir({ prefix: "weft-prof-" }) };
      print("prof.dir", profile.dir);
    }
    print("load_avg.start", loadAvg());
    const sides: Side[] = [];
    if (o.sides.has("bare")) sides.push(await startBare(nc, server, o.bareSubjects));
    const weftFeeds: SideName[] = ["weft", "weft_http", "weft_http_batch"];
    const w = weftFeeds.some((f) => o.sides.has(f)) ? await startWeft(nc, natsUrl, o) : undefined;
    if (w) sides.push(w);
    if (o.sides.has("bullmq")) {
      const version = await redisVersion();
      if (version) {
        print("bullmq.redis", `${version} (appendonly yes, appendfsync everysec, no RDB)`);
        sides.push(await startBullmq(o));
      } else {
        print(
          "bullmq.skipped",
          "redis-server is not on PATH (Debian: apt-get install -y redis-server)",
        );
      }
    }
    closers.push(...sides.map((side) => side.close));
    const targets = sides.flatMap((side) => side.targets);
    const measured = await measure(targets, o);
    const results = new Map<SideName, PhaseResult>(
      targets.map((t, i) => [t.name, measured[i]!]),
    );
    const extra = w ? await w.finish() : undefined;
    const feedPath: Record<SideName, string> = {
      bare: "js.publish() from the bench process",
      weft: "createIntake(nc).submit() in the bench process (the gateway intake code, no HTTP)",
      weft_http: "POST /feedback, one item a request, keep-alive HTTP from another process",
      weft_http_batch:
        `POST /feedback/batch, ${o.batch} items a request, keep-alive HTTP from another process`,
      bullmq: "queue.add() from the bench process",
    };
    for (const [name, r] of results) {
      print(`${name}.feed_path`, feedPath[name]);
      for (const [k, v] of Object.entries(r)) print(`${name}.${k}`, v);
    }
    if (extra) { for (const [k, v] of Object.entries(extra)) print(`weft.${k}`, v); }
    print("load_avg.end", loadAvg());
    const met = (ok: boolean) => (ok ? "met" : "NOT_met");
    const round2 = (x: number) => Math.round(x * 100) / 100;
    const bare = results.get("bare");
    const bull = results.get("bullmq");
    if (bare && results.has("weft")) {
      // The ratio of earlier runs (bus-fed Weft to bare), under its old name.
      print("ratio", round2(results.get("weft")!.items_per_s / bare.items_per_s));
    }
    for (const name of weftFeeds) {
      const r = results.get(name);
      if (!r) continue;
      if (bare) {
        const ratio = round2(r.items_per_s / bare.items_per_s);
        print(`ratio.${name}_vs_bare`, ratio);
        print(`target.${name}_ge_${AIM_VS_BARE}x_bare`, met(ratio >= AIM_VS_BARE));
        const p99 = round2(r.p99_ms / bare.p99_ms);
        print(`p99_ratio.${name}_vs_bare`, p99);
        print(`target.${name}_p99_le_${AIM_P99_VS_BARE}x_bare`, met(p99 <= AIM_P99_VS_BARE));
      }
      if (bull) {
        const ratio = round2(r.items_per_s / bull.items_per_s);
        print(`ratio.${name}_vs_bullmq`, ratio);
        print(`target.${name}_ge_${AIM_VS_BULLMQ}x_bullmq`, met(ratio >= AIM_VS_BULLMQ));
        print(`p99_ratio.${name}_vs_bullmq`, round2(r.p99_ms / bull.p99_ms));
      }
    }
    if (bare && bull) print("ratio.bullmq_vs_bare", round2(bull.items_per_s / bare.items_per_s));
    if (extra) {
      print("target.state_all_processed", met(extra.state_processed === extra.state_expected));
    }
    // The embedded analyzers on one core (this process), after the pipelines are done.
    for (const t of benchAnalyzers(TEXTS)) {
      const name = t.analyzer.replace(/^embedded:/, "");
      print(`analyzer.${name}.items_per_s`, Math.round(t.itemsPerSecond));
      print(`target.analyzer_${name}_ge_20000_per_s`, met(t.itemsPerSecond >= 20_000));
    }
    if (o.json) await Deno.writeTextFile(o.json, JSON.stringify(out, null, 2) + "\n");
  } finally {
    await cleanup();
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
  }
}

/** A first client port with `n` free ports from it (a cluster's nodes take port, +1...). */
function clusterPorts(n: number): number {
  for (;;) {
    const port = freePort();
    if (Array.from({ length: n }, (_, i) => port + i).every(portFree)) return port;
  }
}

if (import.meta.main) {
  try {
    await main();
  } catch (err) {
    if (err instanceof ConfigError) {
      // A bad command line: nothing was started; one line, as deno task shadow says it.
      Deno.stderr.writeSync(encoder.encode(`bench: ${err.message}\n`));
      Deno.exit(2);
    }
    // Everything was stopped by main's cleanup; say why the run failed, plainly.
    Deno.stderr.writeSync(encoder.encode(`bench failed: ${(err as Error)?.stack ?? err}\n`));
    Deno.exit(1);
  }
}
