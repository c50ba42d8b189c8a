/**
 * The JetStream topology Weft needs: streams, durable consumers and KV buckets. Creating
 * it is idempotent: what exists with the right settings is left alone, what differs is
 * updated in place, nothing is deleted. Uses only features nats-server 2.9 has (single
 * filter subjects, no per-message TTL), which 2.10+ accept unchanged.
 *
 * @module
 */
import {
  AckPolicy,
  type ConsumerConfig,
  DeliverPolicy,
  DiscardPolicy,
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamManager,
  RetentionPolicy,
  StorageType,
  type StreamConfig,
} from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/nats-core";
import type { Config } from "./config.ts";
import {
  CONTENT_STATE_BUCKET,
  CONTENT_STREAM,
  DEADLETTER_STREAM,
  DIGEST_STREAM,
  FEEDBACK_STREAM,
  IDEMPOTENCY_BUCKET,
  REVIEW_BUCKET,
  SCHEDULE_BUCKET,
  SCHEDULE_LEASE_BUCKET,
  STATE_BUCKET,
} from "./subjects.ts";

/** A stream configuration; only the name is required. */
export type NamedStreamConfig = Partial<StreamConfig> & { name: string };

const ms = (n: number) => n * 1_000_000; // JetStream durations are nanoseconds.

/** The settings topology needs from {@link Config}. */
export type TopologyConfig = Pick<
  Config,
  | "retentionMs"
  | "streamMaxBytes"
  | "duplicateWindowMs"
  | "ackWaitMs"
  | "maxAttempts"
  | "idempotencyTtlMs"
>;

/** Stream configurations, by name. */
export function streamConfigs(config: TopologyConfig): NamedStreamConfig[] {
  // Every stream: limits retention (SSE replays history, so events stay after acks), file
  // storage, oldest discarded first, the configured de-duplication window.
  const stream = (
    name: string,
    description: string,
    subjects: string[],
    limits: { maxAgeMs: number; maxBytes: number; maxMsgSize?: number },
  ): NamedStreamConfig => ({
    name,
    description,
    subjects,
    retention: RetentionPolicy.Limits,
    storage: StorageType.File,
    discard: DiscardPolicy.Old,
    max_age: ms(limits.maxAgeMs),
    max_bytes: limits.maxBytes,
    ...(limits.maxMsgSize !== undefined ? { max_msg_size: limits.maxMsgSize } : {}),
    duplicate_window: ms(config.duplicateWindowMs),
    num_replicas: 1,
  });
  const events = {
    maxAgeMs: config.retentionMs,
    maxBytes: config.streamMaxBytes,
    maxMsgSize: 1024 * 1024,
  };
  return [
    stream(
      FEEDBACK_STREAM,
      "Weft feedback pipeline: submissions and every event",
      ["feedback.>"],
      events,
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
    stream(
      CONTENT_STREAM,
      "Weft content moderation: every event of every content item",
      ["content.>"],
      events,
    ),
    stream(
      DIGEST_STREAM,
      "Weft digests: requests (from schedules) and the digests published",
      ["digest.>"],
      {
        maxAgeMs: config.retentionMs,
        maxBytes: Math.max(64 * 1024 * 1024, Math.floor(config.streamMaxBytes / 16)),
      },
    ),
  ];
}

/** The durable consumer a stage reads from. */
export function stageConsumerConfig(
  stage: { name: string; filterSubject: string },
  config: Pick<Config, "ackWaitMs" | "maxAttempts">,
): Partial<ConsumerConfig> {
  return {
    durable_name: stage.name,
    description: `Weft stage ${stage.name}`,
    filter_subject: stage.filterSubject,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    ack_wait: ms(config.ackWaitMs),
    // The runner dead-letters after maxAttempts; the server's limit is a backstop for a
    // process that dies on the message itself, so it can never be redelivered forever.
    max_deliver: config.maxAttempts + 2,
    max_ack_pending: 10_000,
  };
}

function isApiError(err: unknown, code: number): boolean {
  return err instanceof JetStreamApiError && err.code === code;
}

function differs(want: Record<string, unknown>, have: Record<string, unknown>): boolean {
  return Object.entries(want).some(([k, v]) => JSON.stringify(have[k]) !== JSON.stringify(v));
}

/** Creates or updates a stream so it has `want`'s settings. */
export async function ensureStream(
  jsm: JetStreamManager,
  want: NamedStreamConfig,
): Promise<void> {
  try {
    const info = await jsm.streams.info(want.name!);
    if (differs(want, info.config as unknown as Record<string, unknown>)) {
      await jsm.streams.update(want.name!, want);
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

/** Creates or updates a durable consumer. */
export async function ensureConsumer(
  jsm: JetStreamManager,
  stream: string,
  want: Partial<ConsumerConfig>,
): Promise<void> {
  try {
    const info = await jsm.consumers.info(stream, want.durable_name!);
    if (differs(want, info.config as unknown as Record<string, unknown>)) {
      await jsm.consumers.update(stream, want.durable_name!, want);
    }
  } catch (err) {
    if (!isApiError(err, JetStreamApiCodes.ConsumerNotFound)) throw err;
    await jsm.consumers.add(stream, want);
  }
}

/** The KV buckets: name, what it holds, and how long an entry lives (undefined: forever). */
export function bucketConfigs(
  config: TopologyConfig,
): { name: string; description: string; ttl?: number }[] {
  return [
    {
      name: STATE_BUCKET,
      description: "Weft: current state of each feedback item",
      ttl: config.retentionMs,
    },
    {
      name: IDEMPOTENCY_BUCKET,
      description: "Weft: first answer to each Idempotency-Key",
      ttl: config.idempotencyTtlMs,
    },
    {
      name: CONTENT_STATE_BUCKET,
      description: "Weft: current moderation state of each content item",
      ttl: config.retentionMs,
    },
    {
      name: REVIEW_BUCKET,
      description: "Weft: the human review queue (compare-and-set claims and decisions)",
      // Decided entries stay (a second decision must find them) until retention ends.
      ttl: config.retentionMs,
    },
    { name: SCHEDULE_BUCKET, description: "Weft: schedules of delayed and recurring events" },
    {
      name: SCHEDULE_LEASE_BUCKET,
      description: "Weft: one lease per schedule firing, so replicas fire at most once",
      ttl: Math.max(config.duplicateWindowMs, 24 * 3600_000),
    },
  ];
}

/** Creates (or binds to) the KV buckets. */
export async function ensureBuckets(nc: NatsConnection, config: TopologyConfig): Promise<void> {
  const kvm = new Kvm(nc);
  for (const { name, description, ttl } of bucketConfigs(config)) {
    await kvm.create(name, {
      history: 1,
      description,
      ...(ttl !== undefined ? { ttl } : {}),
      storage: StorageType.File,
    });
  }
}

/** Ensures the streams and buckets exist (consumers are ensured by their stages). */
export async function ensureTopology(
  nc: NatsConnection,
  jsm: JetStreamManager,
  config: TopologyConfig,
): Promise<void> {
  for (const s of streamConfigs(config)) await ensureStream(jsm, s);
  await ensureBuckets(nc, config);
}
