/**
 * The content moderation pipeline's stages:
 *
 * ```
 * content.uploaded --moderation--> content.moderated
 *   safe    --storage-moderated--> content.published
 *   flagged --review-queue-------> content.review_requested (+ queue entry, SLA schedule)
 * content.sla_expired --review-sla--> content.escalated (level 1) | content.decided (level 2)
 * content.decided --storage-decided--> content.published | content.archived
 * ```
 *
 * Moderation and storage are pure. The review stages also write the review queue and
 * the SLA schedules through the {@link ReviewQueue} and {@link ScheduleStore} ports; every
 * such write is idempotent (create-if-absent, compare-and-set), so a redelivered message
 * changes nothing twice, and their events carry deterministic ids.
 *
 * @module
 */
import "./settings.ts";
import type { ToxicityAnalyzer } from "../../src/ai/analysis.ts";
import { ConflictError, ErrorCode, WeftError } from "../../src/errors.ts";
import { createEvent, deterministicId } from "../../src/events.ts";
import type { ContentDecided, ContentItem, ContentSlaExpired, Moderation } from "./events.gen.ts";
import { type ReviewEntry, type ReviewQueue, ReviewStatus } from "./review_queue.ts";
import type { ScheduleStore } from "../../src/scheduler/store.ts";
import { nextEvent, type Stage, type StageContext } from "../../src/stage.ts";
import type { JetStreamManager } from "@nats-io/jetstream";
import { itemFailedNow, messagesOn, storedMessage } from "../../src/runner.ts";
import { CONTENT_STATE_SPEC } from "./state.ts";
import { validateEvent } from "../../src/schemas.ts";
import { CONTENT_STREAM } from "./subjects.ts";
import { endTypesOf, stepInput } from "../../src/pipeline/derive.ts";
import { MODERATION_PIPELINE } from "./pipeline.ts";
import { ContentEventType as T } from "./events.ts";

/**
 * Where an item's upload (its entry) is stored: a step runs only for an item uploaded before
 * the message (an id never uploaded is dead-lettered `not_found`, failing nothing), and what
 * its outputs' subjects hold from before the upload is not the item's.
 */
const entrySubject = (item: string) => `${T.Uploaded}.${item}`;

/** The id of an item's one decision event, whoever decides (a human or the SLA). */
export function decidedEventId(itemId: string): string {
  return deterministicId(itemId, T.Decided);
}

/**
 * The schedule id of an item's SLA deadline at `level` (1: review, 2: escalation): the
 * pipeline's own (`content.<...>`), which only its services may write.
 */
export function slaScheduleId(itemId: string, level: 1 | 2): string {
  return `${CONTENT_OWNER}.sla-${level}-${itemId}`;
}

/** The owner token of the content pipeline's own schedules: its wiring's name. */
const CONTENT_OWNER = "content";

/**
 * Screens uploaded content. Binary uploads cannot be read by a text analyzer, so they go
 * to human review unless they carry text too.
 */
export function moderationStage(
  analyzer: ToxicityAnalyzer,
): Stage<{ kind: "event"; types: readonly ["content.uploaded"] }> {
  return {
    input: { kind: "event", types: [T.Uploaded] },
    // Its consumer, stream and failure event: the definition's.
    ...stepInput(MODERATION_PIPELINE, "moderation"),
    entrySubject,
    async handle(event, ctx) {
      const item: ContentItem = event.data;
      let moderation: Moderation;
      if (item.text === undefined) {
        moderation = {
          verdict: "flagged",
          categories: ["unscreened"],
          score: 0,
          analyzer: analyzer.name,
          reasons: [`binary upload (${item.object?.content_type}) needs a human look`],
        };
      } else {
        const r = await analyzer.analyze(item.text, { signal: ctx.signal });
        const reasons = r.categories.map((c) => {
          const words = r.evidence?.[c];
          return words?.length ? `${c}: ${words.map((w) => JSON.stringify(w)).join(", ")}` : c;
        });
        moderation = {
          verdict: r.flagged ? "flagged" : "safe",
          categories: r.categories,
          score: r.score,
          analyzer: r.analyzer,
          reasons,
        };
      }
      return [nextEvent(event, T.Moderated, { content: item, moderation }, ctx)];
    },
  };
}

