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
import { DIGEST_STREAM, typeFilter } from "../../src/subjects.ts";
import { DIGEST_REQUEST_SUBJECT, FEEDBACK_STREAM } from "./subjects.ts";
import { FeedbackEventType } from "./events.ts";

/** Dispatched items per team in a window. */
export interface TeamCounts {
  /** Items dispatched in the window. */
  total: number;
  /** Items per team. */
  teams: Record<string, number>;
}

/** Counts items dispatched in [from, to) per team. */
export type DispatchCounter = (from: Date, to: Date) => Promise<TeamCounts>;

/**
 * Counts `feedback.dispatched` events stored in [from, to) from the FEEDBACK stream with
 * an ordered consumer that starts at `from`: it reads only the window, never the history.
 *
 * @example
 * ```ts ignore
 * const counts = await countDispatched(jetstream(nc))(new Date(Date.now() - 3600_000), new Date());
 * ```
 */
export function countDispatched(js: JetStreamClient): DispatchCounter {
  return async (from, to) => {
    const counts: TeamCounts = { total: 0, teams: {} };
    const consumer = await js.consumers.get(FEEDBACK_STREAM, {
      filter_subjects: typeFilter("feedback.dispatched"),
      deliver_policy: DeliverPolicy.StartTime,
      opt_start_time: from.toISOString(),
    });
    for (;;) {
      const m = await consumer.next({ expires: 1000 });
      if (!m || m.time.getTime() >= to.getTime()) break;
      const team = m.json<{ data?: { routing?: { team?: unknown } } }>().data?.routing?.team;
      if (typeof team === "string") {
        counts.total++;
        counts.teams[team] = (counts.teams[team] ?? 0) + 1;
      }
      if (m.info.pending === 0) break;
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
