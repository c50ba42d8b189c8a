/**
 * `deno task shadow`: replays the feedback pipeline's history through a candidate and
 * prints how it would have decided, next to production. Configure the candidate as the
 * mesh is configured (`--analyzers embedded|rules|llm`, `--rules FILE`, WEFT_LLM_*), pick the
 * history (`--since`, `--until` ISO times, `--count N`, `--sample 0.1`), optionally give a
 * labelled JSONL (`--labels FILE`, as `deno task eval` takes), and `--out PATH` for
 * PATH.json and PATH.html. `--prompt sentiment=v2` runs an LLM candidate on another prompt
 * version (`prompts/sentiment.v2.md`). Connects with WEFT_NATS_NKEY (use the ops key: it can read
 * every stream and can publish no pipeline event, so a shadow run changes nothing).
 *
 * A step of a definition's pipeline replays the same way against another version of its
 * definition file: `deno task shadow --pipeline tickets --step triage --definition
 * pipelines/examples/tickets_v2.ts [--count N] [--since ISO] [--sample 0.1] [--labels FILE]
 * [--out PATH]`; its labels are JSON Lines keyed by item, `{"item_id": "t-17", "label": "pos"}`.
 *
 * Live shadows, one command each (a request to the gateway on `weft.shadow.<verb>`; with
 * API keys configured, an admin key in WEFT_API_KEY or `--key`):
 *
 * ```sh
 * deno task shadow attach --id calm --step sentiment --analyzers rules --rules rules/reference.json --rps 20
 * deno task shadow list
 * deno task shadow promote calm
 * deno task shadow detach calm
 * deno task shadow reset feedback.sentiment   # back to the configured version
 * deno task shadow report calm [--out PATH]     # agreement and disagreements, from shadow.>
 * ```
 *
 * `--help` lists the commands and flags; an unknown flag or command is refused (exit 2)
 * before anything runs.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { headers } from "@nats-io/nats-core";
import { Kvm } from "@nats-io/kv";
import { SHADOW_BUCKET, SHADOW_REQUEST_PREFIX } from "../src/subjects.ts";
import {
  formatLiveShadowReport,
  labelledAccuracy,
  liveShadowReport,
  liveShadowReportHtml,
  parseItemLabels,
  readShadowDecisions,
  replayShadow,
} from "../src/shadow/live.ts";
import { createLogger } from "../src/observability/log.ts";
import { loadPipelines } from "../src/pipeline/runtime.ts";
import { parseShadowSpec, SHADOW_ID } from "../src/shadow/spec.ts";
import { listedPipelines } from "../src/supervisor.ts";
import { loadConfig, strayArguments, unknownFlags } from "../src/config.ts";
import { ConfigError, NotFoundError } from "../src/errors.ts";
import { feedbackAnalyzers } from "../pipelines/feedback/analyzers.ts";
import { parseRows } from "../src/ai/evaluation.ts";
import { connectNats, tlsCredentials } from "../src/nats.ts";
import { statusSubject } from "../src/observability/micro.ts";
import {
  decideAll,
  formatShadowReport,
  readProduction,
  shadowReport,
  shadowReportHtml,
} from "../pipelines/feedback/replay.ts";

const say = (text: string, to: typeof Deno.stdout | typeof Deno.stderr = Deno.stdout) =>
  to.writeSync(new TextEncoder().encode(text + "\n"));

/** The live shadow commands. */
const VERBS = ["attach", "detach", "promote", "reset", "list"];

/** What `deno task shadow --help` prints. */
const USAGE = `deno task shadow: a candidate version of a step against production (docs/SHADOW.md)

Replay stored history, read-only (run with the ops key: WEFT_NATS_NKEY=data/identities/ops.nk):
  deno task shadow [--analyzers embedded|rules|llm] [--rules FILE] [--prompt KIND=VERSION,...]
                   [--since ISO] [--until ISO] [--count N] [--sample F] [--labels FILE] [--out PATH]
  deno task shadow --pipeline NAME --step STEP --definition FILE
                   [--since ISO] [--until ISO] [--count N] [--sample F] [--labels FILE] [--out PATH]
  (also --nats-url URL, --log-level L, --pipelines FILES; an LLM candidate's endpoint is WEFT_LLM_*)

Live shadows, one request to the gateway each (an admin key in WEFT_API_KEY or --key KEY):
  deno task shadow attach --id ID --step STEP [--pipeline NAME] [--analyzers K] [--rules FILE]
                   [--model M] [--prompt V] [--rps N] [--concurrency N] [--sample F]
                   [--budget-usd USD]      (or --spec JSON)
  deno task shadow list
  deno task shadow promote ID
  deno task shadow detach ID
  deno task shadow reset PIPELINE.STEP
  deno task shadow report ID [--out PATH] [--examples N]`;

