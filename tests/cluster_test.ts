/**
 * `deno task start --cluster 3`: a 3-node nats-server cluster on loopback, every stream and
 * bucket at R3, the services connected to all three nodes. Under load, the FEEDBACK
 * stream's leader is killed with SIGKILL: a new leader takes over, the supervisor restarts
 * the node, and every accepted item reaches its final state exactly once.
 */
import assert from "node:assert/strict";
import { jetstream, type JetStreamManager, jetstreamManager } from "@nats-io/jetstream";
import { readStream } from "../src/stream_reader.ts";
import { resumingClient } from "./helpers/sse.ts";
import { clusterPidFile } from "../src/supervisor.ts";
import { ONE_PROCESS, startMesh } from "./helpers/mesh.ts";
import { waitFor, waitUntil } from "./helpers/wait.ts";
import { connectClient } from "./helpers/nats.ts";

/**
 * Waits until every accepted item has a processed event; their counts per subject. When the
 * deadline passes, the failure says which items were stuck and where (`stuckReport`).
 */
async function processedCounts(
  jsm: JetStreamManager,
  accepted: ReadonlySet<string>,
  where: (missing: string[]) => Promise<string>,
): Promise<Record<string, number>> {
  let subjects: Record<string, number> = {};
  await waitUntil(
    async () => {
      const info = await jsm.streams.info("FEEDBACK", { subjects_filter: "feedback.processed.*" });
      subjects = info.state.subjects ?? {};
      return [...accepted].every((id) => subjects[`feedback.processed.${id}`]);
    },
    120_000,
    () => where([...accepted].filter((id) => !subjects[`feedback.processed.${id}`])),
  );
  return subjects;
}

/**
 * Where each of `missing` (at most 10 shown) stands: its events in FEEDBACK (type: count),
 * its state as the gateway reads it, its dead letters, and the log lines naming it; then the
 * FEEDBACK consumers' counters (as each one's leader has them) and the mesh's last warnings
 * and errors.
 */
async function stuckReport(
  jsm: JetStreamManager,
  gatewayUrl: string,
  monitoring: string,
  logs: readonly Record<string, unknown>[],
  missing: string[],
): Promise<string> {
  const lines = [`${missing.length} accepted items not processed: ${missing.join(", ")}`];
  // Each part best-effort: what cannot be read is said, and the rest still reported.
  const subjectsOf = (stream: string, filter: string) =>
    jsm.streams.info(stream, { subjects_filter: filter }).then((i) => i.state.subjects ?? {})
      .catch((e) => (lines.push(`${stream}: not read (${e})`), {} as Record<string, number>));
  const events = await subjectsOf("FEEDBACK", "feedback.*.*");
  const letters = await subjectsOf("DEADLETTER", "deadletter.*.*");
  for (const id of missing.slice(0, 10)) {
    const own = (subjects: Record<string, number>) =>
      Object.entries(subjects).filter(([s]) => s.endsWith(`.${id}`)).map(([s, n]) => `${s}:${n}`);
    const state = await fetch(`${gatewayUrl}/feedback/${id}`)
      .then(async (r) => `${r.status} ${await r.text()}`)
      .catch((e) => String(e));
    const said = logs.filter((l) => JSON.stringify(l).includes(`"${id}"`))
      .map((l) => JSON.stringify(l));
    lines.push(
      `${id}: events [${own(events).join(", ")}]; dead letters [${own(letters).join(", ")}]; ` +
        `state ${state.slice(0, 300)}; logs (${said.length}): ${said.slice(-5).join(" | ")}`,
    );
  }
  // The steps' consumers: their names from nats-server's monitoring (the ops key may not list
  // them), their counters from each one's leader (consumer info), as a follower may trail.
  const jsz = await fetch(`${monitoring}/jsz?consumers=true`).then((r) => r.json())
    .catch((e) => ({ error: String(e) })) as {
      account_details?: {
        stream_detail?: { name: string; consumer_detail?: { name: string }[] }[];
      }[];
      error?: string;
    };
  if (jsz.error) lines.push(`consumers: ${jsz.error}`);
  const names = (jsz.account_details ?? []).flatMap((a) => a.stream_detail ?? [])
    .filter((st) => st.name === "FEEDBACK").flatMap((st) => st.consumer_detail ?? [])
    .map((c) => c.name);
  for (const name of names) {
    const c = await jsm.consumers.info("FEEDBACK", name).catch((e) => String(e));
    lines.push(
      typeof c === "string"
        ? `consumer ${name}: ${c}`
        : `consumer ${name}: pending ${c.num_pending}, ack pending ${c.num_ack_pending}, ` +
          `redelivered ${c.num_redelivered}, waiting ${c.num_waiting}, delivered ` +
          `${c.delivered.stream_seq}, ack floor ${c.ack_floor.stream_seq}, leader ` +
          `${c.cluster?.leader}`,
    );
  }
  const warned = logs.filter((l) => l.level === "warn" || l.level === "error");
  lines.push(`last warnings/errors (${warned.length}):`);
  for (const l of warned.slice(-15)) lines.push(JSON.stringify(l).slice(0, 600));
  return lines.join("\n");
}

