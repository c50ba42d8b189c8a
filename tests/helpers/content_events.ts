/**
 * Waiting on content events in tests: reads an item's history from the CONTENT stream
 * with an ordered consumer (past and future), with a deadline instead of sleeps.
 *
 * @module
 */
import { DeliverPolicy, jetstream } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/nats-core";
import { CONTENT_STREAM, contentEventsFilter } from "../../pipelines/moderation/subjects.ts";

/** One event of an item as stored. */
export interface StoredEvent {
  type: string;
  seq: number;
  event: { id: string; type: string; data: Record<string, unknown> };
}

/**
 * Reads `itemId`'s events until `until` holds for the ones seen so far; rejects after
 * `timeoutMs` listing what it saw.
 *
 * @example
 * ```ts ignore
 * const events = await waitForEvents(nc, id, (es) => es.some((e) => e.type === "content.published"));
 * ```
 */
export async function waitForEvents(
  nc: NatsConnection,
  itemId: string,
  until: (events: StoredEvent[]) => boolean,
  timeoutMs = 15_000,
): Promise<StoredEvent[]> {
  const js = jetstream(nc);
  const consumer = await js.consumers.get(CONTENT_STREAM, {
    filter_subjects: contentEventsFilter(itemId),
    deliver_policy: DeliverPolicy.All,
  });
  const messages = await consumer.consume({ max_messages: 64 });
  const seen: StoredEvent[] = [];
  const timer = setTimeout(() => messages.stop(), timeoutMs);
  try {
    if (until(seen)) return seen;
    for await (const m of messages) {
      const event = m.json<StoredEvent["event"]>();
      seen.push({ type: event.type, seq: m.seq, event });
      if (until(seen)) return seen;
    }
    throw new Error(
      `item ${itemId}: condition not met within ${timeoutMs} ms; saw ${
        seen.map((e) => e.type).join(", ")
      }`,
    );
  } finally {
    clearTimeout(timer);
    messages.stop();
  }
}

/** True once an event of `type` was seen. */
export const has = (type: string) => (events: StoredEvent[]) => events.some((e) => e.type === type);