/**
 * An item's outcomes: it is published or archived, once (each is stored once per item, and
 * the runner refuses the second kind; see `Stage.outcomes`).
 */
const OUTCOMES: ReadonlySet<string> = endTypesOf(MODERATION_PIPELINE);

/**
 * Whether an item's outcome stored at `held.seq` is the item's: its history, in the stream,
 * leads there (the state's rule, `contentRefuses` in state.ts, read from the stream):
 * `content.published` after the item's moderation (the first stored after its first upload)
 * found it safe, or after its decision (the first stored on its decided subject) approved it;
 * `content.archived` after a rejecting decision of an item moderation did not find safe. One
 * the storage step's key published for an item that had not reached storage is not: it takes
 * the item's place in nothing (`Stage.holdsOutcome`).
 */
export function contentOutcomeLeads(
  jsm: JetStreamManager,
): (itemId: string, held: { type: string; seq: number }) => Promise<boolean> {
  const verdictOf = itemVerdictReader(jsm);
  return async (itemId, held) => {
    const moderated = await verdictOf(itemId);
    if (!moderated || moderated.uploaded > held.seq) return false;
    if (moderated.verdict === "safe") {
      // Published by storage-moderated; a decision on a safe item decides nothing.
      return held.type === T.Published && moderated.seq !== undefined &&
        moderated.seq < held.seq;
    }
    for await (
      const d of messagesOn(jsm, CONTENT_STREAM, `${T.Decided}.${itemId}`, { before: held.seq })
    ) {
      let decision: string;
      try {
        decision = validateEvent(d.json(), [T.Decided]).data.decision;
      } catch {
        continue; // no decision: the storage step dead-letters it
      }
      return decision === (held.type === T.Published ? "approve" : "reject");
    }
    return false;
  };
}

/**
 * An item's upload and moderation as the stream holds them: the sequence of its first upload,
 * and the verdict and sequence of its one moderation (the first `content.moderated` stored
 * after that upload, when it is one); null for an id never uploaded.
 */
function itemVerdictReader(
  jsm: JetStreamManager,
): (itemId: string) => Promise<{ uploaded: number; verdict?: string; seq?: number } | null> {
  const first = (subject: string, after: number) =>
    // STREAM.MSG.GET takes next_by_subj (nats-server 2.9+); nats.js types only seq/last_by_subj.
    storedMessage(jsm, CONTENT_STREAM, { next_by_subj: subject, seq: after } as unknown as {
      seq: number;
    });
  return async (itemId) => {
    const up = await first(`${T.Uploaded}.${itemId}`, 0);
    if (!up) return null;
    const m = await first(`${T.Moderated}.${itemId}`, up.seq + 1);
    if (!m) return { uploaded: up.seq };
    try {
      const verdict = validateEvent(m.json(), [T.Moderated]).data.moderation.verdict;
      return { uploaded: up.seq, verdict, seq: m.seq };
    } catch {
      return { uploaded: up.seq }; // no moderation: storage and review refuse it
    }
  };
}

/** What the storage steps ask of an item's history before storing its outcome. */
export interface ContentOutcomeGuard {
  /** Whether an outcome stored for the item is its own ({@link contentOutcomeLeads}). */
  holdsOutcome(itemId: string, held: { type: string; seq: number }): Promise<boolean>;
  /**
   * Why a decision stored at `seq` decides nothing, else undefined: the item has its outcome
   * (one its history leads to), or its moderation, stored before the decision, did not send it
   * to review (it found it safe, or there is none yet: a decision for it is no reviewer's).
   */
  undecidable(itemId: string, seq: number): Promise<string | undefined>;
}