/**
 * How close the failover came to failing an item: messages retried, the highest attempt a
 * step reached (a step gives up after WEFT_MAX_ATTEMPTS, 5), and dead letters stored.
 */
function retryFigures(logs: readonly Record<string, unknown>[]) {
  const retries = logs.filter((l) => l.msg === "retrying");
  return {
    retries: retries.length,
    max_attempt: Math.max(0, ...retries.map((l) => Number(l.attempt) || 0)),
    dead_letters: logs.filter((l) => l.msg === "dead-lettered").length,
  };
}

/** Prints a test's figures as one `CLUSTER-FIGURES {...}` line. */
function printFigures(figures: Record<string, unknown>): void {
  Deno.stdout.writeSync(new TextEncoder().encode(`CLUSTER-FIGURES ${JSON.stringify(figures)}\n`));
}

/** Offered load, items/s: low in the suite (other files share the cores), more alone. */
const OFFERED = Number(Deno.env.get("WEFT_TEST_CLUSTER_RATE") ?? 0);
const RATE = OFFERED || 25;
const ROLLING_RATE = OFFERED || 20;

Deno.test("a 3-node cluster at R3 loses nothing when the FEEDBACK leader is killed under load", async () => {
  // What fails here is a node: the services run in one process (the next test kills replicas).
  await using mesh = await startMesh({
    ...ONE_PROCESS,
    WEFT_CLUSTER: "3",
    WEFT_ACK_WAIT_MS: "3000",
  });
  await mesh.waitForLog((l) => l.msg === "weft is ready", 90_000, "the cluster mesh ready");
  const ready = mesh.logs.find((l) => l.msg === "weft is ready")!;
  assert.equal(String(ready.nats).split(",").length, 3, "services get all three nodes");
  const nc = await connectClient(String(ready.nats), "test-ops", mesh.credentials("ops"));
  try {
    const jsm = await jetstreamManager(nc);
    for (const stream of ["FEEDBACK", "CONTENT", "DEADLETTER", "KV_weft_feedback_state"]) {
      const info = await jsm.streams.info(stream);
      assert.equal(info.config.num_replicas, 3, stream);
      assert.equal(info.cluster?.replicas?.length, 2, `${stream}: a leader and two replicas`);
    }

    // An SSE client of GET /events through the failover, resuming with Last-Event-ID.
    // Stopped however the test ends: left running, its reconnect timer leaks into the next.
    await using sse = resumingClient(mesh.gatewayUrl);

    // Load: 25 items/s for 12 s (other test files share the 2 cores; WEFT_TEST_CLUSTER_RATE
    // offers more when the test runs alone); a client retries a 503 after its Retry-After.
    const accepted = new Set<string>();
    const posts: { at: number; ms: number; status: number }[] = [];
    const submit = async (n: number) => {
      for (let attempt = 0; attempt < 50; attempt++) {
        const at = performance.now();
        const res = await fetch(`${mesh.gatewayUrl}/feedback`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ id: `C${n}`, text: `cluster item ${n}, the app is great` }),
        });
        posts.push({ at, ms: performance.now() - at, status: res.status });
        await res.body?.cancel();
        if (res.status === 202) return void accepted.add(`C${n}`);
        assert.equal(res.status, 503, "a failover is answered 503, never lost or 500");
        await new Promise((r) => setTimeout(r, 200));
      }
    };
    const start = performance.now();
    let killedAt = 0;
    const killing = new AbortController();
    const killer = (async () => {
      await new Promise((r, reject) => {
        const t = setTimeout(r, 3000);
        killing.signal.addEventListener("abort", () => {
          clearTimeout(t);
          reject(killing.signal.reason);
        });
      });
      const leader = (await jsm.streams.info("FEEDBACK")).cluster!.leader!;
      const index = Number(leader.replace("weft-", "")) - 1;
      const pid = Number(await Deno.readTextFile(`${mesh.storeDir}/${clusterPidFile(index)}`));
      killedAt = performance.now();
      Deno.kill(pid, "SIGKILL");
      return leader;
    })();
    const inFlight: Promise<void>[] = [];
    for (let n = 0; n < RATE * 12; n++) {
      const due = start + n * 1000 / RATE;
      const wait = due - performance.now();
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
      inFlight.push(submit(n));
    }
    try {
      await Promise.all(inFlight);
    } catch (err) {
      // A refused POST fails the test: no kill timer is left behind for the next test.
      killing.abort(err);
      await killer.catch(() => {});
      throw err;
    }
    const killed = await killer;
    await mesh.waitForLog(
      (l) => l.msg === "nats-server node back" && l.node === killed,
      30_000,
      "the killed node restarted",
    );
    // (Its leadership may come back to it: any leader will do.)
    assert.ok((await jsm.streams.info("FEEDBACK")).cluster!.leader);

    // Every accepted item is processed exactly once.
    const counts = await processedCounts(
      jsm,
      accepted,
      (missing) =>
        stuckReport(jsm, mesh.gatewayUrl, String(ready.nats_monitoring), mesh.logs, missing),
    );
    const twice = Object.entries(counts).filter(([, n]) => n !== 1);
    // The SSE client saw every event the stream holds, once each, in order.
    const expected: number[] = [];
    for await (const m of readStream(jetstream(nc), "FEEDBACK", { filter: "feedback.*.*" })) {
      expected.push(m.seq);
    }
    try {
      await waitFor(
        () => sse.seqs.length >= expected.length || undefined,
        90_000,
        `the SSE client saw ${sse.seqs.length} of ${expected.length} events`,
      );
      assert.deepEqual(sse.seqs.slice(0, expected.length), expected, "no event missed or twice");
    } finally {
      await sse.stop();
    }
    assert.deepEqual(twice, [], "no item has two final events");
    assert.equal(accepted.size, RATE * 12, "every item accepted in the end (after retries)");

    // Figures: how long POSTs failed, and the latency around the failover.
    const after = posts.filter((p) => p.at >= killedAt);
    const failed = after.filter((p) => p.status !== 202);
    const recovery = failed.length === 0
      ? 0
      : Math.max(...failed.map((p) => p.at + p.ms)) - killedAt;
    const window = after.filter((p) => p.at < killedAt + 10_000).map((p) => p.ms)
      .sort((a, b) => a - b);
    const p99 = window[Math.floor(window.length * 0.99)] ?? 0;
    printFigures({
      test: `kill -9 the FEEDBACK leader under ${RATE} items/s`,
      accepted: accepted.size,
      answered_503: posts.filter((p) => p.status === 503).length,
      recovery_ms: Math.round(recovery),
      post_p99_ms_failover: Math.round(p99),
      duplicates: twice.length,
      sse_reconnects: sse.reconnects,
      ...retryFigures(mesh.logs),
    });
  } finally {
    await nc.close();
  }
});

