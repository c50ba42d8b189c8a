/**
 * Whether an item's `<pipeline>.failed` event is one a runner published: the runner fails an
 * item only as it dead-letters one of the item's messages, and stores the letter right after
 * the event (runner.ts, `prepareLetter`). Any key that may publish the event could otherwise
 * fail an item that is fine (found by probing: a step's key publishing `orders.failed.<id>`
 * for an order waiting for approval made it read as failed, closed its event stream and made
 * its decision answer 409).
 *
 * A failure counts when a letter of its stage is stored for it: on the subject the event
 * names (`deadletter.<stage>.<item>`), for the message the event names (its subject, and the
 * stream sequence the event's id is made from), a message that is stored in the pipeline's
 * stream on that subject. Only failures are read for (they are rare): one or two direct reads
 * each, never on an item's usual path.
 *
 * @module
 */
import type { JetStreamManager } from "@nats-io/jetstream";
import { deterministicId } from "./events.ts";
import { messagesOn, storedMessage } from "./runner.ts";
import {
  DEADLETTER_STREAM,
  deadLetterSubject,
  REDRIVEN_TOKEN,
  subjectMatches,
} from "./subjects.ts";

/**
 * How long a failure may wait for its letter (ms after it was stored): the runner stores it
 * right after the event, and one that stopped in between stores it when the message comes
 * back to it, after the stage's ack wait.
 */
export const LETTER_WAIT_MS = 10_000;

/**
 * How long a state writer waits for a failure's letter (ms after the failure was stored)
 * before it dead-letters the failure `conflict`: {@link LETTER_WAIT_MS}, and two of the
 * stages' ack waits (`ackWaitMs`). A runner stopped between the two stores the letter when
 * the message comes back to it, an ack wait later, and one whose store of the letter failed
 * tries again after a nak; a writer that gave up after {@link LETTER_WAIT_MS} alone left a
 * genuine failure out of the item's state for good on a loaded machine.
 *
 * @example
 * ```ts
 * import { letterWindowMs } from "./failure_letter.ts";
 * console.assert(letterWindowMs(30_000) === 70_000);
 * ```
 */
export function letterWindowMs(ackWaitMs: number): number {
  return LETTER_WAIT_MS + 2 * ackWaitMs;
}

/** The first wait of a writer for a failure's letter: the runner stores it right after. */
const FIRST_LETTER_RETRY_MS = 250;

/**
 * How many times a state writer looks again for a failure's letter before it gives up: at least
 * six (`maxAttempts` when more), whatever `WEFT_MAX_ATTEMPTS` says, so that a letter a second or
 * two behind its failure is found within seconds with any setting (with two attempts, the writer
 * had one look after 250 ms, then waited the rest of the window: the item's state lagged a
 * minute behind its stream).
 */
export function letterLooks(maxAttempts: number): number {
  return Math.max(maxAttempts, 6);
}

/**
 * How long a state writer puts off (naks) a failure whose letter is not stored yet, on its
 * `delivery`th delivery, `ageMs` after the failure was stored, when it may put it off `naks`
 * times in all ({@link letterLooks}): 250 ms, then twice as long each time (the letter is
 * usually milliseconds behind, a loaded machine's a few seconds), and its last nak the rest of
 * the window, so that its last look comes {@link letterWindowMs} after the failure.
 *
 * @example
 * ```ts
 * import { letterRetryMs } from "./failure_letter.ts";
 * console.assert(letterRetryMs(0, 20_000, 1, 6) === 250);
 * console.assert(letterRetryMs(800, 20_000, 3, 6) === 1_000);
 * console.assert(letterRetryMs(8_000, 20_000, 6, 6) === 12_000); // its last nak: the rest
 * ```
 */
