/**
 * `deno task start` checks the ports it will listen on before it starts anything: two
 * settings on one port are refused in one line naming both; and a nats-server that cannot
 * start stops the start with nats-server's own reason, in one line, leaving no node running.
 */
import assert from "node:assert/strict";
import { freePort, portFree } from "../src/nats_server.ts";
import { freePortRun, meshTempDir, removedAtEnd, taskArgs } from "./helpers/mesh.ts";

/**
 * Runs `deno task start` with `env` until it exits: its exit code and everything it said.
 * A start still running after `ms` (one that did not refuse) is stopped (SIGTERM, as Ctrl-C)
 * and its code is null.
 */
async function start(
  env: Record<string, string>,
  ms = 20_000,
): Promise<{ code: number | null; text: string }> {
  const child = new Deno.Command("deno", {
    args: await taskArgs("start"),
    cwd: new URL("../", import.meta.url),
    env: { WEFT_NATS_AUTH: "off", ...env },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const ranOn = new Promise<true>((resolve) => timer = setTimeout(() => resolve(true), ms));
  const [out, stillRunning] = await Promise.all([
    child.output(),
    Promise.race([child.status.then(() => false), ranOn]).then((late) => {
      clearTimeout(timer);
      if (late) child.kill("SIGTERM");
      return late;
    }),
  ]);
  const decode = (b: Uint8Array) => new TextDecoder().decode(b);
  return { code: stillRunning ? null : out.code, text: decode(out.stdout) + decode(out.stderr) };
}

/** The log lines at `level` in `text`. */
const linesAt = (text: string, level: string) =>
  text.split("\n").filter((l) => l.startsWith("{") && JSON.parse(l).level === level)
    .map((l) => JSON.parse(l).msg as string);

Deno.test("deno task start refuses two settings on one port in one line naming both and the port, before starting anything", async () => {
  const dir = await meshTempDir("weft-ports-");
  await using _dir = removedAtEnd(dir);
  const p = freePort();
  const run = freePortRun(3);
  const cases: [Record<string, string>, RegExp][] = [
    [
      { PORT: `${p}`, WEFT_NATS_MONITOR_PORT: `${p}` },
      new RegExp(
        `^PORT \\(the gateway\\) and WEFT_NATS_MONITOR_PORT \\(nats-server monitoring\\) are both port ${p}: give each its own port$`,
      ),
    ],
    [
      { PORT: `${p}`, WEFT_EVENTS_PORT: `${p}` },
      new RegExp(`^PORT \\(the gateway\\) and WEFT_EVENTS_PORT .* are both port ${p}:`),
    ],
    [
      { WEFT_HUB: "east", WEFT_NATS_AUTH: "nkeys", PORT: `${p}`, WEFT_LEAF_PORT: `${p}` },
      new RegExp(
        `^PORT \\(the gateway\\) and WEFT_LEAF_PORT \\(the hub's leafnode listener\\) are both port ${p}:`,
      ),
    ],
    [
      { WEFT_CLUSTER: "3", WEFT_NATS_PORT: `${run}`, PORT: `${run + 2}` },
      new RegExp(
        `^PORT \\(the gateway\\) and WEFT_NATS_PORT\\+2 \\(nats-server's client port of cluster node weft-3\\) are both port ${
          run + 2
        }:`,
      ),
    ],
    [
      { WEFT_HUB: "east", WEFT_NATS_AUTH: "nkeys", WEFT_NATS_PORT: `${p}`, WEFT_LEAF_PORT: `${p}` },
      new RegExp(
        `^WEFT_NATS_PORT \\(nats-server's client port\\) and WEFT_LEAF_PORT .* are both port ${p}:`,
      ),
    ],
    [
      {
        WEFT_HUB: "east",
        WEFT_NATS_AUTH: "nkeys",
        WEFT_NATS_MONITOR_PORT: `${p}`,
        WEFT_LEAF_PORT: `${p}`,
      },
      new RegExp(
        `^WEFT_NATS_MONITOR_PORT \\(nats-server monitoring\\) and WEFT_LEAF_PORT .* are both port ${p}:`,
      ),
    ],
    [
      {
        WEFT_HUB: "east",
        WEFT_NATS_AUTH: "nkeys",
        WEFT_CLUSTER: "3",
        WEFT_NATS_PORT: `${run}`,
        WEFT_LEAF_PORT: `${run + 1}`,
      },
      new RegExp(
        `^WEFT_NATS_PORT\\+1 \\(nats-server's client port of cluster node weft-2\\) and WEFT_LEAF_PORT \\(the hub's leafnode listener of cluster node weft-1\\) are both port ${
          run + 1
        }; `,
      ),
    ],
  ];
  for (const [env, said] of cases) {
    const out = await start({ WEFT_NATS_DIR: dir, ...env });
    const what = `${JSON.stringify(env)}: ${out.text}`;
    assert.equal(out.code, 2, what);
    const errors = linesAt(out.text, "error");
    assert.equal(errors.length, 1, what);
    assert.match(errors[0]!, said, what);
    assert.doesNotMatch(out.text, /Uncaught|nats cluster started|starting services/, what);
  }
});

Deno.test("WEFT_CLUSTER=2 is warned of once at start: two nodes keep no majority when one is lost", async () => {
  const dir = await meshTempDir("weft-ports-");
  await using _dir = removedAtEnd(dir);
  const run = freePortRun(2);
  // (A clash then stops it before anything starts.)
  const out = await start({
    WEFT_NATS_DIR: dir,
    WEFT_CLUSTER: "2",
    WEFT_NATS_PORT: `${run}`,
    PORT: `${run + 1}`,
  });
  assert.equal(out.code, 2, out.text);
  const warnings = linesAt(out.text, "warn").filter((m) => m.startsWith("WEFT_CLUSTER=2"));
  assert.equal(warnings.length, 1, out.text);
  assert.match(warnings[0]!, /no majority when one is lost.*run 3 nodes/);
});

Deno.test("a nats-server node that cannot start stops the start in one line with nats-server's own reason, and no node is left running", async () => {
  const dir = await meshTempDir("weft-ports-");
  await using _dir = removedAtEnd(dir);
  // The second node's store is a file, not a directory: it cannot start JetStream.
  await Deno.mkdir(`${dir}/data/jetstream`, { recursive: true });
  await Deno.writeTextFile(`${dir}/data/jetstream/node2`, "not a directory");
  const run = freePortRun(3);
  const out = await start({
    WEFT_NATS_DIR: dir,
    WEFT_CLUSTER: "3",
    WEFT_NATS_PORT: `${run}`,
    WEFT_NATS_MONITOR_PORT: `${freePort()}`,
    PORT: `${freePort()}`,
  });
  try {
    assert.equal(out.code, 1, out.text);
    assert.deepEqual(linesAt(out.text, "error"), [
      "nats-server could not start: Can't start JetStream: storage directory is not a directory",
    ]);
    assert.doesNotMatch(out.text, /Uncaught|\n\s+at /, "no stack trace");
    for (const port of [run, run + 1, run + 2]) {
      assert.ok(portFree(port), `node port ${port} is free again: no node left running`);
    }
  } finally {
    // (Before the fix, the nodes that did start were left running: stop them by their pids.)
    for (const i of [1, 2, 3]) {
      const pid = await Deno.readTextFile(`${dir}/data/nats-server-${i}.pid`).catch(() => "");
      if (pid.trim() && !portFree(run + i - 1)) {
        try {
          Deno.kill(Number(pid.trim()), "SIGTERM");
        } catch { /* gone */ }
      }
    }
  }
});

Deno.test("a relative WEFT_NATS_DIR (data/<dir>, as the start's messages suggest) is the repository's: the mesh starts", async () => {
  // Found by a probe: nats-server runs in the store directory, and was handed the generated
  // configuration's path relative to the repository: "open data/x/data/nats-weft.conf: no
  // such file or directory".
  const dir = await meshTempDir("weft-relative-");
  await using _dir = removedAtEnd(dir);
  const relative = dir.slice(new URL("../", import.meta.url).pathname.length);
  assert.match(relative, /^data\/tmp\//);
  const run = freePortRun(3);
  const out = await start({
    WEFT_NATS_DIR: relative,
    WEFT_NATS_PORT: `${run}`,
    WEFT_NATS_MONITOR_PORT: `${run + 1}`,
    PORT: `${run + 2}`,
  }, 15_000);
  assert.deepEqual(linesAt(out.text, "error"), [], out.text);
  assert.ok(linesAt(out.text, "info").includes("starting services"), out.text);
  await Deno.stat(`${dir}/data/supervisor.lock`); // the store it was given
});

Deno.test("a NATS_URL naming no running server stops deno task start in one line saying so, not a stack trace", async () => {
  const out = await new Deno.Command("deno", {
    args: await taskArgs("start"),
    cwd: new URL("../", import.meta.url),
    env: { NATS_URL: `nats://127.0.0.1:${freePort()}`, PORT: String(freePort()) },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 1, text);
  assert.match(text, /cannot connect to NATS at nats:\/\/127\.0\.0\.1:\d+: connection refused/);
  assert.match(text, /unset it and deno task start runs its own/);
  assert.doesNotMatch(text, /Uncaught|node_modules/, "no stack trace");
});