Deno.test("a 3-node cluster loses nothing when the meta leader is killed, step replicas are killed, and in a rolling restart of every node", async () => {
  await using mesh = await startMesh({
    WEFT_CLUSTER: "3",
    WEFT_ACK_WAIT_MS: "3000",
    WEFT_REPLICAS: "sentiment=2,topics=2,dispatch=2",
  });
  await mesh.waitForLog((l) => l.msg === "weft is ready", 90_000, "the cluster mesh ready");
  const ready = mesh.logs.find((l) => l.msg === "weft is ready")!;
  const nc = await connectClient(String(ready.nats), "test-ops", mesh.credentials("ops"));
  // The load runs until told to stop, and is stopped however the test ends (left running, its
  // POSTs and timers would leak into the next test).
  let stop = false;
  let load: Promise<void> | undefined;
  try {
    const jsm = await jetstreamManager(nc);
    const pidOf = async (node: string) =>
      Number(
        await Deno.readTextFile(
          `${mesh.storeDir}/${clusterPidFile(Number(node.replace("weft-", "")) - 1)}`,
        ),
      );
    /** Waits until every replica of FEEDBACK is current again: the cluster has healed. */
    const healed = () =>
      waitFor(
        async () => {
          const c = (await jsm.streams.info("FEEDBACK")).cluster;
          return c?.leader && c.replicas?.length === 2 && c.replicas.every((r) => r.current) ||
            undefined;
        },
        60_000,
        "FEEDBACK's replicas current",
      );

    // Load through all three faults: 20 items/s (or WEFT_TEST_CLUSTER_RATE); a 503 is retried
    // after its Retry-After.
    const accepted = new Set<string>();
    const posts: { at: number; ms: number; status: number }[] = [];
    load = (async () => {
      const inFlight: Promise<void>[] = [];
      for (let n = 0; !stop; n++) {
        inFlight.push((async () => {
          for (let attempt = 0; attempt < 100; attempt++) {
            const at = performance.now();
            let status = 0; // 0: the gateway refused the connection
            try {
              const res = await fetch(`${mesh.gatewayUrl}/feedback`, {
                method: "POST",
                headers: { "content-type": "application/json" },
                body: JSON.stringify({ id: `R${n}`, text: `rolling item ${n}, checkout broken` }),
              });
              status = res.status;
              await res.body?.cancel();
            } catch { /* counted below */ }
            posts.push({ at, ms: performance.now() - at, status });
            if (status === 202) return void accepted.add(`R${n}`);
            await new Promise((r) => setTimeout(r, 200));
          }
        })());
        await new Promise((r) => setTimeout(r, 1000 / ROLLING_RATE));
      }
      await Promise.all(inFlight);
    })();
    const figures = (from: number, to: number) => {
      const during = posts.filter((p) => p.at >= from && p.at < to);
      const failed = during.filter((p) => p.status !== 202);
      const ms = during.map((p) => p.ms).sort((a, b) => a - b);
      return {
        answered_503: failed.length,
        failing_ms: failed.length
          ? Math.round(Math.max(...failed.map((p) => p.at + p.ms)) - from)
          : 0,
        post_p99_ms: Math.round(ms[Math.floor(ms.length * 0.99)] ?? 0),
      };
    };

    await new Promise((r) => setTimeout(r, 2000));
    // 1. SIGKILL the JetStream meta leader (it is restarted by the supervisor).
    const jsz = await (await fetch(`${ready.nats_monitoring}/jsz`)).json();
    const meta = jsz.meta_cluster.leader as string;
    const killedAt = performance.now();
    Deno.kill(await pidOf(meta), "SIGKILL");
    await mesh.waitForLog(
      (l) => l.msg === "nats-server node back" && l.node === meta,
      30_000,
      "the meta leader's node back",
    );
    await healed();
    const metaFigures = figures(killedAt, performance.now());

    // 2. One replica of each step SIGKILLed: the other goes on; the supervisor restarts it.
    // This mesh's processes only: other test files run meshes of their own meanwhile.
    const replicas = async (step: string) => {
      const ps = await new Deno.Command("ps", { args: ["-eo", "pid,ppid,args"], stdout: "piped" })
        .output();
      return new TextDecoder().decode(ps.stdout).split("\n")
        .map((l) => l.trim().split(/\s+/))
        .filter((f) => Number(f[1]) === mesh.child.pid)
        .filter((f) => f.some((a) => a.endsWith(`/services/${step}.ts`)))
        .map((f) => Number(f[0]));
    };
    for (const step of ["sentiment", "topics", "dispatch"]) {
      // (A replica the faults above stopped may still be on its way back: wait for both.)
      const pids = await waitFor(
        async () => (await replicas(step)).length === 2 ? await replicas(step) : undefined,
        30_000,
        `two replicas of ${step}`,
      );
      const exits = mesh.logs.filter((l) =>
        l.msg === "service exited; restarting" && String(l.child).startsWith(`${step}#`)
      ).length;
      Deno.kill(pids[0]!, "SIGKILL");
      await waitFor(
        () =>
          mesh.logs.filter((l) =>
            l.msg === "service exited; restarting" && String(l.child).startsWith(`${step}#`)
          ).length > exits,
        10_000,
        `${step}'s killed replica restarted`,
      );
    }

    // 3. A rolling restart: each node stopped (SIGTERM) and started again, one at a time.
    const rollAt = performance.now();
    for (const node of ["weft-1", "weft-2", "weft-3"]) {
      const backs = mesh.logs.filter((l) =>
        l.msg === "nats-server node back" && l.node === node
      ).length;
      Deno.kill(await pidOf(node), "SIGTERM");
      await waitFor(
        () =>
          mesh.logs.filter((l) => l.msg === "nats-server node back" && l.node === node).length >
            backs,
        30_000,
        `${node} back`,
      );
      await healed();
    }
    const rollFigures = figures(rollAt, performance.now());
    await new Promise((r) => setTimeout(r, 1000));
    stop = true;
    await load;

    // A failover is answered 503: never a 500, and the gateway never stops listening.
    const restarts = mesh.logs.filter((l) => l.msg === "service exited; restarting")
      .map((l) => String(l.child));
    const odd = posts.filter((p) => p.status !== 202 && p.status !== 503);
    assert.deepEqual(
      odd.map((p) => p.status),
      [],
      `answers other than 202/503 (0: refused); restarted: ${restarts.join(", ")}; gateway log: ${
        JSON.stringify(
          mesh.logs.filter((l) => l.service === "weft-gateway" && l.level !== "info").slice(-5),
        )
      }`,
    );

    const counts = await processedCounts(
      jsm,
      accepted,
      (missing) =>
        stuckReport(jsm, mesh.gatewayUrl, String(ready.nats_monitoring), mesh.logs, missing),
    );
    assert.deepEqual(Object.entries(counts).filter(([, n]) => n !== 1), [], "no item twice");
    printFigures({
      test:
        `meta leader SIGKILL, a replica of each step SIGKILLed, a rolling restart; ${ROLLING_RATE} items/s`,
      accepted: accepted.size,
      meta_leader: meta,
      meta_kill: metaFigures,
      rolling_restart: rollFigures,
      duplicates: 0,
    });
  } finally {
    stop = true;
    await load?.catch(() => {});
    await nc.close();
  }
});
