/**
 * The JetStream topology Weft needs: streams, durable consumers and KV buckets. Creating
 * it is idempotent: what exists with the right settings is left alone, what differs is
 * updated in place, nothing is deleted. Uses only features nats-server 2.9 has (single
 * filter subjects, no per-message TTL), which 2.10+ accept unchanged.
 *
 * @module
 */
import { supportsAtomicBatch } from "./atomic_batch.ts";
import {
  AckPolicy,
  type ConsumerConfig,
  type ConsumerInfo,
  DeliverPolicy,
  DiscardPolicy,
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamManager,
  jetstreamManager,
  RetentionPolicy,
  StorageType,
  type StreamConfig,
  type StreamInfo,
} from "@nats-io/jetstream";
import { ConfigError } from "./errors.ts";
import { Kvm } from "@nats-io/kv";
import { Objm } from "@nats-io/obj";
import type { NatsConnection } from "@nats-io/nats-core";
import type { Config } from "./config.ts";
import {
  DEADLETTER_STREAM,
  DIGEST_STREAM,
  IDEMPOTENCY_BUCKET,
  SCHEDULE_BUCKET,
  SCHEDULE_LEASE_BUCKET,
  SHADOW_BUCKET,
  SHADOW_STREAM,
  SHADOW_TALLY_BUCKET,
  STEP_VERSION_BUCKET,
} from "./subjects.ts";
import type { PipelineWiring } from "./wiring.ts";
import { SHIPPED_PIPELINES } from "../pipelines/shipped.ts";

/** The largest message the digest stream takes: a digest request or a digest, with room. */
export const DIGEST_MAX_MSG_BYTES = 64 * 1024;

/** A stream configuration; only the name is required. */
export type NamedStreamConfig = Partial<StreamConfig> & { name: string };

const ms = (n: number) => n * 1_000_000; // JetStream durations are nanoseconds.

/** The settings topology needs from {@link Config}. */
export type TopologyConfig =
  & Pick<
    Config,
    | "retentionMs"
    | "streamMaxBytes"
    | "duplicateWindowMs"
    | "ackWaitMs"
    | "maxAttempts"
    | "idempotencyTtlMs"
    | "allowShrink"
    | "objectStoreMaxBytes"
  >
  & {
    /** Copies of every stream and bucket: 3 on a 3-node cluster (`--cluster 3`); 1 by default. */
    replicas?: number;
  };

/** Streams and buckets beyond the built-in ones: those of definitions' pipelines. */
export interface ExtraTopology {
  /**
   * Event streams, with the same limits as the built-in pipelines' streams; `atomicBatch`:
   * created to take atomic batches where the server can (nats-server 2.14+).
   */
  streams?: readonly {
    name: string;
    description: string;
    subjects: string[];
    atomicBatch?: boolean;
  }[];
  /** KV buckets; `ttl` in ms. */
  buckets?: readonly { name: string; description: string; ttl?: number }[];
}

/**
 * Stream configurations: the hand-wired pipelines' (`wirings`, the shipped ones by default),
 * the runtime's own (dead letters, digests, shadows), then `extra`'s.
 */
