/**
 * A supervisor killed outright (SIGKILL, as an OOM kill does) leaves nothing running that
 * blocks the next start: its services notice and stop, and the next `deno task start`
 * stops the nats-server it left, through that server's own pid file, and runs.
 */
import assert from "node:assert/strict";
import { freePort } from "../src/nats_server.ts";
import { freePortRun, meshTempDir, ONE_PROCESS, startMesh, taskArgs } from "./helpers/mesh.ts";
import { deadline, waitFor } from "./helpers/wait.ts";

async function childrenOf(pid: number): Promise<{ pid: number; args: string }[]> {
  const out = await new Deno.Command("ps", { args: ["-o", "pid=,args=", "--ppid", String(pid)] })
    .output();
  return new TextDecoder().decode(out.stdout).split("\n").map((l) => l.trim()).filter(Boolean)
    .map((l) => ({ pid: Number(l.split(/\s+/, 1)[0]), args: l.slice(l.indexOf(" ") + 1) }));
}

async function alive(pid: number): Promise<boolean> {
  return (await new Deno.Command("ps", { args: ["-p", String(pid)], stdout: "null" }).output())
    .success;
}

Deno.test("when the supervisor is SIGKILLed its services stop, and the next start stops the nats-server it left and runs", async () => {
  const storeDir = await meshTempDir("weft-orphans-");
  const ports = { natsPort: freePort(), port: freePort() };
  try {
    const first = await startMesh({}, { storeDir, ...ports, keepStore: true });
    const children = await childrenOf(first.child.pid);
    const services = children.filter((c) => c.args.includes("deno"));
    const nats = children.filter((c) => c.args.includes("nats-server"));
    // (The shadow service starts with the first live shadow: none here.)
    assert.equal(services.length, 12, JSON.stringify(children));
    assert.equal(nats.length, 1);

    // stop() also waits until nothing holds the supervisor's output: every service gone.
    await deadline(first.stop("SIGKILL"), 30_000, "every service to exit after the supervisor");
    for (const s of services) {
      await waitFor(async () => !(await alive(s.pid)), 10_000, `${s.args} to exit`);
    }

    // The second start has only to find the leftover server and run: one process will do.
    await using second = await startMesh(ONE_PROCESS, { storeDir, ...ports });
    assert.ok(
      second.logs.some((l) => String(l.msg).includes("earlier start left running")),
      "the leftover server was found and stopped",
    );
    await waitFor(async () => !(await alive(nats[0]!.pid)), 10_000, "the old nats-server gone");
    const res = await fetch(`${second.gatewayUrl}/feedback`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ text: "Still works after a hard kill" }),
    });
    assert.equal(res.status, 202, await res.clone().text());
    const { id } = await res.json();
    await waitFor(
      async () =>
        (await (await fetch(`${second.gatewayUrl}/feedback/${id}`)).json()).status === "processed",
      30_000,
      "the item processed by the second mesh",
    );
  } finally {
    await Deno.remove(storeDir, { recursive: true }).catch(() => {});
  }
});

Deno.test("when a cluster's supervisor is SIGKILLed, the next start on the same ports stops every node it left and runs", async () => {
  const storeDir = await meshTempDir("weft-orphans-cluster-");
  // The same command twice, as a user runs it: every port given, the monitoring one too (the
  // first node's, which the node left running holds).
  const env = { ...ONE_PROCESS, WEFT_CLUSTER: "3", WEFT_NATS_MONITOR_PORT: String(freePort()) };
  const ports = { natsPort: freePortRun(3), port: freePort() };
  let nats: { pid: number; args: string }[] = [];
  try {
    const first = await startMesh(env, { storeDir, ...ports, keepStore: true });
    await first.waitForLog((l) => l.msg === "weft is ready", 120_000, "the first mesh ready");
    nats = (await childrenOf(first.child.pid)).filter((c) => c.args.includes("nats-server"));
    assert.equal(nats.length, 3, JSON.stringify(nats));
    await deadline(first.stop("SIGKILL"), 30_000, "every service to exit after the supervisor");
    // The first node, whose monitoring port the next start checks, is left running.
    const node1 = nats.find((n) => n.args.includes("node1.conf"));
    assert.ok(
      node1 && await alive(node1.pid),
      `the first node left running: ${JSON.stringify(nats)}`,
    );

    // Before: "port <monitoring> (nats-server monitoring) is taken by another process", and
    // the mesh did not start until the nodes were killed by hand.
    await using second = await startMesh(env, { storeDir, ...ports });
    await second.waitForLog((l) => l.msg === "weft is ready", 120_000, "the second mesh ready");
    // (How many nodes still run by now varies between runs, why not investigated; the first,
    // whose monitoring port stopped the start, did in every run.)
    assert.ok(
      second.logs.some((l) => String(l.msg).includes("earlier start left running")),
      "a node left running was found and stopped",
    );
    for (const n of nats) {
      await waitFor(async () => !(await alive(n.pid)), 10_000, `the old node ${n.pid} gone`);
    }
    const res = await waitFor(
      async () => {
        const r = await fetch(`${second.gatewayUrl}/feedback`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ text: "Still works after a hard kill of a cluster's start" }),
        });
        if (r.status === 202) return await r.json();
        await r.body?.cancel();
        return undefined;
      },
      60_000,
      "a submission accepted by the second mesh",
    );
    await waitFor(
      async () =>
        (await (await fetch(`${second.gatewayUrl}/feedback/${res.id}`)).json()).status ===
          "processed",
      60_000,
      "the item processed by the second mesh",
    );
  } finally {
    // A failed run leaves no node behind.
    for (const n of nats) {
      try {
        Deno.kill(n.pid, "SIGKILL");
      } catch { /* gone */ }
    }
    await Deno.remove(storeDir, { recursive: true }).catch(() => {});
  }
});

