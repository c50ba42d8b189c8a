/**
 * Configuration in one typed place: every setting has an environment variable, most a
 * command-line flag, and a default. {@link loadConfig} validates all of them at start-up
 * and reports every problem at once; {@link describeConfig} prints it with secrets masked.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { ConfigError, ValidationError } from "./errors.ts";
import { closest } from "./did_you_mean.ts";
import { type IngestLimits, parseIngestLimits } from "./gateway/ingest_limits.ts";
import { parseShadowSpecs, type ShadowSpec } from "./shadow/spec.ts";
import { parseSyncInterval } from "./nats_server.ts";

/** Log levels, least to most severe. */
export const LogLevel = { debug: 10, info: 20, warn: 30, error: 40 } as const;
/** One of {@link LogLevel}'s names. */
export type LogLevelName = keyof typeof LogLevel;

/** The analyzer families a stage can use. */
export const AnalyzerKind = { Embedded: "embedded", Rules: "rules", Llm: "llm" } as const;
/** One of {@link AnalyzerKind}. */
export type AnalyzerKind = typeof AnalyzerKind[keyof typeof AnalyzerKind];

/** Weft's whole configuration. */
export interface Config {
  /** NATS server URL(s), comma-separated. `NATS_URL`, `--nats-url`. */
  natsUrl: string;
  /** Gateway listen host. `WEFT_HOST`, `--host`. */
  host: string;
  /**
   * With authentication off, the `Host` names (or `host:port`s) the gateway answers besides
   * loopback and `host` (a guard against DNS rebinding), normalised as a URL's host.
   * `WEFT_ALLOWED_HOSTS`, comma-separated.
   */
  allowedHosts: string[];
  /** Gateway listen port; 0 picks a free one. `PORT`, `--port`. */
  port: number;
  /**
   * Supervisor: also run a second gateway process on this port, for event streams (SSE
   * clients, dashboards): its connection set-ups and fan-out then never share an event loop
   * with ingest on `port`. 0: none (the gateway serves both). `WEFT_EVENTS_PORT`,
   * `--events-port`.
   */
  eventsPort: number;
  /** `WEFT_LOG_LEVEL`, `--log-level`. */
  logLevel: LogLevelName;
  /** Path of the ruleset: routing table, and keyword rules for `rules` analyzers. `WEFT_RULES`, `--rules`. */
  rulesPath: string;
  /** Which analyzers the stages use: `embedded` (default), `rules` or `llm`. `WEFT_ANALYZERS`. */
  analyzers: AnalyzerKind;
  /** OpenAI-compatible base URL, e.g. `https://api.openai.com/v1`. `WEFT_LLM_BASE_URL`. */
  llmBaseUrl: string;
  /** Model name. `WEFT_LLM_MODEL`. */
  llmModel: string;
  /** API key (never printed). `WEFT_LLM_API_KEY`. */
  llmApiKey: string;
  /**
   * Deadline of one LLM analysis (an llm step's call) and of each model call of an agent, ms.
   * `WEFT_LLM_TIMEOUT_MS`.
   */
  llmTimeoutMs: number;
  /** LLM requests in flight per analyzer of a stage process. `WEFT_LLM_CONCURRENCY`. */
  llmConcurrency: number;
  /** LLM requests per second per stage process (0: unlimited). `WEFT_LLM_RPS`. */
  llmRps: number;
  /** Spend limit per stage process, USD (0: none). `WEFT_LLM_BUDGET_USD`. */
  llmBudgetUsd: number;
  /** Price per 1,000 input tokens, USD. `WEFT_LLM_PRICE_IN_PER_1K`. */
  llmPriceInPer1k: number;
  /** Price per 1,000 output tokens, USD. `WEFT_LLM_PRICE_OUT_PER_1K`. */
  llmPriceOutPer1k: number;
  /** Largest accepted body of a submission, bytes. `WEFT_BODY_LIMIT`. */
  bodyLimit: number;
  /** Largest accepted body of a batch submission, bytes. `WEFT_BATCH_BODY_LIMIT`. */
  batchBodyLimit: number;
  /**
   * Request bodies the gateway reads at once; a request with a body beyond them is answered
   * 503 with Retry-After, its body unread. Bounds what half-sent bodies cost (a body being read
   * holds ~190-280 KB until it ends, docs/SECURITY.md). `WEFT_BODY_READS_MAX`.
   */
  bodyReadsMax: number;
  /**
   * How long a request body may take to arrive in full, ms, from when its request reached the
   * gateway: past it the request is answered 408 `request_timeout` and its slot is freed.
   * `WEFT_BODY_TIMEOUT_MS`.
   */
  bodyTimeoutMs: number;
  /** Attempts a stage makes at one message before dead-lettering it. `WEFT_MAX_ATTEMPTS`. */
  maxAttempts: number;
  /**
   * Messages one stage process handles at once, and so the most one pull asks for. 256 by
   * default: larger pulls carried 13% more items/s than 64 in `deno task bench` (docs/BENCH.md).
   * `WEFT_CONCURRENCY`.
   */
  concurrency: number;
  /** How long the server waits for an ack before redelivering, ms. `WEFT_ACK_WAIT_MS`. */
  ackWaitMs: number;
  /**
   * Longest a stage's handler may take for one message, ms: past it the call is aborted
   * (its signal) and counts as a failed attempt, retried, then dead-lettered.
   * `WEFT_HANDLER_TIMEOUT_MS`.
   */
  handlerTimeoutMs: number;
  /** First retry delay, ms; doubles per attempt with jitter. `WEFT_RETRY_BASE_MS`. */
  retryBaseMs: number;
  /** Longest retry delay, ms. `WEFT_RETRY_MAX_MS`. */
  retryMaxMs: number;
  /** How long events are kept in each pipeline's event stream, ms. `WEFT_RETENTION_MS`. */
  retentionMs: number;
  /** Most bytes each pipeline's event stream keeps. `WEFT_STREAM_MAX_BYTES`. */
  streamMaxBytes: number;
  /**
   * Most bytes each object store (binary uploads) keeps; uploads are refused (507) from the
   * high-water mark. `WEFT_OBJECT_STORE_MAX_BYTES`.
   */
  objectStoreMaxBytes: number;
  /** De-duplication window for message ids, ms. `WEFT_DUPLICATE_WINDOW_MS`. */
  duplicateWindowMs: number;
  /** How long the first answer to an Idempotency-Key is kept, ms. `WEFT_IDEMPOTENCY_TTL_MS`. */
  idempotencyTtlMs: number;
  /**
   * A reviewer's claim on a waiting item (a definition's wait, a content review) lapses after
   * this long, so another may take the item, ms. `WEFT_CLAIM_TTL_MS`.
   */
  claimTtlMs: number;
  /** Comment sent to idle SSE clients this often, ms. `WEFT_SSE_KEEPALIVE_MS`. */
  sseKeepAliveMs: number;
  /** SSE clients one gateway serves at once. `WEFT_SSE_MAX_CLIENTS`. */
  sseMaxClients: number;
  /**
   * SSE streams one gateway sets up a second, first come first served, after a burst of a
   * quarter of that: a storm of clients connecting at once (every browser after a gateway
   * restart) waits its turn for its stream instead of taking the event loop from ingest.
   * 0 sets every stream up at once. `WEFT_SSE_OPENS_PER_S`.
   */
  sseOpensPerSecond: number;
  /**
   * Live SSE clients are woken at most this often, each writing everything queued in one
   * chunk: fan-out costs one write per client per flush, not per event; adds up to this
   * much delivery lag, ms. `WEFT_SSE_FLUSH_MS`.
   */
  sseFlushMs: number;
  /**
   * Budget of SSE client writes a second per live feed (one per stream): past it, live feeds flush less often
   * than `sseFlushMs` (more lag, the same work), so many clients cannot starve ingest.
   * `WEFT_SSE_WRITES_PER_S`.
   */
  sseWritesPerSecond: number;
  /** An SSE client that cannot take a frame within this time is dropped, ms. `WEFT_SSE_WRITE_TIMEOUT_MS`. */
  sseWriteTimeoutMs: number;
  /**
   * Bytes a gateway's SSE replays may have asked NATS for at once, in all: each replay takes
   * its reader's prefetch (the server's `max_payload` plus 64 KiB) from it and waits for its
   * turn when it is spent; a quarter is reserved for per-item streams' replays. Keep it well
   * under nats-server's `max_pending` (64 MiB by default), past which the server cuts the
   * gateway's connection as a slow consumer.
   * `WEFT_SSE_REPLAY_BYTES`.
   */
  sseReplayBytes: number;
  /** The state writer pulls at most one batch per this long (unless a backlog waits), and holds an unfinished item at most about this long, ms. `WEFT_STATE_FLUSH_MS`. */
  stateFlushMs: number;
  /** How long a stopping service may take to finish in-flight work, ms. `WEFT_DRAIN_MS`. */
  drainMs: number;
  /** Supervisor: nats-server configuration file. `WEFT_NATS_CONF`. */
  natsConf: string;
  /** Supervisor: override the conf's client port (0: keep it). `WEFT_NATS_PORT`. */
  natsPort: number;
  /** Supervisor: override the conf's monitoring port (0: keep it). `WEFT_NATS_MONITOR_PORT`. */
  natsMonitorPort: number;
  /**
   * Supervisor: working directory of the nats-server it starts; relative paths in the
   * conf (`store_dir: "./data/jetstream"`) resolve against it. Default: the repository
   * root. `WEFT_NATS_DIR`.
   */
  natsDir: string;
  /**
   * Supervisor: how often the nats-server it starts fsyncs its file store (`sync_interval`,
   * nats-server 2.10+): `always` (every write, before its ack), or a duration. Default `1s`
   * (the server's own default is 2 minutes; 1 s measured no slower, `always` about 3x
   * slower: docs/BENCH.md); a 2.9 server keeps its 2 minutes, with a warning, and a
   * `WEFT_NATS_CONF` that sets `sync_interval` keeps its own unless this is set. An
   * acknowledged write not yet synced survives a process crash, not a power failure.
   * `WEFT_NATS_SYNC`.
   */
  natsSync: string;
  /**
   * Supervisor: how the nats-server it starts authenticates clients. `nkeys` (default): one
   * identity per service, plus `admin` and `ops`, each with least-privilege permissions
   * (src/identities.ts); `off`: no authentication (any local process may do anything).
   * `WEFT_NATS_AUTH`.
   */
  natsAuth: "nkeys" | "off";
  /** Path of the nkey seed file this process authenticates to NATS with. `WEFT_NATS_NKEY`. */
  natsNkey: string;
  /**
   * A directory of seed files `<service>.nk`: each service of a process running several
   * (`--together`) connects with its own. `WEFT_NATS_IDENTITY_DIR`.
   */
  natsIdentityDir: string;
  /**
   * Supervisor: run services together in one process. `all` (or a bare `--together`), or a
   * comma-separated list of service names (the others run alone); empty: one process per
   * service. `WEFT_TOGETHER`.
   */
  together: string;
  /**
   * Supervisor: V8 flags every service process starts with (`deno run --v8-flags=...`),
   * comma-separated; none by default. `--optimize-for-size` makes each idle process about
   * 12 MiB smaller and halves throughput; `--max-semi-space-size=2` saves about 5 MiB for
   * roughly a tenth of it (docs/BENCH.md). `WEFT_V8_FLAGS`.
   */
  v8Flags: string;
  /**
   * Supervisor: run nats-server as a cluster of this many nodes on loopback (ports
   * WEFT_NATS_PORT, +1, +2...), every stream and bucket replicated on min(3, N) of them.
   * `WEFT_CLUSTER` or `--cluster N`; 1: one server.
   */
  cluster: number;
  /**
   * Supervisor: run as an edge site that sends its events to a hub: the hub's leafnode URL(s),
   * comma-separated (`nats-leaf://hub.example:7422`). The site's nats-server gets its own
   * JetStream domain (the site's name) and a leafnode connection to the hub, which sources
   * the site's event streams across it. Needs `site` and `leafNkey`. `WEFT_LEAF`, `--leaf`.
   */
  leaf: string;
  /** The edge site's name (its JetStream domain, and `site.<name>.` on the hub). `WEFT_SITE`, `--site`. */
  site: string;
  /**
   * The seed file a site's leafnode connection authenticates with: the hub's
   * `data/identities/leaf-<site>.nk`, copied to the site. `WEFT_LEAF_NKEY`, `--leaf-nkey`.
   */
  leafNkey: string;
  /**
   * Supervisor: run as the hub of these edge sites (comma-separated names): a leafnode
   * listener, JetStream domain `hub`, and per site a stream `EDGE_<NAME>` sourcing the
   * site's event streams onto `site.<name>.<pipeline>.>`. `WEFT_HUB`, `--hub`.
   */
  hub: readonly string[];
  /** Supervisor: the hub's leafnode port. `WEFT_LEAF_PORT`. */
  leafPort: number;
  /**
   * Supervisor: the address the hub's leafnode listener binds (loopback by default). Any
   * other needs `leafTlsCert`: sites then reach the hub over TLS. `WEFT_LEAF_HOST`.
   */
  leafHost: string;
  /**
   * Leafnode TLS, PEM files. At a hub: the listener's certificate and key; sites must then
   * use TLS. At a site: its client certificate and key, which a hub with `leafTlsCa`
   * requires. `WEFT_LEAF_TLS_CERT`, `WEFT_LEAF_TLS_KEY` (together).
   */
  leafTlsCert: string;
  /** Private key of `leafTlsCert` (never printed). `WEFT_LEAF_TLS_KEY`. */
  leafTlsKey: string;
  /**
   * Leafnode TLS: the CA the other end's certificate is checked against. At a site: the
   * hub's certificate (the link then uses TLS); at a hub: every site must present a
   * certificate it signed (mutual TLS). `WEFT_LEAF_TLS_CA`.
   */
  leafTlsCa: string;
  /**
   * Supervisor: processes per built-in service, e.g. `sentiment=2,topics=2` (each on the
   * service's one durable consumer). `WEFT_REPLICAS`. Not the gateway (one port).
   */
  serviceReplicas: Record<string, number>;
  /**
   * Pipeline definition files to run besides the built-in pipelines (comma-separated,
   * relative to the repository root): each file's `definePipeline` exports. `WEFT_PIPELINES`
   * or `--pipelines`.
   */
  pipelines: string[];
  /**
   * Whether a service creates missing streams and buckets at start. The supervisor turns
   * it off for its services, whose identities may not: it made them itself.
   * `WEFT_ENSURE_TOPOLOGY`.
   */
  ensureTopology: boolean;
  /** CA certificate (PEM) that verifies the NATS server's TLS certificate. `WEFT_NATS_CA`. */
  natsCa: string;
  /**
   * Client certificate (PEM) presented to a NATS server that verifies clients (mutual TLS,
   * `verify: true`). `WEFT_NATS_CERT`; goes with `natsKey`.
   */
  natsCert: string;
  /** Private key (PEM file) of `natsCert`; its contents are never read into logs. `WEFT_NATS_KEY`. */
  natsKey: string;
  /**
   * API keys by SHA-256 hash, with roles: JSON `[{"sha256":"<hex>","role":"reviewer","name":"alice"}]`.
   * Empty: authentication is off (logged as a warning). `WEFT_API_KEYS`.
   */
  apiKeys: ApiKey[];
  /** Testing/chaos aid: stages fail on text containing this (case-insensitive); "" = off. `WEFT_FAIL_ON`. */
  failOn: string;
  /** Testing/chaos aid: the stages (comma-separated, "" or "*" = all) `failOn` applies to. `WEFT_FAIL_STAGE`. */
  failStage: string;
  /** Testing/chaos aid: every handler call first sleeps this long, ms; 0 = off. `WEFT_SLOW_MS`. */
  slowMs: number;
  /** Testing/chaos aid: the stages (comma-separated, "" or "*" = all) `slowMs` applies to. `WEFT_SLOW_STAGE`. */
  slowStage: string;
  /** Share of a stream's limits from which intake refuses new items (507), so accepted ones can finish. `WEFT_STREAM_HIGH_WATER`. */
  streamHighWater: number;
  /** Share of a stream's limits from which a warning is logged. `WEFT_STREAM_ALERT_AT`. */
  streamAlertAt: number;
  /** Allow a start to lower a stream's limits below what it stores (discarding data). `WEFT_ALLOW_SHRINK`. */
  allowShrink: boolean;
  /** Serve a non-loopback `WEFT_HOST` without API keys anyway. `WEFT_INSECURE_NO_AUTH`. */
  insecureNoAuth: boolean;
  /** PEM certificate chain file: the gateway serves HTTPS when this and `tlsKey` are set. `WEFT_TLS_CERT`. */
  tlsCert: string;
  /** PEM private key file of `tlsCert` (never printed). `WEFT_TLS_KEY`. */
  tlsKey: string;
  /** Ingest rate limits and daily quotas per role and per API key name. `WEFT_RATE_LIMITS`. */
  ingestLimits: IngestLimits;
  /** SSE clients one API key may hold open at once (with keys configured). `WEFT_SSE_MAX_PER_KEY`. */
  sseMaxPerKey: number;
  /**
   * Live shadows attached by configuration (besides those attached over the API): one
   * shadow or a list, as JSON, e.g.
   * `{"id":"rules1","step":"sentiment","candidate":{"analyzers":"rules"}}`. See
   * docs/SHADOW.md. `WEFT_SHADOW`.
   */
  shadows: ShadowSpec[];
  /** `stdin`: stop when standard input closes (the supervisor sets it, so its services die with it). `WEFT_PARENT_WATCH`. */
  parentWatch: "" | "stdin";
}