/** The storage steps' {@link ContentOutcomeGuard}, read from the stream. */
export function contentOutcomeGuard(jsm: JetStreamManager): ContentOutcomeGuard {
  const holdsOutcome = contentOutcomeLeads(jsm);
  const last = (subject: string) => storedMessage(jsm, CONTENT_STREAM, { last_by_subj: subject });
  const verdictOf = itemVerdictReader(jsm);
  return {
    holdsOutcome,
    async undecidable(itemId, seq) {
      for (const type of OUTCOMES) {
        const held = await last(`${type}.${itemId}`);
        if (held && await holdsOutcome(itemId, { type, seq: held.seq })) {
          return `the item already has its outcome ${type} (stream sequence ${held.seq})`;
        }
      }
      const moderated = await verdictOf(itemId);
      const verdict = moderated?.seq !== undefined && moderated.seq < seq
        ? moderated.verdict
        : undefined;
      if (verdict === "flagged") return undefined;
      return `content item ${itemId} was not sent to review (${
        verdict === undefined
          ? "no moderation of it was stored before the decision"
          : `its moderation found it ${verdict}`
      }): a decision on it decides nothing`;
    },
  };
}

/**
 * What keeps an item from review: its outcome (`content.published`, `content.archived`), or
 * `content.failed` when it failed after its last upload and was not resumed (a redrive of its
 * failure stores its upload, or the message it failed on, again); undefined when nothing does.
 * With `redriven` (the message is a redrive's copy) a failure is no bar: that is the resume.
 */
export function contentOutcomeReader(
  jsm: JetStreamManager,
): (itemId: string, redriven?: boolean) => Promise<string | undefined> {
  const last = (subject: string) => storedMessage(jsm, CONTENT_STREAM, { last_by_subj: subject });
  const leads = contentOutcomeLeads(jsm);
  return async (itemId, redriven = false) => {
    for (const type of OUTCOMES) {
      // An outcome the item's history does not lead to (the storage key's, for an item that
      // had not reached storage) is none.
      const held = await last(`${type}.${itemId}`);
      if (held && await leads(itemId, { type, seq: held.seq })) return type;
    }
    if (redriven) return undefined;
    const failed = await last(`${T.Failed}.${itemId}`);
    if (!failed) return undefined;
    const uploaded = await last(`${T.Uploaded}.${itemId}`);
    if (uploaded && uploaded.seq > failed.seq) return undefined;
    // Only a failure a runner's dead letter is stored for (src/failure_letter.ts): found by
    // probing, the storage key's `content.failed` for an item still at moderation had review-queue
    // refuse its moderation, and the item failed for real.
    const inputs = CONTENT_STATE_SPEC.stageInputs;
    return await itemFailedNow(jsm, CONTENT_STREAM, "content", itemId, failed, inputs)
      ? T.Failed
      : undefined;
  };
}

/** Publishes what moderation found safe. */
export function storageModeratedStage(
  moderationOf: ModerationReader,
  guard?: ContentOutcomeGuard,
): Stage<
  { kind: "event"; types: readonly ["content.moderated"] }
> {
  return {
    input: { kind: "event", types: [T.Moderated] },
    outcomes: OUTCOMES,
    // An outcome stored for the item that its history does not lead to is not its own.
    ...(guard ? { holdsOutcome: guard.holdsOutcome } : {}),
    // Its consumer, stream and failure event: the definition's.
    ...stepInput(MODERATION_PIPELINE, "storage-moderated"),
    entrySubject,
    async handle(event, ctx) {
      // The item's one moderation, and its content as uploaded: never what a message on the
      // subject carries (the moderation key could publish any verdict with any content).
      const { moderation, content } = await moderationOf(event.item_id, event);
      if (moderation.verdict !== "safe") return [];
      return [nextEvent(event, T.Published, { content, via: "moderation" }, ctx)];
    },
  };
}