export function streamConfigs(
  config: TopologyConfig,
  extra: ExtraTopology = {},
  wirings: readonly PipelineWiring[] = SHIPPED_PIPELINES,
): NamedStreamConfig[] {
  // Every stream: limits retention (SSE replays history, so events stay after acks), file
  // storage, the configured de-duplication window, and discard-NEW: a full stream refuses
  // new messages (intake refuses new items earlier, see capacity.ts) and never discards an
  // accepted one to make room. Only age (`max_age`, the retention) removes messages.
  const stream = (
    name: string,
    description: string,
    subjects: string[],
    limits: {
      maxAgeMs: number;
      maxBytes: number;
      maxMsgSize?: number;
      discardOld?: boolean;
      allowDirect?: boolean;
    },
  ): NamedStreamConfig => ({
    name,
    description,
    subjects,
    retention: RetentionPolicy.Limits,
    storage: StorageType.File,
    discard: limits.discardOld ? DiscardPolicy.Old : DiscardPolicy.New,
    max_age: ms(limits.maxAgeMs),
    max_bytes: limits.maxBytes,
    ...(limits.maxMsgSize !== undefined ? { max_msg_size: limits.maxMsgSize } : {}),
    duplicate_window: ms(config.duplicateWindowMs),
    num_replicas: config.replicas ?? 1,
    ...(limits.allowDirect ? { allow_direct: true } : {}),
  });
  // An event stream answers direct gets: a step reads a few of an item's messages in one
  // batched request (src/last_messages.ts, nats-server 2.11+). A direct get may be answered by
  // a replica; such a read says how far its stream goes, and counts only when far enough.
  const events = {
    maxAgeMs: config.retentionMs,
    maxBytes: config.streamMaxBytes,
    maxMsgSize: 1024 * 1024,
    allowDirect: true,
  };
  return [
    ...wirings.flatMap((w) =>
      w.streams.map((s) => stream(s.name, s.description, s.subjects, events))
    ),
    stream(
      DEADLETTER_STREAM,
      "Weft dead letters: messages a stage gave up on, with the reason",
      ["deadletter.>"],
      {
        maxAgeMs: 30 * 24 * 3600_000,
        maxBytes: Math.max(64 * 1024 * 1024, Math.floor(config.streamMaxBytes / 4)),
      },
    ),
    // Requests (`{"window_ms": N}`) and digests (counts per team) are small: a message as large
    // as an event stream's (1 MiB) let 66 of them fill the stream, so every later request
    // (the hourly schedule's included) was refused as "maximum bytes exceeded".
    stream(
      DIGEST_STREAM,
      "Weft digests: requests (from schedules) and the digests published",
      ["digest.>"],
      {
        maxAgeMs: config.retentionMs,
        maxBytes: Math.max(64 * 1024 * 1024, Math.floor(config.streamMaxBytes / 16)),
        maxMsgSize: DIGEST_MAX_MSG_BYTES,
      },
    ),
    // Live shadows' decisions: discard-old, so a full stream drops its oldest decisions and
    // never refuses (or slows) a shadow; a day at most, a sixteenth of an event stream's bytes.
    stream(
      SHADOW_STREAM,
      "Weft live shadows: candidates' decisions, and shadow attach/detach/promote events",
      ["shadow.>"],
      {
        maxAgeMs: Math.min(config.retentionMs, 24 * 3600_000),
        maxBytes: Math.max(16 * 1024 * 1024, Math.floor(config.streamMaxBytes / 16)),
        maxMsgSize: 1024 * 1024,
        discardOld: true,
      },
    ),
    ...(extra.streams ?? []).map((s) => stream(s.name, s.description, s.subjects, events)),
  ];
}

/** The durable consumer a stage reads from. */
export function stageConsumerConfig(
  stage: {
    name: string;
    filterSubject: string;
    filterSubjects?: readonly string[];
    metadata?: Readonly<Record<string, string>>;
    owes?: readonly string[];
  },
  config: Pick<Config, "ackWaitMs" | "maxAttempts">,
  opts: { multiFilter?: boolean; metadata?: boolean } = {},
): Partial<ConsumerConfig> {
  // Several filters where the server takes them (2.10+); either way the other field is set
  // to nothing, so that an update from one form to the other leaves no stale filter.
  const filters = opts.multiFilter
    ? (stage.filterSubjects?.length ?? 0) > 1
      ? { filter_subject: undefined, filter_subjects: [...stage.filterSubjects!] }
      : { filter_subject: stage.filterSubject, filter_subjects: undefined }
    : { filter_subject: stage.filterSubject };
  return {
    durable_name: stage.name,
    description: `${STAGE_DESCRIPTION}${stage.name}` +
      (stage.owes?.length ? `${OWES_MARK}${stage.owes.join(",")}` : ""),
    ...filters,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    ack_wait: ms(config.ackWaitMs),
    // The runner dead-letters after maxAttempts; the server's limit is a backstop for a
    // process that dies on the message itself, so it can never be redelivered forever.
    max_deliver: config.maxAttempts + 2,
    max_ack_pending: 10_000,
    // Who made it (nats-server 2.10+ keeps metadata): a retired step's is found by it.
    ...(opts.metadata && stage.metadata ? { metadata: { ...stage.metadata } } : {}),
  };
}

function isApiError(err: unknown, code: number): boolean {
  return err instanceof JetStreamApiError && err.code === code;
}

function differs(want: Record<string, unknown>, have: Record<string, unknown>): boolean {
  return Object.entries(want).some(([k, v]) =>
    // Metadata: the keys wanted (the server's own and a backlog mark may be beside them).
    k === "metadata" && v && typeof v === "object"
      ? differs(v as Record<string, unknown>, (have[k] ?? {}) as Record<string, unknown>)
      // (The server leaves out a field that is 0, e.g. a sourcing stream's duplicate_window.)
      : JSON.stringify(have[k] ?? (v === 0 ? 0 : undefined)) !== JSON.stringify(v)
  );
}

