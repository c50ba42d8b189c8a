/**
 * Rebuilding every item's state from the event stream alone: the FEEDBACK stream is the
 * source of truth, the state bucket a cache of it. Reads every event with an ordered
 * consumer and folds them with the same pure fold the state writer uses (src/state.ts),
 * so the result equals the live state; {@link compareStates} proves it, and
 * `deno task rebuild-state` runs it (compare by default, `--write` to restore the bucket).
 *
 * @module
 */
import type { JetStreamClient } from "@nats-io/jetstream";
import canonicalize from "canonicalize";
import type { FeedbackState } from "./events.gen.ts";
import { assertMatchesSubject } from "./runner.ts";
import { validateEvent } from "./schemas.ts";
import { applyEvent } from "../pipelines/feedback/state.ts";
import { FEEDBACK_STREAM, FeedbackEventType } from "./subjects.ts";
import { readStream } from "./stream_reader.ts";

const EVENT_TYPES = Object.values(FeedbackEventType);

/** What a rebuild read. */
export interface Rebuilt {
  /** Every item's state, by item id. */
  states: Map<string, FeedbackState>;
  /** Events folded. */
  events: number;
  /** Messages skipped as invalid (they are dead-lettered, never folded, live either). */
  skipped: number;
}

/**
 * Folds every event in the FEEDBACK stream into per-item states.
 *
 * @example
 * ```ts ignore
 * import { rebuildStates } from "./rebuild.ts";
 * const { states } = await rebuildStates(jetstream(nc));
 * ```
 */
export async function rebuildStates(js: JetStreamClient): Promise<Rebuilt> {
  const states = new Map<string, FeedbackState>();
  let events = 0;
  let skipped = 0;
  for await (const m of readStream(js, FEEDBACK_STREAM, { filter: "feedback.*.*" })) {
    let event;
    try {
      event = validateEvent(m.json(), EVENT_TYPES);
      assertMatchesSubject(event, m.subject); // as the state writer does
    } catch {
      skipped++;
      continue;
    }
    events++;
    states.set(event.item_id, applyEvent(states.get(event.item_id), event, m.seq));
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
export function compareStates(
  rebuilt: Map<string, FeedbackState>,
  live: Map<string, FeedbackState>,
): StateDiff {
  const diff: StateDiff = { equal: 0, different: [], missingLive: [], missingRebuilt: [] };
  for (const [id, s] of rebuilt) {
    const l = live.get(id);
    if (!l) diff.missingLive.push(id);
    else if (canonicalize(l) === canonicalize(s)) diff.equal++;
    else diff.different.push(id);
  }
  for (const id of live.keys()) if (!rebuilt.has(id)) diff.missingRebuilt.push(id);
  return diff;
}