/** The replay's own flags: each takes a value. */
const REPLAY_OWN_FLAGS = [
  "since",
  "until",
  "count",
  "sample",
  "labels",
  "out",
  "prompt",
  "pipeline",
  "step",
  "definition",
];
/** The replay's own flags, and the settings flags it reads (loadConfig). */
const REPLAY_FLAGS = [
  ...REPLAY_OWN_FLAGS,
  "analyzers",
  "rules",
  "nats-url",
  "log-level",
  "pipelines",
];
/** The live shadow commands' flags. */
const CONTROL_FLAGS = [
  "id",
  "pipeline",
  "step",
  "analyzers",
  "rules",
  "model",
  "prompt",
  "rps",
  "concurrency",
  "sample",
  "budget-usd",
  "spec",
  "key",
];
const REPORT_FLAGS = ["out", "examples"];

/**
 * Refuses a flag that is none of `known` (naming it, and the likely one meant), and, with
 * `positionals` false, any argument that is no flag's value (the first one an unknown
 * command): a typo never runs a replay with the defaults.
 */
function refuseUnknown(args: string[], known: readonly string[], positionals: boolean): void {
  const hint = "`deno task shadow --help` lists them";
  const stray = positionals ? [] : strayArguments(args);
  const unknown = [...unknownFlags(args, known), ...stray.filter((a) => a.startsWith("-"))];
  if (unknown.length > 0) {
    throw new ConfigError(
      `unknown flag${unknown.length > 1 ? "s" : ""}: ${unknown.join(", ")}; ${hint}`,
    );
  }
  if (stray.length > 0) {
    throw new ConfigError(
      stray[0] === args[0]
        ? `unknown command: ${stray[0]} (commands: ${VERBS.join(", ")}, report); ${hint}`
        : `unexpected argument${stray.length > 1 ? "s" : ""}: ${stray.join(" ")}; ${hint}`,
    );
  }
}

/** `deno task shadow attach|detach|promote|list ...`: one request to the gateway. */
async function control(verb: string, args: string[]): Promise<number> {
  refuseUnknown(args, CONTROL_FLAGS, true);
  const { values, positionals } = parseArgs({
    args,
    options: {
      id: { type: "string" },
      pipeline: { type: "string" },
      step: { type: "string" },
      analyzers: { type: "string" },
      rules: { type: "string" },
      model: { type: "string" },
      prompt: { type: "string" },
      rps: { type: "string" },
      concurrency: { type: "string" },
      sample: { type: "string" },
      "budget-usd": { type: "string" },
      spec: { type: "string" },
      key: { type: "string" },
    },
    allowPositionals: true,
    strict: true,
  });
  let body = "";
  if (verb === "attach") {
    const limits: Record<string, number> = {};
    for (
      const [flag, name] of [["rps", "rps"], ["concurrency", "concurrency"], ["sample", "sample"], [
        "budget-usd",
        "budgetUsd",
      ]] as const
    ) {
      if (values[flag] !== undefined) limits[name] = Number(values[flag]);
    }
    const candidate: Record<string, string> = {};
    for (const k of ["analyzers", "rules", "model", "prompt"] as const) {
      if (values[k] !== undefined) candidate[k] = values[k]!;
    }
    body = values.spec ?? JSON.stringify({
      id: values.id ?? positionals[0],
      ...(values.pipeline ? { pipeline: values.pipeline } : {}),
      step: values.step,
      candidate,
      ...(Object.keys(limits).length ? { limits } : {}),
    });
  } else if (verb !== "list") {
    body = values.id ?? positionals[0] ?? "";
    if (!body) {
      throw new Error(
        `usage: deno task shadow ${verb} ${verb === "reset" ? "PIPELINE.STEP" : "ID"}`,
      );
    }
  }
  const config = loadConfig({ args: [] });
  const nc = await connectNats(config.natsUrl, "weft-shadow-cli", {
    nkeySeedFile: config.natsNkey || undefined,
    identity: "ops",
    ...tlsCredentials(config),
  });
  try {
    const h = headers();
    const key = values.key ?? Deno.env.get("WEFT_API_KEY");
    if (key) h.set("Authorization", `Bearer ${key}`);
    const reply = await nc.request(`${SHADOW_REQUEST_PREFIX}.${verb}`, body, {
      timeout: 10_000,
      headers: h,
    });
    const value = reply.json<{ error?: { detail?: string; status?: number } }>();
    say(JSON.stringify(value, null, 2), value?.error ? Deno.stderr : Deno.stdout);
    if (value?.error?.status === 401) {
      // The mesh has API keys: say where this command takes one (the problem names only the
      // request's Authorization header, which a command-line user never sees).
      say(
        key
          ? "shadow: the key in --key or WEFT_API_KEY is none of the mesh's API keys " +
            "(WEFT_API_KEYS): give an admin key"
          : "shadow: the mesh has API keys (WEFT_API_KEYS): give an admin key in " +
            "WEFT_API_KEY or --key KEY",
        Deno.stderr,
      );
    }
    return value?.error ? 1 : 0;
  } finally {
    await nc.close();
  }
}