Deno.test("a nats-server killed under a running mesh is started again, and items flow once more", async () => {
  await using mesh = await startMesh(ONE_PROCESS);
  await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
  const pid = Number((await Deno.readTextFile(`${mesh.storeDir}/nats-server.pid`)).trim());
  Deno.kill(pid, "SIGKILL");
  await waitFor(async () => !(await alive(pid)), 10_000, "the server gone");
  // Before: no log line, no restart, and /readyz answered 503 for good.
  await mesh.waitForLog((l) => l.msg === "nats-server node back", 30_000, "the server back");
  const res = await waitFor(
    async () => {
      const r = await fetch(`${mesh.gatewayUrl}/feedback`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ text: "After the broker came back" }),
      });
      if (r.status === 202) return await r.json();
      await r.body?.cancel();
      return undefined;
    },
    30_000,
    "a submission accepted again",
  );
  await waitFor(
    async () =>
      (await (await fetch(`${mesh.gatewayUrl}/feedback/${res.id}`)).json()).status ===
        "processed",
    30_000,
    "the item processed",
  );
});

Deno.test("a second start on the same store is refused, and leaves the running mesh alone", async () => {
  const storeDir = await meshTempDir("weft-second-");
  const ports = { natsPort: freePort(), port: freePort() };
  try {
    await using first = await startMesh(ONE_PROCESS, { storeDir, ...ports });
    await first.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
    const pid = Number((await Deno.readTextFile(`${storeDir}/nats-server.pid`)).trim());
    // Another gateway port, the same store and NATS port: before, it stopped the first
    // mesh's live server as a leftover and its services moved over to its own.
    const child = new Deno.Command("deno", {
      args: await taskArgs("start"),
      cwd: new URL("../", import.meta.url),
      env: {
        PORT: String(freePort()),
        WEFT_NATS_PORT: String(ports.natsPort),
        WEFT_NATS_DIR: storeDir,
        WEFT_NATS_MONITOR_PORT: String(freePort()),
        ...ONE_PROCESS,
      },
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    // (Before, it ran on: stopped here, not waited for.)
    const output = child.output();
    const second = await deadline(output, 60_000, "the second start to stop").catch(
      async (err) => {
        child.kill("SIGINT");
        await output;
        throw err;
      },
    );
    const printed = new TextDecoder().decode(second.stdout) +
      new TextDecoder().decode(second.stderr);
    assert.equal(second.code, 1, printed);
    assert.match(printed, /another deno task start runs on this store/);
    assert.ok(await alive(pid), "the first mesh's server still runs");
    const r = await fetch(`${first.gatewayUrl}/readyz`);
    await r.body?.cancel();
    assert.equal(r.status, 200);
  } finally {
    await Deno.remove(storeDir, { recursive: true }).catch(() => {});
  }
});

Deno.test("the supervisor's restart line is its own (service weft-supervisor) and names the child in child", async () => {
  // Found by an operator's probe: "service exited; restarting" had service: "sentiment",
  // overriding the supervisor's own service field (docs: service is weft-<name>).
  await using mesh = await startMesh(); // a process per service
  await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
  const started = await mesh.waitForLog(
    (l) => l.service === "weft-sentiment" && l.msg === "starting",
    10_000,
    "sentiment's start",
  );
  Deno.kill(started.pid as number, "SIGKILL");
  const line = await mesh.waitForLog(
    (l) => l.msg === "service exited; restarting",
    10_000,
    "the supervisor to notice",
  );
  assert.equal(line.service, "weft-supervisor");
  assert.equal(line.child, "sentiment");
});
