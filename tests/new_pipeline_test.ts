/**
 * `deno task new NAME` writes a pipeline that works as written: its own test passes, and
 * `deno task start` runs it, answering over HTTP.
 */
import assert from "node:assert/strict";
import { bucketTwin } from "../scripts/new_pipeline.ts";
import { ONE_PROCESS, startMesh } from "./helpers/mesh.ts";
import { quiet, taskArgs } from "./helpers/mesh.ts";
import { waitFor } from "./helpers/wait.ts";
import { exportName } from "../scripts/new_pipeline.ts";

const root = new URL("../", import.meta.url);

/** Runs `deno task new NAME --no-list` from the repository root. */
async function newPipeline(
  name: string,
  env: Record<string, string> = {},
): Promise<Deno.CommandOutput> {
  return await new Deno.Command("deno", {
    args: [...quiet(await taskArgs("new")), name, "--no-list"],
    cwd: root,
    env,
    stdout: "piped",
    stderr: "piped",
  }).output();
}

Deno.test("deno task new prints the configured port in the commands that call the pipeline", async () => {
  const name = `gen-${crypto.randomUUID().slice(0, 8)}`;
  try {
    const made = await newPipeline(name, { PORT: "8123" });
    const said = new TextDecoder().decode(made.stdout);
    assert.ok(made.success, new TextDecoder().decode(made.stderr));
    assert.match(said, new RegExp(`curl -X POST localhost:8123/pipelines/${name}/items`));
    assert.match(said, new RegExp(`curl -N localhost:8123/pipelines/${name}/items/<id>/events`));
    assert.doesNotMatch(said, /:8000/);
  } finally {
    await Deno.remove(new URL(`pipelines/${name}/`, root), { recursive: true }).catch(() => {});
  }
});

Deno.test("deno task new writes a two-step pipeline whose test passes and which the mesh runs", async () => {
  const name = `gen-${crypto.randomUUID().slice(0, 8)}`;
  const dir = new URL(`pipelines/${name}/`, root);
  const list = await Deno.readTextFile(new URL("pipelines/run.json", root));
  try {
    const made = await newPipeline(name);
    const said = new TextDecoder().decode(made.stdout);
    assert.ok(made.success, new TextDecoder().decode(made.stderr));
    assert.match(said, new RegExp(`POST localhost:8000/pipelines/${name}/items`));
    assert.equal(
      await Deno.readTextFile(new URL("pipelines/run.json", root)),
      list,
      "--no-list leaves pipelines/run.json alone",
    );
    // So a bare `deno task start` would not run it: the output says how it runs.
    assert.doesNotMatch(said, /run it +deno task start\n/);
    assert.match(
      said,
      new RegExp(`WEFT_PIPELINES=pipelines/${name}/pipeline\\.ts deno task start`),
    );

    const tested = await new Deno.Command("deno", {
      args: ["test", "--allow-read", `pipelines/${name}/`],
      cwd: root,
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.ok(tested.success, new TextDecoder().decode(tested.stdout));

    await using mesh = await startMesh({
      ...ONE_PROCESS,
      WEFT_PIPELINES: `pipelines/${name}/pipeline.ts`,
    });
    await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
    const res = await fetch(`${mesh.gatewayUrl}/pipelines/${name}/items`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ text: "  is it   on? " }),
    });
    assert.equal(res.status, 202);
    const { id } = await res.json();
    const state = await waitFor(
      async () => {
        const s = await (await fetch(`${mesh.gatewayUrl}/pipelines/${name}/items/${id}`)).json();
        return s.status === "done" ? s : undefined;
      },
      30_000,
      "the item done",
    );
    assert.deepEqual(state.results.classify, { label: "question" });
    assert.equal(state.outcome, "done");
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});

Deno.test("deno task new refuses a name the mesh already uses (a hand-wired pipeline's, the runtime's)", async () => {
  for (const name of ["feedback", "content", "deadletter", "shadow"]) {
    const made = await newPipeline(name);
    assert.equal(made.code, 2, name);
    assert.match(new TextDecoder().decode(made.stderr), /not one of .*feedback, content/);
  }
});

Deno.test("deno task new refuses a name a listed file defines already, or one differing only by - and _ from a pipeline's there or listed in run.json, in one line", async () => {
  const tag = crypto.randomUUID().slice(0, 8);
  const there = `gen_${tag}`;
  try {
    assert.ok((await newPipeline(there)).success);
    const made = await newPipeline(`gen-${tag}`);
    const said = new TextDecoder().decode(made.stderr);
    assert.equal(made.code, 1, said);
    assert.equal(said.trim().split("\n").length, 1, said);
    assert.match(said, new RegExp(`"gen-${tag}" would share the buckets of pipeline "${there}"`));
    await assert.rejects(Deno.stat(new URL(`pipelines/gen-${tag}/`, root)));
  } finally {
    for (const d of [there, `gen-${tag}`]) {
      await Deno.remove(new URL(`pipelines/${d}/`, root), { recursive: true }).catch(() => {});
    }
  }
  // What run.json lists, in a tree of its own: the repository's run.json is what every mesh
  // a test starts reads (rewritten here, a mesh started meanwhile found a file that is not there).
  const tree = await Deno.makeTempDir({ prefix: "weft-new-" });
  try {
    const at = new URL(`file://${tree}/`);
    await Deno.mkdir(new URL("pipelines/", at));
    const listFile = new URL("pipelines/run.json", at);
    // Listed in run.json only (its folder elsewhere, or gone).
    await Deno.writeTextFile(listFile, JSON.stringify({ run: ["pipelines/gen_x_b/pipeline.ts"] }));
    const listed = await bucketTwin("gen-x-b", at);
    assert.equal(listed?.name, "gen_x_b");
    assert.match(listed!.where, /pipelines\/run\.json/);
    // The very name, defined by a listed file in another folder: the same pipeline twice.
    const elsewhere = "pipelines/gen_x_c/shop.ts";
    await Deno.mkdir(new URL("pipelines/gen_x_c/", at));
    await Deno.writeTextFile(new URL(elsewhere, at), `export default { name: "shop-x" };\n`);
    await Deno.writeTextFile(listFile, JSON.stringify({ run: [elsewhere] }));
    const same = await bucketTwin("shop-x", at);
    assert.equal(same?.name, "shop-x", "the name itself: deno task new says it is defined already");
    assert.match(same!.where, new RegExp(elsewhere));
  } finally {
    await Deno.remove(tree, { recursive: true });
  }
});

