/**
 * The human review queue: one KV entry per flagged item in bucket `weft_reviews`.
 *
 * Every change is a compare-and-set on the entry's revision, so when two reviewers race
 * for one item exactly one write lands and the other is answered with a
 * {@link ConflictError} (HTTP 409). The transitions themselves are pure functions
 * ({@link claimReview}, {@link decideReview}, {@link escalateReview}), tested apart from
 * NATS; {@link createReviewQueue} only adds the read-modify-CAS loop.
 *
 * @module
 */
import "./settings.ts";
import { ITEM_ID } from "../../src/subjects.ts";
import { JetStreamApiCodes, JetStreamApiError } from "@nats-io/jetstream";
import type { KV } from "@nats-io/kv";
import { ConflictError, NotFoundError } from "../../src/errors.ts";
import type { ContentItem, Moderation } from "./events.gen.ts";

/** Where an item is in the queue. */
export const ReviewStatus = {
  Pending: "pending",
  Escalated: "escalated",
  Decided: "decided",
} as const;
/** One of {@link ReviewStatus}. */
export type ReviewStatus = typeof ReviewStatus[keyof typeof ReviewStatus];

/** A human decision. */
export interface Decision {
  /** Approve publishes, reject archives. */
  decision: "approve" | "reject";
  /** Why, for the record. */
  reason: string;
  /** Who decided: a key's name, or `weft-sla`. */
  reviewer: string;
  /** When, ISO 8601. */
  decided_at: string;
  /** True when the SLA default action decided. */
  automatic: boolean;
}

/** One item under review. */
export interface ReviewEntry {
  /** The item id. */
  id: string;
  /** Where the item is in the queue. */
  status: ReviewStatus;
  /** The item's trace id. */
  trace_id: string;
  /** When the item entered the queue (its moderation time). */
  queued_at: string;
  /** When the current SLA step ends (review, then escalation). */
  due_at?: string;
  /** 0 while in the review SLA, 1 once escalated. */
  escalation_level: number;
  /** When the item was escalated (ISO 8601); its escalation SLA counts from then. */
  escalated_at?: string;
  /** The id of the SLA timer event that escalated it (its redelivery escalates nothing again). */
  escalated_by?: string;
  /** The content under review. */
  content: ContentItem;
  /** What automatic moderation found, with reasons. */
  moderation: Moderation;
  /** The reviewer holding the item, until `expires_at`. */
  claim?: { reviewer: string; claimed_at: string; expires_at: string };
  /** The decision, once decided. */
  decision?: Decision;
}

/** Claims `entry` for `reviewer`: a new entry, or a {@link ConflictError}. */
export function claimReview(
  entry: ReviewEntry,
  reviewer: string,
  now: Date,
  claimTtlMs: number,
): ReviewEntry {
  if (entry.status === ReviewStatus.Decided) {
    throw new ConflictError(`item ${entry.id} was already decided by ${entry.decision?.reviewer}`);
  }
  const held = entry.claim;
  if (held && held.reviewer !== reviewer && Date.parse(held.expires_at) > now.getTime()) {
    throw new ConflictError(
      `item ${entry.id} is claimed by ${held.reviewer} until ${held.expires_at}`,
    );
  }
  return {
    ...entry,
    claim: {
      reviewer,
      claimed_at: now.toISOString(),
      expires_at: new Date(now.getTime() + claimTtlMs).toISOString(),
    },
  };
}

/**
 * Records a decision. Deciding again with the same reviewer and decision is a replay
 * (`replayed: true`, nothing changes); anything else on a decided item is a conflict, as
 * is deciding an item someone else holds a live claim on.
 */
export function decideReview(
  entry: ReviewEntry,
  d: Omit<Decision, "decided_at">,
  now: Date,
): { entry: ReviewEntry; replayed: boolean } {
  if (entry.status === ReviewStatus.Decided) {
    const prior = entry.decision!;
    if (prior.reviewer === d.reviewer && prior.decision === d.decision && !d.automatic) {
      return { entry, replayed: true };
    }
    throw new ConflictError(
      `item ${entry.id} was already decided (${prior.decision}) by ${prior.reviewer}`,
    );
  }
  const held = entry.claim;
  if (
    !d.automatic && held && held.reviewer !== d.reviewer &&
    Date.parse(held.expires_at) > now.getTime()
  ) {
    throw new ConflictError(`item ${entry.id} is claimed by ${held.reviewer}`);
  }
  const next: ReviewEntry = {
    ...entry,
    status: ReviewStatus.Decided,
    decision: { ...d, decided_at: now.toISOString() },
  };
  delete next.due_at;
  return { entry: next, replayed: false };
}

/**
 * Moves an undecided item to the escalation queue, recording when and by which timer; null
 * when there is nothing to do.
 */