/** The roles an API key can have. `admin` may do everything. */
export const Role = { Ingest: "ingest", Reviewer: "reviewer", Admin: "admin" } as const;
/** One of {@link Role}. */
export type Role = typeof Role[keyof typeof Role];

/** A configured API key: only its SHA-256 hash is known. */
export interface ApiKey {
  /** Lower-case hex SHA-256 of the key. */
  sha256: string;
  /** What the key may do. */
  role: Role;
  /** Who holds it: recorded as the reviewer or uploader. */
  name: string;
}

/** Who every caller is with authentication off; no API key may be named so. */
export const ANONYMOUS_NAME = "anonymous";

/** Parses WEFT_API_KEYS; undefined when invalid (a key named {@link ANONYMOUS_NAME} too). */
export function parseApiKeys(raw: string): ApiKey[] | undefined {
  let value: unknown;
  try {
    value = JSON.parse(raw);
  } catch {
    return undefined;
  }
  if (!Array.isArray(value)) return undefined;
  const roles = new Set<string>(Object.values(Role));
  const keys: ApiKey[] = [];
  for (const k of value) {
    const { sha256, role, name } = (k ?? {}) as Record<string, unknown>;
    if (typeof sha256 !== "string" || !/^[0-9a-fA-F]{64}$/.test(sha256)) return undefined;
    if (typeof role !== "string" || !roles.has(role)) return undefined;
    if (typeof name !== "string" || name.trim() === "" || name.length > 200) return undefined;
    // Whom every caller is with authentication off: a key holder named so would be taken for
    // one (free to name anyone as a decision's or claim's `by`).
    if (name.trim() === ANONYMOUS_NAME) return undefined;
    keys.push({ sha256: sha256.toLowerCase(), role: role as Role, name: name.trim() });
  }
  return keys;
}