type Nats = Awaited<ReturnType<typeof connectNats>>;

/**
 * What the shadow service says of the shadows it hosts, by id, or undefined when no shadow
 * service answers (it starts with the first live shadow).
 */
async function hostedShadows(nc: Nats): Promise<Record<string, HostedShadow> | undefined> {
  try {
    const m = await nc.request(statusSubject("shadow"), "", { timeout: 3_000 });
    return m.json<{ shadows?: Record<string, HostedShadow> }>().shadows ?? {};
  } catch {
    return undefined;
  }
}

/** What the shadow service says of a shadow it hosts (src/shadow/host.ts, `stats`). */
interface HostedShadow {
  up?: boolean;
  error?: string;
  /** Its candidate (`llm:<model>@<prompt>`, ...) and step (`<pipeline>.<step>`). */
  candidate?: string;
  step?: string;
  /** Items its candidate failed on, and those its budget kept from the model. */
  failed?: number;
  over_budget?: number;
}

/**
 * What the shadow service says of shadow `id` when it has decided nothing: it does not run
 * (it failed to start, or no shadow service answers), or it runs and its candidate failed on
 * every item it took; undefined when it runs and has simply taken none yet.
 */
function shadowStatus(
  hosted: Record<string, HostedShadow> | undefined,
  id: string,
): string | undefined {
  if (!hosted) return "no shadow service answered (it starts with the first live shadow)";
  const one = hosted[id];
  if (!one) return "not running (no shadow service hosts it: attached? see deno task shadow list)";
  if (one.up === false) return `not running: ${one.error ?? "it did not start"}`;
  const failed = one.failed ?? 0, over = one.over_budget ?? 0;
  if (failed + over > 0) {
    return `running, but its candidate decided none of the ${failed + over} items it took ` +
      `(${failed} failed, ${over} over its budget): the shadow service logs each failure ` +
      `with its error ("shadow decision failed")`;
  }
  return undefined;
}

/**
 * Whether shadow `id` is attached: over the API (its entry in the shadows bucket), by this
 * task's WEFT_SHADOW, or hosted by the shadow service; `unsure` when the bucket cannot be
 * read (then it may be).
 */
async function attachment(
  nc: Nats,
  configured: readonly { id: string }[],
  hosted: Record<string, unknown> | undefined,
  id: string,
): Promise<"attached" | "none" | "unsure"> {
  if (configured.some((s) => s.id === id) || (hosted && id in hosted)) return "attached";
  try {
    const e = await (await new Kvm(nc).open(SHADOW_BUCKET)).get(id);
    return e?.operation === "PUT" ? "attached" : "none";
  } catch {
    return "unsure";
  }
}

/** The one line for a report of shadow `id` when there is no such shadow. */
function noSuchShadow(id: string): NotFoundError {
  return new NotFoundError(
    `no shadow ${JSON.stringify(id)}: nothing attached under that id, and no decision ` +
      "recorded under it (deno task shadow list names the attached ones)",
  );
}

