/**
 * `deno task start --together`: every service in one Deno process, with the same runner,
 * consumers, acks, retries, state and NATS identities as apart; and a mix (some services
 * together, the rest alone). Kill the one process and the supervisor restarts it whole.
 */
import assert from "node:assert/strict";
import { Kvm } from "@nats-io/kv";
import { has, waitForEvents } from "./helpers/content_events.ts";
import { meshTempDir, removedAtEnd, startMesh, taskArgs } from "./helpers/mesh.ts";
import { freePort } from "../src/nats_server.ts";
import { waitFor } from "./helpers/wait.ts";
import { connectClient } from "./helpers/nats.ts";

const post = async (url: string, body: unknown) => {
  const res = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  return { status: res.status, body: await res.json() };
};

Deno.test("with WEFT_TOGETHER=all every service runs in one process, and both pipelines run", async (t) => {
  // A short ack wait: what the killed process had in hand is redelivered sooner.
  await using mesh = await startMesh({ WEFT_TOGETHER: "all", WEFT_ACK_WAIT_MS: "3000" });
  const started = await mesh.waitForLog((l) => l.msg === "starting services", 5_000, "start");
  // The shadow service alone stays apart (killing it must never take a step with it), and
  // starts only with the first live shadow.
  assert.deepEqual(started.processes, [
    "together(state,ingest,sentiment,topics,dispatch,digest,content-state,moderation,review,storage,gateway,scheduler)",
  ]);
  assert.deepEqual(started.with_the_first_live_shadow, ["shadow"]);
  const ready = await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
  assert.equal(ready.services, 12, "every service answers nats micro");
  const pids = new Set(
    mesh.logs.filter((l) => l.msg === "starting" && l.pid && l.service !== "weft-shadow")
      .map((l) => l.pid),
  );
  assert.equal(pids.size, 1, "one process for every production service");

  const nc = await connectClient(mesh.natsUrl, "together-test", mesh.credentials("ops"));
  try {
    await t.step("feedback and moderation items reach their ends", async () => {
      const fb = await post(`${mesh.gatewayUrl}/feedback`, { text: "Great app, but export fails" });
      assert.equal(fb.status, 202);
      const state = await new Kvm(nc).open("weft_feedback_state");
      await waitFor(
        async () =>
          (await state.get(fb.body.id))?.json<{ status: string }>().status === "processed" ||
          undefined,
        20_000,
        "processed",
      );
      const c = await post(`${mesh.gatewayUrl}/content`, { text: "A lovely lamp, thanks." });
      await waitForEvents(nc, c.body.id, has("content.published"), 20_000);
    });

    await t.step(
      "the one process killed with SIGKILL is restarted whole, and nothing is lost",
      async () => {
        const pid = [...pids][0] as number;
        const before = await post(`${mesh.gatewayUrl}/feedback`, { id: "BEFOREKILL", text: "hi" });
        assert.equal(before.status, 202);
        const seen = mesh.logs.length;
        Deno.kill(pid, "SIGKILL");
        await mesh.waitForLog(
          (l) => l.msg === "service exited; restarting" && l.child === "together",
          10_000,
          "the supervisor to notice",
        );
        await mesh.waitForLog(
          (l) => l.msg === "gateway listening" && mesh.logs.indexOf(l) >= seen,
          30_000,
          "the gateway back",
        );
        const state = await new Kvm(nc).open("weft_feedback_state");
        const after = await waitFor(
          async () => {
            try {
              return (await post(`${mesh.gatewayUrl}/feedback`, { id: "AFTERKILL", text: "hello" }))
                    .status === 202 || undefined;
            } catch {
              return undefined; // the gateway is restarting
            }
          },
          30_000,
          "the gateway to accept again",
        );
        assert.ok(after);
        for (const id of ["BEFOREKILL", "AFTERKILL"]) {
          await waitFor(
            async () =>
              (await state.get(id))?.json<{ status: string }>().status === "processed" ||
              undefined,
            30_000,
            `${id} processed`,
          );
        }
      },
    );
  } finally {
    await nc.close();
  }
});

Deno.test("WEFT_TOGETHER can group some services and run the rest alone", async () => {
  await using mesh = await startMesh({ WEFT_TOGETHER: "gateway,ingest,state,dispatch" });
  const started = await mesh.waitForLog((l) => l.msg === "starting services", 5_000, "start");
  assert.deepEqual(started.processes, [
    "together(state,ingest,dispatch,gateway)",
    "sentiment",
    "topics",
    "digest",
    "content-state",
    "moderation",
    "review",
    "storage",
    "scheduler",
  ]);
  await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
  const fb = await post(`${mesh.gatewayUrl}/feedback`, { text: "Mixed mode works" });
  assert.equal(fb.status, 202);
  await waitFor(
    async () => {
      const s = await (await fetch(`${mesh.gatewayUrl}/feedback/${fb.body.id}`)).json();
      return s.status === "processed" || undefined;
    },
    20_000,
    "processed",
  );
});

Deno.test("WEFT_TOGETHER naming no such service stops deno task start with one clear line", async () => {
  const out = await new Deno.Command("deno", {
    args: await taskArgs("start"),
    cwd: new URL("../", import.meta.url),
    env: {
      WEFT_TOGETHER: "gateway,nosuch",
      WEFT_NATS_PORT: String(freePort()),
      PORT: String(freePort()),
    },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.notEqual(out.code, 0);
  assert.match(text, /WEFT_TOGETHER names no such service: nosuch/);
});

Deno.test("with WEFT_TOGETHER=all a definition's services run in the one process too", async () => {
  const dir = await meshTempDir("weft-together-def-");
  await using _dir = removedAtEnd(dir);
  await Deno.writeTextFile(
    `${dir}/echo.ts`,
    `import { definePipeline } from "${new URL("../mod.ts", import.meta.url).href}";
export const echo = definePipeline({
  name: "echo",
  input: { schema: { type: "object", required: ["text"] } },
  start: "shout",
  steps: {
    shout: { kind: "task", output: { type: "object" }, handle: (i: { text: string }) => ({ text: i.text.toUpperCase() }), next: "done" },
    done: { kind: "end", outcome: "done" },
  },
});
`,
  );
  await using mesh = await startMesh(
    { WEFT_TOGETHER: "all", WEFT_PIPELINES: `${dir}/echo.ts` },
    { storeDir: `${dir}/nats` },
  );
  const started = await mesh.waitForLog((l) => l.msg === "starting services", 5_000, "start");
  assert.deepEqual(started.processes, [
    "together(state,ingest,sentiment,topics,dispatch,digest,content-state,moderation,review,storage,gateway,scheduler,echo-flow,echo-shout)",
  ]);
  const ready = await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
  assert.equal(ready.services, 14);
  const res = await post(`${mesh.gatewayUrl}/pipelines/echo/items`, { text: "hi" });
  assert.equal(res.status, 202);
  const state = await waitFor(
    async () => {
      const s = await (await fetch(`${mesh.gatewayUrl}/pipelines/echo/items/${res.body.id}`))
        .json();
      return s.status === "done" ? s : undefined;
    },
    30_000,
    "the echo item done",
  );
  assert.deepEqual(state.results.shout, { text: "HI" });
});
