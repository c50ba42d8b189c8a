/**
 * The state of every item can be rebuilt from the event stream alone, and the rebuild
 * equals the live state the state writer keeps: processed items, failed items, items
 * redriven after failing, and poison events on the bus.
 */
import assert from "node:assert/strict";
import { FEEDBACK_STATE_SPEC } from "../pipelines/feedback/state.ts";
import { compareStates, rebuildStates, type StateDiff } from "../src/rebuild.ts";
import { redrive } from "../src/redrive.ts";
import { rebuildStateTask, SERVICES_IN_ONE_PROCESS, startServices } from "./helpers/mesh.ts";
import { countsByItem, pushItems, readStates } from "./helpers/nats.ts";
import { waitUntil } from "./helpers/wait.ts";

Deno.test("rebuilding state from the FEEDBACK stream equals the live state, and deno task rebuild-state says so", async () => {
  await using mesh = await startServices({
    ...SERVICES_IN_ONE_PROCESS,
    env: { WEFT_FAIL_ON: "crash", WEFT_FAIL_STAGE: "topics" },
  });
  const items = Array.from({ length: 300 }, (_, i) => ({
    id: `rb-${i}`,
    text: i % 10 === 0 ? `app crash number ${i}` : `great support, slow billing ${i}`,
  }));
  await pushItems(mesh.js, items);
  await mesh.js.publish(
    "feedback.ingested.rb-poison",
    JSON.stringify({ type: "feedback.ingested", version: 1, item_id: "rb-poison" }),
  );
  const finals = async () =>
    (await countsByItem(mesh.jsm, "feedback.processed.*")).size +
    (await countsByItem(mesh.jsm, "feedback.failed.*")).size;
  await waitUntil(
    async () => (await finals()) >= 301,
    30_000,
    async () => `${await finals()} final`,
  );

  // Redrive some failed items after fixing the stage: they fail first, then complete.
  await mesh.kill("topics", "SIGTERM");
  await mesh.start("topics", { WEFT_FAIL_ON: "" });
  const { redriven } = await redrive(mesh.js, { filter: { stage: "topics" } });
  assert.equal(redriven.length, 30);
  await waitUntil(
    async () => (await countsByItem(mesh.jsm, "feedback.processed.*")).size === 300,
    30_000,
  );

  let diff: StateDiff | undefined;
  await waitUntil(
    async () => {
      const { states } = await rebuildStates(mesh.js, FEEDBACK_STATE_SPEC);
      diff = compareStates(states, await readStates(mesh.js));
      return diff.different.length + diff.missingLive.length + diff.missingRebuilt.length === 0;
    },
    20_000,
    () => JSON.stringify(diff),
  );
  const live = await readStates(mesh.js);
  assert.equal([...live.values()].filter((s) => s.status === "processed").length, 300);
  assert.equal(live.get("rb-10")?.stages.failed !== undefined, true, "history keeps the failure");
  assert.equal(live.get("rb-poison")?.status, "failed", "a poison event fails its item");

  const { code, figures, output } = await rebuildStateTask({ NATS_URL: mesh.nats.url });
  assert.equal(code, 0, output);
  assert.equal(figures.different, 0);
  assert.equal(figures.missing_in_bucket, 0);
  assert.equal(figures.equal, live.size);
});

Deno.test("comparing states holding a lone UTF-16 surrogate (accepted over HTTP) does not throw", () => {
  const live = new Map([["a", { text: "x\ud800" }], ["b", { text: "y" }]]);
  const rebuilt = new Map([["a", { text: "x\ud800" }], ["b", { text: "y\udc00" }]]);
  const diff = compareStates(rebuilt, live);
  assert.equal(diff.equal, 1);
  assert.deepEqual(diff.different, ["b"]);
});