/**
 * Throws unless this task may write `out` + each suffix: checked before a replay runs, so a
 * report is not computed (and LLM calls paid for) only to fail at the end.
 */
async function assertWritable(out: string, suffixes: readonly string[]): Promise<void> {
  for (const suffix of suffixes) {
    const { state } = await Deno.permissions.query({ name: "write", path: `${out}${suffix}` });
    if (state !== "granted") {
      throw new Error(
        `--out ${out}: this task may write only under data/ (e.g. --out data/replay)`,
      );
    }
  }
}

/** Throws for a flag of `names` given without a value (`--count` alone parses as `true`). */
function refuseBare(values: Record<string, unknown>, names: readonly string[]): void {
  for (const name of names) {
    if (values[name] === true) throw new Error(`--${name} needs a value`);
  }
}

/**
 * `deno task shadow report ID [--out PATH]`: a live shadow's decisions, read from SHADOW. An id
 * with no decision that no shadow is attached under is refused in one line (exit 2), not
 * reported as an empty report.
 */
async function report(args: string[]): Promise<number> {
  refuseUnknown(args, REPORT_FLAGS, true);
  const { values, positionals } = parseArgs({
    args,
    options: { out: { type: "string" }, examples: { type: "string" } },
    allowPositionals: true,
    strict: true,
  });
  const id = positionals[0];
  if (!id) throw new Error("usage: deno task shadow report ID [--out PATH]");
  const examples = values.examples === undefined ? 10 : Number(values.examples);
  if (!(Number.isInteger(examples) && examples >= 0)) {
    throw new Error("--examples must be a whole number of examples (0 or more)");
  }
  // No shadow can have an id that is no shadow id (`attach` refuses it).
  if (!SHADOW_ID.test(id)) throw noSuchShadow(id);
  if (values.out !== undefined) await assertWritable(values.out, [".json"]);
  const config = loadConfig({ args: [] });
  const nc = await connectNats(config.natsUrl, "weft-shadow-report", {
    nkeySeedFile: config.natsNkey || undefined,
    identity: "ops",
    ...tlsCredentials(config),
  });
  try {
    const decisions = await readShadowDecisions(nc, id);
    const r = liveShadowReport(id, decisions, examples);
    // Nothing decided yet: whether the shadow runs at all (its service knows why not), and,
    // none ever decided under that id, whether there is such a shadow.
    const hosted = r.items === 0 ? await hostedShadows(nc) : undefined;
    if (
      decisions.length === 0 && await attachment(nc, config.shadows, hosted, id) === "none"
    ) {
      throw noSuchShadow(id);
    }
    // No decision to name them: the shadow service knows its candidate and step.
    const live = hosted?.[id];
    if (r.items === 0 && live?.candidate && live.step) {
      const dot = live.step.indexOf(".");
      Object.assign(r, {
        candidate: live.candidate,
        pipeline: live.step.slice(0, dot),
        step: live.step.slice(dot + 1),
      });
    }
    say(formatLiveShadowReport(r));
    if (values.out) {
      await Deno.writeTextFile(`${values.out}.json`, JSON.stringify(r, null, 2) + "\n");
      say(`wrote ${values.out}.json`);
    }
    if (r.items === 0) {
      const why = shadowStatus(hosted, id);
      if (why) say(`shadow ${id}: ${why}`, Deno.stderr);
    }
    return r.items > 0 ? 0 : 1;
  } finally {
    await nc.close();
  }
}

/**
 * `deno task shadow --pipeline NAME --step STEP --definition FILE`: replays a definition
 * step's history through the same step of another version of the definition.
 */
