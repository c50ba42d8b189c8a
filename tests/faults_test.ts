/**
 * Fault tests against real processes: a real nats-server with a file store, every
 * service as its own `deno run`, the real gateway. Each pushes a few thousand items,
 * injects a fault part-way, and asserts that every accepted item reaches exactly one
 * final state, appears exactly once on the final subject, and that nothing is in an
 * unexpected dead letter. Figures go to stdout as `FAULT-FIGURES {...}` lines. The same
 * faults in one process (`--together`): tests/faults_together_test.ts.
 */
import { FEEDBACK_STREAM } from "../pipelines/feedback/subjects.ts";
import { FEEDBACK_SERVICES, startServices } from "./helpers/mesh.ts";
import { waitUntil } from "./helpers/wait.ts";
import { makeItems, processedAtLeast, pushItems, report, settle } from "./helpers/scenario.ts";
import {
  FAST_REDELIVERY,
  N,
  PER_PROCESS_MODE,
  sharedFaultTests,
} from "./helpers/fault_scenarios.ts";

sharedFaultTests(PER_PROCESS_MODE);

Deno.test("one stage run as three replicas on one durable consumer, one of them killed, processes each item once in effect", async () => {
  const started = Date.now();
  const services = FEEDBACK_SERVICES.filter((n) => n !== "sentiment");
  await using mesh = await startServices({ env: FAST_REDELIVERY, services });
  for (const r of [1, 2, 3]) await mesh.start("sentiment", {}, `sentiment#${r}`);
  const items = makeItems("replicas", N);
  const pushing = pushItems(mesh.js, items);
  await processedAtLeast(mesh, N / 3);
  await mesh.kill("sentiment#2", "SIGKILL");
  await pushing;
  const figures = await settle(mesh, "3 sentiment replicas, one kill -9", items, 1, started);
  // What the killed replica had published but not acked comes back after the ack wait and is
  // acked by the others (its outputs are stored already): nothing stays owed.
  let info = await mesh.jsm.consumers.info(FEEDBACK_STREAM, "sentiment");
  await waitUntil(
    async () => {
      info = await mesh.jsm.consumers.info(FEEDBACK_STREAM, "sentiment");
      return info.num_ack_pending === 0 && info.num_pending === 0;
    },
    30_000,
    () => `${info.num_ack_pending} unacked, ${info.num_pending} pending on sentiment`,
  );
  figures.redeliveries = info.delivered.consumer_seq - N;
  report(figures);
});
