/**
 * The fault tests both modes run, registered by the file of each mode (tests/faults_test.ts:
 * every service its own process; tests/faults_together_test.ts: all in one, `--together`), so
 * the test runner can run the two files side by side. Where a test kills or stops "a stage
 * process", in one process it kills or stops the one process.
 *
 * @module
 */
import assert from "node:assert/strict";
import { resumingClient } from "./sse.ts";
import { FEEDBACK_STREAM } from "../../pipelines/feedback/subjects.ts";
import { readStream } from "../../src/stream_reader.ts";
import { startServices } from "./mesh.ts";
import { waitUntil } from "./wait.ts";
import { makeItems, processedAtLeast, pushItems, report, settle } from "./scenario.ts";

/**
 * Items each fault test pushes: a fault lands with hundreds in flight at every step (each has
 * 256 slots). 2,000 until the suite had to fit 2 slow cores; half the items, a quarter less CPU.
 */
export const N = 1000;
/** A short ack wait, so what a killed process held comes back soon. */
export const FAST_REDELIVERY = { WEFT_ACK_WAIT_MS: "2000" };

/** A mode the fault tests run in: every service its own process, or all in one (`--together`). */
export interface FaultMode {
  /** Prefixed to each test's name. */
  name: string;
  together: boolean;
}

/** Every service its own process. */
export const PER_PROCESS_MODE: FaultMode = { name: "", together: false };
/** Every service in one process (`--together`). */
export const ONE_PROCESS_MODE: FaultMode = {
  name: "in one process (--together), ",
  together: true,
};
/** Both modes, for a test that runs in each. */
export const FAULT_MODES: readonly FaultMode[] = [PER_PROCESS_MODE, ONE_PROCESS_MODE];

/**
 * Registers the tests both modes run in `mode`: a stage (in one process, the process) and
 * nats-server killed mid-run, a slow handler, a stopped stage, and a gateway killed under SSE.
 */