/**
 * Reads an item's content as uploaded: the data of the first `content.uploaded` event stored on
 * its subject (the one moderation handled, and reviewers saw); null when there is none.
 */
export function uploadedContentReader(
  jsm: JetStreamManager,
): (itemId: string) => Promise<ContentItem | null> {
  return async (itemId) => {
    // STREAM.MSG.GET takes next_by_subj (nats-server 2.9+); nats.js types only seq/last_by_subj.
    const m = await storedMessage(jsm, CONTENT_STREAM, {
      next_by_subj: `${T.Uploaded}.${itemId}`,
      seq: 0,
    } as unknown as { seq: number });
    return m ? validateEvent(m.json(), [T.Uploaded]).data : null;
  };
}

/** What an item's moderation stages act on: its one moderation, and its content as uploaded. */
export type ModerationReader = (
  itemId: string,
  event: { id: string },
) => Promise<{ moderation: Moderation; content: ContentItem }>;

/**
 * Reads what to act on for a delivered `content.moderated`: the item's content as uploaded
 * (its first `content.uploaded`), and the first moderation stored after it, which moderation
 * published once (a redrive's copy keeps its event id, so it reads the same). One with
 * another id (published by hand on the subject, with any verdict and content, before or
 * after the upload) is refused as a `conflict`, and one for an id never uploaded as
 * `not_found`: either fails nothing. A copy with the first's id but another body is acted on
 * as the first says, never as the copy does.
 */
export function itemModerationReader(jsm: JetStreamManager): ModerationReader {
  const first = (subject: string, after: number) =>
    // STREAM.MSG.GET takes next_by_subj (nats-server 2.9+); nats.js types only seq/last_by_subj.
    storedMessage(jsm, CONTENT_STREAM, { next_by_subj: subject, seq: after } as unknown as {
      seq: number;
    });
  return async (itemId, event) => {
    const up = await first(`${T.Uploaded}.${itemId}`, 0);
    if (!up) {
      throw new WeftError(
        ErrorCode.NotFound,
        `a moderation of content item ${itemId}, which was never uploaded`,
        { permanent: true },
      );
    }
    let content: ContentItem;
    try {
      content = validateEvent(up.json(), [T.Uploaded]).data;
    } catch {
      throw new WeftError(
        ErrorCode.Conflict,
        `content item ${itemId}'s first upload (seq ${up.seq}) is no upload: nothing was ` +
          "moderated",
        { permanent: true },
      );
    }
    const m = await first(`${T.Moderated}.${itemId}`, up.seq + 1);
    const moderated = m ? validateEvent(m.json(), [T.Moderated]) : null;
    if (!moderated || moderated.id !== event.id) {
      throw new WeftError(
        ErrorCode.Conflict,
        `content item ${itemId} has one moderation (${
          moderated ? `event ${moderated.id}, seq ${m!.seq}` : "none stored after its upload"
        }): event ${event.id} is not it, and is not acted on`,
        { permanent: true },
      );
    }
    return { moderation: moderated.data.moderation, content };
  };
}

/**
 * Publishes approved items, archives rejected ones; a decision for an item that already has
 * its outcome (published by moderation, or decided before) is dead-lettered as a `conflict`.
 * A message on an item's decided subject that is no decision (not JSON, another event type,
 * its schema refuses it) is dead-lettered and fails nothing: the item keeps waiting for its
 * decision. Only a decision that could not be stored fails its item.
 */
export function storageDecidedStage(
  uploaded: (itemId: string) => Promise<ContentItem | null>,
  guard?: ContentOutcomeGuard,
): Stage<
  { kind: "event"; types: readonly ["content.decided"] }
