/**
 * `deno task rebuild-state [--pipeline NAME]`: rebuilds every item's state of a pipeline
 * from its stream alone and compares it with its state bucket (exit 1 on any difference).
 * NAME is `feedback` (the default), `content`, or a definition's pipeline (from
 * WEFT_PIPELINES or pipelines/run.json). With `--write`, puts the rebuilt states into the
 * bucket (stop the pipeline's state writer first, or it may race). Prints one JSON line of
 * figures.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { errors } from "@nats-io/nats-core";
import { loadConfig, strayArguments, unknownFlags } from "../src/config.ts";
import { ConfigError } from "../src/errors.ts";
import { connectNats, permissionViolation, tlsCredentials } from "../src/nats.ts";
import { loadPipelines, pipelineStateSpec } from "../src/pipeline/runtime.ts";
import { compareStates, rebuildStates } from "../src/rebuild.ts";
import type { StateSpec } from "../src/state_writer.ts";
import { readStream } from "../src/stream_reader.ts";
import { listedPipelines } from "../src/supervisor.ts";
import { SHIPPED_PIPELINES } from "../pipelines/shipped.ts";

/** The state spec of pipeline `name`: a shipped one's (its wiring's), or a loaded definition's. */
async function stateSpecOf(name: string, files: readonly string[]): Promise<StateSpec<unknown>> {
  const shipped = SHIPPED_PIPELINES.find((w) => w.name === name)?.items?.state;
  if (shipped) return shipped as StateSpec<unknown>;
  const root = new URL("../", import.meta.url).pathname;
  const loaded = (await loadPipelines(files, root)).find((p) => p.def.name === name);
  if (!loaded) {
    throw new Error(
      `--pipeline: no pipeline ${JSON.stringify(name)} (${
        SHIPPED_PIPELINES.map((w) => w.name).join(", ")
      }, or one of WEFT_PIPELINES / pipelines/run.json)`,
    );
  }
  return pipelineStateSpec(loaded) as StateSpec<unknown>;
}

/** Its own flags, and the settings flags it reads (loadConfig). */
const FLAGS = ["write", "pipeline", "nats-url", "log-level", "pipelines"];

/**
 * Refuses what it does not take, naming it (and the flag likely meant): a mistyped
 * `--pipline orders` is not a rebuild of feedback, the default, nor `--pipeline` alone one of
 * a pipeline named "true".
 */
function refuseArgs(args: readonly string[], pipeline: unknown): void {
  const unknown = unknownFlags(args, FLAGS);
  if (unknown.length > 0) {
    throw new ConfigError(
      `unknown flag${unknown.length > 1 ? "s" : ""}: ${unknown.join(", ")} ` +
        "(it takes --pipeline NAME and --write)",
    );
  }
  // (`--write` takes no value: what follows it is the next argument.)
  const stray = strayArguments(args.filter((a) => a !== "--write"));
  if (stray.length > 0) {
    throw new ConfigError(
      `unexpected argument${stray.length > 1 ? "s" : ""}: ${stray.join(" ")} ` +
        "(a pipeline is named with --pipeline NAME)",
    );
  }
  if (typeof pipeline !== "string") throw new ConfigError("--pipeline needs a pipeline's name");
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: { write: { type: "boolean" }, pipeline: { type: "string", default: "feedback" } },
    strict: false,
  });
  let spec: StateSpec<unknown>;
  let config: ReturnType<typeof loadConfig>;
  try {
    refuseArgs(Deno.args, values.pipeline);
    // Its own flags (--write, --pipeline) are not settings: loadConfig leaves them alone.
    config = loadConfig();
    const files = config.pipelines.length > 0 ? config.pipelines : await listedPipelines();
    spec = await stateSpecOf(String(values.pipeline), files);
  } catch (err) {
    Deno.stderr.writeSync(new TextEncoder().encode(`rebuild-state: ${(err as Error).message}\n`));
    Deno.exit(2);
  }
  // Under `deno task start`, NATS wants an identity: the ops key reads, the admin key
  // (--write) also writes the bucket (WEFT_NATS_NKEY=data/identities/admin.nk).
  const nc = await connectNats(config.natsUrl, "weft-rebuild-state", {
    nkeySeedFile: config.natsNkey || undefined,
    ...tlsCredentials(config),
  }).catch((err) => {
    const said = err instanceof ConfigError ? err.message : err instanceof errors.ConnectionError
      // Nothing listens there: a mesh on another port, NATS_URL unset or mistyped.
      ? `no NATS server answers at ${config.natsUrl} (${err.message}): set NATS_URL to the ` +
        `server deno task start runs ("nats" in its "weft is ready" line)`
      : undefined;
    if (said === undefined) throw err;
    Deno.stderr.writeSync(new TextEncoder().encode(`rebuild-state: ${said}\n`));
    Deno.exit(2);
  });
  const js = jetstream(nc);
  const started = performance.now();
  const { states, events, skipped } = await rebuildStates(js, spec);
  const live = new Map<string, unknown>();
  for await (const m of readStream(js, `KV_${spec.bucket}`)) {
    const id = m.subject.slice(`$KV.${spec.bucket}.`.length);
    if (m.data.length === 0) live.delete(id);
    else live.set(id, m.json());
  }
  const diff = compareStates(states, live);
  let written = 0;
  if (values.write) {
    const kv = await new Kvm(nc).open(spec.bucket);
    for (const id of [...diff.different, ...diff.missingLive]) {
      try {
        await kv.put(id, JSON.stringify(states.get(id)));
      } catch (err) {
        const refused = permissionViolation(err);
        if (!refused) throw err;
        // The ops key reads; only the admin key writes a state bucket.
        Deno.stderr.writeSync(
          new TextEncoder().encode(
            `rebuild-state: --write: this key may not write ${spec.bucket} (${refused.message}); ` +
              `${written} of ${diff.different.length + diff.missingLive.length} states ` +
              `written. Run it with the admin key: WEFT_NATS_NKEY=data/identities/admin.nk ` +
              `(under WEFT_NATS_DIR when set)\n`,
          ),
        );
        await nc.close();
        Deno.exit(2);
      }
      written++;
    }
  }
  const report = {
    pipeline: values.pipeline,
    items: states.size,
    events,
    skipped_invalid: skipped,
    equal: diff.equal,
    different: diff.different.length,
    missing_in_bucket: diff.missingLive.length,
    only_in_bucket: diff.missingRebuilt.length,
    written,
    ms: Math.round(performance.now() - started),
  };
  Deno.stdout.writeSync(new TextEncoder().encode(JSON.stringify(report) + "\n"));
  await nc.close();
  const clean = diff.different.length + diff.missingLive.length === 0;
  Deno.exit(clean || values.write ? 0 : 1);
}
