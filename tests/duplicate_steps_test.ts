/**
 * Two steps with one id in a definition file stop `deno task start` before anything starts,
 * naming the file and the step (an object literal would keep the second without a word).
 */
import assert from "node:assert/strict";
import { meshTempDir, removedAtEnd, taskArgs } from "./helpers/mesh.ts";
import { duplicateKeysIn } from "../src/pipeline/duplicate_keys.ts";

const definition = (steps: string) =>
  `import { definePipeline } from "../../../mod.ts";
export const twice = definePipeline({
  name: "twice",
  input: { schema: { type: "object" } },
  start: "a",
  steps: {
${steps}
    z: { kind: "end", outcome: "z" },
  },
});
`;
const step = (result: string) =>
  `    a: { kind: "task", output: { type: "object" }, handle: () => (${result}), next: "z" },`;

Deno.test("deno task start refuses two steps with one id, naming the file and the step, before anything starts", async () => {
  // Found auditing issue 12: the file loaded as a definition of one step `a` (the second),
  // and the mesh started its services.
  const dir = await meshTempDir("weft-twice-");
  await using _dir = removedAtEnd(dir);
  const file = `${dir}/twice.ts`;
  await Deno.writeTextFile(
    file,
    definition(`${step("{ first: true }")}\n${step("{ second: true }")}`),
  );
  const child = new Deno.Command("deno", {
    args: await taskArgs("start"),
    cwd: new URL("../", import.meta.url),
    env: { WEFT_PIPELINES: file, WEFT_NATS_DIR: `${dir}/nats`, PORT: "0" },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  // A start that does not refuse runs until stopped: stopped (SIGTERM, its clean shutdown)
  // once the deadline passes, so the test fails rather than hangs.
  const deadline = setTimeout(() => child.kill("SIGTERM"), 60_000);
  const out = await child.output().finally(() => clearTimeout(deadline));
  const text = new TextDecoder().decode(out.stdout);
  assert.equal(out.code, 2, text);
  const lines = text.trim().split("\n").map((l) => JSON.parse(l));
  const error = lines.find((l) => l.level === "error");
  assert.match(
    error?.msg ?? "",
    /^pipeline file \S*twice\.ts: pipeline twice, step a: defined twice in the steps at line 6/,
  );
  assert.equal(lines.filter((l) => l.level === "error").length, 1, "one clear line");
  assert.ok(!lines.some((l) => /starting services|nats-server/.test(l.msg)), text);
  assert.equal(await Deno.stat(`${dir}/nats`).then(() => true, () => false), false);
});

Deno.test("duplicateKeysIn finds a key written twice in any object of a file, and none in a clean one", async () => {
  const dir = await meshTempDir("weft-twice-");
  await using _dir = removedAtEnd(dir);
  await Deno.writeTextFile(`${dir}/clean.ts`, definition(step("{}")));
  assert.deepEqual(await duplicateKeysIn(`${dir}/clean.ts`), []);
  await Deno.writeTextFile(`${dir}/schema.ts`, "export const s = {\n  type: 1,\n  type: 2,\n};\n");
  assert.deepEqual(await duplicateKeysIn(`${dir}/schema.ts`), [{ key: "type", line: 1 }]);
});
