/**
 * The nats CLI is a first-class client: every command the README shows, run with the real
 * `nats` binary and the ops key against a running mesh (`deno task start`), for the built-in
 * feedback pipeline and for a pipeline run from a definition.
 */
import assert from "node:assert/strict";
import { meshTempDir, ONE_PROCESS, removedAtEnd, startMesh } from "./helpers/mesh.ts";
import { deadline, waitFor } from "./helpers/wait.ts";

const MOD = new URL("../mod.ts", import.meta.url).href;
const decoder = new TextDecoder();

Deno.test("every nats CLI command the README shows works against the mesh", async (t) => {
  const dir = await meshTempDir("weft-cli-");
  await using _dir = removedAtEnd(dir);
  await Deno.writeTextFile(
    `${dir}/hello.ts`,
    `import { definePipeline } from "${MOD}";
export const hello = definePipeline({
  name: "hello",
  input: { schema: { type: "object", required: ["text"] } },
  start: "greet",
  steps: {
    greet: { kind: "task", output: { type: "object" }, handle: (i: { text: string }) => ({ hi: i.text }), next: "approval" },
    approval: { kind: "wait", event: "approved", timeoutMs: 600000, onTimeout: "done", next: "done" },
    done: { kind: "end", outcome: "done" },
  },
});
`,
  );
  await using mesh = await startMesh({ ...ONE_PROCESS, WEFT_PIPELINES: `${dir}/hello.ts` }, {
    storeDir: `${dir}/nats`,
  });
  await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
  // The README's context: the ops key, its replies under its own inbox prefix.
  const global = [
    "--server",
    mesh.natsUrl,
    "--nkey",
    mesh.credentials("ops").nkeySeedFile!,
    "--inbox-prefix",
    "_INBOX_ops",
  ];
  const nats = async (...args: string[]) => {
    const out = await new Deno.Command("nats", {
      args: [...global, ...args],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = decoder.decode(out.stdout) + decoder.decode(out.stderr);
    assert.ok(out.success, `nats ${args.join(" ")}: ${text}`);
    return text;
  };
  /**
   * `nats sub --stream FEEDBACK <subject> --all` (an ordered consumer: ops may not subscribe
   * to a stream's subjects) in the background until it has `count` messages; resolves once it
   * listens.
   */
  const sub = async (subject: string, count: number) => {
    const child = new Deno.Command("nats", {
      args: [...global, "sub", "--stream", "FEEDBACK", subject, "--all", "--count", String(count)],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const stdout = new Response(child.stdout).text();
    // It says "Subscribing to subject <subject> ..." once the subscription is made.
    const reader = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
    let said = "";
    await deadline(
      (async () => {
        while (!said.includes("Subscribing")) {
          const { value, done } = await reader.read();
          if (done) throw new Error(`nats sub ended: ${said}`);
          said += value;
        }
      })(),
      10_000,
      `nats sub ${subject} to subscribe`,
    );
    return async () => {
      await child.status;
      await reader.cancel();
      // The bodies: one JSON line per message, after its "Received on" header.
      return (await stdout).split("\n").filter((l) => l.startsWith("{")).join("\n");
    };
  };

  let id = "";
  await t.step(
    "nats sub --stream FEEDBACK 'feedback.>' and a type, nats pub feedback.submit, nats req submit/get",
    async () => {
      const all = await sub("feedback.>", 5);
      const processed = await sub("feedback.processed.*", 1);
      await nats("pub", "feedback.submit", '{"text":"love it"}');
      const reply = JSON.parse(
        (await nats("req", "weft.feedback.submit", '{"text":"love it too"}', "--raw")).trim(),
      );
      assert.equal(reply.status, "accepted");
      id = reply.id;
      assert.match(await processed(), /"type":"feedback.processed"/);
      // natscli 0.5.0 may print more than N messages for a JetStream `--count N` (7 for 5 here).
      const events = (await all()).trim().split("\n").map((l) => JSON.parse(l).type);
      assert.ok(events.length >= 5, `${events.length} events`);
      assert.ok(events.includes("feedback.ingested"));
      const state = await waitFor(
        async () => {
          const s = JSON.parse((await nats("req", "weft.feedback.get", id, "--raw")).trim());
          return s.status === "processed" ? s : undefined;
        },
        20_000,
        "processed",
      );
      assert.ok(state.routing?.team);
    },
  );

  await t.step("nats kv get, nats stream view, deadletters.list, a service's metrics", async () => {
    assert.match(await nats("kv", "get", "weft_feedback_state", id, "--raw"), /"processed"/);
    // `nats stream view` pages on a terminal: run it on one (script gives it a pty).
    const view = await new Deno.Command("script", {
      args: ["-qc", ["nats", ...global, "stream", "view", "FEEDBACK", "25"].join(" "), "/dev/null"],
      stdin: "null",
      stdout: "piped",
    }).output();
    assert.match(decoder.decode(view.stdout), /Subject: feedback\.ingested\./);
    const letters = JSON.parse(
      (await nats("req", "weft.deadletters.list", '{"pending":true}', "--raw")).trim(),
    );
    assert.ok(Array.isArray(letters.items));
    const metrics = await nats(
      "req",
      "weft.dispatch.metrics",
      "",
      "--replies",
      "0",
      "--timeout",
      "1s",
    );
    assert.match(metrics, /weft_stage_processed_total/);
  });

  await t.step("nats micro ls, info and stats", async () => {
    const ls = await nats("micro", "ls");
    for (const s of ["weft-sentiment", "weft-gateway", "weft-hello-flow", "weft-hello-greet"]) {
      assert.match(ls, new RegExp(s));
    }
    assert.match(await nats("micro", "info", "weft-sentiment"), /Weft pipeline stage sentiment/);
    assert.match(
      await nats("micro", "stats", "weft-sentiment"),
      /weft-sentiment Service Statistics/,
    );
  });

  await t.step(
    "a definition's pipeline: pub <name>.submit, req weft.<name>.submit, get and waiting, kv get, an awaited event",
    async () => {
      await nats("pub", "hello.submit", '{"text":"from the bus"}');
      const reply = JSON.parse(
        (await nats("req", "weft.hello.submit", '{"text":"cli"}', "--raw")).trim(),
      );
      const waiting = await waitFor(
        async () => {
          const s = JSON.parse((await nats("req", "weft.hello.get", reply.id, "--raw")).trim());
          return s.status === "waiting" ? s : undefined;
        },
        20_000,
        "waiting for approval",
      );
      assert.deepEqual(waiting.results.greet, { hi: "cli" });
      // What waits for a decision, over the bus as over HTTP.
      const queue = JSON.parse((await nats("req", "weft.hello.waiting", "", "--raw")).trim());
      assert.ok(
        queue.items.some((i: { id: string; event: string }) =>
          i.id === reply.id && i.event === "hello.approved"
        ),
        JSON.stringify(queue),
      );
      await nats("pub", `hello.approved.${reply.id}`, '{"by":"carol"}');
      await waitFor(
        async () => {
          const raw = await nats("kv", "get", "weft_hello_state", reply.id, "--raw");
          return raw.includes('"outcome":"done"') || undefined;
        },
        20_000,
        "done after the approval on the bus",
      );
      // The bus submission became an item too (its id follows from its stream position).
      const keys = await nats("kv", "ls", "weft_hello_state");
      assert.match(keys, /hello-\d+/);
    },
  );
});
