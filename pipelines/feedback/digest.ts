/**
 * The feedback digest: how many feedback items were dispatched to each team in a window,
 * published as a `digest.feedback_counts` event. A recurring schedule (`feedback-digest`,
 * cron `WEFT_DIGEST_CRON`) publishes the request on `digest.request.feedback`; the
 * `feedback-digest` stage answers it. This is the scheduler's general use beside SLAs.
 *
 * @module
 */
import { DeliverPolicy, type JetStreamClient } from "@nats-io/jetstream";
import { createEvent, deterministicId } from "../../src/events.ts";
import type { Stage } from "../../src/stage.ts";
import { DIGEST_STREAM, ITEM_ID, typeFilter } from "../../src/subjects.ts";
import { storedMessage } from "../../src/runner.ts";
import { DIGEST_REQUEST_SUBJECT, FEEDBACK_STREAM } from "./subjects.ts";
import { FeedbackEventType } from "./events.ts";

/** Dispatched items per team in a window. */
export interface TeamCounts {
  /** Items dispatched in the window, each once. */
  total: number;
  /** Items per team. */
  teams: Record<string, number>;
}

/** Counts items dispatched in [from, to) per team, each item once. */
export type DispatchCounter = (from: Date, to: Date) => Promise<TeamCounts>;

/** Items looked up at once while counting (three direct reads per item dispatched). */
const LOOKUPS_AT_ONCE = 16;

/**
 * Counts the items dispatched in [from, to) from the FEEDBACK stream, each once, under the team
 * of its first `feedback.dispatched` event stored after it reached dispatch (its first
 * `topics_extracted` after its ingested event): read with an ordered consumer that starts at
 * `from` (only the window, never the history), then, per item seen, three direct reads (its
 * ingested event, its first topics_extracted after it, then its first dispatched one after
 * that; at most {@link LOOKUPS_AT_ONCE} items at a time). An item counts only in the window of
 * that dispatched event (a second one, such as a redrive's outputs stored again past the
 * duplicate window on nats-server 2.9, counts nothing; one the dispatch key published before the
 * item reached dispatch, or before its entry, is skipped, as the item's state skips it; one for
 * an id that never entered counts nothing).
 *
 * @example
 * ```ts ignore
 * const counts = await countDispatched(jetstream(nc))(new Date(Date.now() - 3600_000), new Date());
 * ```
 */
export function countDispatched(js: JetStreamClient): DispatchCounter {
  return async (from, to) => {
    // The items with a dispatched event in the window, and the window's stream sequences.
    const seen = new Set<string>();
    let firstSeq = Infinity;
    let lastSeq = -Infinity;
    const consumer = await js.consumers.get(FEEDBACK_STREAM, {
      filter_subjects: typeFilter(FeedbackEventType.Dispatched),
      deliver_policy: DeliverPolicy.StartTime,
      opt_start_time: from.toISOString(),
    });
    for (;;) {
      const m = await consumer.next({ expires: 1000 });
      if (!m || m.time.getTime() >= to.getTime()) break;
      firstSeq = Math.min(firstSeq, m.seq);
      lastSeq = Math.max(lastSeq, m.seq);
      // The subject names the item (`feedback.dispatched.<id>`); the body may lie.
      const item = m.subject.split(".")[2];
      if (item !== undefined && ITEM_ID.test(item)) seen.add(item);
      if (m.info.pending === 0) break;
    }
    const jsm = await js.jetstreamManager(false);
    const next = (subject: string, seq: number) =>
      // STREAM.MSG.GET takes next_by_subj (nats-server 2.9+); nats.js types only seq/last_by_subj.
      storedMessage(jsm, FEEDBACK_STREAM, { next_by_subj: subject, seq } as unknown as {
        seq: number;
      });
    // An item's team: that of its first dispatched event stored after it reached dispatch (its
    // first topics_extracted after its ingested event), when that event is in the window. One
    // stored before (the dispatch key's forgery for an item at sentiment or topics, or any event
    // for an id that had not entered) is never looked at.
    const teamOf = async (item: string): Promise<string | undefined> => {
      const entry = await next(`${FeedbackEventType.Ingested}.${item}`, 0);
      if (entry === null) return undefined;
      const reached = await next(`${FeedbackEventType.TopicsExtracted}.${item}`, entry.seq + 1);
      if (reached === null) return undefined;
      const dispatched = await next(`${FeedbackEventType.Dispatched}.${item}`, reached.seq + 1);
      if (!dispatched || dispatched.seq < firstSeq || dispatched.seq > lastSeq) return undefined;
      try {
        const team = dispatched.json<{ data?: { routing?: { team?: unknown } } }>().data?.routing
          ?.team;
        return typeof team === "string" ? team : undefined;
      } catch {
        return undefined; // not JSON: no team to count under
      }
    };
    const items = [...seen];
    const counts: TeamCounts = { total: 0, teams: {} };
    for (let i = 0; i < items.length; i += LOOKUPS_AT_ONCE) {
      const teams = await Promise.all(items.slice(i, i + LOOKUPS_AT_ONCE).map(teamOf));
      for (const team of teams) {
        if (team === undefined) continue;
        counts.total++;
        counts.teams[team] = (counts.teams[team] ?? 0) + 1;
      }
    }
    return counts;
  };
}

/** Answers digest requests with the counts of the window before each request. */
export function feedbackDigestStage(
  count: DispatchCounter,
  defaultWindowMs: number,
): Stage<{ kind: "document"; name: "digest.request" }> {
  return {
    name: "feedback-digest",
    stream: DIGEST_STREAM,
    failedType: FeedbackEventType.Failed,
    filterSubject: DIGEST_REQUEST_SUBJECT,
    input: { kind: "document", name: "digest.request" },
    // A digest request is no item: its subject's last token (`feedback`) names none, nor does
    // anything in its body. A bad one is dead-lettered and fails no item, so `failedType` is
    // never published.
    identify: () => undefined,
    failsItem: () => false,
    async handle(request, ctx) {
      // The window ends when the request was stored: a redelivery counts the same window.
      const end = new Date(ctx.message.storedAt);
      const start = new Date(end.getTime() - (request.window_ms ?? defaultWindowMs));
      const { total, teams } = await count(start, end);
      const id = deterministicId("feedback-digest", String(ctx.message.seq), end.toISOString());
      return [createEvent({
        type: "digest.feedback_counts",
        id,
        itemId: `fd_${id.slice(0, 24)}`,
        traceId: id,
        source: ctx.source,
        time: end,
        data: { window_start: start.toISOString(), window_end: end.toISOString(), total, teams },
      })];
    },
  };
}
