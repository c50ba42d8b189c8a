/**
 * Versioning: each item records the definition it started on; deploying a changed
 * definition while items are in flight never strands one silently. An item continues when
 * its next step still exists (on the new code), and is otherwise dead-lettered with the
 * reason `definition_changed`, its state failed, the letter listed for redrive.
 */
import assert from "node:assert/strict";
import { serverVersion, versionAtLeast } from "../src/nats_server.ts";
import { meshTempDir, ONE_PROCESS, startMesh, taskArgs } from "./helpers/mesh.ts";
import { waitFor } from "./helpers/wait.ts";
import { connectClient } from "./helpers/nats.ts";
import { AckPolicy } from "@nats-io/jetstream";
import type { LoadedPipeline } from "../src/pipeline/runtime.ts";
import { HOLD, itemState, MOD, post, stateWhenOk } from "./helpers/versions.ts";

/** nats-server 2.10+ (consumer metadata, several filters per consumer). */
const SERVER_2_10 = versionAtLeast((await serverVersion()) ?? "0.0.0", "2.10.0");

/**
 * How long `tick` holds an item: its timer must fire after version 1 stopped (well within
 * this) and while version 2 runs.
 */
const TICK_MS = 15_000;

/**
 * Version 1 holds some items in `hold` and `tick`; version 2 has neither and a new `finish`.
 */
const version = (v: 1 | 2) => `
import { definePipeline } from "${MOD}";
export const vers = definePipeline({
  name: "vers",
  input: { schema: { type: "object", required: ["kind"] } },
  start: "route",
  steps: {
    route: {
      kind: "router",
      route: (i: { kind: string }) => (${
  v === 1 ? 'i.kind === "hold" || i.kind === "tick" ? i.kind : ' : ""
}"approve"),
      routes: { approve: "approve"${v === 1 ? ', hold: "hold", tick: "tick"' : ""} },
    },
    approve: { kind: "wait", event: "approved", timeoutMs: 600000, onTimeout: "expired", next: "finish" },
    ${
  v === 1
    ? 'hold: { kind: "wait", event: "held", timeoutMs: 600000, onTimeout: "expired", next: "finish" },' +
      `tick: { kind: "wait", event: "ticked", timeoutMs: ${TICK_MS}, onTimeout: "expired", next: "finish" },`
    : ""
}
    finish: { kind: "task", output: { type: "object" }, handle: () => ({ v: ${v} }), next: "done" },
    done: { kind: "end", outcome: "done" },
    expired: { kind: "end", outcome: "expired" },
  },
});
`;

const stateOf = async (base: string, id: string) =>
  await (await fetch(`${base}/pipelines/vers/items/${id}`)).json();

/** The item's state once its status is `status` (within 20 s). */
const stateWhen = (base: string, id: string, status: string, what: string) =>
  waitFor(
    async () => {
      const s = await stateOf(base, id);
      return s.status === status ? s : undefined;
    },
    20_000,
    what,
  );