/**
 * Why applying `want` to a stream holding `info` would discard stored messages: a byte or
 * message limit below what it stores, or a shorter age than its oldest message's. Undefined
 * when nothing would be lost.
 */
export function shrinkLoss(want: NamedStreamConfig, info: StreamInfo): string | undefined {
  const { state } = info;
  if (want.max_bytes !== undefined && want.max_bytes > 0 && state.bytes > want.max_bytes) {
    return `max_bytes ${want.max_bytes} is below the ${state.bytes} bytes it stores`;
  }
  if (want.max_msgs !== undefined && want.max_msgs > 0 && state.messages > want.max_msgs) {
    return `max_msgs ${want.max_msgs} is below the ${state.messages} messages it stores`;
  }
  if (want.max_age !== undefined && want.max_age > 0 && state.messages > 0) {
    const oldestMs = Date.now() - Date.parse(state.first_ts);
    if (oldestMs * 1_000_000 > want.max_age) {
      return `max_age ${want.max_age / 1e9}s is shorter than the age of its oldest message ` +
        `(${Math.round(oldestMs / 1000)}s)`;
    }
  }
  return undefined;
}

/**
 * Discards a stream's oldest messages until it is within `want`'s byte and message limits:
 * a discard-new stream refuses new messages when over its limits but keeps what it has, so
 * a shrink meant on purpose has to purge. (Age limits the server enforces itself.)
 */
async function purgeToLimits(jsm: JetStreamManager, want: NamedStreamConfig): Promise<void> {
  for (let round = 0; round < 100; round++) {
    const { state } = await jsm.streams.info(want.name);
    const overBytes = want.max_bytes !== undefined && want.max_bytes > 0 &&
      state.bytes > want.max_bytes;
    const overMsgs = want.max_msgs !== undefined && want.max_msgs > 0 &&
      state.messages > want.max_msgs;
    if ((!overBytes && !overMsgs) || state.messages === 0) return;
    const byBytes = overBytes ? Math.ceil(state.messages * (1 - want.max_bytes! / state.bytes)) : 0;
    const byMsgs = overMsgs ? state.messages - want.max_msgs! : 0;
    const drop = Math.max(1, byBytes, byMsgs);
    await jsm.streams.purge(want.name, { seq: state.first_seq + drop });
  }
}

/**
 * Creates or updates a stream so it has `want`'s settings. A change that would discard
 * stored messages (a smaller limit than the data) is refused with a {@link ConfigError}
 * unless `opts.allowShrink` says it is meant.
 */
export async function ensureStream(
  jsm: JetStreamManager,
  want: NamedStreamConfig,
  opts: { allowShrink?: boolean } = {},
): Promise<void> {
  try {
    const info = await jsm.streams.info(want.name!);
    if (differs(want, info.config as unknown as Record<string, unknown>)) {
      const loss = shrinkLoss(want, info);
      if (loss && !opts.allowShrink) {
        throw new ConfigError(
          `refusing to shrink stream ${want.name}: ${loss}, so applying it would discard ` +
            `stored events. Raise the limit (WEFT_STREAM_MAX_BYTES, WEFT_RETENTION_MS), or, to ` +
            `discard them on purpose, start once with WEFT_ALLOW_SHRINK=1.`,
        );
      }
      await jsm.streams.update(want.name!, want);
      if (loss) await purgeToLimits(jsm, want);
    }
  } catch (err) {
    if (!isApiError(err, JetStreamApiCodes.StreamNotFound)) throw err;
    try {
      await jsm.streams.add(want);
    } catch (addErr) {
      // Another process created it first: fine if it is the same stream.
      await jsm.streams.info(want.name!).catch(() => {
        throw addErr;
      });
    }
  }
}

/** How a stage's durable consumer's description starts (the stage's name follows). */
export const STAGE_DESCRIPTION = "Weft stage ";

/**
 * What follows a stage's name in its consumer's description when the consumer still owes
 * events an earlier definition sent it (`Stage.owes`), their types separated by commas.
 */
export const OWES_MARK = "; still owes ";

/**
 * The consumer metadata key a stage's durable records, when it is created on a stream that
 * holds messages already, the stream's last sequence then: its backlog, which a new step of
 * a changed definition must not run for items that have ended (see `runStage`).
 */
export const BACKLOG_SEQ_KEY = "weft_backlog_seq";

