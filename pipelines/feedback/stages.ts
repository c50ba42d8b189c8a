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
import { FeedbackEventType as T } from "./events.ts";
import { childContext } from "../../src/observability/trace.ts";
import type { FeedbackItem, FeedbackSubmission } from "./events.gen.ts";

/** The item fields carried from a submission onto its events. */
export function itemOf(submission: FeedbackSubmission): FeedbackItem {
  const item: FeedbackItem = { text: submission.text };
  if (submission.channel !== undefined) item.channel = submission.channel;
  if (submission.customer_id !== undefined) item.customer_id = submission.customer_id;
  if (submission.metadata !== undefined) item.metadata = submission.metadata;
  return item;
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
    // Not read per message (the bench's hot path): an event for an id that never entered
    // runs here, and the state writer dead-letters it and what follows `not_found`.
    checksEntry: false,
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

/** Routes to a team, then marks the item processed: its final event. */
export function dispatchStage(
  route: Router,
): Stage<{ kind: "event"; types: readonly ["feedback.topics_extracted"] }> {
  return {
    // Its consumer, stream and failure event: the definition's.
    ...stepInput(FEEDBACK_PIPELINE, "dispatch"),
    // What its outputs' subjects hold from before the item's ingested event is not the item's.
    entrySubject: (item) => `${T.Ingested}.${item}`,
    // Not read per message (the bench's hot path): an event for an id that never entered
    // runs here, and the state writer dead-letters it and what follows `not_found`.
    checksEntry: false,
    input: { kind: "event", types: [T.TopicsExtracted] },
    handle(event, ctx) {
      const routing = route(event.data.sentiment.label, event.data.topics.topics);
      const dispatched = nextEvent(event, T.Dispatched, { ...event.data, routing }, ctx);
      return [dispatched, nextEvent(dispatched, T.Processed, dispatched.data, ctx)];
    },
  };
}