Deno.test("a changed definition: items whose next step exists continue, the others are dead-lettered with the reason", async () => {
  const dir = await meshTempDir("weft-vers-");
  const file = `${dir}/def/vers.ts`;
  await Deno.mkdir(`${dir}/def`, { recursive: true });
  await Deno.writeTextFile(file, version(1));
  const storeDir = `${dir}/nats`;
  let v1Hash: string;
  let kept: string;
  let stranded: string;
  let ticked: string;
  try {
    {
      await using mesh = await startMesh({ ...ONE_PROCESS, WEFT_PIPELINES: file }, {
        storeDir,
        keepStore: true,
      });
      await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
      kept = (await post(mesh.gatewayUrl, "/pipelines/vers/items", { kind: "approve" })).body.id;
      stranded = (await post(mesh.gatewayUrl, "/pipelines/vers/items", { kind: "hold" })).body.id;
      ticked = (await post(mesh.gatewayUrl, "/pipelines/vers/items", { kind: "tick" })).body.id;
      for (const id of [kept, stranded, ticked]) {
        await waitFor(
          async () => (await stateOf(mesh.gatewayUrl, id)).status === "waiting",
          20_000,
          `${id} waiting`,
        );
      }
      v1Hash = (await stateOf(mesh.gatewayUrl, kept)).definition;
    }

    // Deploy version 2 while both items wait.
    await Deno.writeTextFile(file, version(2));
    await using mesh = await startMesh({ ...ONE_PROCESS, WEFT_PIPELINES: file }, { storeDir });
    await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready again");
    const loaded = await mesh.waitForLog((l) => l.msg === "pipeline loaded", 1000, "v2 loaded");
    assert.notEqual(loaded.definition, v1Hash, "a new definition hash");

    const decided = await post(mesh.gatewayUrl, `/pipelines/vers/items/${kept}/approved`, {});
    assert.equal(decided.status, 202);
    const done = await stateWhen(mesh.gatewayUrl, kept, "done", "the kept item done");
    assert.deepEqual(done.results.finish, { v: 2 }, "it continued on the new code");
    assert.equal(done.definition, v1Hash, "it records the definition it started on");

    // A decision over HTTP that no step would take (the item waits at `hold`, which version
    // 2 has not, though it awaits `approved` elsewhere): refused, not accepted and lost.
    const stuck = await post(mesh.gatewayUrl, `/pipelines/vers/items/${stranded}/approved`, {});
    assert.equal(stuck.status, 409, JSON.stringify(stuck.body));
    assert.match(stuck.body.detail, /waits at step hold, which the running definition/);

    // The same decision on the bus (found by probing: it was recorded under version 2's
    // `approve`, acked and never taken): kept as a letter, failing nothing.
    const nc = await connectClient(mesh.natsUrl, "test-admin", mesh.credentials("admin"));
    try {
      nc.publish(`vers.approved.${stranded}`, JSON.stringify({ by: "dan" }));
      const kept = await waitFor(
        async () => {
          const l = await (await fetch(`${mesh.gatewayUrl}/deadletters?item_id=${stranded}`))
            .json();
          return l.items.find((x: { letter: { subject: string } }) =>
            x.letter.subject === `vers.approved.${stranded}`
          );
        },
        20_000,
        "the bus decision kept as a letter",
      );
      assert.equal(kept.letter.code, "conflict");
      assert.match(kept.letter.reason, /waits at step hold, which the running definition/);
      assert.equal((await stateOf(mesh.gatewayUrl, stranded)).status, "waiting", "still waiting");
      // The stranded item's awaited event comes (an operator publishes it): version 2 has no
      // step that awaits it.
      nc.publish(`vers.held.${stranded}`, JSON.stringify({ by: "dan" }));
      await nc.flush();
    } finally {
      await nc.close();
    }
    const failed = await stateWhen(mesh.gatewayUrl, stranded, "failed", "the stranded item failed");
    assert.equal(failed.error.code, "definition_changed");
    assert.match(failed.error.reason, /vers\.held/);
    // A decision for the failed item is refused over HTTP: it would run it on to an outcome.
    const refused = await post(mesh.gatewayUrl, `/pipelines/vers/items/${stranded}/approved`, {});
    assert.equal(refused.status, 409, JSON.stringify(refused.body));
    assert.match(refused.body.detail, /has failed \(definition_changed/);
    const letters = await (await fetch(
      `${mesh.gatewayUrl}/deadletters?code=definition_changed`,
    )).json();
    assert.ok(
      letters.items.some((l: { letter: { item_id?: string } }) => l.letter.item_id === stranded),
      `listed for redrive: ${JSON.stringify(letters).slice(0, 600)}`,
    );
    // One letter for the decision, the control step's: the state writer (which folded the
    // item's failure after it, in stream order) skips it rather than letter it again, so a
    // redrive of every letter would not send the decision twice.
    const held = (await (await fetch(`${mesh.gatewayUrl}/deadletters?item_id=${stranded}`))
      .json()).items.filter((l: { letter: { subject: string } }) =>
        l.letter.subject === `vers.held.${stranded}`
      );
    assert.equal(held.length, 1, JSON.stringify(held).slice(0, 600));
    // A redrive republishes it, byte for byte; with the step still gone it is dead-lettered
    // again with the same reason (once a definition has the step, it would continue).
    const letter = letters.items.find((l: { letter: { item_id?: string } }) =>
      l.letter.item_id === stranded
    );
    const redriven = await post(mesh.gatewayUrl, "/deadletters/redrive", { ids: [letter.seq] });
    assert.equal(redriven.status, 200, JSON.stringify(redriven.body));
    assert.equal(redriven.body.redriven.length, 1);
    await waitFor(
      async () => {
        const l = await (await fetch(`${mesh.gatewayUrl}/deadletters?code=definition_changed`))
          .json();
        return l.items.filter((x: { letter: { item_id?: string } }) =>
              x.letter.item_id === stranded
            )
              .length === 2 || undefined;
      },
      20_000,
      "dead-lettered again after the redrive",
    );
    // The item held at `tick` (gone too): its timer fires under version 2, which has no such
    // step, and is dead-lettered with the reason (the item fails).
    const timedOut = await waitFor(
      async () => {
        const s = await stateOf(mesh.gatewayUrl, ticked);
        return s.status === "failed" ? s : undefined;
      },
      TICK_MS + 30_000,
      "the item held at tick failed at its deadline",
    );
    assert.equal(timedOut.error.code, "definition_changed");
    assert.match(timedOut.error.reason, /a timer of step tick/);
    await mesh.stop(); // its store stays for the next start

    // Version 1 again: the step is back. Redriving the letter resumes the item, which runs on
    // to its end; its state says so (it stayed `failed` before the fold followed redrives),
    // and its event stream replays both tries, past the failure, to the end.
    await Deno.writeTextFile(file, version(1));
    await using again = await startMesh({ ...ONE_PROCESS, WEFT_PIPELINES: file }, { storeDir });
    await again.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready with v1 again");
    const pending = await (await fetch(
      `${again.gatewayUrl}/deadletters?code=definition_changed&pending=true&item_id=${stranded}`,
    )).json();
    assert.equal(pending.items.length, 1, JSON.stringify(pending).slice(0, 600));
    const back = await post(again.gatewayUrl, "/deadletters/redrive", {
      ids: [pending.items[0].seq],
    });
    assert.equal(back.status, 200, JSON.stringify(back.body));
    const resumed = await stateWhen(again.gatewayUrl, stranded, "done", "the redriven item done");
    assert.deepEqual(resumed.results.finish, { v: 1 });
    assert.equal(resumed.error, undefined);
    assert.deepEqual(
      resumed.redriven.map((r: { code: string }) => r.code),
      ["definition_changed"],
      "the failure it was resumed from is kept",
    );
    const sse = await (await fetch(`${again.gatewayUrl}/pipelines/vers/items/${stranded}/events`))
      .text();
    const types = [...sse.matchAll(/^event: (.+)$/gm)].map((m) => m[1]);
    assert.equal(types[0], "vers.submitted", `from the first event: ${types}`);
    assert.ok(types.includes("vers.failed"), `the failures too: ${types}`);
    assert.equal(types.at(-1), "vers.done", `closed at the end: ${types}`);

    // The timer's letter too: redriven with its step back, it times the item out, and the
    // item's state says so (it stayed `failed` while the fold skipped every timer event).
    const timer = await (await fetch(
      `${again.gatewayUrl}/deadletters?code=definition_changed&pending=true&item_id=${ticked}`,
    )).json();
    assert.equal(timer.items.length, 1, JSON.stringify(timer).slice(0, 600));
    assert.match(timer.items[0].letter.subject, /^vers\._timer\./);
    const fired = await post(again.gatewayUrl, "/deadletters/redrive", {
      ids: [timer.items[0].seq],
    });
    assert.equal(fired.status, 200, JSON.stringify(fired.body));
    const expired = await stateWhen(again.gatewayUrl, ticked, "done", "the redriven timer's item");
    assert.equal(expired.outcome, "expired");
    assert.deepEqual(expired.results.tick, { timed_out: true });
    assert.equal(expired.error, undefined);
    assert.deepEqual(
      expired.redriven.map((r: { code: string }) => r.code),
      ["definition_changed"],
    );
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});

/**
 * Runs `deno task start` with `pipelines`, expecting it to refuse (exit 2): its JSON log
 * lines and the error line.
 */
async function refusedStart(pipelines: string, natsDir: string) {
  const out = await new Deno.Command("deno", {
    args: await taskArgs("start"),
    cwd: new URL("../", import.meta.url),
    env: { WEFT_PIPELINES: pipelines, WEFT_NATS_DIR: natsDir, PORT: "0" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(out.code, 2);
  const lines = new TextDecoder().decode(out.stdout).trim().split("\n").map((l) => JSON.parse(l));
  return { lines, error: lines.find((l) => l.level === "error") };
}

Deno.test("a bad definition stops deno task start before anything starts, naming the file and the step", async () => {
  const dir = await meshTempDir("weft-baddef-");
  try {
    await Deno.writeTextFile(
      `${dir}/bad.ts`,
      `import { definePipeline } from "${MOD}";
export const bad = definePipeline({
  name: "bad",
  input: { schema: { type: "object" } },
  start: "a",
  steps: {
    a: { kind: "task", output: { type: "object" }, handle: () => ({}), next: "nowhere" },
    done: { kind: "end", outcome: "done" },
  },
});
`,
    );
    const { lines, error } = await refusedStart(`${dir}/bad.ts`, `${dir}/nats`);
    assert.match(error.msg, /bad\.ts/);
    assert.match(error.msg, /pipeline bad, step a: next names unknown step "nowhere"/);
    assert.ok(!lines.some((l) => /nats-server|starting services/.test(l.msg)), "nothing started");
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});

Deno.test("an llm step with no LLM endpoint configured stops deno task start with one line saying what to set", async () => {
  // Found on a fresh clone: the README's example started, and its llm step's service then
  // failed with a stack trace on every restart, so the mesh never said it was ready.
  const dir = await meshTempDir("weft-nollm-");
  try {
    const { lines, error } = await refusedStart("pipelines/examples/tickets.ts", `${dir}/nats`);
    assert.match(error.msg, /tickets\.ts, step triage: an llm step needs an LLM endpoint/);
    assert.match(
      error.msg,
      /set WEFT_LLM_BASE_URL \(an OpenAI-compatible server\) and WEFT_LLM_MODEL,/,
    );
    // A local server needs no key: the README's own command sets none, and it starts.
    assert.match(error.msg, /WEFT_LLM_API_KEY only if the endpoint needs a key/);
    assert.ok(!lines.some((l) => /nats-server|starting services/.test(l.msg)), "nothing started");
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});

Deno.test("a definition outside the folders Weft may read stops deno task start, saying where to put it", async () => {
  const dir = await Deno.makeTempDir({ prefix: "weft-outside-" });
  const nats = await meshTempDir("weft-outside-nats-");
  try {
    await Deno.writeTextFile(`${dir}/orders.ts`, "export const x = 1;\n");
    const { lines, error } = await refusedStart(`${dir}/orders.ts`, `${nats}/nats`);
    assert.match(error.msg, /orders\.ts: outside the folders Weft may read/);
    assert.match(error.msg, /keep definitions under pipelines\//);
    assert.doesNotMatch(error.msg, /--allow-read/);
    assert.ok(!lines.some((l) => /nats-server|starting services/.test(l.msg)), "nothing started");
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
    await Deno.remove(nats, { recursive: true }).catch(() => {});
  }
});

/**
 * Version 1: a, then a wait, then done; version 2 adds step `b` after the wait, and ends at
 * `finished` instead of `done` (so the items that ended before end with a type it lacks).
 */
const growing = (v: 1 | 2) => `
import { definePipeline } from "${MOD}";
export const grow = definePipeline({
  name: "grow",
  input: { schema: { type: "object" } },
  start: "a",
  steps: {
    a: { kind: "task", output: { type: "object" }, handle: () => ({ a: true }), next: "w" },
    w: { kind: "wait", event: "go", timeoutMs: 600000, onTimeout: "expired", next: "${
  v === 1 ? "done" : "b"
}" },
    ${
  v === 2
    ? 'b: { kind: "task", output: { type: "object" }, handle: () => ({ b: true }), next: "finished" },'
    : ""
}
    ${
  v === 1
    ? 'done: { kind: "end", outcome: "done" },'
    : 'finished: { kind: "end", outcome: "finished" },'
}
    expired: { kind: "end", outcome: "expired" },
  },
});
`;

Deno.test({
  name: "a step added to a running definition runs for items in flight, never for those that ended",
  // On 2.10+ the new consumer marks its backlog in its metadata; on 2.9 (none) its backlog is
  // what the stream stored before the consumer was created.
  fn: async () => {
    const dir = await meshTempDir("weft-grow-");
    const file = `${dir}/def/grow.ts`;
    await Deno.mkdir(`${dir}/def`, { recursive: true });
    await Deno.writeTextFile(file, growing(1));
    const storeDir = `${dir}/nats`;
    const state = itemState("grow");
    const finished: string[] = [];
    let waiting: string;
    try {
      {
        await using mesh = await startMesh({ ...ONE_PROCESS, WEFT_PIPELINES: file }, {
          storeDir,
          keepStore: true,
        });
        await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
        const base = mesh.gatewayUrl;
        for (let i = 0; i < 3; i++) {
          finished.push((await post(base, "/pipelines/grow/items", {})).body.id);
        }
        waiting = (await post(base, "/pipelines/grow/items", {})).body.id;
        for (const id of [...finished, waiting]) {
          await waitFor(async () => (await state(base, id)).status === "waiting", 20_000, id);
        }
        for (const id of finished) {
          assert.equal((await post(base, `/pipelines/grow/items/${id}/go`, {})).status, 202);
          await waitFor(async () => (await state(base, id)).status === "done", 20_000, id);
        }
      }
      // Version 2 adds `b` after the wait: its consumer is created behind the stream's
      // history, which holds the finished items' `go` events.
      await Deno.writeTextFile(file, growing(2));
      await using mesh = await startMesh({ ...ONE_PROCESS, WEFT_PIPELINES: file }, { storeDir });
      await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready again");
      const base = mesh.gatewayUrl;
      assert.equal((await post(base, `/pipelines/grow/items/${waiting}/go`, {})).status, 202);
      const done = await waitFor(
        async () => {
          const s = await state(base, waiting);
          return s.status === "done" ? s : undefined;
        },
        20_000,
        "the item in flight done",
      );
      assert.deepEqual(done.results.b, { b: true }, "the item in flight ran the new step");
      const nc = await connectClient(mesh.natsUrl, "test-admin", mesh.credentials("admin"));
      try {
        const { jetstreamManager } = await import("@nats-io/jetstream");
        const jsm = await jetstreamManager(nc);
        await waitFor(
          async () => {
            const ci = await jsm.consumers.info("GROW", "grow-b");
            return ci.num_pending === 0 && ci.num_ack_pending === 0;
          },
          20_000,
          "b's backlog handled",
        );
        // Before: b ran for each finished item, stored its event after the item's end, and
        // its end was dead-lettered as a conflict.
        for (const id of finished) {
          const b = await jsm.streams.getMessage("GROW", { last_by_subj: `grow.b.${id}` })
            .catch(() => null);
          assert.equal(b, null, `no b event for the finished ${id}`);
          assert.equal((await state(base, id)).results.b, undefined);
        }
        assert.equal((await jsm.streams.info("DEADLETTER")).state.messages, 0, "no dead letter");
      } finally {
        await nc.close();
      }
    } finally {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

/**
 * Version 1: `prep`, a wait `approve`, then `finish` (which holds every item until it is
 * stopped), then done; version 2 has no `finish`: `approve` leads to done.
 */
const retiring = (v: 1 | 2) => `
import { definePipeline } from "${MOD}";
export const retire = definePipeline({
  name: "retire",
  input: { schema: { type: "object" } },
  start: "prep",
  steps: {
    prep: { kind: "task", output: { type: "object" }, handle: () => ({ prepped: true }), next: "approve" },
    approve: { kind: "wait", event: "approved", timeoutMs: 600000, onTimeout: "done", next: "${
  v === 1 ? "finish" : "done"
}" },
    ${
  v === 1
    ? `finish: {
      kind: "task",
      output: { type: "object" },
      handle: (_v: unknown, ctx: { signal: AbortSignal }) =>
        new Promise((_, reject) => ctx.signal.addEventListener("abort", () => reject(new Error("stopped")))),
      next: "done",
    },`
    : ""
}
    done: { kind: "end", outcome: "done" },
  },
});
`;

Deno.test("a step removed while items wait on its consumer: they are dead-lettered with the reason, its consumer swept, and a redrive ends them once", async () => {
  const dir = await meshTempDir("weft-retire-");
  const file = `${dir}/def/retire.ts`;
  await Deno.mkdir(`${dir}/def`, { recursive: true });
  await Deno.writeTextFile(file, retiring(1));
  const storeDir = `${dir}/nats`;
  // A short ack wait: what the stopped step held comes back soon after the restart.
  const env = { ...ONE_PROCESS, WEFT_PIPELINES: file, WEFT_ACK_WAIT_MS: "2000" };
  const state = itemState("retire");
  const ids: string[] = [];
  try {
    {
      await using mesh = await startMesh(env, { storeDir, keepStore: true });
      await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
      const base = mesh.gatewayUrl;
      for (let i = 0; i < 3; i++) {
        ids.push((await post(base, "/pipelines/retire/items", {})).body.id);
      }
      for (const id of ids) {
        await waitFor(async () => (await state(base, id)).status === "waiting", 20_000, id);
        assert.equal((await post(base, `/pipelines/retire/items/${id}/approved`, {})).status, 202);
      }
      for (const id of ids) {
        await waitFor(
          async () => (await state(base, id)).current?.join() === "finish",
          20_000,
          `${id} at finish`,
        );
      }
      const nc = await connectClient(mesh.natsUrl, "test-admin", mesh.credentials("admin"));
      try {
        const { jetstreamManager } = await import("@nats-io/jetstream");
        const jsm = await jetstreamManager(nc);
        await waitFor(
          async () => (await jsm.consumers.info("RETIRE", "retire-finish")).num_ack_pending === 3,
          20_000,
          "finish holds the three approvals",
        );
        if (SERVER_2_10) {
          // Who made it, so a definition without the step finds it (2.9: by its name).
          const { metadata } = (await jsm.consumers.info("RETIRE", "retire-finish")).config;
          assert.equal(metadata?.weft_pipeline, "retire");
          assert.equal(metadata?.weft_step, "finish");
        }
      } finally {
        await nc.close();
      }
    }

    // Version 2 has no `finish`: what its consumer holds leads nowhere the running steps go.
    await Deno.writeTextFile(file, retiring(2));
    await using mesh = await startMesh(env, { storeDir });
    await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready again");
    const base = mesh.gatewayUrl;
    for (const id of ids) {
      const failed = await waitFor(
        async () => {
          const s = await state(base, id);
          return s.status === "failed" ? s : undefined;
        },
        30_000,
        `${id} failed, not left running at finish`,
      );
      assert.equal(failed.error.code, "definition_changed");
      assert.match(
        failed.error.reason,
        /step finish of retire is gone from the running definition/,
      );
    }
    const swept = await mesh.waitForLog(
      (l) => l.msg === "swept a retired step's consumer",
      30_000,
      "the retired consumer swept",
    );
    assert.equal(swept.consumer, "retire-finish");
    const nc = await connectClient(mesh.natsUrl, "test-admin", mesh.credentials("admin"));
    try {
      const { jetstreamManager } = await import("@nats-io/jetstream");
      const jsm = await jetstreamManager(nc);
      await assert.rejects(jsm.consumers.info("RETIRE", "retire-finish"), /consumer not found/i);

      const letters = (await (await fetch(`${base}/deadletters?code=definition_changed`)).json())
        .items as { seq: number; letter: { item_id: string; stage: string; subject: string } }[];
      assert.deepEqual(letters.map((l) => l.letter.item_id).sort(), [...ids].sort());
      for (const l of letters) {
        assert.equal(l.letter.subject, `retire.approve.${l.letter.item_id}`);
      }
      const redriven = await post(base, "/deadletters/redrive", {
        ids: letters.map((l) => l.seq),
      });
      assert.equal(redriven.status, 200, JSON.stringify(redriven.body));
      assert.equal(redriven.body.redriven.length, 3);
      for (const id of ids) {
        const done = await waitFor(
          async () => {
            const s = await state(base, id);
            return s.status === "done" ? s : undefined;
          },
          20_000,
          `${id} done after the redrive`,
        );
        assert.equal(done.outcome, "done");
      }
      const ends = await jsm.streams.info("RETIRE", { subjects_filter: "retire.done.>" });
      assert.deepEqual(
        Object.values(ends.state.subjects ?? {}),
        [1, 1, 1],
        `one end event per item: ${JSON.stringify(ends.state.subjects)}`,
      );
    } finally {
      await nc.close();
    }
    assert.deepEqual(
      mesh.logs.filter((l) => l.msg === "nats permission violation"),
      [],
      "no refused permission while sweeping",
    );
    // The control service's identity may sweep retired consumers, never a running step's.
    const flow = await connectClient(
      mesh.natsUrl,
      "test-as-retire-flow",
      mesh.credentials("retire-flow"),
    );
    try {
      // The pull itself (its consumer's info is not secret): refused by the server.
      await assert.rejects(
        flow.request("$JS.API.CONSUMER.MSG.NEXT.RETIRE.retire-prep", JSON.stringify({ batch: 1 }), {
          timeout: 5_000,
        }),
        /permission/i,
      );
    } finally {
      await flow.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});

Deno.test("the retired consumers of a changed definition: a gone step's, and a renamed durable's as replaced; never a consumer Weft's steps did not make", async () => {
  const { startTestNats } = await import("./helpers/nats.ts");
  const { retiredConsumers } = await import("../src/pipeline/runtime.ts");
  const { definePipeline } = await import("../mod.ts");
  await using t = await startTestNats();
  await t.jsm.streams.add({ name: "SWEEP", subjects: ["sweep.>"] });
  const def = definePipeline({
    name: "sweep",
    input: { schema: { type: "object" } },
    start: "a",
    steps: {
      a: { kind: "task", output: { type: "object" }, handle: () => ({}), next: "b" },
      b: {
        kind: "task",
        output: { type: "object" },
        durable: "sweep-b2",
        handle: () => ({}),
        next: "e",
      },
      e: { kind: "end", outcome: "done" },
    },
  });
  // Weft's stages' consumers carry their metadata (2.10+) and their description (any server).
  const add = (durable: string, metadata?: Record<string, string>) =>
    t.jsm.consumers.add("SWEEP", {
      durable_name: durable,
      ack_policy: AckPolicy.Explicit,
      filter_subject: "sweep.>",
      ...(metadata ? { description: `Weft stage ${durable}` } : {}),
      ...(metadata && SERVER_2_10 ? { metadata } : {}),
    });
  await add("sweep-a", { weft_pipeline: "sweep", weft_step: "a" }); // live
  await add("sweep-gone", { weft_pipeline: "sweep", weft_step: "gone" }); // a step removed
  await add("sweep-b", { weft_pipeline: "sweep", weft_step: "b" }); // b's durable renamed
  await add("sweep-audit"); // an operator's: neither Weft's metadata nor its description
  const found = (byName: boolean) =>
    retiredConsumers(t.jsm, def, { byName }).then((r) =>
      r.sort((x, y) => x.durable.localeCompare(y.durable))
    );
  const expected = [
    { durable: "sweep-b", step: "b", replaced: true },
    { durable: "sweep-gone", step: "gone" },
  ];
  // On 2.10+ the metadata says who made a consumer; by name only where there is none (2.9).
  assert.deepEqual(await found(!SERVER_2_10), expected);
});

/**
 * Version 1 routes `slow` items to `a` (which holds them until stopped) and the others to
 * `b`; version 2 swaps the routes, so the event that sent a slow item to `a` now leads to
 * `b`, a step that stays (and `a` runs for the others). Both go on to a wait, then done.
 */
const rewired = (v: 1 | 2) => `
import { definePipeline } from "${MOD}";
export const rewire = definePipeline({
  name: "rewire",
  input: { schema: { type: "object", required: ["kind"] } },
  start: "s",
  steps: {
    s: {
      kind: "router",
      route: (i: { kind: string }) => (i.kind === "slow" ? "r1" : "r2"),
      routes: ${v === 1 ? '{ r1: "a", r2: "b" }' : '{ r1: "b", r2: "a" }'},
    },
    a: { kind: "task", output: { type: "object" }, handle: ${
  v === 1 ? HOLD : "() => ({ a: 2 })"
}, next: "b" },
    b: { kind: "task", output: { type: "object" }, handle: () => ({ b: ${v} }), next: "w" },
    w: { kind: "wait", event: "go", timeoutMs: 600000, onTimeout: "done", next: "done" },
    done: { kind: "end", outcome: "done" },
  },
});
`;

Deno.test("a re-wired step that stays: an event stored before the change that now leads to another step reaches it, and an item that passed it is not sent there", async () => {
  const dir = await meshTempDir("weft-rewire-");
  const file = `${dir}/def/rewire.ts`;
  await Deno.mkdir(`${dir}/def`, { recursive: true });
  await Deno.writeTextFile(file, rewired(1));
  const storeDir = `${dir}/nats`;
  // A short ack wait: what the stopped step held comes back soon after the restart.
  const env = { ...ONE_PROCESS, WEFT_PIPELINES: file, WEFT_ACK_WAIT_MS: "2000" };
  const state = itemState("rewire");
  const when = stateWhenOk(state);
  let slow: string;
  let fast: string;
  try {
    {
      await using mesh = await startMesh(env, { storeDir, keepStore: true });
      await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
      const base = mesh.gatewayUrl;
      slow = (await post(base, "/pipelines/rewire/items", { kind: "slow" })).body.id;
      fast = (await post(base, "/pipelines/rewire/items", { kind: "fast" })).body.id;
      await when(base, slow, (s) => (s.current as string[])?.join() === "a", "slow at a");
      await when(base, fast, (s) => s.status === "waiting", "fast waiting after b");
      const nc = await connectClient(mesh.natsUrl, "test-admin", mesh.credentials("admin"));
      try {
        const { jetstreamManager } = await import("@nats-io/jetstream");
        const jsm = await jetstreamManager(nc);
        await waitFor(
          async () => (await jsm.consumers.info("REWIRE", "rewire-a")).num_ack_pending === 1,
          20_000,
          "a holds the slow item",
        );
        // b has read past the slow item's routing (not its event then).
        await waitFor(
          async () => {
            const ci = await jsm.consumers.info("REWIRE", "rewire-b");
            return ci.num_pending === 0 && ci.num_ack_pending === 0;
          },
          20_000,
          "b idle",
        );
      } finally {
        await nc.close();
      }
    }

    // Version 2 swaps the routes: the slow item's routing event now leads to b, which read
    // past it under version 1 (it was a's then); the fast item, past b already, now routes
    // to a, which must not run for it.
    await Deno.writeTextFile(file, rewired(2));
    await using mesh = await startMesh({ ...env, WEFT_LOG_LEVEL: "debug" }, { storeDir });
    await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready again");
    const base = mesh.gatewayUrl;
    const moved = await when(
      base,
      slow,
      (s) => s.status === "waiting",
      "the slow item taken by b under version 2, not left running at a",
    );
    assert.deepEqual((moved.results as Record<string, unknown>).b, { b: 2 });
    for (const id of [slow, fast]) {
      assert.equal((await post(base, `/pipelines/rewire/items/${id}/go`, {})).status, 202);
      const done = await when(base, id, (s) => s.status === "done", `${id} done`);
      assert.equal((done.results as Record<string, unknown>).a, undefined, `a never ran for ${id}`);
    }
    assert.deepEqual((await state(base, fast)).results.b, { b: 1 }, "b ran once for the fast item");
    const nc = await connectClient(mesh.natsUrl, "test-admin", mesh.credentials("admin"));
    try {
      const { jetstreamManager } = await import("@nats-io/jetstream");
      const jsm = await jetstreamManager(nc);
      const bs = await jsm.streams.info("REWIRE", { subjects_filter: "rewire.b.>" });
      assert.deepEqual(
        bs.state.subjects,
        { [`rewire.b.${slow}`]: 1, [`rewire.b.${fast}`]: 1 },
        "one b event per item",
      );
      assert.equal((await jsm.streams.info("DEADLETTER")).state.messages, 0, "no dead letter");
    } finally {
      await nc.close();
    }
    const handled = (stage: string, id: string) =>
      mesh.logs.filter((l) => l.msg === "handled" && l.stage === stage && l.item_id === id);
    assert.equal(handled("rewire-b", slow).length, 1, "b ran once for the slow item");
    assert.equal(handled("rewire-a", slow).length + handled("rewire-a", fast).length, 0);
    const handedOver = mesh.logs.filter((l) =>
      l.msg === "handed an event over to the steps the running definition sends it to"
    );
    assert.deepEqual(
      handedOver.map((l) => [l.item_id, l.subject, l.steps]),
      [[slow, `rewire.s.${slow}`, ["b"]]],
    );
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});

/**
 * Version 1 routes items of kinds w, d and e to `a`, which holds them until stopped; version 2
 * routes each of them straight to a step the control service runs: a wait, a delay, an end.
 * (Kind x keeps every step reachable in both.)
 */
const rewiredToControl = (v: 1 | 2) => `
import { definePipeline } from "${MOD}";
export const recontrol = definePipeline({
  name: "recontrol",
  input: { schema: { type: "object", required: ["kind"] } },
  start: "s",
  steps: {
    s: {
      kind: "router",
      route: (i: { kind: string }) => i.kind,
      routes: ${
  v === 1 ? '{ w: "a", d: "a", e: "a", x: "d" }' : '{ w: "w", d: "d", e: "done", x: "a" }'
},
    },
    a: { kind: "task", output: { type: "object" }, handle: ${
  v === 1 ? HOLD : "() => ({ a: 2 })"
}, next: "w" },
    w: { kind: "wait", event: "go", timeoutMs: 600000, onTimeout: "done", next: "done" },
    d: { kind: "delay", ms: 500, next: "done" },
    done: { kind: "end", outcome: "done" },
  },
});
`;

Deno.test("a re-wired route that now leads to a wait, a delay or an end: the event stored before the change reaches it, once, whatever an awaited event's body says", async () => {
  const dir = await meshTempDir("weft-recontrol-");
  const file = `${dir}/def/recontrol.ts`;
  await Deno.mkdir(`${dir}/def`, { recursive: true });
  await Deno.writeTextFile(file, rewiredToControl(1));
  const storeDir = `${dir}/nats`;
  const env = { ...ONE_PROCESS, WEFT_PIPELINES: file, WEFT_ACK_WAIT_MS: "2000" };
  const state = itemState("recontrol");
  const when = stateWhenOk(state);
  const ids: Record<string, string> = {};
  try {
    {
      await using mesh = await startMesh(env, { storeDir, keepStore: true });
      await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
      const base = mesh.gatewayUrl;
      for (const kind of ["w", "d", "e"]) {
        ids[kind] = (await post(base, "/pipelines/recontrol/items", { kind })).body.id;
      }
      for (const id of Object.values(ids)) {
        await when(base, id, (s) => (s.current as string[])?.join() === "a", `${id} at a`);
      }
      // An awaited event for e whose body reads as its end (the ops key, or an outside
      // callback, may publish the wait's events with any body): no Weft event, it ends nothing.
      const ops = await connectClient(mesh.natsUrl, "test-ops", mesh.credentials("ops"));
      try {
        const { jetstream } = await import("@nats-io/jetstream");
        await jetstream(ops).publish(
          `recontrol.go.${ids.e}`,
          JSON.stringify({ id: "forged-end", type: "recontrol.done", data: { runs: { a: 9 } } }),
        );
      } finally {
        await ops.close();
      }
    }
    await Deno.writeTextFile(file, rewiredToControl(2));
    await using mesh = await startMesh(env, { storeDir });
    await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready again");
    const base = mesh.gatewayUrl;
    await when(base, ids.w!, (s) => s.status === "waiting", "the w item waiting at w");
    assert.equal((await post(base, `/pipelines/recontrol/items/${ids.w}/go`, {})).status, 202);
    for (const id of Object.values(ids)) {
      const done = await when(base, id, (s) => s.status === "done", `${id} done`);
      assert.equal(
        (done.results as Record<string, unknown>)?.a,
        undefined,
        `a never ran for ${id}`,
      );
    }
    const nc = await connectClient(mesh.natsUrl, "test-admin", mesh.credentials("admin"));
    try {
      const { jetstreamManager } = await import("@nats-io/jetstream");
      const jsm = await jetstreamManager(nc);
      const ends = await jsm.streams.info("RECONTROL", { subjects_filter: "recontrol.done.>" });
      assert.deepEqual(
        ends.state.subjects,
        Object.fromEntries(Object.values(ids).map((id) => [`recontrol.done.${id}`, 1])),
        "one end event per item",
      );
      assert.equal((await jsm.streams.info("DEADLETTER")).state.messages, 0, "no dead letter");
    } finally {
      await nc.close();
    }
    const handedOver = mesh.logs.filter((l) =>
      l.msg === "handed an event over to the steps the running definition sends it to"
    );
    assert.deepEqual(
      handedOver.map((l) => [l.item_id, l.steps]).sort(),
      [[ids.d, ["d"]], [ids.e, ["done"]], [ids.w, ["w"]]].sort(),
    );
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});

/**
 * Version 1 fans `s` out to `p` (then `a`, which holds items until stopped) and `q`, joined
 * at `j` after `a` and `q`; version 2 joins `p` and `q`: the completion of `p` stored before
 * the change now leads to the join. (A route to `a` keeps it reachable in both.)
 */
const rejoined = (v: 1 | 2) => `
import { definePipeline } from "${MOD}";
export const rejoin = definePipeline({
  name: "rejoin",
  input: { schema: { type: "object", required: ["kind"] } },
  start: "r",
  steps: {
    r: { kind: "router", route: (i: { kind: string }) => i.kind, routes: { fan: "s", solo: "a" } },
    s: { kind: "task", output: { type: "object" }, handle: () => ({ s: 1 }), next: ["p", "q"] },
    p: { kind: "task", output: { type: "object" }, handle: () => ({ p: 1 }), next: "${
  v === 1 ? "a" : "j"
}" },
    a: { kind: "task", output: { type: "object" }, handle: ${
  v === 1 ? HOLD : "() => ({ a: 2 })"
}, next: "${v === 1 ? "j" : "done"}" },
    q: { kind: "task", output: { type: "object" }, handle: () => ({ q: 1 }), next: "j" },
    j: { kind: "join", after: ${
  v === 1 ? '["a", "q"]' : '["p", "q"]'
}, deadlineMs: 600000, onDeadline: "expired", next: "done" },
    done: { kind: "end", outcome: "done" },
    expired: { kind: "end", outcome: "expired" },
  },
});
`;

Deno.test("a re-wired branch that now leads straight to its join: the completion stored before the change reaches the join, and the item ends once", async () => {
  const dir = await meshTempDir("weft-rejoin-");
  const file = `${dir}/def/rejoin.ts`;
  await Deno.mkdir(`${dir}/def`, { recursive: true });
  await Deno.writeTextFile(file, rejoined(1));
  const storeDir = `${dir}/nats`;
  const env = { ...ONE_PROCESS, WEFT_PIPELINES: file, WEFT_ACK_WAIT_MS: "2000" };
  const state = itemState("rejoin");
  const when = stateWhenOk(state);
  let id: string;
  try {
    {
      await using mesh = await startMesh(env, { storeDir, keepStore: true });
      await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
      const base = mesh.gatewayUrl;
      id = (await post(base, "/pipelines/rejoin/items", { kind: "fan" })).body.id;
      await when(
        base,
        id,
        (s) =>
          (s.current as string[])?.sort().join() === "a,j" &&
          (s.results as { q?: unknown })?.q !== undefined,
        "held at a, q at the join",
      );
    }
    await Deno.writeTextFile(file, rejoined(2));
    await using mesh = await startMesh(env, { storeDir });
    await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready again");
    const base = mesh.gatewayUrl;
    const done = await when(base, id, (s) => s.status === "done", "the item done through the join");
    assert.equal((done.results as Record<string, unknown>).a, undefined, "a never ran");
    const nc = await connectClient(mesh.natsUrl, "test-admin", mesh.credentials("admin"));
    try {
      const { jetstreamManager } = await import("@nats-io/jetstream");
      const jsm = await jetstreamManager(nc);
      const ends = await jsm.streams.info("REJOIN", { subjects_filter: "rejoin.*.>" });
      const counts = ends.state.subjects as Record<string, number>;
      assert.equal(counts[`rejoin.done.${id}`], 1, "one end event");
      assert.equal(counts[`rejoin.expired.${id}`], undefined, "no expiry");
      assert.equal((await jsm.streams.info("DEADLETTER")).state.messages, 0, "no dead letter");
    } finally {
      await nc.close();
    }
    const handedOver = mesh.logs.filter((l) =>
      l.msg === "handed an event over to the steps the running definition sends it to"
    );
    assert.deepEqual(handedOver.map((l) => [l.item_id, l.subject, l.steps]), [
      [id, `rejoin.p.${id}`, ["j"]],
    ]);
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});

/**
 * Version 1 fans `s` out to `p` and `q` (which holds an item asking to be held until
 * stopped), joined at `j` before `f` and a wait; version 2 has neither `q` nor the join: `p`
 * leads straight to `f`.
 */
const branching = (v: 1 | 2) => `
import { definePipeline } from "${MOD}";
export const branch = definePipeline({
  name: "branch",
  input: { schema: { type: "object" } },
  start: "s",
  steps: {
    s: { kind: "task", output: { type: "object" }, handle: () => ({ s: true }), next: ${
  v === 1 ? '["p", "q"]' : '"p"'
} },
    p: { kind: "task", output: { type: "object" }, handle: () => ({ p: ${v} }), next: "${
  v === 1 ? "j" : "f"
}" },
    ${
  v === 1
    ? `q: {
      kind: "task",
      output: { type: "object" },
      handle: (v: unknown, ctx: { input: { hold?: boolean }; signal: AbortSignal }) =>
        ctx.input.hold ? (${HOLD})(v, ctx) : { q: 1 },
      next: "j",
    },
    j: { kind: "join", after: ["p", "q"], deadlineMs: 600000, onDeadline: "expired", next: "f" },
    expired: { kind: "end", outcome: "expired" },`
    : ""
}
    f: { kind: "task", output: { type: "object" }, handle: () => ({ f: ${v} }), next: "w" },
    w: { kind: "wait", event: "go", timeoutMs: 600000, onTimeout: "done", next: "done" },
    done: { kind: "end", outcome: "done" },
  },
});
`;

Deno.test("a branch's step removed while it holds an item, its sibling past the join already and now leading straight on: the item goes on from its sibling's event, no step twice", async () => {
  const dir = await meshTempDir("weft-branch-");
  const file = `${dir}/def/branch.ts`;
  await Deno.mkdir(`${dir}/def`, { recursive: true });
  await Deno.writeTextFile(file, branching(1));
  const storeDir = `${dir}/nats`;
  const env = { ...ONE_PROCESS, WEFT_PIPELINES: file, WEFT_ACK_WAIT_MS: "2000" };
  const state = itemState("branch");
  let id: string;
  let passed: string;
  try {
    {
      await using mesh = await startMesh(env, { storeDir, keepStore: true });
      await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
      const base = mesh.gatewayUrl;
      // One item held at q; one past the join and f already, waiting after them.
      id = (await post(base, "/pipelines/branch/items", { hold: true })).body.id;
      passed = (await post(base, "/pipelines/branch/items", {})).body.id;
      await waitFor(
        async () => (await state(base, passed)).status === "waiting",
        20_000,
        "the other item past f, waiting",
      );
      await waitFor(
        async () => (await state(base, id)).current?.slice().sort().join() === "j,q",
        20_000,
        "p done, the item at q and the join",
      );
      const nc = await connectClient(mesh.natsUrl, "test-admin", mesh.credentials("admin"));
      try {
        const { jetstreamManager } = await import("@nats-io/jetstream");
        const jsm = await jetstreamManager(nc);
        await waitFor(
          async () => (await jsm.consumers.info("BRANCH", "branch-q")).num_ack_pending === 1,
          20_000,
          "q holds the item",
        );
        await waitFor(
          async () => {
            const ci = await jsm.consumers.info("BRANCH", "branch-f");
            return ci.delivered.stream_seq > 0 || ci.num_pending === 0;
          },
          20_000,
          "f's consumer in place",
        );
      } finally {
        await nc.close();
      }
    }

    // Version 2: q is gone, and p, which ran already, now leads straight to f, whose
    // consumer is past p's event (on 2.9 it reads on from it). What q holds is swept: the
    // only step the running definition sends it to (p) took it, so q's branch is dropped.
    // The other item went from p through the join to f: p's event is not f's to take again.
    await Deno.writeTextFile(file, branching(2));
    await using mesh = await startMesh({ ...env, WEFT_LOG_LEVEL: "debug" }, { storeDir });
    await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready again");
    const base = mesh.gatewayUrl;
    const on = await waitFor(
      async () => {
        const s = await state(base, id);
        return s.status === "waiting" ? s : undefined;
      },
      30_000,
      "the held item runs on from p's event through f to the wait",
    );
    assert.deepEqual(on.results.f, { f: 2 });
    assert.deepEqual(on.results.p, { p: 1 }, "p's result from its one run");
    for (const item of [id, passed]) {
      assert.equal((await post(base, `/pipelines/branch/items/${item}/go`, {})).status, 202);
      await waitFor(async () => (await state(base, item)).status === "done", 20_000, item);
    }
    assert.deepEqual((await state(base, passed)).results.f, { f: 1 }, "f ran once, under v1");
    const swept = await mesh.waitForLog(
      (l) => l.msg === "swept a retired step's consumer",
      30_000,
      "q's consumer swept",
    );
    assert.equal(swept.consumer, "branch-q");
    assert.equal(swept.dead_lettered, 0);
    const handled = (stage: string, item: string) =>
      mesh.logs.filter((l) => l.msg === "handled" && l.stage === stage && l.item_id === item);
    assert.equal(handled("branch-f", id).length, 1, "f ran once for the held item");
    assert.equal(handled("branch-f", passed).length, 0, "f did not run again for the other");
    assert.equal(handled("branch-p", id).length + handled("branch-p", passed).length, 0);
    const nc = await connectClient(mesh.natsUrl, "test-admin", mesh.credentials("admin"));
    try {
      const { jetstreamManager } = await import("@nats-io/jetstream");
      const jsm = await jetstreamManager(nc);
      assert.equal((await jsm.streams.info("DEADLETTER")).state.messages, 0, "no dead letter");
    } finally {
      await nc.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});

Deno.test("a redriven event that a step ran for already does not run it again, and the item's later events reach the steps the running definition sends them to", async () => {
  const { startTestNats } = await import("./helpers/nats.ts");
  const { runStage } = await import("../src/runner.ts");
  const { runStateWriter } = await import("../src/state_writer.ts");
  const { listDeadLetters, redrive } = await import("../src/redrive.ts");
  const { ensureTopology } = await import("../src/topology.ts");
  const { compileFlow } = await import("../src/pipeline/flow.ts");
  const { PermanentError } = await import("../src/errors.ts");
  const rt = await import("../src/pipeline/runtime.ts");
  const { definePipeline } = await import("../mod.ts");
  const { jetstream } = await import("@nats-io/jetstream");
  const { Kvm } = await import("@nats-io/kv");
  await using t = await startTestNats();
  const runs = { p: 0, f: 0 };
  const obj = { type: "object" } as const;
  // Version 1 forks `s` to `p` and `q` (which fails the item), joined before `f`; version 2
  // has neither `q` nor the join: `p` leads straight to `f`.
  const v1 = definePipeline({
    name: "fork",
    input: { schema: obj },
    start: "s",
    steps: {
      s: { kind: "task", output: obj, handle: () => ({}), next: ["p", "q"] },
      p: { kind: "task", output: obj, handle: () => ({ p: ++runs.p }), next: "j" },
      q: {
        kind: "task",
        output: obj,
        handle: () => {
          throw new PermanentError("q refuses");
        },
        next: "j",
      },
      j: { kind: "join", after: ["p", "q"], deadlineMs: 600_000, onDeadline: "late", next: "f" },
      f: { kind: "task", output: obj, handle: () => ({ f: ++runs.f }), next: "done" },
      done: { kind: "end", outcome: "done" },
      late: { kind: "end", outcome: "late" },
    },
  });
  const v2 = definePipeline({
    name: "fork",
    input: { schema: obj },
    start: "s",
    steps: {
      s: { kind: "task", output: obj, handle: () => ({}), next: "p" },
      p: { kind: "task", output: obj, handle: () => ({ p: ++runs.p }), next: "f" },
      f: { kind: "task", output: obj, handle: () => ({ f: ++runs.f }), next: "done" },
      done: { kind: "end", outcome: "done" },
    },
  });
  const one: LoadedPipeline = { file: "inline", def: v1, flow: compileFlow(v1) };
  const two: LoadedPipeline = { file: "inline", def: v2, flow: compileFlow(v2) };
  await ensureTopology(t.nc, t.jsm, t.config, rt.pipelineTopology([one], t.config.retentionMs));
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const kv = await new Kvm(t.nc).open(rt.stateBucketOf("fork"));
  const stateIs = (status: string, what: string) =>
    waitFor(
      async () => {
        const s = await rt.readItem(kv, "it");
        return s?.status === status ? s : undefined;
      },
      20_000,
      what,
    );
  const work = async (p: LoadedPipeline, id: string) =>
    await runStage({ ...deps, stage: rt.workStage(p, id, { nc: t.nc }) });
  const first = [
    await runStateWriter({ ...deps, spec: rt.pipelineStateSpec(one) }),
    await runStage({ ...deps, stage: rt.controlStage(one, t.nc) }),
    ...await Promise.all(["s", "p", "q", "f"].map((id) => work(one, id))),
  ];
  const second = [];
  try {
    await rt.submitItem(t.nc, one, "it", {}, { source: "test", traceId: "0".repeat(32) });
    await stateIs("failed", "the item failed at q, p done");
    assert.equal(runs.p, 1);
    await Promise.all(first.map((r) => r.stop()));
    first.length = 0;

    // Version 2, then q's letter redriven: s's event again, which p ran for already.
    second.push(
      await runStateWriter({ ...deps, spec: rt.pipelineStateSpec(two) }),
      await runStage({
        ...deps,
        stage: rt.controlStage(two, t.nc, { handover: rt.createHandover(two, t.nc) }),
      }),
      ...await Promise.all(["s", "p"].map((id) => work(two, id))),
    );
    const js = jetstream(t.nc);
    const letters = await listDeadLetters(js, { item_id: "it" });
    assert.deepEqual(letters.map((l) => l.letter.subject), ["fork.s.it"]);
    await redrive(js, { ids: [letters[0]!.seq] });
    await stateIs("running", "the item resumed");
    second.push(await work(two, "f")); // f's consumer, past p's event on nats-server 2.10+
    const done = await stateIs("done", "the item ran on through f to its end");
    assert.deepEqual(done.results.f, { f: 1 });
    assert.deepEqual(runs, { p: 1, f: 1 }, "p did not run again, f once");
    assert.ok(
      t.lines.some((l) => l.includes("skipped: this step ran for the event already")),
      "p skipped the redriven event",
    );
  } finally {
    await Promise.all([...first, ...second].map((r) => r.stop()));
  }
});
