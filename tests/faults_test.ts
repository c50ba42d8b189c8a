/**
 * Fault tests against real processes: a real nats-server with a file store, every
 * service as its own `deno run`, the real gateway. Each pushes a few thousand items,
 * injects a fault part-way, and asserts that every accepted item reaches exactly one
 * final state, appears exactly once on the final subject, and that nothing is in an
 * unexpected dead letter. Figures go to stdout as `FAULT-FIGURES {...}` lines.
 */
import assert from "node:assert/strict";
import { FEEDBACK_STREAM } from "../src/subjects.ts";
import { startMesh } from "./helpers/mesh.ts";
import { makeItems, processedAtLeast, pushItems, settle } from "./helpers/scenario.ts";

const N = 2000;
const FAST_REDELIVERY = { WEFT_ACK_WAIT_MS: "2000" };

Deno.test("a stage killed with SIGKILL mid-batch and restarted loses and duplicates nothing", async () => {
  const started = Date.now();
  await using mesh = await startMesh({ env: FAST_REDELIVERY });
  const items = makeItems("kill-stage", N);
  const pushing = pushItems(mesh.js, items);
  await processedAtLeast(mesh, N / 4);
  await mesh.kill("sentiment", "SIGKILL");
  await mesh.start("sentiment");
  await pushing;
  await settle(mesh, "kill -9 a stage (sentiment) mid-batch, restart", items, 1, started);
});

Deno.test("nats-server killed with SIGKILL mid-run and restarted on its file store loses and duplicates nothing", async () => {
  const started = Date.now();
  await using mesh = await startMesh({ env: FAST_REDELIVERY });
  const items = makeItems("kill-nats", N);
  const pushing = pushItems(mesh.js, items);
  await processedAtLeast(mesh, N / 4);
  await mesh.nats.stop("SIGKILL");
  await mesh.nats.restart();
  await pushing;
  await settle(mesh, "kill -9 nats-server mid-run, restart (file store)", items, 1, started);
});

Deno.test("a handler slower than the ack wait keeps its lease with in-progress acks and is not redelivered", async () => {
  const started = Date.now();
  await using mesh = await startMesh({
    env: { WEFT_ACK_WAIT_MS: "1000", WEFT_SLOW_MS: "2500", WEFT_SLOW_STAGE: "topics" },
    serviceEnv: { topics: { WEFT_CONCURRENCY: String(N) } },
  });
  const items = makeItems("slow", N);
  await pushItems(mesh.js, items);
  const figures = await settle(
    mesh,
    "handler (topics) 2.5 s, ack wait 1 s",
    items,
    N,
    started,
  );
  const info = await mesh.jsm.consumers.info(FEEDBACK_STREAM, "topics");
  assert.equal(info.num_redelivered, 0, "no message was redelivered mid-work");
  assert.equal(info.delivered.consumer_seq, N, "each message delivered once");
  figures.redelivered = info.num_redelivered;
});

Deno.test("a downstream stage stopped for a while builds a backlog that drains after restart", async () => {
  const started = Date.now();
  await using mesh = await startMesh();
  const items = makeItems("backlog", N);
  await mesh.kill("dispatch", "SIGTERM");
  await pushItems(mesh.js, items);
  let backlog = 0;
  const { waitFor } = await import("./helpers/mesh.ts");
  await waitFor(
    async () => {
      backlog = (await mesh.jsm.consumers.info(FEEDBACK_STREAM, "dispatch")).num_pending;
      return backlog === N;
    },
    60_000,
    () => `dispatch backlog ${backlog} of ${N}`,
  );
  await mesh.start("dispatch");
  const figures = await settle(mesh, "dispatch stopped, backlog, restart", items, 1, started);
  figures.max_backlog = backlog;
});