/**
 * One setting: where it goes in {@link Config}, the environment variable and optional flag it
 * is read from, its default, and how a raw value is parsed (undefined: invalid).
 */
export interface Setting<K extends keyof Config = keyof Config> {
  /** Its key in {@link Config}. */
  key: K;
  /** The environment variable, `WEFT_*`. */
  env: string;
  /** The command-line flag, without `--`. */
  flag?: string;
  /** The value when neither is given. */
  default: Config[K];
  /**
   * The value of a raw string; undefined when it is invalid, or a {@link ValidationError}
   * saying why (reported with its field, never for a secret).
   */
  parse: (raw: string) => Config[K] | undefined;
  /** Masked when the configuration is printed. */
  secret?: boolean;
  /** What a valid value looks like, said when one is invalid. */
  expects?: string;
}

/** What each integer parser ({@link int}) takes, said when a value is invalid. */
const INT_RANGES = new WeakMap<(raw: string) => unknown, string>();
const int = (min: number, max = Number.MAX_SAFE_INTEGER) => {
  const parse = (raw: string) => {
    const n = Number(raw);
    return Number.isInteger(n) && n >= min && n <= max ? n : undefined;
  };
  INT_RANGES.set(
    parse,
    max === Number.MAX_SAFE_INTEGER
      ? `an integer, at least ${min}`
      : `an integer from ${min} to ${max}`,
  );
  return parse;
};
const str = (raw: string) => (raw.trim() === "" ? undefined : raw.trim());
const level = (raw: string) => (raw in LogLevel ? raw as LogLevelName : undefined);
const kind = (raw: string) =>
  (Object.values(AnalyzerKind) as string[]).includes(raw) ? raw as AnalyzerKind : undefined;