export function letterRetryMs(
  ageMs: number,
  windowMs: number,
  delivery: number,
  naks: number,
): number {
  const rest = windowMs - ageMs;
  if (delivery >= naks) return Math.max(FIRST_LETTER_RETRY_MS, Math.ceil(rest));
  const doubling = FIRST_LETTER_RETRY_MS * 2 ** (Math.max(1, delivery) - 1);
  return Math.max(FIRST_LETTER_RETRY_MS, Math.min(doubling, Math.ceil(rest / 2)));
}

/**
 * Where a failure's letter and the message it names are read: where a mesh stores them
 * ({@link storedLetters}), or a hub's copies of an edge site's (src/edge.ts, `siteLetters`).
 */
export interface LetterReads {
  /** The letters stored on `subject` (`deadletter.<stage>.<item>`), oldest first. */
  letters(subject: string): AsyncIterable<{ json<T>(): T }>;
  /** Whether the pipeline's stream holds a message on `subject` at its sequence `seq`. */
  holds(subject: string, seq: number): Promise<boolean>;
}

/**
 * The subjects stage `stage` (a durable's name) consumes, as its consumer's filters (wildcards
 * allowed); undefined for a stage the pipeline does not know (a step of an earlier definition),
 * whose letters are taken for any message of the stream, as before. A runner dead-letters only
 * what its stage consumed: a letter naming another subject is none of its (found by probing:
 * the topics key stored a letter of its own naming an item's ingested event, then the item's
 * failure, and the item, still at sentiment, failed). A definition's: `definedStageInputs`.
 */
export type StageInputs = (stage: string) => readonly string[] | undefined;

/**
 * The letters in DEADLETTER and the messages of `stream`, read where the mesh stores them (one
 * or two direct reads per failure).
 *
 * @example
 * ```ts ignore
 * const v = await failureVerdict(storedLetters(jsm, "ORDERS"), "orders.failed", event);
 * ```
 */
export function storedLetters(jsm: JetStreamManager, stream: string): LetterReads {
  return {
    letters: (subject) => messagesOn(jsm, DEADLETTER_STREAM, subject),
    holds: async (subject, seq) => (await storedMessage(jsm, stream, { seq }))?.subject === subject,
  };
}

/**
 * Whether `writer` (a state writer's durable name, its dead letters' stage) dead-lettered the
 * message stored at `seq` on `subject` for item `item`: a failure it refused (its letter not
 * stored within {@link letterWindowMs}) stays out of the item's state even when the letter
 * comes later, so a rebuild leaves it out too and agrees with the bucket.
 */
export async function letteredByWriter(
  reads: LetterReads,
  writer: string,
  item: string,
  subject: string,
  seq: number,
): Promise<boolean> {
  for await (const m of reads.letters(deadLetterSubject(writer, item))) {
    try {
      const letter = m.json<{ subject?: unknown; stream_seq?: unknown }>();
      if (letter.subject === subject && letter.stream_seq === seq) return true;
    } catch {
      continue;
    }
  }
  return false;
}

/** What a failure's letter says of it: vouched for, refused (with why), or not stored yet. */
export type FailureVerdict =
  | { type: "vouched" }
  | { type: "refused"; reason: string }
  | { type: "pending"; reason: string };

/**
 * The verdict on `event`, a `failedType` event of item `event.item_id`, from the letters and
 * messages `reads` reads; with `inputs`, refused when its stage does not consume the message it
 * names.
 *
 * @example
 * ```ts ignore
 * const v = await failureVerdict(storedLetters(jsm, "ORDERS"), "orders.failed", event);
 * if (v.type !== "vouched") console.log(v.reason);
 * ```
 */
