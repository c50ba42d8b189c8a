/**
 * The runtime's subjects, streams and buckets, defined once, and the shape every pipeline's
 * event subjects share: `<pipeline>.<type>.<item_id>`, so
 * `nats sub --stream <PIPELINE> '<pipeline>.>'` shows a pipeline's events, `<pipeline>.*.<id>`
 * one item's history and `<pipeline>.<type>.*` one type across items. Each pipeline names its
 * own stream, buckets and subjects in its folder.
 *
 * @module
 */
import { isEventRoot } from "./schemas.ts";

/** An item id: letters, digits, `_` and `-`, at most 64 characters (it is a subject token and a KV key). */
export const ITEM_ID: RegExp = /^[A-Za-z0-9_-]{1,64}$/;

/** The JetStream stream holding dead letters. */
export const DEADLETTER_STREAM = "DEADLETTER";
/** KV bucket remembering the first answer to each Idempotency-Key. */
export const IDEMPOTENCY_BUCKET = "weft_idempotency";

/** The subject an event of `type` about `itemId` is published on. */
export function eventSubject(type: string, itemId: string): string {
  return `${type}.${itemId}`;
}

/** The subject filter matching every event of one type (all items). */
export function typeFilter(type: string): string {
  return `${type}.*`;
}

/**
 * Splits an event subject, `<pipeline>.<type>.<id>` of a pipeline whose events are
 * registered (src/schemas.ts), into its event type and item id; null for any other subject. The subject, not the body, says which item
 * an event is about: NATS permissions guard subjects, so a body cannot name another item.
 *
 * @example
 * ```ts
 * import { parseEventSubject } from "./subjects.ts";
 * import { registerEvents } from "./schemas.ts";
 * registerEvents({
 *   events: { "orders.placed": { $id: "orders.placed", properties: { version: { const: 1 } } } },
 * });
 * const s = parseEventSubject("orders.placed.o1");
 * console.assert(s?.type === "orders.placed" && s.itemId === "o1");
 * console.assert(parseEventSubject("$KV.orders.o1") === null);
 * ```
 */
export function parseEventSubject(subject: string): { type: string; itemId: string } | null {
  const parts = subject.split(".");
  if (parts.length !== 3 || !isEventRoot(parts[0]!) || !parts[1] || !parts[2]) return null;
  return { type: `${parts[0]}.${parts[1]}`, itemId: parts[2] };
}

/** The header a redrive republishes an original with: the dead letter's sequence. */
export const REDRIVE_OF_HEADER = "Weft-Redrive-Of";
/**
 * The header a redrive republishes an original with beside {@link REDRIVE_OF_HEADER}: the item
 * its letter was dead-lettered under. A definition's intake, which names a bus submission's
 * item by its stream position, takes a redriven submission as that item again (once it has
 * checked that the item failed there, on the same submission).
 */
export const REDRIVE_ITEM_HEADER = "Weft-Redrive-Item";
/**
 * The header a pipeline's control service stores an event again with when a changed
 * definition sends it to steps that will not read the original (their consumers are past
 * it): the steps it is for, comma-separated. Every other consumer acks it unread.
 */
export const HANDOVER_HEADER = "Weft-Handover-To";
/**
 * The dead-letter subjects' token of redrive markers (`deadletter.redriven.<seq>`): no
 * stage's durable may take it, or its letters would be taken for markers.
 */
export const REDRIVEN_TOKEN = "redriven";

/** The subject a dead letter from `stage` about `itemId` is kept on. */
export function deadLetterSubject(stage: string, itemId: string | undefined): string {
  return `deadletter.${stage}.${itemId ?? "unknown"}`;
}

/** KV bucket of schedules (delayed and recurring events). */
export const SCHEDULE_BUCKET = "weft_schedules";
/** KV bucket of per-firing leases: the replica that creates the lease fires. */
export const SCHEDULE_LEASE_BUCKET = "weft_schedule_leases";

/** Request/reply schedule management: `weft.schedules.<create|list|get|cancel>`. */
export const SCHEDULES_REQUEST_PREFIX = "weft.schedules";

/** The JetStream stream of digests and their requests (`digest.>`). */
export const DIGEST_STREAM = "DIGEST";

/**
 * The JetStream stream of live shadows' decisions, `shadow.<pipeline>.<step>.<item_id>`,
 * and of the audit events of attaching, detaching and promoting them
 * (`shadow._audit.<action>.<pipeline>.<step>`). Small, short-lived and discard-old: it never
 * refuses a shadow's publish and shares no limit with production's streams.
 */
export const SHADOW_STREAM = "SHADOW";
/** KV bucket of the live shadows attached over the API (`weft.shadow.attach`, `POST /shadows`). */
export const SHADOW_BUCKET = "weft_shadows";
/**
 * KV bucket of each live shadow's counters that its decisions do not hold (failures, items
 * over budget or sampled out, the candidate's LLM spend), key: the shadow's id; written by
 * the shadow service as it goes, so a restart goes on from them (its budget included).
 */
export const SHADOW_TALLY_BUCKET = "weft_shadow_tallies";
/**
 * KV bucket of promoted step versions, key `<pipeline>.<step>`: the candidate a step runs
 * instead of its configured analyzers (history kept: every promotion is recorded).
 */
export const STEP_VERSION_BUCKET = "weft_step_versions";
/** Request/reply shadow control: `weft.shadow.<attach|detach|list|promote>`. */
export const SHADOW_REQUEST_PREFIX = "weft.shadow";
/** Audit events of shadow control: `shadow._audit.<action>.<pipeline>.<step>`. */
export const SHADOW_AUDIT_PREFIX = "shadow._audit";

/** The streams the runtime keeps for itself; each pipeline's come besides. */
export const RUNTIME_STREAMS: readonly string[] = [DEADLETTER_STREAM, DIGEST_STREAM, SHADOW_STREAM];

/**
 * True when `subject` matches the NATS subject `filter` (`*`: one token, `>`: the rest).
 *
 * @example
 * ```ts
 * import { subjectMatches } from "./subjects.ts";
 * console.assert(subjectMatches("orders.placed.*", "orders.placed.o1"));
 * console.assert(!subjectMatches("orders.placed.*", "$KV.weft_orders_state.o1"));
 * ```
 */
export function subjectMatches(filter: string, subject: string): boolean {
  const f = filter.split(".");
  const s = subject.split(".");
  for (let i = 0; i < f.length; i++) {
    if (f[i] === ">") return s.length > i;
    if (i >= s.length || (f[i] !== "*" && f[i] !== s[i]) || s[i] === "") return false;
  }
  return f.length === s.length;
}

/**
 * The timers of definitions' pipelines (deadlines, timeouts, delays: src/pipeline/), which
 * the scheduler fires besides what the hand-wired pipelines declare
 * ({@link import("./wiring.ts").schedulableSubjects}).
 */
export const TIMER_SUBJECTS: readonly string[] = ["*._timer.*"];

/**
 * The first tokens of the runtime's own subjects: no pipeline is named so, so no timer,
 * submission or event of a pipeline is ever published under them.
 */
export const RUNTIME_ROOTS: ReadonlySet<string> = new Set([
  "deadletter",
  "digest",
  "shadow",
  "weft",
  "schedules",
  "site",
]);

/** True when `subject` matches one of `filters`. */
export function subjectAllowed(filters: readonly string[], subject: string): boolean {
  return filters.some((f) => subjectMatches(f, subject));
}