async function replayDefinition(
  values: Record<string, string | boolean | undefined>,
  range: { since?: Date; until?: Date; count?: number; sample?: number },
): Promise<number> {
  if (typeof values.step !== "string" || typeof values.definition !== "string") {
    throw new Error(
      "usage: deno task shadow --pipeline NAME --step STEP --definition FILE " +
        "[--count N] [--since ISO] [--until ISO] [--sample F] [--labels FILE] [--out PATH]",
    );
  }
  const spec = parseShadowSpec({
    id: "replay",
    pipeline: values.pipeline,
    step: values.step,
    candidate: { definition: values.definition },
    ...(range.sample !== undefined ? { limits: { sample: range.sample } } : {}),
  });
  // `--labels FILE`: JSON Lines of `{"item_id": ..., "<field>": <expected>}`.
  const labels = typeof values.labels === "string"
    ? parseItemLabels(await Deno.readTextFile(values.labels))
    : undefined;
  const config = loadConfig({ args: [] });
  const root = new URL("../", import.meta.url).pathname;
  const files = config.pipelines.length > 0 ? config.pipelines : await listedPipelines();
  const pipelines = await loadPipelines(files, root);
  const nc = await connectNats(config.natsUrl, "weft-shadow", {
    nkeySeedFile: config.natsNkey || undefined,
    identity: "ops",
    ...tlsCredentials(config),
  });
  try {
    const replay = await replayShadow({
      nc,
      spec,
      config,
      log: createLogger("weft-shadow", config.logLevel),
      pipelines,
      root,
      ...range,
    });
    const decided = replay.decisions.length;
    if (decided === 0 && replay.failed === 0) {
      say(
        `shadow: no ${spec.pipeline}.${spec.step} items in the range given: nothing to compare`,
        Deno.stderr,
      );
      return 1;
    }
    const r = liveShadowReport(spec.id, replay.decisions);
    if (labels) r.labelled = labelledAccuracy(replay.decisions, labels);
    const stats = {
      failed: replay.failed,
      timed_out: replay.timedOut,
      items_per_s: Math.round(decided / Math.max(replay.wallSeconds, 1e-6)),
      handler_ms_mean: decided ? Math.round((replay.handlerSeconds / decided) * 1e6) / 1e3 : 0,
      ...(replay.llm ? { llm: replay.llm } : {}),
    };
    say(formatLiveShadowReport(r, "replay"));
    say(
      `\ncandidate: ${stats.items_per_s} items/s, ${stats.handler_ms_mean} ms per item, ` +
        `${stats.failed} failed` +
        (replay.timedOut
          ? ` (${replay.timedOut} did not answer within ${config.handlerTimeoutMs} ms, ` +
            `WEFT_HANDLER_TIMEOUT_MS)`
          : "") +
        (replay.llm
          ? `, LLM ${replay.llm.calls} calls, ${replay.llm.total_tokens} tokens, ` +
            `$${replay.llm.cost_usd.toFixed(4)}`
          : ""),
    );
    if (typeof values.out === "string") {
      await Deno.writeTextFile(
        `${values.out}.json`,
        JSON.stringify({ ...r, ...stats }, null, 2) + "\n",
      );
      await Deno.writeTextFile(`${values.out}.html`, liveShadowReportHtml(r, "replay"));
      say(`wrote ${values.out}.json and ${values.out}.html`);
    }
    return r.items > 0 ? 0 : 1;
  } finally {
    await nc.close();
  }
}