const num = (min: number) => (raw: string) => {
  const n = Number(raw);
  return Number.isFinite(n) && n >= min ? n : undefined;
};
const ratio = (raw: string) => {
  const n = Number(raw);
  return Number.isFinite(n) && n > 0 && n <= 1 ? n : undefined;
};
const bool = (raw: string) =>
  /^(1|true|yes)$/i.test(raw) ? true : /^(0|false|no)$/i.test(raw) ? false : undefined;
const url = (raw: string) => {
  try {
    return new URL(raw).protocol.startsWith("http") ? raw.replace(/\/+$/, "") : undefined;
  } catch {
    return undefined;
  }
};

/**
 * An edge site's name: lower-case letters, digits and `-`, starting with a letter, at most
 * 32 characters. It is the site's JetStream domain and a subject token on the hub, and
 * `hub` is the hub's own domain.
 */
export const SITE_NAME: RegExp = /^[a-z][a-z0-9-]{0,31}$/;
/** What a site name looks like, said when one is invalid. */
const SITE_NAME_RULE =
  "lower-case letters, digits and -, starting with a letter, at most 32 characters";
const siteName = (raw: string) => {
  const v = raw.trim();
  if (v === "hub") {
    throw new ValidationError(
      `invalid value "hub": "hub" is reserved, the hub's own JetStream domain: name each site ` +
        `otherwise (${SITE_NAME_RULE})`,
    );
  }
  return SITE_NAME.test(v) ? v : undefined;
};
/** Leafnode URLs (`nats-leaf://`, `nats://`, `tls://`), comma-separated, normalised. */
const parseLeafUrls = (raw: string) => {
  const urls = raw.split(",").map((u) => u.trim()).filter(Boolean);
  try {
    return urls.length > 0 &&
        urls.every((u) => /^(nats-leaf|nats|tls):\/\/[^\s,]+$/.test(u) && new URL(u).port !== "")
      ? urls.join(",")
      : undefined;
  } catch {
    return undefined;
  }
};

/**
 * A `Host` a gateway may be named by: a host name, an IPv4 address or a bracketed IPv6 one,
 * with an optional port; its URL host (lower case), or undefined when it is anything else.
 */
const hostEntry = (raw: string): string | undefined => {
  const m = raw.match(/^([a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])(?::(\d{1,5}))?$/i);
  if (!m || (m[2] !== undefined && (Number(m[2]) < 1 || Number(m[2]) > 65535))) return undefined;
  try {
    return new URL(`http://${raw}`).host;
  } catch {
    return undefined;
  }
};
/** `Host` names, comma-separated, each {@link hostEntry}'s. */
const parseHostList = (raw: string) => {
  const hosts = raw.split(",").map((h) => h.trim()).filter(Boolean).map(hostEntry);
  return hosts.length > 0 && hosts.every((h) => h !== undefined) ? hosts as string[] : undefined;
};