/**
 * Creates or updates a durable consumer. With `markBacklog` (nats-server 2.10+: consumer
 * metadata), one created on a stream that already holds messages records the stream's last
 * sequence under {@link BACKLOG_SEQ_KEY}, read again once it exists (so nothing stored before
 * it escapes the mark); an update keeps the metadata it has (what `want` names is set over it).
 */
export async function ensureConsumer(
  jsm: JetStreamManager,
  stream: string,
  want: Partial<ConsumerConfig>,
  opts: { markBacklog?: boolean } = {},
): Promise<void> {
  const updateIfDiffers = async (info: ConsumerInfo) => {
    if (differs(want, info.config as unknown as Record<string, unknown>)) {
      // The metadata it has stays (its backlog mark), with what is wanted over it.
      const metadata = info.config.metadata || want.metadata
        ? { ...info.config.metadata, ...want.metadata }
        : undefined;
      await jsm.consumers.update(stream, want.durable_name!, {
        ...want,
        ...(metadata ? { metadata } : {}),
      });
    }
  };
  try {
    await updateIfDiffers(await jsm.consumers.info(stream, want.durable_name!));
  } catch (err) {
    if (!isApiError(err, JetStreamApiCodes.ConsumerNotFound)) throw err;
    const marked = (seq: number) => ({
      ...want,
      metadata: { ...want.metadata, [BACKLOG_SEQ_KEY]: String(seq) },
    });
    const last = opts.markBacklog ? (await jsm.streams.info(stream)).state.last_seq : 0;
    try {
      await jsm.consumers.add(stream, last > 0 ? marked(last) : want);
      if (opts.markBacklog) {
        // What the stream stored between that read and the create is behind the consumer too
        // (a publish put there went unmarked: the step would run for it unchecked); read
        // again, the mark covers it, and perhaps a few stored just after, which only pay the
        // backlog's reads.
        const after = (await jsm.streams.info(stream)).state.last_seq;
        if (after > last) await jsm.consumers.update(stream, want.durable_name!, marked(after));
      }
    } catch (addErr) {
      // Created meanwhile by another process (a replica of the step starting beside this
      // one) behind a later last sequence: the server refuses the create ("consumer already
      // exists": the marks differ) and the replica failed to start (found by probing: two
      // creators at once on a stream taking publishes, 14 of 60 refused). Its mark stands.
      const made = await jsm.consumers.info(stream, want.durable_name!).catch(() => null);
      if (!made) throw addErr;
      await updateIfDiffers(made);
    }
  }
}

/**
 * The KV buckets: name, what it holds, and how long an entry lives (undefined: forever):
 * `extra`'s, the hand-wired pipelines' (`wirings`), then the runtime's own.
 */
export function bucketConfigs(
  config: TopologyConfig,
  extra: ExtraTopology = {},
  wirings: readonly PipelineWiring[] = SHIPPED_PIPELINES,
): { name: string; description: string; ttl?: number; history?: number }[] {
  return [
    ...(extra.buckets ?? []),
    ...wirings.flatMap((w) =>
      (w.buckets ?? []).map((b) => ({
        name: b.name,
        description: b.description,
        ...(b.ttl !== undefined ? { ttl: b.ttl === "retention" ? config.retentionMs : b.ttl } : {}),
      }))
    ),
    {
      name: IDEMPOTENCY_BUCKET,
      description: "Weft: first answer to each Idempotency-Key",
      ttl: config.idempotencyTtlMs,
    },
    { name: SCHEDULE_BUCKET, description: "Weft: schedules of delayed and recurring events" },
    { name: SHADOW_BUCKET, description: "Weft: live shadows attached over the API" },
    {
      name: SHADOW_TALLY_BUCKET,
      description: "Weft: each live shadow's failures, skips and LLM spend, across restarts",
    },
    {
      name: STEP_VERSION_BUCKET,
      description: "Weft: promoted step versions (the candidate a step runs), with history",
      history: 16,
    },
    {
      name: SCHEDULE_LEASE_BUCKET,
      description: "Weft: one lease per schedule firing, so replicas fire at most once",
      ttl: Math.max(config.duplicateWindowMs, 24 * 3600_000),
    },
  ];
}