> {
  return {
    input: { kind: "event", types: [T.Decided] },
    outcomes: OUTCOMES,
    // An outcome stored for the item that its history does not lead to is not its own.
    ...(guard ? { holdsOutcome: guard.holdsOutcome } : {}),
    // Its consumer, stream and failure event: the definition's.
    ...stepInput(MODERATION_PIPELINE, "storage-decided"),
    entrySubject,
    // Only a decision it read and could not act on fails the item, never junk on the subject.
    failsItem: (_message, handled) => handled,
    async handle(event, ctx) {
      const d = event.data;
      // Only an item its moderation sent to review is decided: an outcome for any other would
      // be one its history does not lead to.
      const refused = await guard?.undecidable(event.item_id, ctx.message.seq);
      if (refused !== undefined) {
        throw new WeftError(ErrorCode.Conflict, refused, { permanent: true });
      }
      // What is published or archived is the item as uploaded, never what a decision carries
      // (a decision published on the bus could carry anything).
      const content = await uploaded(event.item_id);
      if (!content) {
        throw new WeftError(
          ErrorCode.InvalidAwaitedEvent,
          `a decision for item ${event.item_id}, which was never uploaded`,
        );
      }
      return [
        d.decision === "approve"
          ? nextEvent(event, T.Published, { content, via: "review" }, ctx)
          : nextEvent(event, T.Archived, {
            content,
            reason: `rejected by ${d.reviewer}: ${d.reason}`,
          }, ctx),
      ];
    },
  };
}

/** SLA timing the review stages need. */
export interface SlaConfig {
  /** Undecided this long after queueing: escalate, ms. */
  reviewSlaMs: number;
  /** Still undecided this long after escalation: default action, ms. */
  escalationSlaMs: number;
  /** The default action. */
  slaDefaultAction: "approve" | "reject";
}

/** The deadline event a schedule publishes when an SLA step ends. */
export function slaExpiredEvent(
  entry: { id: string; trace_id: string },
  level: 1 | 2,
  dueAt: string,
  source: string,
): ContentSlaExpired {
  return createEvent({
    type: T.SlaExpired,
    id: deterministicId(entry.id, T.SlaExpired, String(level)),
    itemId: entry.id,
    traceId: entry.trace_id,
    source,
    time: new Date(dueAt),
    data: { level, due_at: dueAt },
  });
}

async function scheduleSla(
  schedules: ScheduleStore,
  entry: { id: string; trace_id: string },
  level: 1 | 2,
  dueAt: string,
  source: string,
) {
  await schedules.create({
    id: slaScheduleId(entry.id, level),
    subject: `${T.SlaExpired}.${entry.id}`,
    payload: slaExpiredEvent(entry, level, dueAt, source) as unknown as Record<string, unknown>,
    at: dueAt,
    description: `review SLA level ${level} of ${entry.id}`,
  }).catch((err) => {
    // The deadline exists with another time (the SLA setting changed between deliveries):
    // the first deadline stands; failing the item for it would be worse.
    if (!(err instanceof ConflictError)) throw err;
  });
}