// deno-lint-ignore no-explicit-any
const SETTINGS: Setting<any>[] = [
  {
    key: "natsUrl",
    env: "NATS_URL",
    flag: "nats-url",
    default: "nats://127.0.0.1:4222",
    parse: str,
    secret: true,
  },
  { key: "host", env: "WEFT_HOST", flag: "host", default: "127.0.0.1", parse: str },
  {
    key: "allowedHosts",
    env: "WEFT_ALLOWED_HOSTS",
    default: [],
    parse: parseHostList,
    expects: "host names or addresses, comma-separated, each host or host:port " +
      "(e.g. weft.example.com,192.168.1.20:8000)",
  },
  { key: "port", env: "PORT", flag: "port", default: 8000, parse: int(0, 65535) },
  {
    key: "eventsPort",
    env: "WEFT_EVENTS_PORT",
    flag: "events-port",
    default: 0,
    parse: int(0, 65535),
  },
  { key: "logLevel", env: "WEFT_LOG_LEVEL", flag: "log-level", default: "info", parse: level },
  { key: "rulesPath", env: "WEFT_RULES", flag: "rules", default: "rules/routing.json", parse: str },
  { key: "analyzers", env: "WEFT_ANALYZERS", flag: "analyzers", default: "embedded", parse: kind },
  { key: "llmBaseUrl", env: "WEFT_LLM_BASE_URL", default: "", parse: url },
  { key: "llmModel", env: "WEFT_LLM_MODEL", default: "", parse: str },
  { key: "llmApiKey", env: "WEFT_LLM_API_KEY", default: "", parse: str, secret: true },
  { key: "llmTimeoutMs", env: "WEFT_LLM_TIMEOUT_MS", default: 15_000, parse: int(100) },
  { key: "llmConcurrency", env: "WEFT_LLM_CONCURRENCY", default: 4, parse: int(1, 1000) },
  { key: "llmRps", env: "WEFT_LLM_RPS", default: 0, parse: num(0) },
  { key: "llmBudgetUsd", env: "WEFT_LLM_BUDGET_USD", default: 0, parse: num(0) },
  { key: "llmPriceInPer1k", env: "WEFT_LLM_PRICE_IN_PER_1K", default: 0, parse: num(0) },
  { key: "llmPriceOutPer1k", env: "WEFT_LLM_PRICE_OUT_PER_1K", default: 0, parse: num(0) },
  { key: "bodyLimit", env: "WEFT_BODY_LIMIT", default: 64 * 1024, parse: int(1024) },
  {
    key: "batchBodyLimit",
    env: "WEFT_BATCH_BODY_LIMIT",
    default: 4 * 1024 * 1024,
    parse: int(1024),
  },
  { key: "bodyReadsMax", env: "WEFT_BODY_READS_MAX", default: 256, parse: int(1, 1_000_000) },
  {
    key: "bodyTimeoutMs",
    env: "WEFT_BODY_TIMEOUT_MS",
    default: 30_000,
    parse: int(100, 3600_000),
  },
  { key: "maxAttempts", env: "WEFT_MAX_ATTEMPTS", default: 5, parse: int(1, 100) },
  {
    key: "concurrency",
    env: "WEFT_CONCURRENCY",
    flag: "concurrency",
    default: 256,
    parse: int(1, 10_000),
  },
  { key: "ackWaitMs", env: "WEFT_ACK_WAIT_MS", default: 30_000, parse: int(1000) },
  {
    key: "handlerTimeoutMs",
    env: "WEFT_HANDLER_TIMEOUT_MS",
    default: 300_000,
    parse: int(100, 24 * 3600_000),
  },
  { key: "retryBaseMs", env: "WEFT_RETRY_BASE_MS", default: 500, parse: int(0) },
  { key: "retryMaxMs", env: "WEFT_RETRY_MAX_MS", default: 30_000, parse: int(0) },
  { key: "retentionMs", env: "WEFT_RETENTION_MS", default: 7 * 24 * 3600_000, parse: int(60_000) },
  {
    key: "streamMaxBytes",
    env: "WEFT_STREAM_MAX_BYTES",
    default: 1024 ** 3,
    parse: int(1024 * 1024),
  },
  {
    key: "objectStoreMaxBytes",
    env: "WEFT_OBJECT_STORE_MAX_BYTES",
    default: 1024 ** 3,
    parse: int(1024 * 1024),
  },
  { key: "duplicateWindowMs", env: "WEFT_DUPLICATE_WINDOW_MS", default: 120_000, parse: int(1000) },
  {
    key: "idempotencyTtlMs",
    env: "WEFT_IDEMPOTENCY_TTL_MS",
    default: 24 * 3600_000,
    parse: int(1000),
  },
  { key: "claimTtlMs", env: "WEFT_CLAIM_TTL_MS", default: 15 * 60_000, parse: int(1000) },
  { key: "sseKeepAliveMs", env: "WEFT_SSE_KEEPALIVE_MS", default: 15_000, parse: int(100) },
  { key: "sseMaxClients", env: "WEFT_SSE_MAX_CLIENTS", default: 1000, parse: int(1) },
  { key: "sseOpensPerSecond", env: "WEFT_SSE_OPENS_PER_S", default: 200, parse: num(0) },
  { key: "sseFlushMs", env: "WEFT_SSE_FLUSH_MS", default: 100, parse: int(0, 10_000) },
  {
    key: "sseWritesPerSecond",
    env: "WEFT_SSE_WRITES_PER_S",
    default: 5_000,
    parse: int(100, 1_000_000),
  },
  { key: "sseWriteTimeoutMs", env: "WEFT_SSE_WRITE_TIMEOUT_MS", default: 10_000, parse: int(100) },
  {
    key: "sseReplayBytes",
    env: "WEFT_SSE_REPLAY_BYTES",
    default: 16 * 1024 * 1024,
    parse: int(1),
  },
  { key: "stateFlushMs", env: "WEFT_STATE_FLUSH_MS", default: 20, parse: int(0, 10_000) },
  { key: "drainMs", env: "WEFT_DRAIN_MS", default: 10_000, parse: int(0) },
  { key: "natsConf", env: "WEFT_NATS_CONF", default: "nats.conf", parse: str },
  { key: "natsPort", env: "WEFT_NATS_PORT", default: 0, parse: int(0, 65535) },
  { key: "natsMonitorPort", env: "WEFT_NATS_MONITOR_PORT", default: 0, parse: int(0, 65535) },
  { key: "natsDir", env: "WEFT_NATS_DIR", default: "", parse: str },
  {
    key: "natsSync",
    env: "WEFT_NATS_SYNC",
    default: "1s",
    parse: parseSyncInterval,
    expects: "always, or a duration such as 500ms, 1s or 2m",
  },
  {
    key: "natsAuth",
    env: "WEFT_NATS_AUTH",
    default: "nkeys",
    parse: (raw: string) => (raw === "nkeys" || raw === "off" ? raw : undefined),
  },
  { key: "natsNkey", env: "WEFT_NATS_NKEY", default: "", parse: str },
  { key: "natsIdentityDir", env: "WEFT_NATS_IDENTITY_DIR", default: "", parse: str },
  {
    key: "together",
    env: "WEFT_TOGETHER",
    flag: "together",
    default: "",
    parse: (raw: string) => {
      const v = raw.trim();
      if (v === "true" || v === "all") return "all";
      return /^[a-z-]+(,[a-z-]+)*$/.test(v) ? v : undefined;
    },
  },
  {
    key: "v8Flags",
    env: "WEFT_V8_FLAGS",
    default: "",
    parse: (raw: string) => {
      const v = raw.trim();
      if (v === "none" || v === "") return "";
      return /^--[a-z0-9_-]+(=[\w.]+)?(,--[a-z0-9_-]+(=[\w.]+)?)*$/.test(v) ? v : undefined;
    },
  },
  {
    key: "cluster",
    env: "WEFT_CLUSTER",
    flag: "cluster",
    default: 1,
    parse: int(1, 5),
    expects: "a number of nats-server nodes from 1 to 5",
  },
  {
    key: "leaf",
    env: "WEFT_LEAF",
    flag: "leaf",
    default: "",
    parse: parseLeafUrls,
    expects: "the hub's leafnode URL(s), comma-separated, each nats-leaf://host:port " +
      "(or tls://host:port for TLS, or nats://host:port)",
  },
  {
    key: "site",
    env: "WEFT_SITE",
    flag: "site",
    default: "",
    parse: siteName,
    expects: `a site name: ${SITE_NAME_RULE}`,
  },
  { key: "leafNkey", env: "WEFT_LEAF_NKEY", flag: "leaf-nkey", default: "", parse: str },
  {
    key: "hub",
    env: "WEFT_HUB",
    flag: "hub",
    default: [],
    parse: (raw: string) => {
      const sites = raw.split(",").map((s) => s.trim()).filter(Boolean);
      // (A bare `--hub` reads as "true": the sites must be named.)
      return sites.length > 0 && raw.trim() !== "true" && sites.every((s) => siteName(s) === s) &&
          new Set(sites).size === sites.length
        ? sites
        : undefined;
    },
    expects: `site names, comma-separated, none twice, each ${SITE_NAME_RULE}`,
  },
  { key: "leafPort", env: "WEFT_LEAF_PORT", default: 7422, parse: int(1, 65535) },
  { key: "leafHost", env: "WEFT_LEAF_HOST", default: "127.0.0.1", parse: str },
  { key: "leafTlsCert", env: "WEFT_LEAF_TLS_CERT", default: "", parse: str },
  { key: "leafTlsKey", env: "WEFT_LEAF_TLS_KEY", default: "", parse: str },
  { key: "leafTlsCa", env: "WEFT_LEAF_TLS_CA", default: "", parse: str },
  {
    key: "serviceReplicas",
    env: "WEFT_REPLICAS",
    flag: "replicas",
    default: {},
    parse: (raw: string) => {
      const out: Record<string, number> = {};
      for (const part of raw.split(",").map((p) => p.trim()).filter(Boolean)) {
        const m = part.match(/^([a-z][a-z0-9_-]*)=([1-9]|1[0-6])$/);
        if (!m || m[1] === "gateway") return undefined;
        out[m[1]!] = Number(m[2]);
      }
      return out;
    },
  },
  {
    key: "pipelines",
    env: "WEFT_PIPELINES",
    flag: "pipelines",
    default: [],
    parse: (raw: string) => {
      const files = raw.split(",").map((f) => f.trim()).filter((f) => f.length > 0);
      return files.every((f) => /\.(ts|js|mts|mjs)$/.test(f)) ? files : undefined;
    },
  },
  { key: "ensureTopology", env: "WEFT_ENSURE_TOPOLOGY", default: true, parse: bool },
  { key: "natsCa", env: "WEFT_NATS_CA", default: "", parse: str },
  { key: "natsCert", env: "WEFT_NATS_CERT", default: "", parse: str },
  { key: "natsKey", env: "WEFT_NATS_KEY", default: "", parse: str },
  { key: "apiKeys", env: "WEFT_API_KEYS", default: [], parse: parseApiKeys, secret: true },
  { key: "failOn", env: "WEFT_FAIL_ON", default: "", parse: str },
  { key: "failStage", env: "WEFT_FAIL_STAGE", default: "", parse: str },
  { key: "slowMs", env: "WEFT_SLOW_MS", default: 0, parse: int(0, 3_600_000) },
  { key: "slowStage", env: "WEFT_SLOW_STAGE", default: "", parse: str },
  { key: "streamHighWater", env: "WEFT_STREAM_HIGH_WATER", default: 0.9, parse: ratio },
  { key: "streamAlertAt", env: "WEFT_STREAM_ALERT_AT", default: 0.8, parse: ratio },
  { key: "allowShrink", env: "WEFT_ALLOW_SHRINK", default: false, parse: bool },
  { key: "insecureNoAuth", env: "WEFT_INSECURE_NO_AUTH", default: false, parse: bool },
  { key: "sseMaxPerKey", env: "WEFT_SSE_MAX_PER_KEY", default: 100, parse: int(1) },
  { key: "ingestLimits", env: "WEFT_RATE_LIMITS", default: {}, parse: parseIngestLimits },
  { key: "tlsCert", env: "WEFT_TLS_CERT", default: "", parse: str },
  { key: "tlsKey", env: "WEFT_TLS_KEY", default: "", parse: str },
  { key: "shadows", env: "WEFT_SHADOW", default: [], parse: parseShadowSpecs },
  {
    key: "parentWatch",
    env: "WEFT_PARENT_WATCH",
    default: "",
    parse: (raw: string) => (raw === "stdin" ? raw : undefined),
  },
];