Deno.test("deno task new refuses every name deno task start refuses, in one line, before writing anything or listing it", async () => {
  const listFile = new URL("pipelines/run.json", root);
  const list = await Deno.readTextFile(listFile);
  const tag = crypto.randomUUID().slice(0, 8);
  // Longer than 32 characters (the definition validator's limit), or no subject token.
  const names = [
    `long${tag}`.padEnd(40, "x"),
    `long${tag}`.padEnd(33, "x"),
    `Gen${tag}`,
    `g.${tag}`,
  ];
  try {
    for (const name of names) {
      const made = await new Deno.Command("deno", {
        args: [...quiet(await taskArgs("new")), name],
        cwd: root,
        stdout: "piped",
        stderr: "piped",
      }).output();
      const said = new TextDecoder().decode(made.stderr);
      assert.equal(made.code, 2, `${name}: ${said}`);
      assert.equal(said.trim().split("\n").length, 1, said);
      assert.match(
        said,
        new RegExp(`name "${name}" is (longer than 32 characters|not a subject token)`),
      );
      await assert.rejects(
        Deno.stat(new URL(`pipelines/${name}/`, root)),
        `${name}: nothing written`,
      );
      assert.equal(await Deno.readTextFile(listFile), list, `${name}: run.json unchanged`);
    }
  } finally {
    await Deno.writeTextFile(listFile, list);
    for (const name of names) {
      await Deno.remove(new URL(`pipelines/${name}/`, root), { recursive: true }).catch(() => {});
    }
  }
});

Deno.test("deno task new writes a pipeline whose test passes for a name starting with a digit or holding runs of - or _", async () => {
  const tag = crypto.randomUUID().slice(0, 8);
  const digits = String(Math.floor(Math.random() * 1e8));
  const names = [`1abc${tag}`, `9${digits}`, `a${tag}-`, `a${tag}--b`, `a${tag}_-_b_`];
  try {
    for (const name of names) {
      const made = await newPipeline(name);
      assert.ok(made.success, `${name}: ${new TextDecoder().decode(made.stderr)}`);
    }
    const tested = await new Deno.Command("deno", {
      args: ["test", "--allow-read", ...names.map((n) => `pipelines/${n}/`)],
      cwd: root,
      stdout: "piped",
      stderr: "piped",
    }).output();
    const out = new TextDecoder().decode(tested.stdout) + new TextDecoder().decode(tested.stderr);
    assert.ok(tested.success, out);
    assert.match(out, new RegExp(`${names.length} passed`));
  } finally {
    for (const name of names) {
      await Deno.remove(new URL(`pipelines/${name}/`, root), { recursive: true }).catch(() => {});
    }
  }
});

Deno.test("deno task new writes files deno fmt --check and deno lint accept (deno task ok), for a short name and a 32-character one", async () => {
  // Found by probing: its test's first line was 140 characters, so `deno task ok` failed
  // on a freshly written pipeline.
  const tag = crypto.randomUUID().replaceAll("-", "").slice(0, 8);
  const names = [`f${tag}`, `f${tag}-${"x".repeat(22)}`];
  assert.equal(names[1]!.length, 32);
  try {
    for (const name of names) {
      const made = await newPipeline(name);
      assert.ok(made.success, `${name}: ${new TextDecoder().decode(made.stderr)}`);
    }
    const dirs = names.map((n) => `pipelines/${n}/`);
    for (const args of [["fmt", "--check", ...dirs], ["lint", ...dirs]]) {
      const run = await new Deno.Command("deno", {
        args,
        cwd: root,
        stdout: "piped",
        stderr: "piped",
      }).output();
      const out = new TextDecoder().decode(run.stdout) + new TextDecoder().decode(run.stderr);
      assert.ok(run.success, `deno ${args[0]}: ${out}`);
    }
  } finally {
    for (const name of names) {
      await Deno.remove(new URL(`pipelines/${name}/`, root), { recursive: true }).catch(() => {});
    }
  }
});

Deno.test("exportName is an identifier for every name: digits first, reserved words, runs of - and _", () => {
  assert.equal(exportName("order-lines"), "orderLines");
  assert.equal(exportName("a--b"), "aB");
  assert.equal(exportName("a-"), "a");
  assert.equal(exportName("9"), "pipeline9");
  assert.equal(exportName("1abc"), "pipeline1abc");
  assert.equal(exportName("class"), "pipelineClass");
  assert.equal(exportName("define-pipeline"), "pipelineDefinePipeline");
});
