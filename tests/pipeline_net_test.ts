/**
 * A definition's task step reaches the hosts its `allowNet` lists (an API, a webhook, an embedding
 * service), and only those: its service's `--allow-net` is NATS, the LLM endpoint for model
 * steps, and its own `allowNet`. Found by probing as a new user: a handler calling any HTTP API
 * failed every attempt with Deno's "Requires net access ..., run again with the --allow-net
 * flag", which no setting could grant.
 */
import assert from "node:assert/strict";
import { compileFlow } from "../src/pipeline/flow.ts";
import { definePipeline } from "../src/pipeline/definition.ts";
import { PipelineDefinitionError } from "../src/pipeline/validate.ts";
import type { LoadedPipeline } from "../src/pipeline/runtime.ts";
import { meshServices, serviceArgs } from "../src/supervisor.ts";
import { meshTempDir, ONE_PROCESS, removedAtEnd, startMesh } from "./helpers/mesh.ts";
import { testConfig } from "./helpers/nats.ts";
import { waitFor } from "./helpers/wait.ts";

const MOD = new URL("../mod.ts", import.meta.url).href;

/** A definition whose `call` task lists `allowNet`, and whose `plain` task does not. */
function callingSpec(allowNet: unknown) {
  return {
    name: "calls",
    input: { schema: { type: "object" } },
    start: "call",
    steps: {
      call: {
        kind: "task",
        output: { type: "object" },
        allowNet,
        handle: () => ({}),
        next: "plain",
      },
      plain: { kind: "task", output: { type: "object" }, handle: () => ({}), next: "done" },
      done: { kind: "end", outcome: "done" },
    },
  } as const;
}

Deno.test("definePipeline refuses a step's allowNet that is no list of host or host:port, naming the step", () => {
  for (
    const bad of [
      "api.example.com",
      ["https://api.example.com"],
      ["api.example.com/v1"],
      ["a.example.com,b.example.com"],
      ["*"],
      [""],
      ["api.example.com:70000"],
      ["api.example.com:0"],
      [443],
    ]
  ) {
    assert.throws(
      () => definePipeline(callingSpec(bad) as never),
      (err: unknown) =>
        err instanceof PipelineDefinitionError && err.problem === "invalid_value" &&
        err.step === "call" && /allowNet lists hosts/.test(err.message),
      JSON.stringify(bad),
    );
  }
  assert.doesNotThrow(() =>
    definePipeline(
      callingSpec(["api.example.com:443", "127.0.0.1", "[::1]:8080", "localhost:9"]) as never,
    )
  );
});

Deno.test("a step's allowNet is on its service's --allow-net, and on no other service's", () => {
  const def = definePipeline(callingSpec(["hooks.example.com:443"]) as never);
  const loaded: LoadedPipeline[] = [{ file: "/x/calls.ts", def, flow: compileFlow(def) }];
  const config = testConfig("nats://127.0.0.1:4222");
  const allowNet = (name: string) => {
    const spec = meshServices(loaded).services.find((s) => s.name === name);
    assert.ok(spec, name);
    return serviceArgs(spec, config).find((a) => a.startsWith("--allow-net="))!;
  };
  assert.equal(allowNet("calls-call"), "--allow-net=127.0.0.1:4222,hooks.example.com:443");
  assert.equal(allowNet("calls-plain"), "--allow-net=127.0.0.1:4222");
  assert.equal(allowNet("calls-flow"), "--allow-net=127.0.0.1:4222");
  assert.doesNotMatch(allowNet("gateway"), /hooks\.example\.com/);
  // A live shadow runs a candidate's copy of the step.
  assert.match(allowNet("shadow"), /hooks\.example\.com:443/);
});

Deno.test("a task step calls the HTTP API its allowNet lists, under deno task start", async () => {
  const seen: string[] = [];
  await using api = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (req) => {
    seen.push(await req.text());
    return Response.json({ score: 7 });
  });
  const dir = await meshTempDir("weft-net-");
  await using _dir = removedAtEnd(dir);
  await Deno.writeTextFile(
    `${dir}/calls.ts`,
    `import { definePipeline } from "${MOD}";
export const calls = definePipeline({
  name: "calls",
  input: { schema: { type: "object", required: ["text"], properties: { text: { type: "string" } } } },
  start: "score",
  steps: {
    score: {
      kind: "task",
      output: { type: "object", required: ["score"] },
      allowNet: ["127.0.0.1:${api.addr.port}"],
      handle: async (v: { text: string }, ctx) => {
        const res = await fetch("http://127.0.0.1:${api.addr.port}/score", {
          method: "POST",
          body: v.text,
          signal: ctx.signal,
        });
        return await res.json();
      },
      next: "done",
    },
    done: { kind: "end", outcome: "done" },
  },
});
`,
  );
  await using mesh = await startMesh({
    ...ONE_PROCESS,
    WEFT_PIPELINES: `${dir}/calls.ts`,
    WEFT_MAX_ATTEMPTS: "2",
    WEFT_RETRY_BASE_MS: "100",
  }, { storeDir: `${dir}/nats` });
  await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
  const res = await fetch(`${mesh.gatewayUrl}/pipelines/calls/items`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ text: "hello api" }),
  });
  assert.equal(res.status, 202);
  const { id } = await res.json();
  const state = await waitFor(
    async () => {
      const s = await (await fetch(`${mesh.gatewayUrl}/pipelines/calls/items/${id}`)).json();
      return s.status === "done" || s.status === "failed" ? s : undefined;
    },
    30_000,
    "the item ended",
  );
  assert.equal(state.status, "done", JSON.stringify(state.error));
  assert.deepEqual(state.results.score, { score: 7 });
  assert.deepEqual(seen, ["hello api"]);
});
