/**
 * `deno task start`: runs the whole mesh on one machine. Starts nats-server from
 * nats.conf (unless NATS_URL names a running server), ensures the streams and buckets,
 * starts every service as its own Deno process with the narrowest permissions that work,
 * restarts a crashed service with exponential backoff, and on Ctrl-C (SIGINT) or SIGTERM
 * drains the services first and stops NATS last.
 *
 * @module
 */
import { type JetStreamManager, jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/nats-core";
import {
  type Config,
  describeConfig,
  ENV_PERMISSION,
  flagsUsage,
  isLoopback,
  loadConfig,
  strayArguments,
  unknownFlags,
} from "./config.ts";
import { createLogger, type Logger } from "./observability/log.ts";
import { ConfigError, isNatsUnavailable } from "./errors.ts";
import { connectNats, FIRST_CONNECT_PATIENCE_MS, tlsCredentials } from "./nats.ts";
import {
  freePort,
  type NatsServer,
  NatsServerExitedError,
  NatsServerMissingError,
  portFree,
  serverVersion,
  startNatsServer,
  stopLeftover,
  SYNC_INTERVAL_SERVER,
  syncIntervalOf,
  tooOldMessage,
  versionAtLeast,
  withSyncInterval,
} from "./nats_server.ts";
import { ensureStream, ensureTopology, streamConfigs } from "./topology.ts";
import {
  EDGE_MIN_SERVER_VERSION,
  edgeStream,
  edgeStreamConfigs,
  hubConf,
  leafIdentity,
  leafKeyFile,
  leafPermissions,
  leafRefusalWatcher,
  type LeafTls,
  leafTlsWatcher,
  siteConf,
  type SiteDurable,
  type SiteStream,
  watchSources,
} from "./edge.ts";
import {
  type Access,
  authorizationBlock,
  ensureIdentities,
  IDENTITY_DIR,
  inboxPrefix,
  type Permissions,
  permissionsFor,
} from "./identities.ts";
import {
  checkHoldsWithinRetention,
  checkModelSteps,
  definitionDirs,
  hasScratchpad,
  type LoadedPipeline,
  loadPipelines,
  pipelineGatewayAccess,
  pipelineServiceSpecs,
  pipelineTopology,
  stepNet,
} from "./pipeline/runtime.ts";
import { checkDuplicateKeys } from "./pipeline/duplicate_keys.ts";
import { metricsSubject, statusSubject } from "./observability/micro.ts";
import { pipelineSubjects } from "./pipeline/derive.ts";
import { scratchpadBucketOf } from "./pipeline/agent_step.ts";
import { retrying } from "./retry.ts";
import { SHIPPED_PIPELINES } from "../pipelines/shipped.ts";
// The shipped pipelines' own settings, validated at start with the rest.
import "../pipelines/shipped_settings.ts";
import {
  callerSchedulableSubjects,
  mergeAccess,
  type PipelineWiring,
  type ServiceSpec,
  wiredReads,
} from "./wiring.ts";
import {
  DEADLETTER_STREAM,
  DIGEST_STREAM,
  IDEMPOTENCY_BUCKET,
  RUNTIME_STREAMS,
  SCHEDULE_BUCKET,
  SCHEDULE_LEASE_BUCKET,
  SHADOW_AUDIT_PREFIX,
  SHADOW_BUCKET,
  SHADOW_REQUEST_PREFIX,
  SHADOW_STREAM,
  SHADOW_TALLY_BUCKET,
  STEP_VERSION_BUCKET,
} from "./subjects.ts";

/** The repository root: service entries and nats.conf are relative to it. */
const ROOT = new URL("../", import.meta.url);

/** The server's answer when the streams' reserved limits pass its JetStream store. */
const INSUFFICIENT_STORE = /insufficient (storage )?resources/i;

/**
 * The streams on the server that belong to no running pipeline (none of `running`: the
 * shipped pipelines', the runtime's and the loaded definitions' streams; KV buckets and object
 * stores apart), with the bytes each reserves of the store: often a definition no longer run
 * (an experiment's), which keeps its reservation until removed.
 */
export async function strayStreams(
  jsm: JetStreamManager,
  running: Iterable<string>,
): Promise<{ name: string; maxBytes: number }[]> {
  const known = new Set(running);
  const out: { name: string; maxBytes: number }[] = [];
  for await (const info of jsm.streams.list()) {
    const name = info.config.name;
    if (known.has(name) || name.startsWith("KV_") || name.startsWith("OBJ_")) continue;
    out.push({ name, maxBytes: info.config.max_bytes ?? -1 });
  }
  return out.sort((a, b) => b.maxBytes - a.maxBytes || a.name.localeCompare(b.name));
}

/**
 * What to say of `stray` ({@link strayStreams}) when the store is short: their names, what
 * each reserves, and how to remove one (on `server`, with the admin key `nkey` under nkeys;
 * with `stopsServer`, the refused start's own nats-server, when to). Empty when there is none.
 *
 * @example
 * ```ts
 * import { strayStreamsHint } from "./supervisor.ts";
 * const said = strayStreamsHint([{ name: "BADB", maxBytes: 1024 ** 3 }], "data/identities/admin.nk");
 * console.assert(said.includes("BADB (1 GiB)"));
 * console.assert(said.includes("nats stream rm NAME --nkey data/identities/admin.nk"));
 * ```
 */
export function strayStreamsHint(
  stray: readonly { name: string; maxBytes: number }[],
  nkey?: string,
  server?: string,
  stopsServer = false,
): string {
  if (stray.length === 0) return "";
  const size = (b: number) =>
    b <= 0
      ? "no byte limit"
      : b >= 1024 ** 3
      ? `${+(b / 1024 ** 3).toFixed(2)} GiB`
      : `${+(b / 1024 ** 2).toFixed(2)} MiB`;
  return `. Streams no running pipeline uses hold part of that store: ` +
    `${stray.map((s) => `${s.name} (${size(s.maxBytes)})`).join(", ")}; remove one no ` +
    `longer needed (its messages are lost) with \`nats stream rm NAME${
      server ? ` --server ${server}` : ""
    }${nkey ? ` --nkey ${nkey}` : ""}\`${
      // This start's own nats-server stops with it: the command needs one running.
      stopsServer
        ? ", while a start that fits runs (this one stops its nats-server: start once " +
          "without the new definitions, or with WEFT_STREAM_MAX_BYTES lowered)"
        : ""}`;
}

/** nats.conf's client port, used when WEFT_NATS_PORT does not override it. */
const DEFAULT_NATS_PORT = 4222;
/** Where the supervisor's nats-server writes its pid, relative to its working directory. */
const NATS_PID_FILE = "nats-server.pid";

export type { ServiceSpec } from "./wiring.ts";
export { mergeAccess } from "./wiring.ts";

/**
 * The services of the mesh: the built-in ones, then those of the loaded pipelines; the
 * gateway's and the operators' access grown by what the pipelines need.
 */
export function meshServices(loaded: readonly LoadedPipeline[] = []): {
  services: ServiceSpec[];
  operators: Record<"admin" | "ops", Access>;
} {
  if (loaded.length === 0) return { services: [...SERVICES], operators: OPERATOR_IDENTITIES };
  const extra = pipelineGatewayAccess(loaded);
  const streams = loaded.map((p) => pipelineSubjects(p.def).stream);
  return {
    services: [
      ...SERVICES.map((s) =>
        s.name === "gateway"
          ? {
            ...s,
            access: mergeAccess(s.access, extra.gateway),
            reads: [...s.reads ?? [], ...definitionDirs(loaded, ROOT.pathname)],
          }
          : s.name === "scheduler"
          // Its timers fire into the definitions' streams (checked as for its own, above), and
          // so do callers' schedules of their submissions.
          ? {
            ...s,
            access: mergeAccess(s.access, {
              readsStreams: streams,
              publishes: loaded.flatMap((p) => [`${p.def.name}.submit`, `${p.def.name}._timer.*`]),
            }),
          }
          : s.name === "shadow"
          // Shadows of the definitions' work steps: their streams, and the definitions; an
          // agent's copy reads its item's scratchpad and what its tools read.
          ? {
            ...s,
            access: mergeAccess(s.access, {
              readsStreams: streams,
              managesConsumers: streams,
              readsBuckets: loaded.flatMap((p) =>
                hasScratchpad(p.def) ? [scratchpadBucketOf(p.def.name), ...p.def.buckets ?? []] : []
              ),
            }),
            reads: [...s.reads ?? [], ...definitionDirs(loaded, ROOT.pathname)],
            // A live shadow runs a candidate's copy of a step: what the step may reach.
            net: loaded.flatMap((p) =>
              Object.keys(p.def.steps).flatMap((id) => stepNet(p.def, id))
            ),
          }
          : s
      ),
      ...pipelineServiceSpecs(loaded, ROOT.pathname),
    ],
    operators: {
      ...OPERATOR_IDENTITIES,
      ops: mergeAccess(OPERATOR_IDENTITIES.ops, withoutCoreSubscriptions(extra.ops)),
    },
  };
}

/**
 * `access` without its plain subscriptions: an operator watches a pipeline's subjects through
 * JetStream (`nats sub --stream`), never with a core subscription on a subject a stream
 * captures (see {@link OPERATOR_IDENTITIES}).
 */
function withoutCoreSubscriptions(access: Access): Access {
  const { subscribes: _dropped, ...rest } = access;
  return rest;
}

/** The service that hosts live shadows; started with the first one (see supervise). */
export const SHADOW_SERVICE = "shadow";

/** The runtime's own services: the gateway, the scheduler and the live shadows. */
const RUNTIME_SERVICES: readonly ServiceSpec[] = [
  {
    name: "gateway",
    entry: "services/gateway.ts",
    listens: true,
    // A live shadow's candidate is built at attach, to refuse one that cannot run.
    reads: ["rules", "prompts"],
    access: {
      // Human actions; a redrive republishes a letter's original to the input of the step
      // that consumed it (after checking it byte for byte against the stream). Each
      // pipeline adds its own subjects (its wiring's `gateway`).
      publishes: ["deadletter.redriven.*", `${SHADOW_AUDIT_PREFIX}.>`],
      // Each service's metrics on its own subject (GET /metrics), and statuses.
      requests: [metricsSubject("*"), "weft.*.status", "$SRV.>"],
      // The gateway and the events gateway (WEFT_EVENTS_PORT), one identity, ask each other
      // on weft.gateway.metrics for the items each accepted (src/gateway/mesh_metrics.ts).
      answersItself: true,
      serves: ["weft.schedules.>", "weft.deadletters.>", `${SHADOW_REQUEST_PREFIX}.>`],
      readsStreams: [DEADLETTER_STREAM, DIGEST_STREAM, SHADOW_STREAM],
      writesBuckets: [IDEMPOTENCY_BUCKET, SHADOW_BUCKET, STEP_VERSION_BUCKET],
      // Callers' schedules (ids without a `.`), not the pipelines' own timers.
      writesKeys: [{ bucket: SCHEDULE_BUCKET, keys: "*" }],
    },
  },
  {
    name: "scheduler",
    entry: "services/scheduler.ts",
    background: true,
    access: {
      // Each pipeline adds what it may schedule (its wiring's `schedulable` and `timers`; a
      // definition's submissions and timers, `<name>._timer.*`): never a subject of the
      // runtime's own (a timer "of" `deadletter` would be a forged dead letter).
      publishes: [],
      writesBuckets: [SCHEDULE_BUCKET, SCHEDULE_LEASE_BUCKET],
    },
  },
  {
    // Live shadows: read production's input and outputs (each pipeline's wiring adds its
    // streams), publish only shadow decisions (not the audit events).
    name: SHADOW_SERVICE,
    entry: "services/shadow.ts",
    reads: ["rules", "prompts"],
    llm: true,
    apart: true,
    // A candidate that falls behind only skips items (its own budget and rate limit).
    background: true,
    access: {
      publishes: ["shadow.*.*.*"],
      // Not `shadow._audit.<action>.<step>` (a real audit event has 5 tokens, out of reach
      // of `shadow.*.*.*`; a 4-token one under _audit would pass for one to a reader).
      deniesPublishes: ["shadow._audit.>"],
      // SHADOW: its own decisions, counted again after a restart; its other counters (and
      // budget spent) in the tally bucket.
      readsStreams: [SHADOW_STREAM],
      readsBuckets: [SHADOW_BUCKET],
      writesBuckets: [SHADOW_TALLY_BUCKET],
    },
  },
];

/**
 * The services of the mesh's hand-wired pipelines (`wirings`, the shipped ones by default)
 * and the runtime's own: each pipeline's services in start order, then the gateway, the
 * scheduler and the shadow service, grown by what each pipeline needs of them.
 */
export function wiredServices(
  wirings: readonly PipelineWiring[] = SHIPPED_PIPELINES,
): ServiceSpec[] {
  const grow =
    (name: string, part: (w: PipelineWiring) => Access | undefined) =>
    (s: ServiceSpec): ServiceSpec =>
      s.name !== name
        ? s
        : { ...s, access: wirings.reduce((a, w) => mergeAccess(a, part(w) ?? {}), s.access) };
  return [
    ...wirings.flatMap((w) => w.services),
    ...RUNTIME_SERVICES.map(grow("gateway", (w) => w.gateway))
      .map(grow("shadow", (w) => w.shadow))
      // It reads what it fires into: a firing answered "duplicate" is checked to be its own.
      .map(grow("scheduler", (w) => ({
        publishes: [...w.schedulable ?? [], ...w.timers ?? []],
        readsStreams: w.streams.map((s) => s.name),
      }))),
  ];
}

/** The services of the mesh with the shipped pipelines, in start order. */
export const SERVICES: readonly ServiceSpec[] = wiredServices();

/** What operators read of the shipped pipelines: every stream, bucket and object store. */
const SHIPPED_READS = wiredReads(SHIPPED_PIPELINES);

/**
 * The identities besides the services': `admin` (the supervisor: streams, buckets, and
 * anything an operator does on purpose) and `ops` (the nats CLI day to day: read every
 * stream and bucket, submit, send requests, `nats micro`; never change or delete a stream,
 * write a bucket, or publish a step's event).
 */
export const OPERATOR_IDENTITIES: Readonly<Record<"admin" | "ops", Access>> = {
  admin: { admin: true },
  ops: {
    publishes: callerSchedulableSubjects(SHIPPED_PIPELINES),
    requests: ["weft.>", "$SRV.>"],
    // No plain subscription but its own inbox (`_INBOX_ops.>`: run the CLI with
    // `--inbox-prefix _INBOX_ops`): it watches events through JetStream (`nats sub --stream
    // NAME`, an ordered consumer delivering into that inbox). A core subscription on a subject
    // a stream captures is what lets a reader copy one stream into another: the server
    // delivers a push consumer's messages to any `deliver_subject` with interest, unchecked
    // against its creator's permissions (nats-io/nats-server#8274), and the stream capturing
    // that subject stores them (`nats sub deadletter.x` then `nats consumer add ORDERS c
    // --target deadletter.x` forged dead letters). Nor `_INBOX.>`: the replies to every nats
    // CLI run with its default prefix, the admin key's included. Nor `weft.>` (others'
    // requests to the gateway carry their API keys), the JetStream API or acks.
    answers: false,
    readsStreams: [...SHIPPED_READS.readsStreams!, ...RUNTIME_STREAMS],
    readsBuckets: [
      ...SHIPPED_READS.readsBuckets!,
      SCHEDULE_BUCKET,
      SCHEDULE_LEASE_BUCKET,
      IDEMPOTENCY_BUCKET,
      SHADOW_BUCKET,
      SHADOW_TALLY_BUCKET,
      STEP_VERSION_BUCKET,
    ],
    readsObjects: SHIPPED_READS.readsObjects,
  },
};

/** Every identity's permissions: the services' and the operators'. */
export function meshPermissions(
  mesh: { services: readonly ServiceSpec[]; operators: Record<"admin" | "ops", Access> } = {
    services: SERVICES,
    operators: OPERATOR_IDENTITIES,
  },
): { name: string; permissions: Permissions }[] {
  const durables = mesh.services.flatMap((s) => s.access.consumes ?? []);
  // One identity per service, however many processes run it (the events gateway).
  const services = mesh.services.filter((s, i) =>
    mesh.services.findIndex((t) => t.name === s.name) === i
  );
  return [
    // Every service answers its own metrics and status requests (src/observability/micro.ts):
    // on subjects of its own, so no other identity sees the requests' reply inboxes.
    ...services.map((s) => ({
      name: s.name,
      access: {
        ...s.access,
        serves: [...s.access.serves ?? [], metricsSubject(s.name), statusSubject(s.name)],
      },
    })),
    ...Object.entries(mesh.operators).map(([name, access]) => ({ name, access })),
  ].map(({ name, access }, _, all) => ({
    name,
    permissions: permissionsFor(
      name,
      access,
      durables,
      all.map((a) => a.name),
      // Who sends requests (services answer into their inboxes only).
      all.filter((a) => a.access.admin || (a.access.requests ?? []).length > 0).map((a) => a.name),
    ),
  }));
}

/** host:port of each server in a NATS URL list, for `--allow-net`. */
export function natsHosts(natsUrl: string): string[] {
  return natsUrl.split(",").map((u) => {
    const url = new URL(u.trim().includes("://") ? u.trim() : `nats://${u.trim()}`);
    return `${url.hostname}:${url.port || "4222"}`;
  });
}

/** The `deno run` arguments for a service: permissions narrowed to what it needs. */
export function serviceArgs(spec: ServiceSpec, config: Config): string[] {
  return processArgs([spec], config, [spec.entry], config.natsNkey ? [config.natsNkey] : []);
}

/**
 * The `deno run` arguments of a process running `specs` (one, or several together): the
 * union of what each needs, `seedFiles` readable, then `entry` (module and arguments).
 */
export function processArgs(
  specs: readonly ServiceSpec[],
  config: Config,
  entry: string[],
  seedFiles: readonly string[],
): string[] {
  const net = [...natsHosts(config.natsUrl)];
  const listens = specs.some((s) => s.listens);
  for (const port of listenPorts(specs, config)) net.push(`${config.host}:${port}`);
  // A definition's step's own hosts (its `allowNet`): an API its handler or tools call.
  net.push(...specs.flatMap((s) => s.net ?? []));
  // An analyzing step reaches the LLM endpoint whenever one is configured: with `llm`
  // analyzers, or to run an LLM candidate promoted from a live shadow.
  const llm = specs.some((s) => s.analyzes) &&
    (config.analyzers === "llm" || config.llmBaseUrl !== "");
  if (llm || (specs.some((s) => s.llm) && config.llmBaseUrl)) {
    const u = new URL(config.llmBaseUrl);
    net.push(`${u.hostname}:${u.port || (u.protocol === "https:" ? 443 : 80)}`);
  }
  const args = [
    "run",
    "--no-prompt",
    // Services print only JSON log lines: silence Deno's own progress notices (downloads,
    // "waiting for file lock"); errors still reach stderr.
    "--quiet",
    // A request's signal aborts only when its client goes away, not also after every
    // successful response (Deno's legacy behaviour, which prints a free-text deprecation
    // warning the first time a handler reads the signal: the event streams do).
    ...(listens ? ["--unstable-no-legacy-abort"] : []),
    ...v8Flags(specs, config),
    `--allow-net=${net.join(",")}`,
    `--allow-env=${ENV_PERMISSION}`,
  ];
  const read = [
    ...seedFiles,
    ...(config.natsCa ? [config.natsCa] : []),
    ...(config.natsCert ? [config.natsCert, config.natsKey] : []),
    ...(specs.some((s) => s.readsRules) ? [config.rulesPath] : []),
    ...(listens && config.tlsCert ? [config.tlsCert, config.tlsKey] : []),
    ...(llm ? ["prompts"] : []),
    ...specs.flatMap((s) => s.reads ?? []),
  ];
  if (read.length > 0) args.push(`--allow-read=${read.join(",")}`);
  args.push(...entry);
  return args;
}

/** `--v8-flags=...` for a process running `specs`: WEFT_V8_FLAGS, and the background ones'. */
function v8Flags(specs: readonly ServiceSpec[], config: Config): string[] {
  const flags = new Set(config.v8Flags ? config.v8Flags.split(",") : []);
  if (specs.length > 0 && specs.every((s) => s.background)) flags.add("--optimize-for-size");
  return flags.size > 0 ? [`--v8-flags=${[...flags].join(",")}`] : [];
}

/** The ports the listening services among `specs` take: their own, or the gateway's. */
function listenPorts(specs: readonly ServiceSpec[], config: Pick<Config, "port">): number[] {
  return [...new Set(specs.filter((s) => s.listens).map((s) => s.port ?? config.port))];
}

/**
 * The second gateway of `WEFT_EVENTS_PORT`: the gateway as it is (same code, identity and
 * routes), on its own port and always in a process of its own, so that event-stream clients
 * sent to it never delay ingest on the first.
 */
export function eventsGateway(services: readonly ServiceSpec[], port: number): ServiceSpec {
  const gateway = services.find((s) => s.name === "gateway");
  if (!gateway) throw new ConfigError("WEFT_EVENTS_PORT needs the gateway");
  return { ...gateway, port, apart: true, replicas: undefined, replica: 1 };
}

/** The module that runs several services in one process. */
export const TOGETHER_ENTRY = "services/together.ts";

/**
 * How the supervisor groups services into processes: `together` is empty (one process
 * each), `all`, or a comma-separated list of names run in one process (the rest alone).
 * Throws a ConfigError naming an unknown service.
 */
export function processGroups(
  together: string,
  services: readonly ServiceSpec[] = SERVICES,
): ServiceSpec[][] {
  // A service with several replicas: one in the group (when grouped), the others alone.
  const extra = (s: ServiceSpec, grouped: boolean): ServiceSpec[][] =>
    Array.from(
      { length: Math.max(0, (s.replicas ?? 1) - (grouped ? 1 : 0)) },
      (_, i) => [(s.replicas ?? 1) > 1 ? { ...s, replica: i + (grouped ? 1 : 0) } : s],
    );
  if (!together) return services.flatMap((s) => extra(s, false));
  const names = together === "all"
    ? services.filter((s) => !s.apart).map((s) => s.name)
    : together.split(",");
  const unknown = names.filter((n) => !services.some((s) => s.name === n));
  if (unknown.length > 0) {
    throw new ConfigError(`WEFT_TOGETHER names no such service: ${unknown.join(", ")}`);
  }
  const grouped = services.filter((s) => names.includes(s.name) && !s.apart);
  return [
    grouped,
    ...grouped.flatMap((s) => extra(s, true)),
    ...services.filter((s) => !grouped.includes(s)).flatMap((s) => extra(s, false)),
  ];
}

/**
 * Extra environment of a service. With telemetry on (`OTEL_DENO=true`, inherited with the
 * other `OTEL_*` variables, which Deno's runtime reads itself: no `--allow-env` or
 * `--allow-net` is needed for them), each service is named `weft-<name>` in its spans.
 */
export function serviceEnv(
  spec: ServiceSpec,
  getEnv: (name: string) => string | undefined,
): Record<string, string> {
  const on = getEnv("OTEL_DENO");
  if (!on || on === "false" || on === "0") return {};
  return { OTEL_SERVICE_NAME: `weft-${spec.name}` };
}

function envOrUndefined(name: string): string | undefined {
  try {
    return Deno.env.get(name);
  } catch {
    return undefined; // not in --allow-env: telemetry stays as configured
  }
}

/** Delay before restart number `n` of a crashed service, ms. */
export function restartDelay(n: number): number {
  return Math.min(30_000, 500 * 2 ** Math.max(0, n - 1));
}

interface Running {
  spec: ServiceSpec;
  child: Deno.ChildProcess;
  startedAt: number;
  restarts: number;
}

/** Where identities live, under nats-server's directory (src/identities.ts). */
export { IDENTITY_DIR };
/** The configuration the supervisor starts nats-server with when it authenticates. */
export const GENERATED_CONF = "data/nats-weft.conf";

/**
 * Makes (or reuses) every identity's nkey under `cwd`/{@link IDENTITY_DIR}, and writes
 * `cwd`/{@link GENERATED_CONF}: `baseConf` followed by the authorization block. Returns the
 * file and each identity's seed file.
 */
export async function writeAuthConfig(
  baseConf: string,
  cwd: string,
  mesh?: Parameters<typeof meshPermissions>[0],
  edge: EdgeRole = {},
  sync = "",
): Promise<{ configFile: string; seeds: Map<string, string>; dir: string }> {
  const dir = `${cwd.replace(/\/$/, "")}/${IDENTITY_DIR}`;
  const perms = meshPermissions(mesh);
  const identities = await ensureIdentities(dir, perms.map((p) => p.name));
  // A hub: one leafnode identity per edge site, usable only for a leafnode connection; and
  // no other identity may open a leafnode connection (its permissions were made for a client).
  const sites = edge.hub?.sites ?? [];
  const users: Parameters<typeof authorizationBlock>[0][number][] = identities.map((
    identity,
    i,
  ) => ({
    identity,
    permissions: perms[i]!.permissions,
    ...(sites.length > 0 ? { connectionTypes: ["STANDARD"] } : {}),
  }));
  const leaves = await ensureIdentities(dir, sites.map(leafIdentity));
  sites.forEach((site, i) =>
    users.push({
      identity: leaves[i]!,
      permissions: leafPermissions(site, edge.hub?.definitions),
      connectionTypes: ["LEAFNODE"],
    })
  );
  const text = serverConf(await Deno.readTextFile(baseConf), edge, sync) + "\n" +
    authorizationBlock(users);
  const configFile = await writeGeneratedConf(baseConf, cwd, text);
  return {
    configFile,
    seeds: new Map([...identities, ...leaves].map((i) => [i.name, i.seedFile])),
    dir,
  };
}

/** What an edge role adds to the server: nothing, a hub's leafnode listener, or a site's link. */
export interface EdgeRole {
  /** A hub of these sites, with its leafnode listener on `host` (loopback) and `leafPort`. */
  hub?: {
    sites: readonly string[];
    leafPort: number;
    host?: string;
    tls?: LeafTls;
    /** The streams of the definitions it runs, collected from each site too. */
    definitions?: readonly SiteStream[];
  };
  /**
   * An edge site: its name, the hub's leafnode URL(s), its leafnode seed and TLS files, and
   * its services' durable consumers (no request of the hub's may touch them).
   */
  site?: {
    name: string;
    urls: string;
    seed?: string;
    tls?: LeafTls;
    durables?: readonly SiteDurable[];
  };
}

/**
 * The leafnode TLS files of `config`, as absolute paths (nats-server runs in its own
 * directory; relative paths are taken from the repository root, like nats.conf).
 */
function leafTls(config: Config): LeafTls | undefined {
  const abs = (path: string) => (path ? new URL(path, ROOT).pathname : undefined);
  if (!config.leafTlsCert && !config.leafTlsCa) return undefined;
  return { cert: abs(config.leafTlsCert), key: abs(config.leafTlsKey), ca: abs(config.leafTlsCa) };
}

/** The streams of loaded definitions, as a hub collects them from its sites. */
function definitionSiteStreams(loaded: readonly LoadedPipeline[]): SiteStream[] {
  return loaded.map((p) => ({ stream: pipelineSubjects(p.def).stream, root: p.def.name }));
}

/**
 * The durable consumers `services` read (each once): what an edge site refuses every request
 * of the hub's on (src/edge.ts, `siteDenyImports`).
 */
export function siteDurables(services: readonly ServiceSpec[]): SiteDurable[] {
  const all = services.flatMap((s) => s.access.consumes ?? []);
  return all.filter((c, i) =>
    all.findIndex((d) => d.stream === c.stream && d.durable === c.durable) === i
  );
}

/** The server configuration `conf` with an edge role's additions. */
export function edgeServerConf(conf: string, edge: EdgeRole): string {
  if (edge.hub && edge.hub.sites.length > 0) {
    return hubConf(conf, edge.hub.leafPort, { host: edge.hub.host, tls: edge.hub.tls });
  }
  if (edge.site) {
    return siteConf(
      conf,
      edge.site.name,
      edge.site.urls,
      edge.site.seed,
      edge.site.tls,
      edge.site.durables,
    );
  }
  return conf;
}

/**
 * The server configuration `conf` as a start runs it: with an edge role's additions, and
 * with `sync_interval: sync` (WEFT_NATS_SYNC) when `sync` is set.
 */
export function serverConf(conf: string, edge: EdgeRole, sync: string): string {
  const edged = edgeServerConf(conf, edge);
  return sync ? withSyncInterval(edged, sync) : edged;
}

/** Writes `cwd`/{@link GENERATED_CONF} (mode 0600) with a header naming its source. */
async function writeGeneratedConf(baseConf: string, cwd: string, text: string): Promise<string> {
  const configFile = `${cwd.replace(/\/$/, "")}/${GENERATED_CONF}`;
  await Deno.mkdir(`${cwd.replace(/\/$/, "")}/data`, { recursive: true });
  const header = `# Generated by the supervisor of \`deno task start\` from ${baseConf} and the\n` +
    `# services' permissions (src/supervisor.ts, src/identities.ts, src/edge.ts). Do not\n` +
    `# edit: it is rewritten at every start.\n\n`;
  await Deno.writeTextFile(configFile, header + text, { mode: 0o600 });
  return configFile;
}

/**
 * The mesh with a hub's additions: the gateway and the operators read each site's stream.
 */
export function withEdgeSites(
  mesh: ReturnType<typeof meshServices>,
  sites: readonly string[],
): ReturnType<typeof meshServices> {
  if (sites.length === 0) return mesh;
  const reads: Access = { readsStreams: sites.map(edgeStream) };
  return {
    services: mesh.services.map((s) =>
      s.name === "gateway" ? { ...s, access: mergeAccess(s.access, reads) } : s
    ),
    operators: {
      ...mesh.operators,
      // Through JetStream, as every stream (no plain subscription: see OPERATOR_IDENTITIES).
      ops: mergeAccess(mesh.operators.ops, reads),
    },
  };
}

/** Whether the supervisor can check `host`'s port on loopback (its own --allow-net). */
function isLoopbackOrAny(host: string): boolean {
  return isLoopback(host) || host === "0.0.0.0" || host === "::";
}

/** A port a start listens on, and the setting it comes from. */
export interface PlannedPort {
  /** The port. */
  port: number;
  /** The setting, and what listens there: `PORT (the gateway)`. */
  what: string;
}

/**
 * The client and monitoring ports a nats-server configuration sets at its top level
 * (`listen: host:port` or `port: N`; `http: host:port`, `http: N` or `http_port: N`); a
 * block's own `listen` (leafnodes, cluster) is indented and not taken.
 */
export function confPorts(conf: string): { client?: number; monitor?: number } {
  const top = (keys: string) =>
    new RegExp(`^(?:${keys})\\s*[:=]\\s*"?(?:[^\\s":]*:)?(\\d+)"?\\s*$`, "m").exec(conf)?.[1];
  const client = top("listen|port");
  const monitor = top("http|http_port");
  return {
    ...(client ? { client: Number(client) } : {}),
    ...(monitor ? { monitor: Number(monitor) } : {}),
  };
}

/**
 * Every port this start will listen on, with the setting each comes from: the gateway's
 * (`PORT`, 0 picks a free one and is left out) and the events gateway's; with its own
 * nats-server (`ownNats`, no `NATS_URL`), the client port of each node (`WEFT_NATS_PORT`,
 * +1, +2... for a cluster; else `conf`'s, else 4222), the monitoring port (the first node's:
 * the others take free ones, as do a cluster's routes) and a hub's leafnode port of each
 * node (`WEFT_LEAF_PORT`, +1...).
 *
 * @example
 * ```ts
 * import { loadConfig } from "./config.ts";
 * import { plannedPorts } from "./supervisor.ts";
 * const config = loadConfig({ env: () => undefined, args: ["--cluster", "3"] });
 * const ports = plannedPorts(config, { ownNats: true, conf: "listen: 127.0.0.1:4222" });
 * console.assert(ports.some((p) => p.port === 4224 && p.what.startsWith("WEFT_NATS_PORT+2")));
 * ```
 */
export function plannedPorts(
  config: Pick<
    Config,
    | "port"
    | "eventsPort"
    | "natsConf"
    | "natsPort"
    | "natsMonitorPort"
    | "cluster"
    | "hub"
    | "leafPort"
  >,
  opts: { ownNats: boolean; conf?: string },
): PlannedPort[] {
  const out: PlannedPort[] = [];
  if (config.port) out.push({ port: config.port, what: "PORT (the gateway)" });
  if (config.eventsPort) {
    out.push({ port: config.eventsPort, what: "WEFT_EVENTS_PORT (the events gateway)" });
  }
  if (!opts.ownNats) return out;
  const fromConf = confPorts(opts.conf ?? "");
  const n = Math.max(1, config.cluster);
  const node = (i: number) => n > 1 ? ` of cluster node weft-${i + 1}` : "";
  // (Unset, a port is the conf's: said, as the setting that moves it.)
  const fromFile = (set: number) => set ? "" : `, as ${config.natsConf} sets it`;
  const client = config.natsPort || fromConf.client || DEFAULT_NATS_PORT;
  for (let i = 0; i < n; i++) {
    out.push({
      port: client + i,
      what: `WEFT_NATS_PORT${i > 0 ? `+${i}` : ""} (nats-server's client port${node(i)}${
        fromFile(config.natsPort)
      })`,
    });
  }
  const monitor = config.natsMonitorPort || fromConf.monitor;
  if (monitor) {
    out.push({
      port: monitor,
      what: `WEFT_NATS_MONITOR_PORT (nats-server monitoring${fromFile(config.natsMonitorPort)})`,
    });
  }
  if (config.hub.length > 0) {
    for (let i = 0; i < n; i++) {
      out.push({
        port: config.leafPort + i,
        what: `WEFT_LEAF_PORT${i > 0 ? `+${i}` : ""} (the hub's leafnode listener${node(i)})`,
      });
    }
  }
  return out;
}

/**
 * What is wrong with `ports` ({@link plannedPorts}): one line naming each port two settings
 * share, and both settings; empty when every port is its own.
 *
 * @example
 * ```ts
 * import { portClashes } from "./supervisor.ts";
 * const said = portClashes([{ port: 8000, what: "PORT" }, { port: 8000, what: "WEFT_EVENTS_PORT" }]);
 * console.assert(said === "PORT and WEFT_EVENTS_PORT are both port 8000: give each its own port");
 * ```
 */
export function portClashes(ports: readonly PlannedPort[]): string {
  const byPort = new Map<number, string[]>();
  for (const p of ports) byPort.set(p.port, [...byPort.get(p.port) ?? [], p.what]);
  const clashes = [...byPort].filter(([, whats]) => whats.length > 1).map(([port, whats]) =>
    `${whats.slice(0, -1).join(", ")} and ${whats.at(-1)} are ${
      whats.length > 2 ? "all" : "both"
    } port ${port}`
  );
  return clashes.length > 0 ? `${clashes.join("; ")}: give each its own port` : "";
}

/**
 * What a start with `config` should warn of before it runs: a 2-node cluster, which keeps no
 * majority when one node is lost (every stream and the cluster's meta leader stop until it
 * is back).
 */
export function startWarnings(config: Pick<Config, "cluster">): string[] {
  return config.cluster === 2
    ? [
      "WEFT_CLUSTER=2: two nodes keep no majority when one is lost: every stream (at R2) and " +
      "the cluster itself stop taking writes until it is back (the gateway answers 503 " +
      "meanwhile); run 3 nodes to survive losing one, or 1 for a single server",
    ]
    : [];
}

/**
 * Waits until every service answers a `$SRV.PING` and the gateway's port accepts a
 * connection, or `ms` pass. Returns what is still missing (empty: ready).
 */
async function waitReady(
  nc: NatsConnection,
  config: Config,
  ms: number,
  stopped: () => boolean,
  services: readonly ServiceSpec[],
): Promise<string[]> {
  const want = new Set(services.map((s) => `weft-${s.name}`));
  const ports = listenPorts(services, config);
  const deadline = Date.now() + ms;
  let missing = [...want];
  while (Date.now() < deadline && !stopped()) {
    const seen = new Set<string>();
    try {
      const answers = await nc.requestMany("$SRV.PING", undefined, { maxWait: 300 });
      for await (const m of answers) {
        const name = (m.json() as { name?: string }).name;
        if (name) seen.add(name);
      }
    } catch { /* no responders yet */ }
    missing = [...want].filter((n) => !seen.has(n));
    // (Elsewhere than loopback: not ours to probe.)
    for (const port of isLoopbackOrAny(config.host) ? ports : []) {
      try {
        (await Deno.connect({ hostname: "127.0.0.1", port })).close();
      } catch {
        missing.push(`gateway port ${port}`);
      }
    }
    if (missing.length === 0) return [];
    await new Promise((r) => setTimeout(r, 200));
  }
  return missing;
}

/**
 * Starts an `n`-node nats-server cluster on loopback: client ports `port`, `port + 1`...,
 * route ports picked free, node names `weft-1`..., one store per node under `cwd`, each
 * with `configFile` (the authorization block included). A port taken by something else
 * stops the start with a ConfigError naming it.
 */
export async function startCluster(
  n: number,
  opts: {
    configFile: string;
    cwd: string;
    port: number;
    monitorPort?: number;
    /** Ports the route and other monitoring ports must not take (the gateways'). */
    avoid?: readonly number[];
    onLog?: (line: string) => void;
    log: Logger;
  },
): Promise<NatsServer[]> {
  const clientPorts = Array.from({ length: n }, (_, i) => opts.port + i);
  for (const [i, p] of clientPorts.entries()) {
    if (portFree(p)) continue;
    if (
      !(await stopLeftover({ port: p, pidFile: clusterPidFile(i), cwd: opts.cwd }))
    ) {
      throw new ConfigError(
        `port ${p} (cluster node weft-${i + 1}) is taken by another process: stop it, or set ` +
          `WEFT_NATS_PORT so that ${clientPorts.join(", ")} are free`,
      );
    }
  }
  // Route and monitoring ports: free, and none twice, nor a client or leafnode port (a port
  // freePort() found free is not held: a second call may return it again).
  const base = await Deno.readTextFile(opts.configFile);
  const leaf = /leafnodes \{\n {2}listen: "[^"]*:(\d+)"/.exec(base);
  const used = new Set<number>([
    ...clientPorts,
    ...(leaf ? clientPorts.map((_, i) => Number(leaf[1]) + i) : []),
    ...(opts.monitorPort ? [opts.monitorPort] : []),
    ...opts.avoid ?? [],
  ]);
  const pick = (): number => {
    for (;;) {
      const p = freePort();
      if (!used.has(p)) return used.add(p), p;
    }
  };
  const routePorts = clientPorts.map(() => pick());
  const monitorPorts = clientPorts.map((_, i) => i === 0 ? opts.monitorPort : pick());
  const routes = routePorts.map((p) => `nats://127.0.0.1:${p}`);
  // One configuration per node: the same, with the node's own JetStream store.
  const files = await Promise.all(clientPorts.map(async (_, i) => {
    const file = `${opts.cwd.replace(/\/$/, "")}/data/nats-weft-node${i + 1}.conf`;
    const store = `store_dir: "./data/jetstream/node${i + 1}"`;
    const text = (/store_dir:\s*("[^"]*"|\S+)/.test(base)
      ? base.replace(/store_dir:\s*("[^"]*"|\S+)/, store)
      : base.replace(/jetstream\s*\{/, `jetstream {\n  ${store}`))
      // A hub's leafnode listener (src/edge.ts): one port per node.
      .replace(
        /(leafnodes \{\n {2}listen: "[^"]*:)(\d+)"/,
        (_, head: string, p: string) =>
          `${head}${Number(p) + i}"`,
      );
    await Deno.writeTextFile(file, text, { mode: 0o600 });
    return file;
  }));
  const started = await Promise.allSettled(clientPorts.map((port, i) =>
    startNatsServer({
      configFile: files[i]!,
      port,
      // The first node keeps the configured monitoring port; the others take free ones.
      monitorPort: monitorPorts[i],
      cwd: opts.cwd,
      detached: true,
      pidFile: clusterPidFile(i),
      onLog: opts.onLog,
      extraArgs: [
        "--server_name",
        `weft-${i + 1}`,
        "--cluster_name",
        "weft",
        "--cluster",
        routes[i]!,
        "--routes",
        routes.filter((_, j) => j !== i).join(","),
      ],
    })
  ));
  // A node that did not start stops the start: the nodes that did are stopped, not left.
  const failed = started.find((r) => r.status === "rejected");
  if (failed) {
    await Promise.all(started.map((r) => r.status === "fulfilled" ? r.value.stop() : undefined));
    throw failed.reason;
  }
  const nodes = started.map((r) => (r as PromiseFulfilledResult<NatsServer>).value);
  opts.log.info("nats cluster started", {
    nodes: nodes.map((node, i) => ({ name: `weft-${i + 1}`, url: node.url, pid: node.pid })),
  });
  return nodes;
}

/** Where cluster node `i` (0-based) writes its pid, relative to the nodes' directory. */
export function clusterPidFile(i: number): string {
  return `data/nats-server-${i + 1}.pid`;
}

/** The file listing the definitions to run when WEFT_PIPELINES does not. */
export const PIPELINES_LIST = "pipelines/run.json";

/** The definitions listed in {@link PIPELINES_LIST}; none when it is missing. */
export async function listedPipelines(root: URL = ROOT): Promise<string[]> {
  let text: string;
  try {
    text = await Deno.readTextFile(new URL(PIPELINES_LIST, root));
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return [];
    throw err;
  }
  let run: unknown;
  try {
    run = (JSON.parse(text) as { run?: unknown }).run;
  } catch (err) {
    throw new ConfigError(`${PIPELINES_LIST} is not JSON: ${(err as Error).message}`);
  }
  if (!Array.isArray(run) || !run.every((f) => typeof f === "string")) {
    throw new ConfigError(`${PIPELINES_LIST}: "run" must be a list of definition files`);
  }
  return run;
}

/** Runs the mesh until SIGINT/SIGTERM. */
export async function supervise(config: Config, log: Logger): Promise<void> {
  let nats: NatsServer | undefined;
  /** Every node this start runs (one, or a cluster's). */
  let nodes: NatsServer[] = [];
  /** Held while this start runs its own nats-server: one supervisor per store. */
  let supervisorLock: Deno.FsFile | undefined;
  for (const warning of startWarnings(config)) log.warn(warning);
  // Two settings on one port would crash-loop a gateway or stop nats-server: say which,
  // once, and start nothing.
  const clash = portClashes(plannedPorts(config, {
    ownNats: !Deno.env.get("NATS_URL"),
    conf: await Deno.readTextFile(new URL(config.natsConf, ROOT)).catch(() => ""),
  }));
  if (clash) {
    log.error(clash);
    Deno.exit(2);
  }
  // A gateway port another process holds would crash-loop the gateway: say so once, and
  // start nothing.
  if (isLoopbackOrAny(config.host) && !portFree(config.port)) {
    log.error(
      `port ${config.port} (the gateway's, PORT) is taken by another process: stop it, or set ` +
        `PORT to a free port`,
    );
    Deno.exit(1);
  }
  if (config.eventsPort && isLoopbackOrAny(config.host) && !portFree(config.eventsPort)) {
    log.error(
      `port ${config.eventsPort} (the events gateway's, WEFT_EVENTS_PORT) is taken by another ` +
        `process: stop it, or set WEFT_EVENTS_PORT to a free port`,
    );
    Deno.exit(1);
  }
  // Nothing starts on a configuration that cannot run: a bad definition included.
  let groups: ServiceSpec[][];
  let loaded: LoadedPipeline[];
  let mesh: ReturnType<typeof meshServices>;
  try {
    if (config.pipelines.length === 0) config = { ...config, pipelines: await listedPipelines() };
    loaded = await loadPipelines(config.pipelines, ROOT.pathname);
    await checkDuplicateKeys(loaded, (f) => f.replace(ROOT.pathname, ""));
    checkHoldsWithinRetention(loaded, config.retentionMs);
    checkModelSteps(loaded, config.llmBaseUrl);
    mesh = withEdgeSites(meshServices(loaded), config.hub);
    const unknown = Object.keys(config.serviceReplicas).filter((n) =>
      !mesh.services.some((s) => s.name === n)
    );
    if (unknown.length > 0) {
      throw new ConfigError(`WEFT_REPLICAS names no such service: ${unknown.join(", ")}`);
    }
    mesh.services = mesh.services.map((s) =>
      config.serviceReplicas[s.name] ? { ...s, replicas: config.serviceReplicas[s.name] } : s
    );
    if (config.eventsPort) mesh.services.push(eventsGateway(mesh.services, config.eventsPort));
    groups = processGroups(config.together, mesh.services);
  } catch (err) {
    log.error((err as Error).message);
    Deno.exit(2);
  }
  for (const p of loaded) {
    log.info("pipeline loaded", { pipeline: p.def.name, definition: p.def.hash, file: p.file });
  }
  const startedAt = performance.now();
  let env: Record<string, string> = {};
  /** Each identity's seed file, when the supervisor's own nats-server authenticates. */
  let seeds: Map<string, string> | undefined;
  /** Where those seeds are, for a process running several services. */
  let identityDir: string | undefined;
  if (Deno.env.get("NATS_URL") && (config.hub.length > 0 || config.site)) {
    log.error(
      `--hub and --leaf configure the nats-server this start runs: unset NATS_URL (or run ` +
        `that server as a hub or site yourself, see src/edge.ts)`,
    );
    Deno.exit(2);
  }
  if (config.hub.length > 0 && config.natsAuth !== "nkeys") {
    log.error(
      `--hub needs WEFT_NATS_AUTH=nkeys: each site's leafnode identity and its permissions ` +
        `keep the sites' subjects apart from the hub's`,
    );
    Deno.exit(2);
  }
  // WEFT_NATS_SYNC named on purpose (not its default): refused where it cannot apply.
  const syncAsked = (Deno.env.get("WEFT_NATS_SYNC") ?? "").trim() !== "";
  let sync = config.natsSync;
  if (Deno.env.get("NATS_URL") && syncAsked) {
    log.error(
      `WEFT_NATS_SYNC configures the nats-server this start runs: unset NATS_URL, or set ` +
        `sync_interval in that server's own configuration`,
    );
    Deno.exit(2);
  }
  if (Deno.env.get("NATS_URL")) {
    log.info("using the NATS server in NATS_URL", { nats: describeConfig(config).natsUrl });
  } else {
    const version = await serverVersion();
    if (version !== null && !versionAtLeast(version)) {
      log.error(tooOldMessage(version));
      Deno.exit(1);
    }
    if (sync && version !== null && !versionAtLeast(version, SYNC_INTERVAL_SERVER)) {
      if (syncAsked) {
        log.error(tooOldMessage(
          version,
          SYNC_INTERVAL_SERVER,
          `which WEFT_NATS_SYNC=${sync} needs (sync_interval); unset it to keep the ` +
            `server's default`,
        ));
        Deno.exit(1);
      }
      // The default asks for 1 s where the server can; an older one keeps its 2 minutes.
      log.warn(
        `nats-server ${version} fsyncs its store only every 2 minutes: a power failure can ` +
          `lose up to 2 minutes of acknowledged writes (nats-server ${SYNC_INTERVAL_SERVER}+ ` +
          `lets Weft sync every ${sync})`,
      );
      sync = "";
    }
    if (
      version !== null && (config.hub.length > 0 || config.leaf) &&
      !versionAtLeast(version, EDGE_MIN_SERVER_VERSION)
    ) {
      log.error(tooOldMessage(
        version,
        EDGE_MIN_SERVER_VERSION,
        "which a hub and its edge sites need (subject transforms on stream sources)",
      ));
      Deno.exit(1);
    }
    // A relative store is the repository's (data/<dir>, as the messages below suggest), not
    // nats-server's working directory's.
    const cwd = config.natsDir
      ? decodeURIComponent(new URL(config.natsDir, ROOT).pathname)
      : ROOT.pathname;
    // The start task may write only under the repository's data/ (its --allow-write).
    if (
      config.natsDir &&
      Deno.permissions.querySync({ name: "write", path: `${cwd}/data` }).state !== "granted"
    ) {
      log.error(
        `WEFT_NATS_DIR ${config.natsDir} is outside what deno task start may write (the ` +
          `repository's data/): use a directory under data/, or run src/supervisor.ts with ` +
          `--allow-write for that directory too`,
      );
      Deno.exit(1);
    }
    // One supervisor per store: a second start on the same store (another terminal, or
    // during the first one's drain) would stop the first one's live nats-server as a
    // leftover and take over its services. The lock goes with the process, however it ends.
    const store = `${cwd.replace(/\/$/, "")}/data`;
    await Deno.mkdir(store, { recursive: true });
    supervisorLock = await Deno.open(`${store}/supervisor.lock`, { create: true, write: true });
    if (!(await supervisorLock.tryLock(true))) {
      log.error(
        `another deno task start runs on this store (${store}): stop it first (Ctrl-C), ` +
          `or give a second mesh its own store and ports (WEFT_NATS_DIR=data/<dir>, ` +
          `WEFT_NATS_PORT, WEFT_NATS_MONITOR_PORT, PORT)`,
      );
      Deno.exit(1);
    }
    const port = config.natsPort || DEFAULT_NATS_PORT;
    // A supervisor killed outright (SIGKILL, OOM) leaves its nats-server running (each node
    // of a cluster): stop it through the pid file it wrote, or say plainly who holds the
    // port. Before the monitoring port is checked: the leftover (a cluster's first node)
    // holds that one too.
    const leftovers = config.cluster <= 1
      ? [{ port, pidFile: NATS_PID_FILE, what: "" }]
      : Array.from({ length: config.cluster }, (_, i) => ({
        port: port + i,
        pidFile: clusterPidFile(i),
        what: ` (cluster node weft-${i + 1})`,
      }));
    for (const leftover of leftovers) {
      if (portFree(leftover.port)) continue;
      log.warn("port taken: stopping a nats-server an earlier start left running", {
        port: leftover.port,
      });
      if (!(await stopLeftover({ port: leftover.port, pidFile: leftover.pidFile, cwd }))) {
        log.error(
          `port ${leftover.port}${leftover.what} is taken by a process this start did not ` +
            `leave behind; stop it, or set WEFT_NATS_PORT (or NATS_URL to use that server)`,
        );
        Deno.exit(1);
      }
    }
    // nats.conf's monitoring port (or the override) taken: say so, not an empty failure.
    const monitorPort = config.natsMonitorPort || (config.natsConf === "nats.conf" ? 8222 : 0);
    if (monitorPort && !portFree(monitorPort)) {
      log.error(
        `port ${monitorPort} (nats-server monitoring) is taken by another process: stop it, ` +
          `or set WEFT_NATS_MONITOR_PORT to a free port`,
      );
      Deno.exit(1);
    }
    const baseConf = new URL(config.natsConf, ROOT).pathname;
    // A configuration that sets its own sync_interval keeps it, unless WEFT_NATS_SYNC is set.
    const own = syncIntervalOf(await Deno.readTextFile(baseConf).catch(() => ""));
    if (own && !syncAsked) {
      log.info("nats-server keeps the sync_interval of its configuration", {
        conf: config.natsConf,
        sync_interval: own,
      });
      sync = "";
    }
    let configFile = baseConf;
    let edge: EdgeRole = {};
    if (config.hub.length > 0) {
      // (A cluster's nodes listen on leafPort, +1, +2...)
      const taken = Array.from({ length: config.cluster }, (_, i) => config.leafPort + i)
        .filter((p) => !portFree(p));
      if (taken.length > 0) {
        log.error(
          `port ${taken.join(", ")} (the hub's leafnode listener) is taken by another ` +
            `process: stop it, or set WEFT_LEAF_PORT to a free port`,
        );
        Deno.exit(1);
      }
      edge = {
        hub: {
          sites: config.hub,
          leafPort: config.leafPort,
          host: config.leafHost,
          tls: leafTls(config),
          definitions: definitionSiteStreams(loaded),
        },
      };
    } else if (config.site) {
      // The site's key, as the hub made it: named, or where the hub keeps it (under this
      // site's nats-server directory, as a hub keeps it under its own).
      const keyFile = leafKeyFile(config.site, config.natsDir);
      const seedFile = config.leafNkey || `${cwd.replace(/\/$/, "")}/${leafKeyFile(config.site)}`;
      const hubs = `the hub's ${leafIdentity(config.site)}.nk (in its ${IDENTITY_DIR}/, under ` +
        `its WEFT_NATS_DIR if set)`;
      let seed: string | undefined;
      try {
        seed = (await Deno.readTextFile(seedFile)).trim();
      } catch (err) {
        if (config.leafNkey || !(err instanceof Deno.errors.NotFound)) {
          log.error(
            `the site's leafnode key ${seedFile} cannot be read: copy ${hubs} to this site's ` +
              `${keyFile}, or name it with --leaf-nkey (WEFT_LEAF_NKEY)`,
            { err },
          );
          Deno.exit(1);
        }
        log.warn(
          `no leafnode key (${keyFile} or --leaf-nkey): the site connects to the hub ` +
            `unauthenticated, which a Weft hub refuses; copy ${hubs} to ${keyFile}`,
        );
      }
      edge = {
        site: {
          name: config.site,
          urls: config.leaf,
          seed,
          tls: leafTls(config),
          durables: siteDurables(mesh.services),
        },
      };
    }
    if (config.natsAuth === "nkeys") {
      const made = await writeAuthConfig(baseConf, cwd, mesh, edge, sync);
      configFile = made.configFile;
      seeds = made.seeds;
      identityDir = made.dir;
    } else if (edge.site || sync) {
      configFile = await writeGeneratedConf(
        baseConf,
        cwd,
        serverConf(await Deno.readTextFile(baseConf), edge, sync),
      );
    }
    // Refused permissions are the server's to log; say them in the mesh's log too. (A site
    // the hub refuses is an authorization failure, and a leafnode TLS handshake that fails
    // (an untrusted certificate) is logged by the server only at its own level: both are met
    // again every second, and said apart, throttled.)
    const leafRefused = config.site
      ? leafRefusalWatcher(log, config.site, {
        keyFile: config.leafNkey || leafKeyFile(config.site, config.natsDir),
      })
      : () => false;
    const leafTlsFailed = config.site || config.hub.length > 0
      ? leafTlsWatcher(log, config.site || undefined)
      : () => false;
    const onLog = (line: string) => {
      if (leafRefused(line) || leafTlsFailed(line)) return;
      if (/violation/i.test(line)) log.warn("nats permission violation", { line });
    };
    try {
      if (config.cluster > 1) {
        nodes = await startCluster(config.cluster, {
          configFile,
          cwd,
          port,
          monitorPort: monitorPort || undefined,
          avoid: [config.port, config.eventsPort].filter((p) => p > 0),
          onLog,
          log,
        });
        nats = nodes[0];
      } else {
        nats = await startNatsServer({
          configFile,
          onLog,
          port: config.natsPort || undefined,
          monitorPort: config.natsMonitorPort || undefined,
          cwd,
          detached: true,
          pidFile: NATS_PID_FILE,
        });
        nodes = [nats];
      }
    } catch (err) {
      if (err instanceof NatsServerMissingError) {
        log.error(err.message);
        Deno.exit(1);
      }
      if (err instanceof ConfigError) {
        log.error(err.message);
        Deno.exit(1);
      }
      // nats-server's own reason, in one line: a port or store it cannot use, a bad conf.
      if (err instanceof NatsServerExitedError) {
        log.error(`nats-server could not start: ${err.reason}`);
        Deno.exit(1);
      }
      throw err;
    }
    const url = nodes.map((n) => n.url).join(",");
    config = { ...config, natsUrl: url };
    env = { NATS_URL: url };
  }

  const nc = await connectNats(config.natsUrl, "weft-supervisor", {
    nkeySeedFile: seeds?.get("admin") ?? (config.natsNkey || undefined),
    identity: "admin",
    ...tlsCredentials(config),
  }, {
    // A server this start began is up (it said it is ready for clients): a handshake that
    // times out means loaded cores, not a refusal; try again rather than stop everything.
    patienceMs: nodes.length > 0 ? FIRST_CONNECT_PATIENCE_MS : 0,
  }).catch(async (err) => {
    // One line saying what to do, not a stack trace (a NATS_URL naming a server not running).
    log.error(
      `cannot connect to NATS at ${describeConfig(config).natsUrl}: ${
        err instanceof Error ? err.message : String(err)
      }` +
        (nodes.length === 0
          ? ": NATS_URL names a server for Weft to use, which must be running; unset it and " +
            "deno task start runs its own"
          : ""),
    );
    await Promise.all(nodes.map((n) => n.stop("SIGTERM")));
    Deno.exit(1);
  });
  // From here on a failure must not leave the nats-server this start began running.
  const fail = async (message: string, err?: unknown) => {
    log.error(message, err ? { err } : {});
    await nc.close().catch(() => {});
    await Promise.all(nodes.map((n) => n.stop("SIGTERM")));
    Deno.exit(1);
  };
  const serverAt = nc.info?.version;
  if (serverAt !== undefined && !versionAtLeast(serverAt)) await fail(tooOldMessage(serverAt));
  try {
    // A new cluster elects its JetStream meta leader a few seconds after its nodes start:
    // until then requests time out. Try again for up to 60 s; on one server, only while it
    // is unavailable (a busy machine's server may not answer a request in time).
    const until = Date.now() + 60_000;
    for (let attempt = 1;; attempt++) {
      try {
        const jsm = await jetstreamManager(nc);
        const topology = { ...config, replicas: Math.min(3, config.cluster) };
        await ensureTopology(nc, jsm, topology, pipelineTopology(loaded, config.retentionMs));
        // A hub: one stream per edge site, sourcing the site's streams across domains, with
        // an event stream's limits (the first pipeline's).
        const limits = streamConfigs(topology)[0]!;
        for (const s of edgeStreamConfigs(config.hub, limits, definitionSiteStreams(loaded))) {
          await ensureStream(jsm, s, { allowShrink: config.allowShrink });
        }
        break;
      } catch (err) {
        // Each stream reserves its byte limit in the server's store: waiting will not help.
        if (Date.now() >= until || INSUFFICIENT_STORE.test(String(err))) throw err;
        if (config.cluster <= 1 && !isNatsUnavailable(err)) throw err;
        log.info("JetStream not ready yet; trying again", { attempt, err: String(err) });
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
  } catch (err) {
    let hint = "";
    if (INSUFFICIENT_STORE.test(String(err))) {
      hint =
        `. Each pipeline's stream reserves WEFT_STREAM_MAX_BYTES (now ${config.streamMaxBytes} ` +
        `bytes) of the server's JetStream store (max_file_store in nats.conf, 8GB): with ` +
        `${loaded.length} definitions besides the shipped pipelines, lower WEFT_STREAM_MAX_BYTES ` +
        `(or WEFT_OBJECT_STORE_MAX_BYTES, now ${config.objectStoreMaxBytes} bytes, which each ` +
        `object store reserves) or raise max_file_store`;
      // Streams of definitions no longer run (an earlier experiment's) keep their reservation.
      try {
        const topology = { ...config, replicas: Math.min(3, config.cluster) };
        const running = [
          ...streamConfigs(topology, pipelineTopology(loaded, config.retentionMs)),
          ...edgeStreamConfigs(
            config.hub,
            streamConfigs(topology)[0]!,
            definitionSiteStreams(loaded),
          ),
        ].map((s) => s.name);
        const nkey = seeds?.get("admin") ?? (config.natsNkey || undefined);
        const stray = await strayStreams(await jetstreamManager(nc), running);
        hint += strayStreamsHint(stray, nkey, config.natsUrl, nodes.length > 0);
      } catch (listErr) {
        log.warn("the streams could not be listed", { err: String(listErr) });
      }
    }
    await fail(`streams and buckets could not be set up: ${(err as Error).message}${hint}`, err);
  }

  let stopping = false;
  const running = new Map<string, Running>();

  const start = (group: ServiceSpec[], restarts: number) => {
    const alone = group.length === 1;
    const key = !alone
      ? "together"
      : group[0]!.replica === undefined
      ? group[0]!.name
      : `${group[0]!.name}#${group[0]!.replica}`;
    // With identities, each service reads its own seed, and leaves the topology (made
    // above) alone: its identity could not create it anyway.
    const groupSeeds = seeds ? group.map((s) => seeds!.get(s.name)!) : [];
    const own: Record<string, string> = !seeds
      ? {}
      : alone
      ? { WEFT_NATS_NKEY: groupSeeds[0]!, WEFT_ENSURE_TOPOLOGY: "false" }
      : { WEFT_NATS_IDENTITY_DIR: identityDir!, WEFT_ENSURE_TOPOLOGY: "false" };
    const entry = alone
      ? [group[0]!.entry, ...group[0]!.args ?? []]
      : [TOGETHER_ENTRY, ...group.map((s) => s.name)];
    // (services/together.ts finds a pipeline's services from WEFT_PIPELINES, passed below.)
    const child = new Deno.Command("deno", {
      args: processArgs(group, config, entry, groupSeeds),
      // The service exits when this pipe closes: when the supervisor dies, however it dies.
      env: {
        ...env,
        ...own,
        ...(alone ? serviceEnv(group[0]!, envOrUndefined) : {}),
        ...(alone && group[0]!.port ? { PORT: String(group[0]!.port) } : {}),
        WEFT_PARENT_WATCH: "stdin",
        // The definitions to run, however the supervisor was given them (env or --pipelines).
        ...(config.pipelines.length > 0 ? { WEFT_PIPELINES: config.pipelines.join(",") } : {}),
        // The edge role, however it was given (the hub's gateway serves /sites from it).
        ...(config.hub.length > 0 ? { WEFT_HUB: config.hub.join(",") } : {}),
        ...(config.site ? { WEFT_SITE: config.site, WEFT_LEAF: config.leaf } : {}),
      },
      stdin: "piped",
      stdout: "inherit",
      stderr: "inherit",
      cwd: ROOT,
      detached: true,
    }).spawn();
    const r: Running = { spec: group[0]!, child, startedAt: Date.now(), restarts };
    running.set(key, r);
    child.status.then(async (status) => {
      if (stopping) return;
      const ranFor = Date.now() - r.startedAt;
      const n = ranFor > 30_000 ? 1 : r.restarts + 1; // a long run resets the backoff
      const delay = restartDelay(n);
      // `service` is the logger's own (weft-supervisor): the child goes in a field of its own.
      log.warn("service exited; restarting", {
        child: key,
        code: status.code,
        signal: status.signal,
        restart_in_ms: delay,
      });
      await new Promise((res) => setTimeout(res, delay));
      if (!stopping) start(group, n);
    });
  };
  // Ctrl-C counts from here on, also while waiting for the services to be ready.
  let signalled = false;
  const stopRequested = new Promise<void>((resolve) => {
    const onSignal = () => {
      signalled = true;
      resolve();
    };
    Deno.addSignalListener("SIGINT", onSignal);
    Deno.addSignalListener("SIGTERM", onSignal);
  });
  // The live shadows' host runs only once there is a shadow to host: at once with
  // WEFT_SHADOW, else from the first attached over the API (a put in the shadow bucket).
  const deferred = config.shadows.length > 0
    ? []
    : groups.filter((g) => g.every((s) => s.name === SHADOW_SERVICE));
  for (const group of groups) if (!deferred.includes(group)) start(group, 0);
  // On a cluster the bucket's stream, just created, can answer "stream not found" for a
  // moment (seen in CI on a 3-node hub: the supervisor died of it before the gateway
  // listened): try again, and should it never work, start the shadow service now.
  const shadowWatch = deferred.length > 0
    ? await retrying(() => new Kvm(nc).open(SHADOW_BUCKET).then((kv) => kv.watch()), {
      attempts: 8,
      baseMs: 200,
      maxMs: 3000,
      signal: new AbortController().signal,
    }).catch((err) => {
      log.error("cannot watch for live shadows: starting the shadow service now", { err });
      for (const group of deferred) start(group, 0);
      return undefined;
    })
    : undefined;
  const shadowsAttached = shadowWatch
    ? (async () => {
      // Once: the watch hands over every entry already in the bucket (a restart with shadows
      // attached) and any that come meanwhile, and each would start another process, with
      // its own rate limits and budget for every shadow.
      for await (const e of shadowWatch) {
        if (e.operation !== "PUT" || stopping) continue;
        log.info("a live shadow is attached: starting the shadow service", { shadow: e.key });
        for (const group of deferred) start(group, 0);
        break;
      }
      shadowWatch.stop();
    })().catch((err) => log.error("watching for live shadows failed", { err }))
    : undefined;
  // A nats-server this start runs that dies (a cluster node, or the one server) is started
  // again (same ports, name and store), as services are; the services reconnect.
  if (nodes.length > 0) {
    nodes.forEach((node, i) => {
      const watch = (restarts: number): void => {
        node.exited.then(async (status) => {
          if (stopping) return;
          const delay = restartDelay(restarts + 1);
          log.warn("nats-server node exited; restarting", {
            node: `weft-${i + 1}`,
            code: status.code,
            signal: status.signal,
            restart_in_ms: delay,
          });
          await new Promise((r) => setTimeout(r, delay));
          if (stopping) return;
          try {
            await node.restart();
            log.info("nats-server node back", { node: `weft-${i + 1}` });
            watch(0);
          } catch (err) {
            log.error("nats-server node did not restart", { node: `weft-${i + 1}`, err });
            watch(restarts + 1);
          }
        });
      };
      watch(0);
    });
  }
  log.info("starting services", {
    processes: groups.filter((g) => !deferred.includes(g)).map((g) =>
      g.length === 1 ? g[0]!.name : `together(${g.map((s) => s.name).join(",")})`
    ),
    ...(deferred.length > 0 ? { with_the_first_live_shadow: [SHADOW_SERVICE] } : {}),
  });

  // Ready means every service answers `nats micro` pings and the gateway accepts
  // connections; only then say so, once, with where everything is.
  const started = mesh.services.filter((s) => !deferred.some((g) => g.includes(s)));
  const missing = await waitReady(nc, config, 60_000, () => signalled, started);
  // A hub keeps its connection: it restarts a site's stalled source once the site is back.
  const sourceWatch = config.hub.length > 0
    ? watchSources(await jetstreamManager(nc), config.hub, { log, natsDir: config.natsDir })
    : undefined;
  if (!sourceWatch && !shadowWatch) await nc.close();
  const scheme = config.tlsCert ? "https" : "http";
  const gateway = `${scheme}://${config.host}:${config.port}`;
  const events = config.eventsPort ? `${scheme}://${config.host}:${config.eventsPort}` : undefined;
  const summary = {
    gateway,
    events,
    // The dashboard is an event stream's client: the events gateway's when there is one.
    dashboard: `${events ?? gateway}/dashboard`,
    nats: config.natsUrl,
    nats_monitoring: nats ? `http://127.0.0.1:${config.natsMonitorPort || 8222}` : undefined,
    nats_cli: seeds
      // The ops key reads replies only on its own inbox prefix (src/identities.ts).
      ? `nats context save weft --server ${config.natsUrl} --nkey ${seeds.get("ops")} ` +
        `--inbox-prefix ${inboxPrefix("ops")} --select`
      : undefined,
    services: started.length,
    nats_sync: nats && sync ? sync : undefined,
    pipelines: loaded.length > 0 ? loaded.map((p) => p.def.name) : undefined,
    edge: config.hub.length > 0
      ? {
        role: "hub",
        sites: config.hub,
        leafnodes: `${
          config.leafTlsCert ? "tls" : "nats-leaf"
        }://${config.leafHost}:${config.leafPort}`,
        site_seeds: seeds ? config.hub.map((s) => seeds!.get(leafIdentity(s))) : undefined,
      }
      : config.site
      ? { role: "site", site: config.site, hub: config.leaf }
      : undefined,
    ready_in_ms: Math.round(performance.now() - startedAt),
  };
  // (Stopped before ready: nothing to announce.)
  if (!signalled && missing.length > 0) {
    log.warn("weft is running, but not every service is ready", { missing });
  } else if (!signalled) log.info("weft is ready", summary);
  if (!signalled && Deno.stdout.isTerminal() && missing.length === 0) {
    const lines = [
      `Weft is ready: ${started.length} services in ${(summary.ready_in_ms / 1000).toFixed(1)} s`,
      ...(events
        ? [
          `  gateway    ${gateway}`,
          `  events     ${events}   (event streams: /events, /.../events; dashboard: ${summary.dashboard})`,
        ]
        : [`  gateway    ${gateway}   (dashboard: ${summary.dashboard})`]),
      `  nats       ${config.natsUrl}${
        summary.nats_monitoring ? `   (monitoring: ${summary.nats_monitoring})` : ""
      }`,
      ...(summary.nats_cli ? [`  nats CLI   ${summary.nats_cli}`] : []),
      `  stop       Ctrl-C`,
    ];
    Deno.stdout.writeSync(new TextEncoder().encode(lines.join("\n") + "\n"));
  }

  await stopRequested;
  stopping = true;
  if (sourceWatch) await sourceWatch.stop();
  shadowWatch?.stop();
  await shadowsAttached;
  if (sourceWatch || shadowWatch) await nc.close().catch(() => {});
  log.info("stopping: draining services");
  await Promise.all([...running.entries()].map(async ([name, { child }]) => {
    try {
      child.kill("SIGTERM");
    } catch { /* already gone */ }
    const timer = setTimeout(() => {
      log.warn("service did not stop in time; killing", { child: name });
      try {
        child.kill("SIGKILL");
      } catch { /* gone */ }
    }, config.drainMs + 5_000);
    await child.status;
    clearTimeout(timer);
  }));
  if (nodes.length > 0) {
    log.info("stopping nats-server", { nodes: nodes.length });
    stopping = true;
    await Promise.all(nodes.map((n) => n.stop("SIGTERM")));
  }
  log.info("stopped");
}

if (import.meta.main) {
  if (Deno.args.includes("--help") || Deno.args.includes("-h")) {
    Deno.stdout.writeSync(new TextEncoder().encode(
      `deno task start [flags]: runs nats-server, every service and the gateway.

Every flag is also an environment variable (flags win); the rest of the settings are
environment variables only. README.md, "Configuration", says what each one does.

${flagsUsage()}
`,
    ));
    Deno.exit(0);
  }
  const log = createLogger("weft-supervisor");
  let config: Config;
  try {
    const unknown = unknownFlags(Deno.args);
    if (unknown.length > 0) {
      throw new ConfigError(
        `unknown flag${unknown.length > 1 ? "s" : ""}: ${
          unknown.join(", ")
        }; \`deno task start --help\` lists them`,
      );
    }
    const stray = strayArguments(Deno.args);
    if (stray.length > 0) {
      throw new ConfigError(
        `unexpected argument${stray.length > 1 ? "s" : ""}: ${
          stray.join(" ")
        }; settings are flags with a value (--cluster 3) or environment variables (README.md, "Configuration")`,
      );
    }
    config = loadConfig();
  } catch (err) {
    log.error("configuration refused", { err });
    Deno.exit(2);
  }
  await supervise(config, createLogger("weft-supervisor", config.logLevel));
  Deno.exit(0);
}