export function sharedFaultTests(mode: FaultMode): void {
  Deno.test(
    mode.together
      ? "in one process (--together), the process killed with SIGKILL mid-batch and restarted loses and duplicates nothing"
      : "a stage killed with SIGKILL mid-batch and restarted loses and duplicates nothing",
    async () => {
      const started = Date.now();
      await using mesh = await startServices({ env: FAST_REDELIVERY, together: mode.together });
      const items = makeItems(mode.together ? "kill-together" : "kill-stage", N);
      const pushing = pushItems(mesh.js, items);
      await processedAtLeast(mesh, N / 4);
      // In one process, every step, the state writer and the gateway go down at once.
      await mesh.kill("sentiment", "SIGKILL");
      await mesh.start("sentiment");
      await pushing;
      const figures = await settle(
        mesh,
        mode.together
          ? "kill -9 the one process (--together) mid-batch, restart"
          : "kill -9 a stage (sentiment) mid-batch, restart",
        items,
        1,
        started,
      );
      if (!mode.together) {
        figures.redeliveries =
          (await mesh.jsm.consumers.info(FEEDBACK_STREAM, "sentiment")).delivered.consumer_seq - N;
      }
      report(figures);
    },
  );

  Deno.test(`${mode.name}nats-server killed with SIGKILL mid-run and restarted on its file store loses and duplicates nothing`, async () => {
    const started = Date.now();
    await using mesh = await startServices({ env: FAST_REDELIVERY, together: mode.together });
    const items = makeItems(mode.together ? "kill-nats-together" : "kill-nats", N);
    const pushing = pushItems(mesh.js, items);
    await processedAtLeast(mesh, N / 4);
    await mesh.nats.stop("SIGKILL");
    await mesh.nats.restart();
    await pushing;
    report(
      await settle(
        mesh,
        mode.together
          ? "kill -9 nats-server mid-run under --together, restart (file store)"
          : "kill -9 nats-server mid-run, restart (file store)",
        items,
        1,
        started,
      ),
    );
  });

  Deno.test(`${mode.name}a handler slower than the ack wait keeps its lease with in-progress acks and is not redelivered`, async () => {
    const started = Date.now();
    // The handler outlasts the ack wait; in-progress acks every ack wait / 3 (3 s) keep the
    // lease. A 9 s ack wait leaves 6 s of slack for a starved event loop on a loaded machine
    // (with 3 s, a fresh clone's suite run saw leases lapse; with 6 s, 517 of 3,000 lapsed
    // once while another test file ran beside it on the 2 cores).
    const env = { WEFT_ACK_WAIT_MS: "9000", WEFT_SLOW_MS: "10000", WEFT_SLOW_STAGE: "topics" };
    // Fewer slots than items: waiting messages must not be pulled early and expire. (In one
    // process every step has the slots.)
    const slots = { WEFT_CONCURRENCY: String(N / 2) };
    await using mesh = await startServices(
      mode.together
        ? { env: { ...env, ...slots }, together: true }
        : { env, serviceEnv: { topics: slots } },
    );
    const items = makeItems(mode.together ? "slow-together" : "slow", N);
    await pushItems(mesh.js, items);
    const figures = await settle(
      mesh,
      `handler (topics) 10 s, ack wait 9 s, ${N / 2} slots${mode.together ? ", --together" : ""}`,
      items,
      N,
      started,
    );
    const info = await mesh.jsm.consumers.info(FEEDBACK_STREAM, "topics");
    // A message comes back for one of two reasons: the stage asked for it (a retry, logged: on
    // a loaded machine a publish can outlast its 5 s timeout) or its lease lapsed mid-work. The
    // in-progress acks must leave none of the second kind.
    const retried = mesh.logs.filter((l) => l.msg === "retrying" && l.stage === "topics").length;
    const redeliveries = info.delivered.consumer_seq - N;
    assert.equal(redeliveries - retried, 0, "no lease lapsed: every redelivery was a retry");
    figures.redeliveries = redeliveries;
    figures.retried = retried;
    report(figures);
  });

  // In one process, stopping the stage stops every step (and the state writer): each step's
  // consumer builds the backlog.
  Deno.test(`${mode.name}a downstream stage stopped for a while builds a backlog that drains after restart`, async () => {
    const started = Date.now();
    await using mesh = await startServices({ together: mode.together });
    const items = makeItems(mode.together ? "backlog-together" : "backlog", N);
    await mesh.kill("dispatch", "SIGTERM");
    await pushItems(mesh.js, items);
    let backlog = 0;
    // In one process the whole mesh stops before the items come, so they wait at its first
    // consumer (ingest, which reads feedback.submit).
    const waitsAt = mode.together ? "ingest" : "dispatch";
    await waitUntil(
      async () => {
        // Not yet delivered, or delivered to a pull request of the stopped process that the
        // server still held (nats-server 2.9 may hand it messages until it notices the client
        // is gone; they come back after the ack wait): either way waiting for the restart.
        const info = await mesh.jsm.consumers.info(FEEDBACK_STREAM, waitsAt);
        backlog = info.num_pending + info.num_ack_pending;
        return backlog === N;
      },
      60_000,
      () => `${waitsAt} backlog ${backlog} of ${N}`,
    );
    await mesh.start("dispatch");
    const figures = await settle(
      mesh,
      mode.together
        ? "the one process (--together) stopped, backlog, restart"
        : "dispatch stopped, backlog, restart",
      items,
      1,
      started,
    );
    figures.max_backlog = backlog;
    report(figures);
  });

  Deno.test(`${mode.name}SSE clients of a gateway killed with SIGKILL reconnect with Last-Event-ID and miss no event`, async () => {
    const started = Date.now();
    await using mesh = await startServices({ env: FAST_REDELIVERY, together: mode.together });
    const clients = Array.from({ length: 3 }, () => resumingClient(mesh.gatewayUrl));
    try {
      const items = makeItems(mode.together ? "sse-together" : "sse", N);
      const pushing = pushItems(mesh.js, items);
      await processedAtLeast(mesh, N / 4);
      // In one process, the gateway goes down with every step and the state writer.
      await mesh.kill("gateway", "SIGKILL");
      await mesh.start("gateway");
      await pushing;
      const figures = await settle(
        mesh,
        `gateway kill -9 under 3 SSE clients${
          mode.together ? " (--together: the one process)" : ""
        }`,
        items,
        1,
        started,
      );
      const expected: number[] = [];
      for await (const m of readStream(mesh.js, FEEDBACK_STREAM, { filter: "feedback.*.*" })) {
        expected.push(m.seq);
      }
      await waitUntil(
        () => clients.every((c) => c.seqs.length >= expected.length),
        90_000, // a deadline, not a wait: on a loaded machine the clients catch up slowly
        () => `clients saw ${clients.map((c) => c.seqs.length)} of ${expected.length}`,
      );
      for (const c of clients) {
        assert.ok(c.reconnects >= 1, "the client had to reconnect");
        assert.deepEqual(c.seqs, expected, "every event once, in order");
      }
      figures.sse_events_per_client = expected.length;
      figures.sse_reconnects = clients.map((c) => c.reconnects);
      report(figures);
    } finally {
      await Promise.all(clients.map((c) => c.stop()));
    }
  });
}