/** Puts flagged items in the review queue with an SLA deadline. */
export function reviewQueueStage(
  queue: ReviewQueue,
  schedules: ScheduleStore,
  sla: SlaConfig,
  outcomeOf: (itemId: string, redriven?: boolean) => Promise<string | undefined>,
  moderationOf: ModerationReader,
): Stage<{ kind: "event"; types: readonly ["content.moderated"] }> {
  return {
    input: { kind: "event", types: [T.Moderated] },
    // Its consumer, stream and failure event: the definition's.
    ...stepInput(MODERATION_PIPELINE, "review-queue"),
    entrySubject,
    async handle(event, ctx: StageContext) {
      if (event.data.moderation.verdict !== "flagged") return []; // storage-moderated's
      // A moderation of an item that has its outcome (a copy the moderation key published
      // again) queues no review: a reviewer's decision on it could change nothing.
      const outcome = await outcomeOf(event.item_id, ctx.message.redriveOf !== undefined);
      if (outcome === T.Failed) {
        throw new WeftError(
          ErrorCode.Conflict,
          `content item ${event.item_id} has failed: a moderation after its failure queues no ` +
            "review until the failure is redriven",
          { permanent: true },
        );
      }
      if (outcome !== undefined) {
        throw new WeftError(
          ErrorCode.Conflict,
          `content item ${event.item_id} is ${outcome.split(".")[1]} already: a moderation ` +
            "after its outcome queues no review",
          { permanent: true },
        );
      }
      // The item's one moderation (a copy of it may carry another verdict: flagged is what it
      // said), and reviewers see the content as uploaded.
      const { moderation, content } = await moderationOf(event.item_id, event);
      if (moderation.verdict !== "flagged") return [];
      // Times derive from the input event, so a redelivery computes the same entry.
      const queuedAt = event.time;
      const dueAt = new Date(Date.parse(queuedAt) + sla.reviewSlaMs).toISOString();
      const entry = await queue.enqueue({
        id: event.item_id,
        status: ReviewStatus.Pending,
        trace_id: event.trace_id,
        queued_at: queuedAt,
        due_at: dueAt,
        escalation_level: 0,
        content,
        moderation,
      });
      if (entry.status === ReviewStatus.Pending) {
        await scheduleSla(schedules, entry, 1, dueAt, ctx.source);
      }
      return [nextEvent(event, T.ReviewRequested, {
        content,
        moderation,
        queued_at: queuedAt,
        due_at: dueAt,
      }, ctx)];
    },
  };
}

function decidedEvent(
  entry: ReviewEntry,
  cause: string,
  source: string,
  time: Date,
): ContentDecided {
  const d = entry.decision!;
  return createEvent({
    type: T.Decided,
    id: decidedEventId(entry.id),
    itemId: entry.id,
    traceId: entry.trace_id,
    source,
    cause,
    time,
    data: {
      content: entry.content,
      decision: d.decision,
      reason: d.reason,
      reviewer: d.reviewer,
      automatic: d.automatic,
    },
  });
}

/** The reviewer name recorded on decisions the SLA makes. */
export const SLA_REVIEWER = "weft-sla";

/**
 * How much earlier than its deadline an SLA timer may be handled (the scheduler's and this
 * process's clocks may differ a little); any earlier, it decides nothing. As a definition's
 * timers (src/pipeline/runtime.ts).
 */
export const SLA_TIMER_SKEW_MS = 5_000;

/** A timer that does not fit the item's review record: dead-lettered, failing nothing. */
function badTimer(event: ContentSlaExpired, why: string): WeftError {
  return new WeftError(
    ErrorCode.InvalidAwaitedEvent,
    `SLA timer (level ${event.data.level}) of item ${event.item_id} ${why}`,
  );
}

/**
 * Acts on SLA deadlines: escalate first, then apply the default action. A timer is judged by
 * the item's review record (its status, the deadline the review stages recorded on it, and
 * which timer escalated it), never by the level and deadline the timer event claims: one
 * that comes before the item's deadline, or does not fit its step (a level 2 for an item
 * never escalated, another level 1 for an escalated one), decides nothing; it is
 * dead-lettered as `invalid_awaited_event` and fails nothing.
 */
