/**
 * Rebuilding every item's state from the event stream alone: a pipeline's stream is the
 * source of truth, its state bucket a cache of it. Reads every event with an ordered
 * consumer and folds them as the pipeline's state writer does, with the same spec (its
 * decoding and pure fold), so the result equals the live state; {@link compareStates}
 * proves it, and `deno task rebuild-state [--pipeline NAME]` runs it (compare by default,
 * `--write` to restore the bucket).
 *
 * @module
 */
import type { JetStreamClient } from "@nats-io/jetstream";
import { canonicalJson } from "./canonical_json.ts";
import { decodeStateEvent, startsNoItem, type StateSpec } from "./state_writer.ts";
import { readStream } from "./stream_reader.ts";
import { failureFolds, storedLetters } from "./failure_letter.ts";
import { DEADLETTER_STREAM } from "./subjects.ts";

/** What a rebuild read. */
export interface Rebuilt<S> {
  /** Every item's state, by item id. */
  states: Map<string, S>;
  /** Events folded. */
  events: number;
  /**
   * Messages skipped as invalid, as the first of an item that never entered, or as an event
   * the item's history does not lead to (they are dead-lettered, never folded, live either).
   */
  skipped: number;
}

/**
 * Folds every event of `spec`'s stream (its filter) into per-item states, as its state
 * writer does: the same checks (a message the writer would dead-letter is skipped) and fold.
 *
 * @example
 * ```ts ignore
 * import { rebuildStates } from "./rebuild.ts";
 * import { loadPipelines, pipelineStateSpec } from "./pipeline/runtime.ts";
 * const [orders] = await loadPipelines(["pipelines/orders/pipeline.ts"]);
 * const { states } = await rebuildStates(jetstream(nc), pipelineStateSpec(orders!));
 * ```
 */
export async function rebuildStates<S>(
  js: JetStreamClient,
  spec: StateSpec<S>,
): Promise<Rebuilt<S>> {
  const states = new Map<string, S>();
  let events = 0;
  let skipped = 0;
  // Whether the stream still holds everything ever stored in it (nothing expired or removed).
  const jsm = await js.jetstreamManager(false);
  const whole = (await jsm.streams.info(spec.stream)).state.first_seq <= 1;
  // Failures fold only with their runner's dead letter (failure_letter.ts), as the writer
  // folds them: judged while DEADLETTER still holds every letter ever stored in it.
  const letters = spec.failedType !== undefined &&
    await jsm.streams.info(DEADLETTER_STREAM).then((i) => i.state.first_seq <= 1, () => false);
  const reads = storedLetters(jsm, spec.stream);
  // Items with a message on their entry subject (valid or not): they entered.
  const entered = new Set<string>();
  for await (const m of readStream(js, spec.stream, { filter: spec.filter })) {
    const item = m.subject.slice(m.subject.lastIndexOf(".") + 1);
    if (spec.entrySubject?.(item) === m.subject) entered.add(item);
    let event;
    try {
      event = decodeStateEvent(spec, m.data, m.subject, m.time.getTime(), m.headers);
    } catch {
      skipped++;
      continue;
    }
    const state = states.get(event.item_id);
    // An item starts at its entry event: the writer dead-letters another first event of an id
    // with nothing on its entry subject before it (one that never entered), folding nothing.
    // Unless the stream no longer holds its head: there an item's entry may have expired, and
    // its later events still fold.
    if (
      state === undefined && startsNoItem(spec, event) && whole && !entered.has(event.item_id)
    ) {
      skipped++;
      continue;
    }
    // Nor a failure no runner's letter is stored for (the writer dead-letters it, `conflict`),
    // nor one the writer dead-letters itself (its letter came too late: the writer's
    // refusal stands, and the bucket and a rebuild agree).
    if (
      letters && event.type === spec.failedType &&
      !await failureFolds(
        reads,
        spec.failedType,
        spec.durable,
        event,
        m.subject,
        m.seq,
        spec.stageInputs,
      )
    ) {
      skipped++;
      continue;
    }
    // Nor an event the item's history does not lead to (the writer dead-letters it, `conflict`).
    if (state !== undefined && spec.refuses?.(state, event, m.seq) !== undefined) {
      skipped++;
      continue;
    }
    events++;
    const next = spec.apply(state, event, m.seq);
    if (next !== undefined) states.set(event.item_id, next);
  }
  return { states, events, skipped };
}

/** How two sets of states differ. */
export interface StateDiff {
  /** Items in both with equal states. */
  equal: number;
  /** Ids whose states differ. */
  different: string[];
  /** Ids only in `rebuilt`. */
  missingLive: string[];
  /** Ids only in `live`. */
  missingRebuilt: string[];
}

/**
 * Compares rebuilt states with live ones, key order ignored.
 *
 * @example
 * ```ts
 * import { compareStates } from "./rebuild.ts";
 * const d = compareStates(new Map(), new Map());
 * console.assert(d.equal === 0 && d.different.length === 0);
 * ```
 */
export function compareStates<S>(rebuilt: Map<string, S>, live: Map<string, S>): StateDiff {
  const diff: StateDiff = { equal: 0, different: [], missingLive: [], missingRebuilt: [] };
  for (const [id, s] of rebuilt) {
    const l = live.get(id);
    if (!l) diff.missingLive.push(id);
    else if (canonicalJson(l) === canonicalJson(s)) diff.equal++;
    else diff.different.push(id);
  }
  for (const id of live.keys()) if (!rebuilt.has(id)) diff.missingRebuilt.push(id);
  return diff;
}