/** Parsers for settings a pipeline declares ({@link registerSettings}). */
export const settingParsers: {
  /** An integer from `min` to `max`. */
  int: (min: number, max?: number) => (raw: string) => number | undefined;
  /** A non-empty string, trimmed. */
  str: (raw: string) => string | undefined;
} = { int, str };

/**
 * Adds a pipeline's own settings to the configuration (its settings module registers them when
 * it loads, and adds their keys to {@link Config} by declaration merging). Each is read,
 * defaulted, validated and printed like the runtime's; a pipeline's env names must start with
 * `WEFT_` (what services may read, {@link ENV_PERMISSION}). Registering a key twice keeps the
 * first.
 *
 * @example
 * ```ts ignore
 * registerSettings([
 *   { key: "orderTimeoutMs", env: "WEFT_ORDER_TIMEOUT_MS", default: 60_000, parse: settingParsers.int(1) },
 * ]);
 * ```
 */
// deno-lint-ignore no-explicit-any
export function registerSettings(settings: readonly Setting<any>[]): void {
  for (const setting of settings) {
    if (!setting.env.startsWith("WEFT_")) {
      throw new TypeError(`setting ${String(setting.key)}: ${setting.env} must start with WEFT_`);
    }
    if (!SETTINGS.some((s) => s.key === setting.key)) SETTINGS.push(setting);
  }
}