export async function failureVerdict(
  reads: LetterReads,
  failedType: string,
  event: { id?: unknown; item_id: string; data?: unknown },
  inputs?: StageInputs,
): Promise<FailureVerdict> {
  const item = event.item_id;
  const data = (event.data ?? {}) as {
    stage?: unknown;
    subject?: unknown;
    dead_letter_subject?: unknown;
  };
  if (
    typeof data.stage !== "string" || typeof data.subject !== "string" ||
    data.dead_letter_subject !== deadLetterSubject(data.stage, item)
  ) {
    return {
      type: "refused",
      reason: `its data names no dead letter of a stage for item ${JSON.stringify(item)}`,
    };
  }
  // A redrive's marker (`deadletter.redriven.<seq>`, the gateway's) is no runner's letter: the
  // gateway's key may publish markers and any event of a pipeline, the failure included.
  if (data.stage === REDRIVEN_TOKEN) {
    return { type: "refused", reason: `${REDRIVEN_TOKEN} is no stage: no runner fails an item` };
  }
  const consumes = inputs?.(data.stage);
  if (consumes !== undefined && !consumes.some((f) => subjectMatches(f, data.subject as string))) {
    return {
      type: "refused",
      reason: `${data.stage} consumes no message on ${data.subject}: no runner of it fails an ` +
        `item there`,
    };
  }
  for await (const m of reads.letters(data.dead_letter_subject)) {
    let letter: { stage?: unknown; subject?: unknown; stream_seq?: unknown; item_id?: unknown };
    try {
      letter = m.json();
    } catch {
      continue;
    }
    if (
      letter.stage !== data.stage || letter.subject !== data.subject ||
      letter.item_id !== item || typeof letter.stream_seq !== "number" ||
      deterministicId(item, failedType, String(letter.stream_seq)) !== event.id
    ) continue;
    // Only a message of the pipeline's stream: a stage of another stream (a digest's) fails no
    // item, and taking its word made any item fail with a letter naming one of its subjects.
    if (await reads.holds(data.subject, letter.stream_seq)) return { type: "vouched" };
  }
  return {
    type: "pending",
    reason: `no dead letter of ${data.stage} for the message it names (${data.subject}) is ` +
      `stored on ${data.dead_letter_subject}: a runner fails an item only as it stores one`,
  };
}

/**
 * Whether a failure folds into its item's state where every letter is stored already (a
 * rebuild, a hub's view of a site's items): its runner's letter vouches for it
 * ({@link failureVerdict}) and the state writer `writer` did not dead-letter it itself
 * ({@link letteredByWriter}); `subject` and `seq` are where the failure is stored, `inputs`
 * what each stage consumes.
 *
 * @example
 * ```ts ignore
 * const folds = await failureFolds(storedLetters(jsm, "ORDERS"), "orders.failed", "state",
 *   event, m.subject, m.seq);
 * ```
 */
export async function failureFolds(
  reads: LetterReads,
  failedType: string,
  writer: string,
  event: { id?: unknown; item_id: string; data?: unknown },
  subject: string,
  seq: number,
  inputs?: StageInputs,
): Promise<boolean> {
  const verdict = await failureVerdict(reads, failedType, event, inputs);
  return verdict.type === "vouched" &&
    !await letteredByWriter(reads, writer, event.item_id, subject, seq);
}

/**
 * {@link failureVerdict}, asked again every 100 ms while it is `pending` (the letter on its way:
 * the runner stores it right after the failure), until `until` (ms since the epoch) or
 * `stopped()`: the last verdict. Errors of a read are thrown.
 *
 * @example
 * ```ts ignore
 * const reads = storedLetters(jsm, "ORDERS");
 * const v = await settledVerdict(reads, "orders.failed", event, Date.now() + 10_000);
 * ```
 */
export async function settledVerdict(
  reads: LetterReads,
  failedType: string,
  event: { id?: unknown; item_id: string; data?: unknown },
  until: number,
  stopped: () => boolean = () => false,
  inputs?: StageInputs,
): Promise<FailureVerdict> {
  for (;;) {
    const verdict = await failureVerdict(reads, failedType, event, inputs);
    if (verdict.type !== "pending" || Date.now() >= until || stopped()) return verdict;
    await new Promise((r) => setTimeout(r, 100));
  }
}
