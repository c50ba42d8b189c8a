/**
 * Event envelopes: every event carries its id, type, schema version, item id, trace id,
 * time and producing service around its `data`. Ids of derived events are deterministic,
 * so a redelivered input yields the same output ids and JetStream's duplicate window
 * drops the second publish.
 *
 * @module
 */
import { createHash } from "node:crypto";
import type { AnyEvent, EventEnvelope, EventMap } from "./schemas.ts";

/** A deterministic id from its parts: 32 hex characters of SHA-256. */
export function deterministicId(...parts: string[]): string {
  return createHash("sha256").update(parts.join("\u0000")).digest("hex").slice(0, 32);
}

/** Lower-case hex SHA-256 of `data`: the hash dead letters keep of an original body. */
export function sha256Hex(data: Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

/** What is needed to create an event; the envelope fields are filled in. */
export interface NewEvent<K extends keyof EventMap> {
  /** The event type. */
  type: K;
  /** Id of the item the event is about. */
  itemId: string;
  /** Trace id (32 hex characters) of the item's trace. */
  traceId: string;
  /** The producing service's name. */
  source: string;
  /** The event's payload. */
  data: EventMap[K]["data"];
  /** Event id; derived from `cause` and `type` when omitted. */
  id?: string;
  /** Id of the event this one follows from. */
  cause?: string;
  /** Defaults to now. */
  time?: Date;
}

/**
 * Creates an event envelope of a registered event type (its pipeline's events module adds it
 * to `EventMap`), typed by it.
 *
 * @example
 * ```ts ignore
 * import { createEvent } from "./events.ts";
 * // With "orders.placed" registered (see EventMap in schemas.ts):
 * const e = createEvent({
 *   type: "orders.placed",
 *   itemId: "o1",
 *   traceId: "0af7651916cd43dd8448eb211c80319c",
 *   source: "gateway",
 *   data: { sku: "A-1" },
 * });
 * console.assert(e.version === 1 && e.item_id === "o1");
 * ```
 */
export function createEvent<K extends keyof EventMap>(e: NewEvent<K>): EventMap[K] {
  return createEnvelope(e as NewEnvelope) as EventMap[K];
}

/** {@link NewEvent} of any type, registered or not (a definition's events are not). */
export type NewEnvelope = Omit<NewEvent<never>, "type" | "data"> & { type: string; data: unknown };

/**
 * Creates an event envelope of any type, with no typing of its payload: for events no
 * pipeline registered in `EventMap`, such as a definition's (src/pipeline/flow.ts).
 *
 * @example
 * ```ts
 * import { createEnvelope } from "./events.ts";
 * const e = createEnvelope({
 *   type: "orders.priced",
 *   itemId: "o1",
 *   traceId: "0af7651916cd43dd8448eb211c80319c",
 *   source: "orders-price",
 *   data: { total: 10 },
 * });
 * console.assert(e.version === 1 && e.type === "orders.priced");
 * ```
 */
export function createEnvelope(e: NewEnvelope): EventEnvelope {
  return {
    id: e.id ?? deterministicId(e.cause ?? e.itemId, e.type),
    type: e.type,
    version: 1,
    item_id: e.itemId,
    trace_id: e.traceId,
    time: (e.time ?? new Date()).toISOString(),
    source: e.source,
    data: e.data,
  };
}

/** The event types of {@link AnyEvent}. */
export type EventType = AnyEvent["type"];
