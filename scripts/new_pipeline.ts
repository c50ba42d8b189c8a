/**
 * `deno task new NAME`: writes a working two-step pipeline (pipelines/NAME/pipeline.ts) and
 * its test, lists it in pipelines/run.json for `deno task start`, and says how to run and
 * call it.
 *
 * @module
 */
import { takenNames } from "../src/pipeline/runtime.ts";
import { MAX_NAME, pipelineNameProblem } from "../src/pipeline/validate.ts";
import { loadConfig } from "../src/config.ts";

const ROOT = new URL("../", import.meta.url);

/** Words no `const` may be named, and the names pipeline.ts binds itself. */
const NOT_AN_EXPORT = new Set(
  ("await break case catch class const continue debugger default delete do else enum export " +
    "extends false finally for function if implements import in instanceof interface let new " +
    "null package private protected public return static super switch this throw true try typeof " +
    "var void while with yield arguments eval undefined NaN Infinity definePipeline").split(" "),
);

/**
 * The name a new pipeline's definition is exported as: NAME in camelCase (`order-lines` ->
 * `orderLines`; a run of - or _ is one break, a trailing one none), prefixed `pipeline` when
 * that is no identifier of its own (`9` -> `pipeline9`, `class` -> `pipelineClass`).
 *
 * @example
 * ```ts
 * import { exportName } from "./new_pipeline.ts";
 * console.assert(exportName("order-lines") === "orderLines");
 * console.assert(exportName("1abc") === "pipeline1abc");
 * ```
 */
export function exportName(name: string): string {
  const words = name.split(/[-_]+/).filter((w) => w.length > 0);
  const camel = words.map((w, i) => i === 0 ? w : w[0]!.toUpperCase() + w.slice(1)).join("");
  if (/^[A-Za-z_$][A-Za-z0-9_$]*$/.test(camel) && !NOT_AN_EXPORT.has(camel)) return camel;
  return `pipeline${camel.slice(0, 1).toUpperCase()}${camel.slice(1)}`;
}

/** The definition a new pipeline starts from: normalize -> classify -> done. */
export function pipelineSource(name: string): string {
  const id = exportName(name);
  return `/**
 * The ${name} pipeline: a text is normalized, then classified. Edit the steps; the runtime
 * derives services, subjects, routes and state from this file (docs/PIPELINES.md).
 */
import { definePipeline } from "../../mod.ts";

/** The input document: what \`POST /pipelines/${name}/items\` takes. */
export interface Input {
  text: string;
}

export const ${id} = definePipeline({
  name: "${name}",
  input: {
    schema: {
      type: "object",
      required: ["text"],
      properties: { text: { type: "string", minLength: 1, maxLength: 10000 } },
    },
  },
  start: "normalize",
  steps: {
    normalize: {
      kind: "task",
      output: { type: "object", required: ["text"], properties: { text: { type: "string" } } },
      handle: (input: Input) => ({ text: input.text.trim().replace(/\\s+/g, " ") }),
      next: "classify",
    },
    classify: {
      kind: "task",
      output: {
        type: "object",
        required: ["label"],
        properties: { label: { enum: ["question", "statement"] } },
      },
      // (\`as const\` keeps the labels literal: the compiler checks them against the enum.)
      handle: (n: { text: string }) =>
        ({ label: n.text.endsWith("?") ? "question" : "statement" }) as const,
      next: "done",
    },
    done: { kind: "end", outcome: "done" },
  },
});
`;
}

/** The new pipeline's test: its handlers' results match their schemas, step by step. */
export function testSource(name: string): string {
  // Imported as \`pipeline\`: no name of the test's own can then be the definition's.
  return `import assert from "node:assert/strict";
import { advance, compileFlow, completion, entryData, flowEvent } from "../../mod.ts";
import { ${exportName(name)} as pipeline } from "./pipeline.ts";

Deno.test("${name}: a question is normalized, classified and done", async () => {
  const flow = compileFlow(pipeline);
  const ctx = { source: "test", now: new Date() };
  const entry = flowEvent(
    flow,
    "submitted",
    { id: "e1", item_id: "i1", trace_id: "0".repeat(32) },
    entryData({ text: "  is it   on? " }),
    ctx,
  );
  const step = async (id: "normalize" | "classify", data: typeof entry.data) => {
    const s = pipeline.steps[id];
    const result = await s.handle(data.value as never);
    assert.ok(flow.checkOutput.get(id)!(result), \`\${id}'s result matches its output schema\`);
    return advance(data, id, result, result);
  };
  const normalized = await step("normalize", entry.data);
  assert.deepEqual(normalized.value, { text: "is it on?" });
  const classified = await step("classify", normalized);
  assert.deepEqual(classified.value, { label: "question" });
  const events = completion(flow, "classify", entry, classified, ctx);
  const types = events.map((e) => e.type);
  assert.deepEqual(types, [\`\${pipeline.name}.classify\`, \`\${pipeline.name}.done\`]);
});
`;
}

/**
 * The pipeline `name` would share its buckets with (names differing only by - and _ are one
 * to the buckets: `weft_a_b_state`), and where that one is: a folder of pipelines/, or a file
 * pipelines/run.json lists (by its folder, or the name it defines). Undefined when none.
 */