export function escalateReview(
  entry: ReviewEntry,
  dueAt: Date,
  by?: { at: Date; timer: string },
): ReviewEntry | null {
  if (entry.status !== ReviewStatus.Pending) return null;
  const next: ReviewEntry = {
    ...entry,
    status: ReviewStatus.Escalated,
    escalation_level: 1,
    due_at: dueAt.toISOString(),
  };
  if (by) {
    next.escalated_at = by.at.toISOString();
    next.escalated_by = by.timer;
  }
  return next;
}

/** The queue in NATS KV. */
export interface ReviewQueue {
  /** Adds an item; an existing entry is kept and returned (redeliveries). */
  enqueue(entry: ReviewEntry): Promise<ReviewEntry>;
  /** One entry; null when unknown. */
  get(id: string): Promise<ReviewEntry | null>;
  /** Entries with `status`, oldest first. */
  list(status?: ReviewStatus): Promise<ReviewEntry[]>;
  /** Claims an item; a {@link ConflictError} when someone else holds it or it is decided. */
  claim(id: string, reviewer: string, now: Date): Promise<ReviewEntry>;
  /** Decides an item; see {@link decideReview}. */
  decide(
    id: string,
    d: Omit<Decision, "decided_at">,
    now: Date,
  ): Promise<{ entry: ReviewEntry; replayed: boolean }>;
  /** Moves a pending item to the escalation queue; null when it is not pending. */
  escalate(
    id: string,
    dueAt: Date,
    by?: { at: Date; timer: string },
  ): Promise<ReviewEntry | null>;
}

function isCasConflict(err: unknown): boolean {
  if (err instanceof JetStreamApiError) {
    return err.code === JetStreamApiCodes.StreamWrongLastSequence ||
      err.code === JetStreamApiCodes.StreamWrongLastSequenceUnknown;
  }
  return /wrong last sequence|key exists/i.test(String((err as Error)?.message));
}

const encoder = new TextEncoder();

/**
 * The review queue over a KV bucket.
 *
 * @example
 * ```ts ignore
 * const queue = createReviewQueue(await new Kvm(nc).open(REVIEW_BUCKET), { claimTtlMs: 900_000 });
 * await queue.claim("c1", "alice", new Date()); // ConflictError if bob holds it
 * ```
 */
export function createReviewQueue(kv: KV, opts: { claimTtlMs: number }): ReviewQueue {
  async function read(id: string): Promise<{ entry: ReviewEntry; revision: number } | null> {
    // An id that cannot be an item id (and so not a KV key) is simply unknown: never a
    // KV error, which would surface as a 500 on every route that reads the queue.
    if (!ITEM_ID.test(id)) return null;
    const e = await kv.get(id);
    if (!e || e.operation !== "PUT" || e.length === 0) return null;
    return { entry: e.json<ReviewEntry>(), revision: e.revision };
  }

  /** Read, transform, compare-and-set; re-reads on a lost race and transforms again. */
  async function change<R>(
    id: string,
    transform: (entry: ReviewEntry) => { next: ReviewEntry | null; result: R },
  ): Promise<R> {
    for (let attempt = 0; attempt < 20; attempt++) {
      const current = await read(id);
      if (!current) throw new NotFoundError(`no review for item ${JSON.stringify(id)}`);
      const { next, result } = transform(current.entry);
      if (next === null || next === current.entry) return result;
      try {
        await kv.update(id, encoder.encode(JSON.stringify(next)), current.revision);
        return result;
      } catch (err) {
        if (!isCasConflict(err)) throw err;
      }
    }
    throw new ConflictError(`review ${id} kept changing; retry`);
  }

  return {
    async enqueue(entry) {
      try {
        await kv.create(entry.id, encoder.encode(JSON.stringify(entry)));
        return entry;
      } catch (err) {
        if (!isCasConflict(err)) throw err;
        return (await read(entry.id))?.entry ?? entry;
      }
    },
    async get(id) {
      return (await read(id))?.entry ?? null;
    },
    async list(status) {
      const out: ReviewEntry[] = [];
      // The queue holds what humans review: small enough to read whole. Keys first, then
      // the entries, all in flight together.
      const keys: string[] = [];
      for await (const k of await kv.keys()) keys.push(k);
      const entries = await Promise.all(keys.map((k) => read(k)));
      for (const e of entries) if (e && (!status || e.entry.status === status)) out.push(e.entry);
      return out.sort((a, b) => a.queued_at.localeCompare(b.queued_at) || a.id.localeCompare(b.id));
    },
    claim(id, reviewer, now) {
      return change(id, (entry) => {
        const next = claimReview(entry, reviewer, now, opts.claimTtlMs);
        return { next, result: next };
      });
    },
    decide(id, d, now) {
      return change(id, (entry) => {
        const r = decideReview(entry, d, now);
        return { next: r.replayed ? null : r.entry, result: r };
      });
    },
    escalate(id, dueAt, by) {
      return change(id, (entry) => {
        const next = escalateReview(entry, dueAt, by);
        return { next, result: next };
      });
    },
  };
}
