/**
 * The fault tests of tests/faults_test.ts with every service in one process
 * (`deno task start --together`): where a test kills or stops "a stage process", it kills or
 * stops the one process (every step, the state writer and the gateway at once).
 */
import { FEEDBACK_STREAM } from "../pipelines/feedback/subjects.ts";
import { FEEDBACK_SERVICES, startServices } from "./helpers/mesh.ts";
import { waitUntil } from "./helpers/wait.ts";
import { makeItems, processedAtLeast, pushItems, report, settle } from "./helpers/scenario.ts";
import {
  FAST_REDELIVERY,
  N,
  ONE_PROCESS_MODE,
  sharedFaultTests,
} from "./helpers/fault_scenarios.ts";

sharedFaultTests(ONE_PROCESS_MODE);

Deno.test("in one process (--together), three replicas of the one process on the same durable consumers, one of them killed, process each item once in effect", async () => {
  const started = Date.now();
  // Three processes of every step and the state writer (no gateway: it has one port).
  const services = FEEDBACK_SERVICES.filter((n) => n !== "gateway");
  await using mesh = await startServices({ env: FAST_REDELIVERY, services, together: true });
  for (const r of [2, 3]) await mesh.start("sentiment", {}, `together#${r}`);
  const items = makeItems("replicas-together", N);
  const pushing = pushItems(mesh.js, items);
  await processedAtLeast(mesh, N / 3);
  await mesh.kill("together#2", "SIGKILL");
  await pushing;
  const figures = await settle(
    mesh,
    "3 replicas of the one process (--together), one kill -9",
    items,
    1,
    started,
  );
  // What the killed process had published but not acked comes back after the ack wait and is
  // acked by the others: nothing stays owed on any step's consumer.
  for (const durable of ["ingest", "sentiment", "topics", "dispatch", "state"]) {
    let info = await mesh.jsm.consumers.info(FEEDBACK_STREAM, durable);
    await waitUntil(
      async () => {
        info = await mesh.jsm.consumers.info(FEEDBACK_STREAM, durable);
        return info.num_ack_pending === 0 && info.num_pending === 0;
      },
      30_000,
      () => `${info.num_ack_pending} unacked, ${info.num_pending} pending on ${durable}`,
    );
  }
  figures.replicas = 3;
  report(figures);
});