/** Creates (or binds to) the KV buckets and the hand-wired pipelines' object stores. */
export async function ensureBuckets(
  nc: NatsConnection,
  config: TopologyConfig,
  extra: ExtraTopology = {},
  wirings: readonly PipelineWiring[] = SHIPPED_PIPELINES,
): Promise<void> {
  const kvm = new Kvm(nc);
  // Another process may create the same bucket at the same moment: its bucket is as good.
  const orOpen = async (create: () => Promise<unknown>, open: () => Promise<unknown>) => {
    try {
      await create();
    } catch (err) {
      await open().catch(() => {
        throw err;
      });
    }
  };
  const jsm = await jetstreamManager(nc);
  for (const { name, description, ttl, history } of bucketConfigs(config, extra, wirings)) {
    await orOpen(
      () =>
        kvm.create(name, {
          replicas: config.replicas ?? 1,
          history: history ?? 1,
          description,
          ...(ttl !== undefined ? { ttl } : {}),
          storage: StorageType.File,
        }),
      () => kvm.open(name),
    );
    await refuseRollups(jsm, `KV_${name}`);
  }
  const objm = new Objm(nc);
  for (const { name, description } of wirings.flatMap((w) => w.objectStores ?? [])) {
    await orOpen(
      () =>
        objm.create(name, {
          replicas: config.replicas ?? 1,
          description,
          storage: StorageType.File,
          max_bytes: config.objectStoreMaxBytes,
        }),
      () => objm.open(name),
    );
    await limitObjectStore(jsm, name, config.objectStoreMaxBytes);
  }
}

/**
 * Gives an object store's stream (`OBJ_<name>`, discard-new) the byte limit `maxBytes`: one
 * created without a limit, or with another, gets it, unless it holds more than that. A store
 * is never shrunk below what it holds, not even with WEFT_ALLOW_SHRINK: its stream would drop
 * chunks of stored objects.
 */
async function limitObjectStore(
  jsm: JetStreamManager,
  name: string,
  maxBytes: number,
): Promise<void> {
  const stream = `OBJ_${name}`;
  const info = await jsm.streams.info(stream);
  if (info.config.max_bytes === maxBytes) return;
  if (info.state.bytes > maxBytes) {
    throw new ConfigError(
      `refusing to shrink object store ${name}: it holds ${info.state.bytes} bytes, more than ` +
        `WEFT_OBJECT_STORE_MAX_BYTES (${maxBytes}), and a smaller store would lose parts of ` +
        `stored objects. Raise WEFT_OBJECT_STORE_MAX_BYTES, or delete objects first.`,
    );
  }
  await jsm.streams.update(stream, { ...info.config, max_bytes: maxBytes });
}

/**
 * Turns off rollup headers on a bucket's stream (nats.js creates buckets with them on, for
 * `kv.purge()`, which Weft never uses): with them, any writer of one key could erase every
 * key of the bucket with one message (`KV-Operation: PURGE` and `Nats-Rollup: all`), e.g.
 * every timer in the schedule bucket or every item's scratchpad.
 */
async function refuseRollups(jsm: JetStreamManager, stream: string): Promise<void> {
  const info = await jsm.streams.info(stream);
  if (info.config.allow_rollup_hdrs === false) return;
  await jsm.streams.update(stream, { ...info.config, allow_rollup_hdrs: false });
}

/** Ensures the streams and buckets exist (consumers are ensured by their stages). */
export async function ensureTopology(
  nc: NatsConnection,
  jsm: JetStreamManager,
  config: TopologyConfig,
  extra: ExtraTopology = {},
  wirings: readonly PipelineWiring[] = SHIPPED_PIPELINES,
): Promise<void> {
  // Atomic batches (nats-server 2.14+): a batch submission is then all or nothing on the bus
  // too (src/atomic_batch.ts), on the streams that ask for it. An older server keeps them as
  // they were.
  const atomic = supportsAtomicBatch(nc.info?.version);
  const wantsAtomic = new Set([
    ...wirings.flatMap((w) => w.streams.filter((s) => s.atomicBatch).map((s) => s.name)),
    ...(extra.streams ?? []).filter((s) => s.atomicBatch).map((s) => s.name),
  ]);
  for (const s of streamConfigs(config, extra, wirings)) {
    const want = atomic && wantsAtomic.has(s.name) ? { ...s, allow_atomic: true } : s;
    try {
      await ensureStream(jsm, want, { allowShrink: config.allowShrink });
    } catch (err) {
      // The server's reason alone does not say which of the streams did not fit.
      if (err instanceof ConfigError || !/insufficient (storage )?resources/i.test(String(err))) {
        throw err;
      }
      throw new ConfigError(`stream ${s.name} could not be made: ${(err as Error).message}`, {
        cause: err,
      });
    }
  }
  await ensureBuckets(nc, config, extra, wirings);
}