/** The environment variable names Weft reads (the runtime's and the registered pipelines'). */
export function envNames(): string[] {
  return SETTINGS.map((s) => s.env);
}

/**
 * The flags `deno task start` takes, one line each: the flag, its environment variable and
 * its default (secrets' defaults are empty). For `--help`.
 *
 * @example
 * ```ts
 * import { flagsUsage } from "./config.ts";
 * console.assert(flagsUsage().includes("--port"));
 * ```
 */
export function flagsUsage(): string {
  const rows = SETTINGS.filter((s) => s.flag).map((s) => {
    const d = s.default;
    const empty = d === "" || d === undefined ||
      (typeof d === "object" && d !== null && Object.keys(d).length === 0);
    const shown = empty ? "(none)" : typeof d === "object" ? JSON.stringify(d) : String(d);
    return [`--${s.flag}`, s.env, shown] as const;
  });
  const w0 = Math.max(...rows.map((r) => r[0].length));
  const w1 = Math.max(...rows.map((r) => r[1].length));
  return rows.map(([f, e, d]) => `  ${f.padEnd(w0)}  ${e.padEnd(w1)}  default ${d}`).join("\n");
}

/**
 * The narrowest `--allow-env` value covering {@link envNames}: the names outside the `WEFT_`
 * prefix, and `WEFT_*` (Deno 2 accepts a trailing wildcard; every pipeline setting is `WEFT_*`).
 */
export const ENV_PERMISSION: string = [
  ...envNames().filter((n) => !n.startsWith("WEFT_")),
  "WEFT_*",
].join(",");

/** Where configuration comes from; defaults to the process's env and arguments. */
export interface ConfigSource {
  /** Reads an environment variable; defaults to `Deno.env.get`. */
  env?: (name: string) => string | undefined;
  /** Command-line arguments; defaults to `Deno.args`. */
  args?: string[];
}

/** The settings' command-line flags, without `--`. */
const FLAGS: ReadonlySet<string> = new Set(SETTINGS.flatMap((s) => (s.flag ? [s.flag] : [])));

/** The flag an argument names (`--name` or `--name=value`), or undefined. */
function flagOf(arg: string): string | undefined {
  return arg.startsWith("--") ? arg.slice(2).split("=", 1)[0] : undefined;
}

/**
 * `args` with each bare settings flag (one followed by another settings flag, or last) given
 * the value `true`: `--together --events-port 8001` is `--together=true --events-port 8001`,
 * not `--together` with the value `--events-port`. A value that starts with `--` but names
 * no settings flag is left to be a value.
 */
function bareFlagsMarked(args: readonly string[]): string[] {
  return args.map((arg, i) => {
    if (arg.includes("=") || !FLAGS.has(flagOf(arg) ?? "")) return arg;
    const next = args[i + 1];
    return next === undefined || FLAGS.has(flagOf(next) ?? "") ? `${arg}=true` : arg;
  });
}

/**
 * The arguments in `args` that are neither a settings flag nor a flag's value (`start 3`,
 * `--port 9000 9001`): a program that takes only settings flags refuses them.
 *
 * @example
 * ```ts
 * import { strayArguments } from "./config.ts";
 * console.assert(strayArguments(["--port", "9000", "9001"])[0] === "9001");
 * ```
 */
export function strayArguments(args: readonly string[]): string[] {
  const marked = bareFlagsMarked(args);
  const stray: string[] = [];
  for (let i = 0; i < marked.length; i++) {
    const arg = marked[i]!;
    if (arg.startsWith("--")) {
      if (!arg.includes("=")) i++; // its value
    } else stray.push(arg);
  }
  return stray;
}

/**
 * The `--flags` in `args` that are no setting's flag (or none of `known`, a program's own
 * flags without `--`), each with the closest one when a typo is likely: a program refuses
 * them rather than ignoring them silently.
 *
 * @example
 * ```ts
 * import { unknownFlags } from "./config.ts";
 * console.assert(unknownFlags(["--event-port", "8001"])[0] === "--event-port (did you mean --events-port?)");
 * console.assert(unknownFlags(["--cout", "3"], ["count"])[0] === "--cout (did you mean --count?)");
 * ```
 */
export function unknownFlags(
  args: readonly string[],
  known: Iterable<string> = FLAGS,
): string[] {
  const flags = new Set(known);
  return args.flatMap((arg) => {
    const name = flagOf(arg);
    if (name === undefined || name === "" || flags.has(name)) return [];
    const near = closest(name, flags);
    return [`--${name}${near !== undefined ? ` (did you mean --${near}?)` : ""}`];
  });
}

/**
 * Builds and validates the configuration: flags override env, env overrides defaults.
 * Throws a {@link ConfigError} naming every bad setting.
 *
 * @example
 * ```ts
 * import { loadConfig } from "./config.ts";
 * const config = loadConfig({ env: () => undefined, args: ["--port", "9000"] });
 * console.assert(config.port === 9000);
 * ```
 */
