/**
 * The feedback pipeline's stages as pure handlers:
 * submission -> ingested -> sentiment_analyzed -> topics_extracted -> dispatched + processed.
 *
 * @module
 */
import type { SentimentAnalyzer, TopicsAnalyzer, ToxicityAnalyzer } from "../../src/ai/analysis.ts";
import { createEvent, deterministicId } from "../../src/events.ts";
import type { Router } from "./rules.ts";
import { nextEvent, type Stage, type StageContext } from "../../src/stage.ts";
import { FEEDBACK_STREAM, SUBMIT_SUBJECT } from "./subjects.ts";
import { stepInput } from "../../src/pipeline/derive.ts";
import { FEEDBACK_PIPELINE } from "./pipeline.ts";
import { FEEDBACK_STATE_SPEC } from "./state.ts";
import { FeedbackEventType as T } from "./events.ts";
import { childContext } from "../../src/observability/trace.ts";
import type { FeedbackItem, FeedbackSubmission } from "./events.gen.ts";
import type { JetStreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/nats-core";
import { lastMessagesReader, storedFirstOnSubject } from "../../src/last_messages.ts";
import { failureCounts, itemFailedNow, messagesOn, storedMessage } from "../../src/runner.ts";
import { canonicalJson } from "../../src/canonical_json.ts";
import { ConflictError, ErrorCode, NotFoundError, WeftError } from "../../src/errors.ts";

/** The item fields carried from a submission onto its events. */
export function itemOf(submission: FeedbackSubmission): FeedbackItem {
  const item: FeedbackItem = { text: submission.text };
  if (submission.channel !== undefined) item.channel = submission.channel;
  if (submission.customer_id !== undefined) item.customer_id = submission.customer_id;
  if (submission.metadata !== undefined) item.metadata = submission.metadata;
  return item;
}

/**
 * The item's fields an event of the pipeline carries (text, channel, customer_id, metadata: what
 * its ingested event carried, which every later event carries on), of any body: what the item
 * was submitted with, as opposed to what its steps found.
 */
export function itemFieldsOf(event: unknown): unknown {
  const d = (event as { data?: unknown } | null)?.data as Record<string, unknown> | undefined;
  if (d === null || typeof d !== "object") return undefined;
  return { text: d.text, channel: d.channel, customer_id: d.customer_id, metadata: d.metadata };
}

/** The id of the ingested event of an item: one per item, so re-submissions de-duplicate. */
export function ingestedEventId(itemId: string): string {
  return deterministicId(itemId, T.Ingested);
}

/**
 * An id for a bus submission that names none: derived from where the server stored it,
 * so a redelivery keeps it.
 */
export function busSubmissionId(message: { seq: number; storedAt: number }): string {
  return `fb_${
    deterministicId("submit", String(message.storedAt), String(message.seq)).slice(0, 24)
  }`;
}

/** Where every feedback stage reads, and what it fails an item with. */
const FEEDBACK = { stream: FEEDBACK_STREAM, failedType: T.Failed } as const;

/** Turns plain submissions from `feedback.submit` into ingested events. */
export function ingestStage(): Stage<{ kind: "document"; name: "feedback.submit" }> {
  return {
    name: "ingest",
    ...FEEDBACK,
    filterSubject: SUBMIT_SUBJECT,
    input: { kind: "document", name: "feedback.submit" },
    // An id sent again with another body is refused (dead-lettered `conflict`), as over HTTP.
    entryInputOf: itemFieldsOf,
    identify(raw, message) {
      const id = (raw as { id?: unknown } | null)?.id;
      return typeof id === "string" && /^[A-Za-z0-9_-]{1,64}$/.test(id)
        ? id
        : busSubmissionId(message);
    },
    handle(submission, ctx: StageContext) {
      const itemId = submission.id ?? busSubmissionId(ctx.message);
      const traceId = ctx.message.traceId ?? childContext().traceId;
      return [createEvent({
        type: T.Ingested,
        id: ingestedEventId(itemId),
        itemId,
        traceId,
        source: ctx.source,
        data: itemOf(submission),
        time: ctx.now(),
      })];
    },
  };
}

/** Classifies sentiment. */
export function sentimentStage(
  analyzer: SentimentAnalyzer,
): Stage<{ kind: "event"; types: readonly ["feedback.ingested"] }> {
  return {
    // Its consumer, stream and failure event: the definition's.
    ...stepInput(FEEDBACK_PIPELINE, "sentiment"),
    // What its output's subject holds from before the item's ingested event is not the item's:
    // a `sentiment_analyzed` published for the id before it was submitted cannot stand in for
    // the item's own (its own is stored after it). Its input is the entry event itself, so no
    // message pays a read for this; only a refused once-per-item publish does.
    entrySubject: (item) => `${T.Ingested}.${item}`,
    // One carrying another text than the item's is not the item's either.
    inputOf: itemFieldsOf,
    input: { kind: "event", types: [T.Ingested] },
    async handle(event, ctx) {
      const sentiment = await analyzer.analyze(event.data.text, { signal: ctx.signal });
      return [nextEvent(event, T.SentimentAnalyzed, { ...event.data, sentiment }, ctx)];
    },
  };
}

/** The topic given to abusive feedback, so routing can send it to trust and safety. */
export const ABUSE_TOPIC = "abuse";

/**
 * Extracts topics. With a toxicity analyzer, abusive text also gets the topic
 * {@link ABUSE_TOPIC} (first), with the toxicity categories as its evidence.
 */
export function topicsStage(
  analyzer: TopicsAnalyzer,
  toxicity?: ToxicityAnalyzer,
): Stage<{ kind: "event"; types: readonly ["feedback.sentiment_analyzed"] }> {
  return {
    // Its consumer, stream and failure event: the definition's.
    ...stepInput(FEEDBACK_PIPELINE, "topics"),
    // What its outputs' subjects hold from before the item's ingested event is not the item's.
    entrySubject: (item) => `${T.Ingested}.${item}`,
    // Not read per message (the bench's hot path): an event for an id that never entered, or
    // with another text than the item's, runs here; dispatch refuses what follows from it, and
    // the state writer applies none of it.
    checksEntry: false,
    // What its output's subject holds with another text than the item's is not the item's,
    // nor what it holds from before the item's sentiment_analyzed (the topics key's event for an
    // item still at sentiment).
    inputOf: itemFieldsOf,
    inputSubject: (item) => `${T.SentimentAnalyzed}.${item}`,
    input: { kind: "event", types: [T.SentimentAnalyzed] },
    async handle(event, ctx) {
      const options = { signal: ctx.signal };
      const [found, toxic] = await Promise.all([
        analyzer.analyze(event.data.text, options),
        toxicity?.analyze(event.data.text, options),
      ]);
      const topics = toxic?.flagged
        ? {
          ...found,
          topics: [ABUSE_TOPIC, ...found.topics.filter((t) => t !== ABUSE_TOPIC)],
          evidence: { [ABUSE_TOPIC]: toxic.categories, ...found.evidence },
        }
        : found;
      return [nextEvent(event, T.TopicsExtracted, { ...event.data, topics }, ctx)];
    },
  };
}

/**
 * Whether a `feedback.processed` stored for an item (at `held.seq`) is the item's end: stored
 * after the item reached dispatch (a `topics_extracted` of it stored after its entry and before
 * it), as the item's state requires. One the dispatch key published for an item still at
 * sentiment or topics is not, and does not keep a step that gives up on the item from failing
 * it (`Stage.holdsOutcome`). Read only when a step gives up on an item.
 */
export function feedbackOutcomeLeads(
  jsm: JetStreamManager,
): (itemId: string, held: { type: string; seq: number }) => Promise<boolean> {
  const first = (subject: string, after: number) =>
    // STREAM.MSG.GET takes next_by_subj (nats-server 2.9+); nats.js types only seq/last_by_subj.
    storedMessage(jsm, FEEDBACK_STREAM, { next_by_subj: subject, seq: after } as unknown as {
      seq: number;
    });
  return async (itemId, held) => {
    const entry = await first(`${T.Ingested}.${itemId}`, 0);
    if (!entry || entry.seq > held.seq) return false;
    const reached = await first(`${T.TopicsExtracted}.${itemId}`, entry.seq + 1);
    return reached !== null && reached.seq < held.seq;
  };
}

/** What dispatch reads of an item before routing it ({@link feedbackItemReader}). */
export type FeedbackItemReader = (
  itemId: string,
  /** The stream sequence of the message being admitted: the read holds the stream up to it. */
  seq?: number,
) => Promise<{
  /** The first message on the item's ingested subject (its body, any JSON), if any. */
  entry: { seq: number; event: unknown } | null;
  /** Whether the item has failed and not been resumed since (by a redrive). */
  failed: boolean;
  /**
   * Whether the item reached topics before the admitted message: a `sentiment_analyzed` carrying
   * its ingested event's text, channel, customer and metadata is stored after its entry and
   * before `seq` (always true without `seq`).
   */
  analyzed: boolean;
}>;

/**
 * Reads the item's ingested event (the first message on `feedback.ingested.<id>`), whether
 * it has failed and not been resumed since (its last `feedback.failed` is not followed by the
 * event it failed on, stored again by a redrive: `failedNow`), and whether it reached topics
 * before the message (a `sentiment_analyzed` of it stored between).
 *
 * With `nc` on nats-server 2.11+, one batched direct get reads the last message of the three
 * subjects. The ingested subject's last message is its first when it was stored under
 * "expected last subject sequence 0" (`storedFirstOnSubject`), as intake stores every item's;
 * and the answer counts only from a server that held the stream up to the admitted message.
 * Otherwise (older servers, a redriven entry, no entry, any answer not trusted whole): three
 * direct reads of the stream in parallel, the first by `next_by_subj`. A `sentiment_analyzed`
 * stored on its subject after the message (published again) costs a read of the subject's
 * messages between the entry and the message.
 */
export function feedbackItemReader(
  jsm: JetStreamManager,
  nc?: NatsConnection,
): FeedbackItemReader {
  const readLast = nc ? lastMessagesReader(nc, FEEDBACK_STREAM) : undefined;
  return async (itemId, seq) => {
    const ingested = `${T.Ingested}.${itemId}`;
    const failedOn = `${T.Failed}.${itemId}`;
    const analyzedOn = `${T.SentimentAnalyzed}.${itemId}`;
    const last = await readLast?.([ingested, failedOn, analyzedOn], { atLeastSeq: seq });
    const first = last?.get(ingested);
    const [entry, lastFailure, lastAnalyzed] = first && storedFirstOnSubject(first)
      ? [first, last!.get(failedOn) ?? null, last!.get(analyzedOn) ?? null]
      : await Promise.all([
        // STREAM.MSG.GET takes next_by_subj (nats-server 2.9+); nats.js types only
        // seq/last_by_subj.
        storedMessage(jsm, FEEDBACK_STREAM, {
          next_by_subj: ingested,
          seq: 0,
        } as unknown as { seq: number }),
        storedMessage(jsm, FEEDBACK_STREAM, { last_by_subj: failedOn }),
        storedMessage(jsm, FEEDBACK_STREAM, { last_by_subj: analyzedOn }),
      ]);
    // A failure stored before the item entered does not hold it: a failed submission that a
    // redrive or a resubmission then made the item, or one a step's key published for the id
    // before it was submitted.
    const failed = lastFailure !== null && (entry === null || lastFailure.seq > entry.seq) &&
      await failedNow(jsm, itemId, lastFailure);
    let event: unknown;
    try {
      event = entry?.json();
    } catch {
      event = undefined;
    }
    const analyzed = seq === undefined || (entry !== null && await analyzedBetween(
      jsm,
      analyzedOn,
      event,
      { from: entry.seq, before: seq, last: lastAnalyzed },
    ));
    return { entry: entry ? { seq: entry.seq, event } : null, failed, analyzed };
  };
}

/**
 * Whether a `sentiment_analyzed` carrying the item's fields as its ingested event (`entry`)
 * does is stored on `subject` after sequence `from` and before `before`: the item's last one
 * there (`last`, read already) when it is, else the messages between, up to a bound (an item's
 * own subject holds one, or a few).
 */
async function analyzedBetween(
  jsm: JetStreamManager,
  subject: string,
  entry: unknown,
  at: { from: number; before: number; last: { seq: number; json(): unknown } | null },
): Promise<boolean> {
  const fields = canonicalJson(itemFieldsOf(entry));
  const isIt = (m: { json(): unknown }) => {
    try {
      const e = m.json() as { type?: unknown } | null;
      return e?.type === T.SentimentAnalyzed && canonicalJson(itemFieldsOf(e)) === fields;
    } catch {
      return false;
    }
  };
  const { from, before, last } = at;
  if (last === null || last.seq <= from) return false; // none after the entry
  if (last.seq < before && isIt(last)) return true;
  for await (const m of messagesOn(jsm, FEEDBACK_STREAM, subject, { from: from + 1, before })) {
    if (isIt(m)) return true;
  }
  return false;
}

/**
 * Whether a feedback item whose last `feedback.failed` is `last` (stored after it entered) has
 * not been resumed since. Failed on an event, a redrive of it resumes the
 * item ({@link itemFailedNow}); failed on a step's message that is no event (junk, which a
 * redrive cannot make pass), nothing does, not a valid event stored on that subject later (a
 * step's key could publish one); failed on its submission, a redrive of it does.
 */
async function failedNow(
  jsm: JetStreamManager,
  itemId: string,
  last: { seq: number; time?: Date; json<T>(): T },
): Promise<boolean> {
  // A failure no runner's dead letter is stored for counts for nothing: the item's earlier
  // failures are asked about instead (found by probing: the topics key's `feedback.failed` for
  // an item at sentiment kept dispatch from routing it, and the item never processed).
  const inputs = FEEDBACK_STATE_SPEC.stageInputs;
  if (!(await failureCounts(jsm, FEEDBACK_STREAM, "feedback.failed", last, inputs))) {
    return await itemFailedNow(jsm, FEEDBACK_STREAM, FEEDBACK_PIPELINE.name, itemId, last, inputs);
  }
  let on: { event_id?: unknown; subject?: unknown } | undefined;
  try {
    on = last.json<{ data?: { event_id?: unknown; subject?: unknown } }>().data;
  } catch {
    return true; // no failure event of Weft's: as failed
  }
  if (typeof on?.event_id !== "string" && on?.subject !== SUBMIT_SUBJECT) return true;
  // (The failure read above, not read again.)
  return await itemFailedNow(jsm, FEEDBACK_STREAM, FEEDBACK_PIPELINE.name, itemId, last, inputs);
}

/**
 * Routes to a team, then marks the item processed: its final event. With `items` (the
 * service's), it runs only for an item that entered before the message, on the text its
 * ingested event carried, and that has not failed (or was resumed): what a step's key could
 * publish for any other (a forged `sentiment_analyzed` runs topics alone) is dead-lettered
 * `not_found`, `subject_mismatch` or `conflict`, failing nothing, and no `processed` is stored.
 */
export function dispatchStage(
  route: Router,
  items?: FeedbackItemReader,
): Stage<{ kind: "event"; types: readonly ["feedback.topics_extracted"] }> {
  return {
    // Its consumer, stream and failure event: the definition's.
    ...stepInput(FEEDBACK_PIPELINE, "dispatch"),
    // What its outputs' subjects hold from before the item's ingested event, or with another
    // text than the item's, is not the item's, nor what they hold from before the item's
    // topics_extracted (the dispatch key's events for an item still at sentiment or topics).
    entrySubject: (item) => `${T.Ingested}.${item}`,
    inputOf: itemFieldsOf,
    inputSubject: (item) => `${T.TopicsExtracted}.${item}`,
    // Whether the item entered is part of admit's check (one round trip: one batched read on
    // nats-server 2.11+, two reads before).
    ...(items ? { admit: (event, message) => admitDispatch(items, event, message.seq) } : {}),
    input: { kind: "event", types: [T.TopicsExtracted] },
    handle(event, ctx) {
      const routing = route(event.data.sentiment.label, event.data.topics.topics);
      const dispatched = nextEvent(event, T.Dispatched, { ...event.data, routing }, ctx);
      return [dispatched, nextEvent(dispatched, T.Processed, dispatched.data, ctx)];
    },
  };
}

/**
 * Refuses a `topics_extracted` that dispatch must not route: for an id with no ingested event
 * stored before it (`not_found`), carrying another text, channel, customer or metadata than the
 * item's ingested event (`subject_mismatch`), for an item that failed and was not resumed
 * (`conflict`, redrivable once it is), or for an item that had not reached topics: no
 * `sentiment_analyzed` of it stored before the message (`conflict`: the topics key's event for
 * an item still at sentiment). None fails the item.
 */
async function admitDispatch(
  items: FeedbackItemReader,
  event: { type: string; item_id: string; data: unknown },
  seq: number,
): Promise<void> {
  const item = event.item_id;
  const { entry, failed, analyzed } = await items(item, seq);
  if (!entry || entry.seq > seq) {
    throw new NotFoundError(
      `no item ${JSON.stringify(item)}: ${event.type} counts only for an item whose entry ` +
        `event (${T.Ingested}.${item}) was stored before it, and none was (stream sequence ` +
        `${seq}); nothing was dispatched`,
    );
  }
  if (canonicalJson(itemFieldsOf(entry.event)) !== canonicalJson(itemFieldsOf(event))) {
    throw new WeftError(
      ErrorCode.SubjectMismatch,
      `${event.type} for feedback item ${item} carries a text, channel, customer_id or ` +
        `metadata other than its ingested event's (stream sequence ${entry.seq}): a forged or ` +
        `altered event; nothing was dispatched`,
      { field: "/data/text" },
    );
  }
  if (failed) {
    throw new ConflictError(
      `feedback item ${item} has failed: dispatch runs for it only once it is resumed ` +
        `(redrive its failure's dead letter); nothing was dispatched`,
      { permanent: true },
    );
  }
  if (!analyzed) {
    throw new ConflictError(
      `feedback item ${item} has no sentiment_analyzed stored before this ${event.type} ` +
        `(stream sequence ${seq}): it had not reached topics, so this is no topics step's ` +
        `event for it; nothing was dispatched`,
      { permanent: true },
    );
  }
}