export function reviewSlaStage(
  queue: ReviewQueue,
  schedules: ScheduleStore,
  sla: SlaConfig,
): Stage<{ kind: "event"; types: readonly ["content.sla_expired"] }> {
  return {
    input: { kind: "event", types: [T.SlaExpired] },
    // Its consumer, stream and failure event: the definition's.
    ...stepInput(MODERATION_PIPELINE, "review-sla"),
    entrySubject,
    // The definition's loop (SLA -> review) repeats its escalations; its automatic decision,
    // like a reviewer's, comes once.
    once: new Set([T.Decided]),
    // A timer message it cannot read (not JSON, not a timer: forged or garbled) is
    // dead-lettered and fails nothing; the item's real deadline still comes.
    failsItem: (_message, handled) => handled,
    async handle(event, ctx) {
      let entry = await queue.get(event.item_id);
      if (!entry) return [];
      if (entry.status === ReviewStatus.Decided && !entry.decision?.automatic) {
        // Decided by a human in time. Its SLA should have been cancelled; that it fired
        // means the decision's publish or the cancel may have failed, so publish the
        // decision again: same event id, so JetStream drops it if it was published.
        return [decidedEvent(entry, decidedEventId(entry.id), ctx.source, ctx.now())];
      }
      const level = event.data.level;
      const now = ctx.now().getTime();
      const notBefore = (due: number, what: string) => {
        if (now < due - SLA_TIMER_SKEW_MS) {
          throw badTimer(event, `came before the item's ${what} ${new Date(due).toISOString()}`);
        }
      };
      if (entry.status === ReviewStatus.Pending) {
        if (level !== 1) throw badTimer(event, "came for an item that was never escalated");
        // The deadline the review queue recorded when the item entered it.
        const reviewDue = entry.due_at
          ? Date.parse(entry.due_at)
          : Date.parse(entry.queued_at) + sla.reviewSlaMs;
        notBefore(reviewDue, "review deadline");
        // Still undecided this long after the escalation, which is now (a late timer, the
        // scheduler down a while, leaves reviewers the whole escalation SLA).
        const dueAt = new Date(now + sla.escalationSlaMs);
        entry = await queue.escalate(entry.id, dueAt, { at: ctx.now(), timer: event.id }) ??
          await queue.get(entry.id) ?? entry;
        if (entry.status === ReviewStatus.Decided && !entry.decision?.automatic) {
          return []; // a human decided meanwhile
        }
      }
      if (entry.status === ReviewStatus.Escalated && level === 1) {
        // Escalated by this timer (its redelivery: the escalation, or its schedule or event,
        // may not have been stored), or before timers were recorded: the same again, no-ops
        // where stored. Another level-1 timer of an escalated item escalates nothing.
        if (entry.escalated_by !== undefined && entry.escalated_by !== event.id) {
          throw badTimer(event, `came for an item escalated at ${entry.escalated_at}`);
        }
        await scheduleSla(schedules, entry, 2, entry.due_at!, ctx.source);
        return [nextEvent(event, T.Escalated, {
          level: 1,
          reason: `not decided within ${sla.reviewSlaMs} ms`,
          due_at: entry.due_at!,
        }, ctx)];
      }
      if (entry.status === ReviewStatus.Decided) {
        // Decided by the default action: a level 2 timer (a redelivery) publishes the
        // decision again (same event id); a level 1 has nothing left to do.
        return level === 2 ? [decidedEvent(entry, event.id, ctx.source, ctx.now())] : [];
      }
      if (level !== 2) throw badTimer(event, "does not fit the item's review"); // unreachable
      notBefore(
        entry.due_at
          ? Date.parse(entry.due_at)
          : Date.parse(entry.escalated_at ?? entry.queued_at) + sla.escalationSlaMs,
        "escalation deadline",
      );
      let decided: ReviewEntry;
      try {
        ({ entry: decided } = await queue.decide(entry.id, {
          decision: sla.slaDefaultAction,
          reason: `no decision within the escalation SLA: default action`,
          reviewer: SLA_REVIEWER,
          automatic: true,
        }, ctx.now()));
      } catch (err) {
        if (!(err instanceof ConflictError)) throw err;
        const now = await queue.get(entry.id);
        if (!now?.decision?.automatic) return []; // a human won the race
        decided = now; // our own earlier attempt landed: emit its event again
      }
      return [decidedEvent(decided, event.id, ctx.source, ctx.now())];
    },
  };
}

/** The decision event for a decided queue entry (the gateway publishes it). */
export function humanDecidedEvent(entry: ReviewEntry, source: string, now: Date): ContentDecided {
  return decidedEvent(entry, deterministicId(entry.id, "decision"), source, now);
}
