/**
 * What a stage is: a pure, typed handler from one input to the events it produces. The
 * runner (src/runner.ts) does all the NATS work around it.
 *
 * @module
 */
import type { DocumentMap, EventMap } from "./schemas.ts";
import { createEvent } from "./events.ts";

/** Facts about the message being handled, for handlers that need them. */
export interface MessageInfo {
  /** The subject the message was published on. */
  subject: string;
  /** Sequence in the stream: stable across redeliveries. */
  seq: number;
  /** Time the server stored the message, ms since the epoch: stable across redeliveries. */
  storedAt: number;
  /** 1 on first delivery. */
  deliveryCount: number;
  /** Trace id from the message's traceparent header, when present. */
  traceId?: string;
  /** The dead letter a redrive republished it from (its `Weft-Redrive-Of` header), if any. */
  redriveOf?: number;
  /**
   * The item the dead letter a redrive republished it from was kept under (its
   * `Weft-Redrive-Item` header): only with {@link MessageInfo.redriveOf}.
   */
  redriveItem?: string;
  /**
   * The steps a copy stored by a definition change's hand-over is for (its
   * `Weft-Handover-To` header), if it is one.
   */
  handoverTo?: string[];
}

/** What a handler gets beside its input. */
export interface StageContext {
  /** The producing service's name, recorded on events. */
  source: string;
  /** Facts about the message being handled. */
  message: MessageInfo;
  /** The current time; injected so handlers stay pure. */
  now(): Date;
  /** Aborted when the service is stopping or the handler ran out of time. */
  signal: AbortSignal;
}

/** What a stage consumes: events of some types, or a plain document (a submission). */
export type StageInput =
  | { kind: "event"; types: readonly (keyof EventMap)[] }
  | { kind: "document"; name: keyof DocumentMap };

/** The value a handler receives for an input spec. */
export type InputOf<I extends StageInput> = I extends { kind: "event"; types: readonly (infer K)[] }
  ? K extends keyof EventMap ? EventMap[K] : never
  : I extends { kind: "document"; name: infer N } ? N extends keyof DocumentMap ? DocumentMap[N]
    : never
  : never;

/** Any event a stage may emit. */
export type OutputEvent = EventMap[keyof EventMap];

