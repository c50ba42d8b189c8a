import assert from "node:assert/strict";
import { loadPipelines } from "./runtime.ts";
import { ConfigError } from "../errors.ts";

const mod = new URL("../../mod.ts", import.meta.url).href;

/** A one-step definition named `name`, in a file of its own. */
async function definitionFile(dir: string, name: string): Promise<string> {
  const file = `${dir}/${name}.ts`;
  await Deno.writeTextFile(
    file,
    `import { definePipeline } from ${JSON.stringify(mod)};
export const p = definePipeline({
  name: ${JSON.stringify(name)},
  input: { schema: { type: "object", required: ["text"], properties: { text: { type: "string" } } } },
  start: "echo",
  steps: {
    echo: {
      kind: "task",
      output: { type: "object", required: ["text"], properties: { text: { type: "string" } } },
      handle: (i: { text: string }) => ({ text: i.text }),
      next: "done",
    },
    done: { kind: "end", outcome: "done" },
  },
});
`,
  );
  return file;
}

Deno.test("a definition may not take a name the mesh's subjects already use", async () => {
  const dir = await Deno.makeTempDir();
  try {
    for (const name of ["feedback", "content", "digest", "deadletter", "shadow"]) {
      const file = await definitionFile(dir, name);
      await assert.rejects(
        loadPipelines([file]),
        (e) => e instanceof ConfigError && e.message.includes(`"${name}" is the mesh's own`),
        name,
      );
    }
    const ok = await loadPipelines([await definitionFile(dir, "orders")]);
    assert.deepEqual(ok.map((p) => p.def.name), ["orders"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a definition's step may not take a durable consumer another pipeline has", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const file = await definitionFile(dir, "orders");
    // The feedback pipeline's sentiment step keeps its consumer "sentiment".
    await Deno.writeTextFile(
      file,
      (await Deno.readTextFile(file)).replace(
        `kind: "task",`,
        `kind: "task", durable: "sentiment",`,
      ),
    );
    await assert.rejects(
      loadPipelines([file]),
      (e) =>
        e instanceof ConfigError && e.message.includes("step echo") &&
        e.message.includes(`"sentiment" is also feedback's`),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