async function main(args: string[]): Promise<number> {
  if (args.includes("--help") || args.includes("-h") || args[0] === "help") {
    say(USAGE);
    return 0;
  }
  if (args[0] === "report") return report(args.slice(1));
  if (args[0] !== undefined && VERBS.includes(args[0])) return control(args[0], args.slice(1));
  refuseUnknown(args, REPLAY_FLAGS, false);
  const { values } = parseArgs({
    args,
    options: {
      since: { type: "string" },
      until: { type: "string" },
      count: { type: "string" },
      sample: { type: "string" },
      labels: { type: "string" },
      out: { type: "string" },
      prompt: { type: "string" },
      pipeline: { type: "string" },
      step: { type: "string" },
      definition: { type: "string" },
    },
    strict: false,
  });
  refuseBare(values, REPLAY_OWN_FLAGS);
  const feedbackReplay = values.pipeline === undefined || values.pipeline === "feedback";
  if (feedbackReplay && (values.step !== undefined || values.definition !== undefined)) {
    throw new Error(
      "--step and --definition replay a step of a definition's pipeline: add --pipeline NAME. " +
        "The feedback replay runs its candidate analyzers (--analyzers, --rules, --prompt) " +
        "over all its steps",
    );
  }
  if (typeof values.out === "string") await assertWritable(values.out, [".json", ".html"]);
  // The candidate's analyzers come from the usual settings (flags and WEFT_* env).
  const config = loadConfig({ args });
  const date = (v: unknown, name: string) => {
    if (v === undefined) return undefined;
    const d = new Date(String(v));
    if (Number.isNaN(d.getTime())) throw new Error(`--${name} must be an ISO time`);
    return d;
  };
  const count = values.count === undefined ? undefined : Number(values.count);
  const sample = values.sample === undefined ? undefined : Number(values.sample);
  if (count !== undefined && !(Number.isInteger(count) && count > 0)) {
    throw new Error("--count must be a positive integer");
  }
  if (sample !== undefined && !(sample > 0 && sample <= 1)) {
    throw new Error("--sample must be in (0, 1]");
  }
  if (typeof values.pipeline === "string" && values.pipeline !== "feedback") {
    return await replayDefinition(values, {
      since: date(values.since, "since"),
      until: date(values.until, "until"),
      count,
      sample,
    });
  }
  // `--prompt sentiment=v2[,topics=v2]`: the candidate's prompt versions (llm).
  const prompts: Record<string, string> = {};
  if (typeof values.prompt === "string") {
    for (const part of values.prompt.split(",")) {
      const m = /^(sentiment|topics|toxicity)=([A-Za-z0-9_-]+)$/.exec(part.trim());
      if (!m) throw new Error("--prompt takes KIND=VERSION[,...], e.g. sentiment=v2");
      prompts[m[1]!] = m[2]!;
    }
  }
  // Never the embedded analyzers in the LLM's place: a failed call is the candidate's
  // failure, counted, as a live shadow's is (candidateConfig's `fallback: false`).
  const candidate = await feedbackAnalyzers({
    ...config,
    llmPromptVersions: prompts,
    llmFallback: false,
  });
  const promptNote = Object.entries(prompts).map(([k, v]) => ` ${k}@${v}`).join("");
  const name = `${config.analyzers}${
    config.analyzers === "llm" ? `:${config.llmModel}${promptNote}` : ""
  } (rules ${config.rulesPath})`;
  const nc = await connectNats(config.natsUrl, "weft-shadow", {
    nkeySeedFile: config.natsNkey || undefined,
    identity: "ops",
    ...tlsCredentials(config),
  });
  try {
    const production = await readProduction(nc, {
      since: date(values.since, "since"),
      until: date(values.until, "until"),
      count,
      sample,
    });
    if (production.length === 0) {
      say("shadow: no feedback items in the range given: nothing to compare", Deno.stderr);
      return 1;
    }
    const started = performance.now();
    const run = await decideAll(candidate, production);
    const wallMs = performance.now() - started;
    if (production.length > 0 && run.items.length === 0) {
      say(
        `shadow: the candidate failed on every one of the ${production.length} items ` +
          `(first: ${run.firstFailure}); nothing to compare`,
        Deno.stderr,
      );
      return 1;
    }
    let labels;
    if (typeof values.labels === "string") {
      const { task, rows } = parseRows(await Deno.readTextFile(values.labels));
      if (task !== "sentiment" && task !== "topics") {
        throw new Error(`--labels: ${task} rows are not a feedback decision`);
      }
      labels = {
        task,
        byText: new Map(
          rows.map((r) => [r.text, r.gold]),
        ),
      } as const;
    }
    const stats = candidate.llmStats?.snapshot();
    const report = shadowReport(name, run.items, run.decided, {
      wallMs,
      failures: run,
      labels,
      ...(stats
        ? {
          llm: { calls: stats.calls, total_tokens: stats.total_tokens, cost_usd: stats.cost_usd },
        }
        : {}),
    });
    say(formatShadowReport(report));
    if (typeof values.out === "string") {
      await Deno.writeTextFile(`${values.out}.json`, JSON.stringify(report, null, 2) + "\n");
      await Deno.writeTextFile(`${values.out}.html`, shadowReportHtml(report));
      say(`wrote ${values.out}.json and ${values.out}.html`);
    }
    return 0;
  } finally {
    await nc.close();
  }
}

if (import.meta.main) {
  try {
    Deno.exit(await main(Deno.args));
  } catch (err) {
    say(`shadow: ${(err as Error).message}`, Deno.stderr);
    Deno.exit(2);
  }
}
