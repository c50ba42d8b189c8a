/**
 * The shape every fault test shares: push items through a real mesh, inject a fault
 * part-way, then check that every accepted item reached exactly one final state, appears
 * exactly once on the final subject, and that nothing was dead-lettered.
 *
 * @module
 */
import assert from "node:assert/strict";
import { DEADLETTER_STREAM } from "../../src/subjects.ts";
import type { ServiceMesh } from "./mesh.ts";
import { countsByItem, pushItems, readStates } from "./nats.ts";
import { waitUntil } from "./wait.ts";

/** What a fault test reports. */
export interface FaultFigures {
  test: string;
  pushed: number;
  faults: number;
  lost: number;
  duplicates: number;
  wall_ms: number;
  [extra: string]: unknown;
}

/** Items with unique ids for one test. */
export function makeItems(prefix: string, n: number): { id: string; text: string }[] {
  return Array.from({ length: n }, (_, i) => ({
    id: `${prefix}-${i}`,
    text: i % 3 === 0 ? `love the new dashboard ${i}` : `billing page is slow and broken ${i}`,
  }));
}

/** Resolves once at least `n` items have their processed event. */
export function processedAtLeast(mesh: ServiceMesh, n: number, deadlineMs = 60_000): Promise<void> {
  return waitUntil(
    async () => (await countsByItem(mesh.jsm, "feedback.processed.*")).size >= n,
    deadlineMs,
  );
}

/**
 * Waits (up to `deadlineMs`) for every item to be final, then asserts exactly-once and
 * returns the figures.
 */
export async function settle(
  mesh: ServiceMesh,
  test: string,
  items: { id: string }[],
  faults: number,
  started: number,
  deadlineMs = 90_000,
): Promise<FaultFigures> {
  const ids = new Set(items.map((i) => i.id));
  await waitUntil(
    async () => {
      const done = await countsByItem(mesh.jsm, "feedback.processed.*");
      return [...ids].every((id) => done.has(id));
    },
    deadlineMs,
    async () =>
      `${(await countsByItem(mesh.jsm, "feedback.processed.*")).size} of ${ids.size} processed`,
    // Each look lists every item's subject (thousands): at most twice a second once it has
    // waited a while, so the looking does not compete with the mesh for the cores.
    500,
  );
  // Every item's state reaches the bucket too.
  await waitUntil(
    async () => {
      const states = await readStates(mesh.js, 5_000);
      return [...ids].every((id) => states.get(id)?.status === "processed");
    },
    30_000,
    () => "states not all processed",
    500,
  );

  const processed = await countsByItem(mesh.jsm, "feedback.processed.*");
  const failed = await countsByItem(mesh.jsm, "feedback.failed.*");
  let duplicates = 0;
  for (const type of ["ingested", "sentiment_analyzed", "topics_extracted", "dispatched"]) {
    for (const n of (await countsByItem(mesh.jsm, `feedback.${type}.*`)).values()) {
      duplicates += n - 1;
    }
  }
  for (const n of processed.values()) duplicates += n - 1;
  const lost = [...ids].filter((id) => processed.get(id) !== 1).length;
  const dead = (await mesh.jsm.streams.info(DEADLETTER_STREAM)).state.messages;
  const states = await readStates(mesh.js);

  assert.equal(lost, 0, "every accepted item processed exactly once");
  assert.equal(failed.size, 0, "no item failed");
  assert.equal(duplicates, 0, "no event appears twice");
  assert.equal(dead, 0, "no unexpected dead letters");
  assert.equal(states.size, ids.size, "one state per item");
  assert.deepEqual(mesh.crashed(), [], "no service crashed on its own");

  const figures: FaultFigures = {
    test,
    pushed: ids.size,
    faults,
    lost,
    duplicates,
    dead_letters: dead,
    wall_ms: Date.now() - started,
  };
  return figures;
}

/** Prints a test's figures as one `FAULT-FIGURES {...}` line. */
export function report(figures: FaultFigures): void {
  Deno.stdout.writeSync(new TextEncoder().encode(`FAULT-FIGURES ${JSON.stringify(figures)}\n`));
}

export { pushItems };