export function loadConfig(source: ConfigSource = {}): Config {
  const env = source.env ?? ((name: string) => Deno.env.get(name));
  const { values } = parseArgs({
    args: bareFlagsMarked(source.args ?? Deno.args),
    options: Object.fromEntries(
      SETTINGS.filter((s) => s.flag).map((s) => [s.flag!, { type: "string" as const }]),
    ),
    strict: false,
    allowPositionals: true,
  });
  const config: Record<string, unknown> = {};
  const problems: string[] = [];
  /** The settings given an invalid value: the checks of settings together skip them. */
  const invalid = new Set<string>();
  for (const s of SETTINGS) {
    const fromFlag = s.flag ? values[s.flag] : undefined;
    // A bare `--flag` (no value) means "true".
    const raw = typeof fromFlag === "string" ? fromFlag : fromFlag === true ? "true" : env(s.env);
    if (raw === undefined || raw === "") {
      config[s.key] = s.default;
      continue;
    }
    let parsed: unknown;
    try {
      parsed = s.parse(raw);
    } catch (err) {
      if (!(err instanceof ValidationError)) throw err;
      // A parser that says what is wrong (WEFT_SHADOW names the field, as its HTTP attach
      // does); a secret's is not repeated, it may quote the value.
      if (!s.secret) {
        invalid.add(s.key);
        problems.push(
          `${s.flag ? `--${s.flag} / ` : ""}${s.env}: ${
            err.field ? `${err.field}: ` : ""
          }${err.message}`,
        );
        continue;
      }
    }
    if (parsed === undefined) {
      invalid.add(s.key);
      const expects = s.expects ?? INT_RANGES.get(s.parse);
      problems.push(
        `${s.flag ? `--${s.flag} / ` : ""}${s.env}: invalid value ${
          JSON.stringify(s.secret ? "***" : raw)
        }${expects ? ` (expects ${expects})` : ""}`,
      );
    } else config[s.key] = parsed;
  }
  if (config.analyzers === AnalyzerKind.Llm && (!config.llmBaseUrl || !config.llmModel)) {
    problems.push("WEFT_ANALYZERS=llm needs WEFT_LLM_BASE_URL and WEFT_LLM_MODEL");
  }
  if (
    !isLoopback(String(config.host)) && (config.apiKeys as ApiKey[]).length === 0 &&
    !config.insecureNoAuth
  ) {
    problems.push(
      `WEFT_HOST=${config.host} would serve the gateway beyond this machine with no API keys: ` +
        `set WEFT_API_KEYS, or WEFT_INSECURE_NO_AUTH=1 to do it anyway`,
    );
  }
  // Settings that go together, one without the other. (A value refused above is not
  // missing: its own problem says what is wrong with it.)
  const oneOf = (a: string, b: string) =>
    !invalid.has(a) && !invalid.has(b) && Boolean(config[a]) !== Boolean(config[b]);
  if (oneOf("natsCert", "natsKey")) {
    problems.push(
      "WEFT_NATS_CERT and WEFT_NATS_KEY go together: set both for a client certificate, or neither",
    );
  }
  if (oneOf("leaf", "site")) {
    problems.push("--leaf (WEFT_LEAF) and --site (WEFT_SITE) go together: set both for a site");
  }
  if (config.leaf && ((config.hub as string[] | undefined) ?? []).length > 0) {
    problems.push("a process is a hub (--hub) or an edge site (--leaf), not both");
  }
  if (config.leaf && Number(config.cluster) > 1) {
    problems.push("an edge site runs one nats-server: --leaf does not go with --cluster");
  }
  if (oneOf("tlsCert", "tlsKey")) {
    problems.push("WEFT_TLS_CERT and WEFT_TLS_KEY go together: set both for HTTPS, or neither");
  }
  if (oneOf("leafTlsCert", "leafTlsKey")) {
    problems.push(
      "WEFT_LEAF_TLS_CERT and WEFT_LEAF_TLS_KEY go together: set both for leafnode TLS, or neither",
    );
  }
  const leafHost = String(config.leafHost);
  if (!["127.0.0.1", "localhost", "::1"].includes(leafHost) && !config.leafTlsCert) {
    problems.push(
      `WEFT_LEAF_HOST ${leafHost} is not loopback: sites would reach the hub in the clear; ` +
        `set WEFT_LEAF_TLS_CERT and WEFT_LEAF_TLS_KEY (and WEFT_LEAF_TLS_CA for mutual TLS)`,
    );
  }
  // Every stream de-duplicates over the window, and nats-server refuses a window longer than
  // what a stream keeps (WEFT_RETENTION_MS; a day for the live shadows' stream): the start
  // failed setting up the streams with "duplicates window can not be larger then max age".
  const kept = Math.min(Number(config.retentionMs), 24 * 3600_000);
  if (
    !invalid.has("retentionMs") && !invalid.has("duplicateWindowMs") &&
    Number(config.duplicateWindowMs) > kept
  ) {
    problems.push(
      `WEFT_DUPLICATE_WINDOW_MS ${config.duplicateWindowMs} is longer than streams keep ` +
        `messages (WEFT_RETENTION_MS ${config.retentionMs}, and a day at most for the live ` +
        `shadows' stream): lower it to ${kept} or less, or raise WEFT_RETENTION_MS`,
    );
  }
  if (problems.length > 0) {
    throw new ConfigError(`invalid configuration: ${problems.join("; ")}`);
  }
  return config as unknown as Config;
}

/**
 * True for loopback host names and addresses: only this machine can reach them.
 *
 * @example
 * ```ts
 * import { isLoopback } from "./config.ts";
 * console.assert(isLoopback("127.0.0.1") && isLoopback("localhost") && !isLoopback("0.0.0.0"));
 * ```
 */
export function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || host === "[::1]" ||
    /^127(\.\d{1,3}){3}$/.test(host);
}

/** The configuration as printable pairs, secrets masked (credentials in URLs). */
export function describeConfig(config: Config): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const s of SETTINGS) {
    const v = config[s.key as keyof Config];
    out[s.key] = s.secret && typeof v === "string"
      ? (s.key === "natsUrl" ? maskUrlCredentials(v) : v ? "***" : "")
      : s.secret && Array.isArray(v)
      ? `${v.length} configured (hashes not shown)`
      : v;
  }
  return out;
}

function maskUrlCredentials(urls: string): string {
  return urls.replace(/\/\/[^@/]*@/g, "//***@");
}