export async function bucketTwin(
  name: string,
  root: URL = ROOT,
): Promise<{ name: string; where: string } | undefined> {
  const key = (n: string) => n.replaceAll("-", "_");
  const twin = (n: string | undefined) => n !== undefined && n !== name && key(n) === key(name);
  for await (const e of Deno.readDir(new URL("pipelines/", root))) {
    if (e.isDirectory && twin(e.name)) return { name: e.name, where: `pipelines/${e.name}/` };
  }
  const list = JSON.parse(
    await Deno.readTextFile(new URL("pipelines/run.json", root)).catch(() => '{"run":[]}'),
  ) as { run?: unknown };
  for (const file of Array.isArray(list.run) ? list.run : []) {
    if (typeof file !== "string") continue;
    const folder = file.split("/").at(-2);
    // The name it defines: the first `name: "..."` of the file, when it can be read.
    const text = await Deno.readTextFile(new URL(file, root)).catch(() => "");
    const defined = /\bname:\s*["']([a-z0-9_-]+)["']/.exec(text)?.[1];
    // A listed file defining this very name elsewhere is the same pipeline twice.
    const found = defined === name ? name : [defined, folder].find(twin);
    if (found) return { name: found, where: `${file} (listed in pipelines/run.json)` };
  }
  return undefined;
}

/**
 * Where `deno task start` will serve HTTP, as the curl commands printed name it: the
 * configured port (`PORT`), `https://` when the gateway serves TLS. A configuration that does
 * not load leaves the default port (the start will say what is wrong with it).
 */
function gatewayAddress(): string {
  try {
    const config = loadConfig({ args: [] });
    return `${config.tlsCert ? "https://" : ""}localhost:${config.port}`;
  } catch {
    return "localhost:8000";
  }
}

const say = (text: string, to: typeof Deno.stdout | typeof Deno.stderr = Deno.stdout) =>
  to.writeSync(new TextEncoder().encode(text + "\n"));

if (import.meta.main) {
  const name = Deno.args.find((a) => !a.startsWith("-"));
  const listIt = !Deno.args.includes("--no-list");
  const taken = takenNames();
  // Every name the definition's validator refuses, refused before anything is written.
  const problem = name === undefined ? undefined : pipelineNameProblem(name);
  if (problem !== undefined) {
    say(
      `${problem}: deno task start would refuse it; choose another (lower-case letters, ` +
        `digits, - or _, at most ${MAX_NAME} characters)`,
      Deno.stderr,
    );
    Deno.exit(2);
  }
  if (!name || taken.has(name)) {
    say(
      `usage: deno task new NAME   (NAME: lower-case letters, digits, - or _, at most ${MAX_NAME} ` +
        "characters; not one of " +
        `${[...taken].join(", ")})`,
      Deno.stderr,
    );
    Deno.exit(2);
  }
  const dir = new URL(`pipelines/${name}/`, ROOT);
  try {
    await Deno.stat(dir);
    say(`pipelines/${name}/ exists already: choose another name`, Deno.stderr);
    Deno.exit(1);
  } catch { /* free */ }
  const twin = await bucketTwin(name);
  if (twin?.name === name) {
    say(
      `a pipeline "${name}" is defined already in ${twin.where}: choose another name`,
      Deno.stderr,
    );
    Deno.exit(1);
  }
  if (twin) {
    say(
      `"${name}" would share the buckets of pipeline "${twin.name}" (${twin.where}): ` +
        `weft_${name.replaceAll("-", "_")}_state is both's, as names differing only by - and _ ` +
        `are one to the buckets; choose another name`,
      Deno.stderr,
    );
    Deno.exit(1);
  }
  await Deno.mkdir(dir, { recursive: true });
  await Deno.writeTextFile(new URL("pipeline.ts", dir), pipelineSource(name));
  await Deno.writeTextFile(new URL("pipeline_test.ts", dir), testSource(name));
  if (listIt) {
    const listFile = new URL("pipelines/run.json", ROOT);
    const list = JSON.parse(await Deno.readTextFile(listFile).catch(() => '{"run":[]}'));
    const file = `pipelines/${name}/pipeline.ts`;
    list.run = [...new Set([...(list.run ?? []), file])];
    await Deno.writeTextFile(listFile, JSON.stringify(list, null, 2) + "\n");
  }
  const at = gatewayAddress();
  say(
    `Wrote pipelines/${name}/pipeline.ts and pipeline_test.ts${
      listIt ? "; listed in pipelines/run.json" : ""
    }.

  test it     deno test pipelines/${name}/
  run it      ${
      listIt ? "deno task start" : `WEFT_PIPELINES=pipelines/${name}/pipeline.ts deno task start`
    }
  call it     curl -X POST ${at}/pipelines/${name}/items \\
                -H 'content-type: application/json' -d '{"text":"is it on?"}'
              curl ${at}/pipelines/${name}/items/<id>          (its state)
              curl -N ${at}/pipelines/${name}/items/<id>/events  (its events, SSE)
  on NATS     nats req weft.${name}.submit '{"text":"hello"}'
              nats kv get weft_${name.replaceAll("-", "_")}_state <id>`,
  );
}
