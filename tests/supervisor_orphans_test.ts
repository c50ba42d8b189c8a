/**
 * A supervisor killed outright (SIGKILL, as an OOM kill does) leaves nothing running that
 * blocks the next start: its services notice and stop, and the next `deno task start`
 * stops the nats-server it left, through that server's own pid file, and runs.
 */
import assert from "node:assert/strict";
import { freePort } from "../src/nats_server.ts";
import { meshTempDir, ONE_PROCESS, startMesh } from "./helpers/mesh.ts";
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