/** A pipeline stage: consume, decide, emit. */
export interface Stage<I extends StageInput = StageInput> {
  /** Stage name: names its durable consumer and its service. */
  name: string;
  /** The subject filter of its durable consumer. */
  filterSubject: string;
  /**
   * A step with several inputs: their subjects, which its consumer filters on instead of
   * `filterSubject` (their wildcard) where the server can (nats-server 2.10+), so it is
   * delivered only what is for it.
   */
  filterSubjects?: readonly string[];
  /** The stream its durable consumer reads. */
  stream: string;
  /**
   * Reads this existing durable consumer, as it is, instead of the one `name` names (which
   * still names its dead letters, metrics and logs): never created nor changed, only drained
   * (a retired step's consumer, by its pipeline's control service).
   */
  durable?: string;
  /** Recorded on its durable consumer where the server keeps metadata (nats-server 2.10+). */
  metadata?: Readonly<Record<string, string>>;
  /**
   * Event types an earlier definition sent to this stage that its consumer may still owe
   * (a step before it renamed): recorded in the consumer's description, so that a later
   * start keeps reading them until none is left.
   */
  owes?: readonly string[];
  /** The event type published for an item that is dead-lettered (`<pipeline>.failed`). */
  failedType: string;
  /**
   * The outcome of an item that has ended, as its state records it, whichever definition's
   * end it reached (undefined while it has none): a message given up on for it fails nothing,
   * also when its end is no end of `finalTypes` (an end step a changed definition lacks).
   */
  outcomeOf?(item: string): Promise<string | undefined>;
  /**
   * Decodes and checks a message itself, instead of the schemas of `input` (a pipeline
   * definition's steps, whose schemas are the definition's). Returns undefined for a
   * message that is not for this stage (acked, nothing published).
   */
  decode?(raw: unknown, message: MessageInfo): unknown;
  /**
   * Whether a message on this stage's consumer is for it, told from its subject alone. One
   * that is not is acked unread, whatever its body: a wide filter also brings an item's other
   * events, which the consumers they are for handle (and dead-letter when bad).
   */
  accepts?(message: MessageInfo): boolean;
  /** Checks an output event before anything is published, instead of schemas/. */
  checkOutput?(event: OutputEvent): void;
  /**
   * Where an item's entry event is stored (`orders.submitted.<item>`). A message of another
   * type is run only for an item whose entry was stored before it, else it is dead-lettered
   * `not_found`, failing nothing (a step's key publishing its own event for an id that never
   * entered starts nothing downstream): one direct read of the stream per such message. And
   * what an output's subject holds from before the entry is not the item's, so an event
   * published for an id before it entered cannot stand in for its own once-per-item output.
   */
  entrySubject?(item: string): string;
  /**
   * Where the step's input for an item is stored (`orders.priced.<item>` for a step after the
   * pricing step). What its once-per-item outputs' subjects hold from before the first message
   * there (after the item's entry) is not its output: an event of its type published, with a key
   * that may publish it, for an item that had not reached the step. When such an event holds its
   * output's subject, the output is stored after it, as after junk; the item's state does not
   * take the earlier one. Read only when a once-per-item publish is refused.
   */
  inputSubject?(item: string): string;
  /**
   * `false`: run a message without first reading whether its item entered (the read above),
   * for a stage on a measured hot path whose state writer refuses such an item anyway (a
   * hand-wired pipeline's later steps: two reads per item cost the benched pipeline about a
   * sixth of its throughput in `deno task bench`). Default true.
   */
  checksEntry?: boolean;
  /**
   * The item's input an event carries (an order's customer and lines, say; any
   * body, so it must not throw). When a once-per-item output's publish is refused because its
   * subject holds an event already, a held event carrying another input than the output's
   * (published with a step's key, forged or altered, before the item's own) is not the item's:
   * the output is stored after it. Without it, any valid event of the type for the item stands
   * for the item's own.
   */
  inputOf?(event: unknown): unknown;
  /**
   * For a stage that publishes an item's entry event under an id its submission names (a bus
   * intake): what of an entry event (any body; it must not throw) makes a submission sent again
   * under that id the same item. When the item's entry event is stored already and carries
   * another (the id taken by another body), the message is dead-lettered `conflict`, failing
   * nothing, as the gateway refuses it with 422; the same is a replay, acked.
   */
  entryInputOf?(event: unknown): unknown;
  /** Event types that start an item: stored once per subject, the first one wins. */
  entryTypes?: ReadonlySet<string>;
  /**
   * Output event types an item has at most one of: published with "expected last subject
   * sequence 0", so the stream stores each once per item, however late a second comes (a
   * forged or stray copy of an earlier event under another id would otherwise run the rest
   * of the item again). A refusal means it is stored already, which is success.
   */
  once?: ReadonlySet<string>;
  /**
   * Event types of which an item has at most one, whichever it is: its outcomes (e.g.
   * published or archived). The runner publishes none of them for an item that already has
   * one stored under another event id; it dead-letters the message instead, with code
   * `conflict`, and fails nothing (the item has its outcome). On nats-server 2.11+ the check
   * and the publish are atomic: the outcome is stored only if nothing was stored for the item
   * since the check (two steps deciding one item at once store one outcome).
   */
  outcomes?: ReadonlySet<string>;
  /**
   * Whether an event of {@link once} stored for the item (`type` at stream sequence `seq`,
   * its body `raw`), found where the item's own would go, is one its state takes: false for
   * one the item's history does not lead to (a step's key publishing its event for an item
   * not at its step, which the state refuses), so the item's own is still published after it.
   * Without it, every stored one counts.
   */
  storedStands?(
    item: string,
    stored: { type: string; seq: number; raw: unknown },
  ): Promise<boolean>;
  /**
   * Whether an outcome stored for `item` (one of `outcomes`: `held.type` at stream sequence
   * `held.seq`) is the item's, its history leading there. One that is not (published with a
   * step's key for an item that had not reached the step; its state writer dead-letters it)
   * keeps the item from none of its own: the runner publishes the item's outcome after it, and
   * a message given up on for the item fails it. Asked only when an outcome is stored already.
   * Without it, any stored outcome is the item's.
   */
  holdsOutcome?(item: string, held: { type: string; seq: number }): Promise<boolean>;
  /**
   * The event types that finish an item: its pipeline's outcomes (e.g. processed; published
   * or archived). Giving up on a message of an item that already has one dead-letters the
   * message and fails nothing: no `failedType` event is stored after the outcome.
   */
  finalTypes?: ReadonlySet<string>;
  /** What it consumes. */
  input: I;
  /**
   * Names the item a raw (possibly invalid) message is about, so a dead letter can be
   * tied to it. Defaults to the event's `item_id`.
   */
  identify?(raw: unknown, message: MessageInfo): string | undefined;
  /**
   * Whether giving up on this message fails its item (publishes `failedType`). Default: yes,
   * except for an event that disagrees with its subject and a bad awaited event. A stage
   * that also reads messages the item does not depend on (a definition's control step, an
   * item's awaited decisions) says no for those, whatever their body: a forged or garbled
   * decision is dead-lettered and the item keeps waiting. `handled`: whether the message
   * reached the handler (it decoded and passed its schema), so a stage may fail the item only
   * for a message it could read (an item's decision that could not be acted on), not for
   * junk on its subject.
   */
  failsItem?(message: MessageInfo, handled: boolean): boolean;
  /**
   * Whether an item has ended by any means this stage's `finalTypes` may not know (an end of
   * an earlier version of its pipeline's definition): asked for the events of its consumer's
   * backlog (stored before the consumer was created), which are acked unhandled for an item
   * that ended.
   */
  ended?(item: string): Promise<boolean>;
  /**
   * Whether the item went on from `input` already, so this stage is not to run for it: asked,
   * like `ended`, only for the events of its consumer's backlog (a step renamed, added, or
   * given another durable reads the stream's history), which are then acked unhandled.
   */
  wentOn?(input: InputOf<I>, message: MessageInfo): Promise<boolean>;
  /**
   * Whether this stage has handled `input` already (its output for it is stored): asked only
   * for a copy of an event stored again (a redrive, a hand-over), which is then acked
   * unhandled, so a step never runs twice for one event (an email, a payment).
   */
  tookAlready?(input: InputOf<I>, message: MessageInfo): Promise<boolean>;
  /**
   * Checks a decoded message against what its item's history holds before the handler runs,
   * throwing to refuse it (dead-lettered, failing the item only as its code says: `not_found`,
   * `subject_mismatch` and `conflict` fail none). A stage with it is not given the
   * `entrySubject` check: it makes its own (a definition's work step: the item entered, has
   * not ended, and the event carries its input).
   */
  admit?(input: InputOf<I>, message: MessageInfo): Promise<void>;
  /** Pure: same input, same outputs (ids included). Throw to fail; see errors.ts. */
  handle(input: InputOf<I>, ctx: StageContext): OutputEvent[] | Promise<OutputEvent[]>;
}

/** The event that follows `input` in the same item and trace, with a deterministic id. */
export function nextEvent<K extends keyof EventMap>(
  input: { id: string; item_id: string; trace_id: string },
  type: K,
  data: EventMap[K]["data"],
  ctx: StageContext,
): EventMap[K] {
  return createEvent({
    type,
    itemId: input.item_id,
    traceId: input.trace_id,
    source: ctx.source,
    data,
    cause: input.id,
    time: ctx.now(),
  });
}
