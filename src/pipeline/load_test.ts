import assert from "node:assert/strict";
import { checkHoldsWithinRetention, loadPipelines } from "./runtime.ts";
import { definePipeline, type StepContext, type TaskStep } from "./definition.ts";
import { compileFlow } from "./flow.ts";
import { ConfigError } from "../errors.ts";

const mod = new URL("../../mod.ts", import.meta.url).href;

/** The one-step definition of {@link definitionFile}, its step taking the durable `durable`. */
async function withDurable(dir: string, durable: string): Promise<string> {
  const file = await definitionFile(dir, "orders");
  await Deno.writeTextFile(
    file,
    (await Deno.readTextFile(file)).replace(
      `kind: "task",`,
      `kind: "task", durable: "${durable}",`,
    ),
  );
  return file;
}

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
    // The feedback pipeline's sentiment step keeps its consumer "sentiment".
    const file = await withDurable(dir, "sentiment");
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

Deno.test("a step's durable may not be redriven: its dead letters would be the redrive markers", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const file = await withDurable(dir, "redriven");
    // Before: accepted; its letters went to deadletter.redriven.*, where each redrive's
    // marker is kept (and counted as a letter redriven), and its identity could write them.
    await assert.rejects(
      loadPipelines([file]),
      (e) =>
        e instanceof ConfigError && e.message.includes("step echo") &&
        e.message.includes(`"redriven"`) && e.message.includes("deadletter.redriven"),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a task step without a handler, or a router without its route, stops the start, naming the step", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const file = await definitionFile(dir, "orders");
    const source = await Deno.readTextFile(file);
    // Before: accepted, then every item failed in the step (its handle is not a function).
    await Deno.writeTextFile(
      file,
      source.replace("handle: (i: { text: string }) => ({ text: i.text }),", ""),
    );
    await assert.rejects(
      loadPipelines([file]),
      (e) =>
        e instanceof ConfigError &&
        /pipeline file \S+orders\.ts, step echo: a task step needs its handle/.test(e.message),
    );
    // Given apart, it is the step's own (another file: a module is imported once).
    const apart = `${dir}/apart.ts`;
    await Deno.writeTextFile(
      apart,
      source.replace("handle: (i: { text: string }) => ({ text: i.text }),", "").replace(
        "\n});\n",
        "\n}, { echo: (i) => ({ text: i.text }) });\n",
      ),
    );
    const [loaded] = await loadPipelines([apart]);
    const echo = loaded!.def.steps.echo as TaskStep;
    assert.deepEqual(await echo.handle!({ text: "hi" }, {} as StepContext), { text: "hi" });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a fan-out whose branches always end the item at two different ends stops the start, naming the step", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const file = `${dir}/forked.ts`;
    await Deno.writeTextFile(
      file,
      `import { definePipeline } from ${JSON.stringify(mod)};
const obj = { type: "object" } as const;
export const p = definePipeline({
  name: "forked",
  input: { schema: obj },
  start: "a",
  steps: {
    a: { kind: "task", output: obj, handle: () => ({}), next: ["b", "c"] },
    b: { kind: "task", output: obj, handle: () => ({}), next: "x" },
    c: { kind: "task", output: obj, handle: () => ({}), next: "y" },
    x: { kind: "end", outcome: "x" },
    y: { kind: "end", outcome: "y" },
  },
});
`,
    );
    await assert.rejects(
      loadPipelines([file]),
      (e) =>
        e instanceof ConfigError && e.message.includes(`pipeline file ${file}, step a:`) &&
        e.message.includes("two different ends (x and y)"),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a wait, join or delay that holds items longer than events are kept stops the start, naming the step", () => {
  // A 30-day approval with the default 7-day retention: the item's events and state would
  // expire while it waits, and its outcome would come for an item nothing remembers.
  const approvals = (timeoutMs: number) => {
    const def = definePipeline({
      name: "approvals",
      input: { schema: { type: "object" } },
      start: "approval",
      steps: {
        approval: { kind: "wait", event: "approved", timeoutMs, onTimeout: "done", next: "done" },
        done: { kind: "end", outcome: "done" },
      },
    });
    return [{ file: `${Deno.cwd()}/pipelines/approvals.ts`, def, flow: compileFlow(def) }];
  };
  const week = 7 * 86_400_000;
  assert.throws(
    () => checkHoldsWithinRetention(approvals(30 * 86_400_000), week),
    (err: Error) =>
      err instanceof ConfigError &&
      /^pipeline file pipelines\/approvals\.ts: pipeline approvals, step approval waits up to 30 days, longer than events are kept \(WEFT_RETENTION_MS, 7 days\)/
        .test(err.message),
  );
  checkHoldsWithinRetention(approvals(week), week); // exactly the retention: fine
  const monthly = definePipeline({
    name: "monthly",
    input: { schema: { type: "object" } },
    start: "close",
    steps: {
      close: { kind: "delay", cron: "0 0 1 * *", next: "done" },
      done: { kind: "end", outcome: "done" },
    },
  });
  assert.throws(
    () =>
      checkHoldsWithinRetention([{ file: "m.ts", def: monthly, flow: compileFlow(monthly) }], week),
    /step close holds items \(between its cron's times\) for up to (28|29|30|31) days/,
  );
  checkHoldsWithinRetention(approvals(30 * 86_400_000), 31 * 86_400_000);
});

Deno.test("a step's prompt file that does not exist stops the start, naming the step and the path", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const file = await definitionFile(dir, "orders");
    await Deno.writeTextFile(
      file,
      (await Deno.readTextFile(file)).replace(
        `echo: {\n      kind: "task",`,
        `triage: { kind: "llm", prompt: "prompts/triage.md", output: { type: "object" }, next: "echo" },\n    echo: {\n      kind: "task",`,
      ).replace(`start: "echo"`, `start: "triage"`),
    );
    await assert.rejects(
      loadPipelines([file]),
      (e) =>
        e instanceof ConfigError && e.message.includes("step triage") &&
        e.message.includes("prompt file prompts/triage.md not found"),
    );
    await Deno.mkdir(`${dir}/prompts`);
    await Deno.writeTextFile(`${dir}/prompts/triage.md`, "Triage it. {{schema}}");
    assert.equal((await loadPipelines([file])).length, 1, "found relative to the definition");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("two pipelines whose names differ only by - and _ are refused: they would share buckets", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await assert.rejects(
      loadPipelines([await definitionFile(dir, "a-b"), await definitionFile(dir, "a_b")]),
      (e) => e instanceof ConfigError && e.message.includes("would share its buckets"),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the shipped example definitions load: every prompt they name exists", async () => {
  const root = new URL("../../", import.meta.url).pathname;
  const loaded = await loadPipelines(
    [
      "pipelines/examples/tickets.ts",
      "pipelines/examples/documents.ts",
      "pipelines/support/pipeline.ts",
    ],
    root,
  );
  assert.deepEqual(loaded.map((p) => p.def.name).sort(), ["documents", "support", "tickets"]);
});

Deno.test("a definition with a mistyped kind or field is refused at load naming the file, step and field", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const source = await Deno.readTextFile(await definitionFile(dir, "orders"));
    for (
      const [from, to, said] of [
        [
          `kind: "task",`,
          `kind: "taks",`,
          /step echo: kind "taks" is not a step kind \(did you mean task\?\)/,
        ],
        [`next: "done",`, `nxt: "done",`, /step echo: unknown field "nxt" \(did you mean next\?\)/],
        [`outcome: "done"`, `result: "done"`, /step done: unknown field "result"/],
      ] as const
    ) {
      // A file each: an imported module is not imported again.
      const file = `${dir}/${crypto.randomUUID()}.ts`;
      await Deno.writeTextFile(file, source.replace(from, to));
      await assert.rejects(
        loadPipelines([file]),
        (e) => e instanceof ConfigError && e.message.includes(file) && said.test(e.message),
        to,
      );
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a definition file listed twice is refused as listed twice, not as its own twin", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const file = await definitionFile(dir, "orders");
    const again = file.replace(/\/([^/]+)$/, "/./$1");
    await assert.rejects(
      loadPipelines([file, again]),
      (e) =>
        e instanceof ConfigError && e.message.includes("is listed twice") &&
        !e.message.includes("also defined"),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a definition file that does not load is refused in one plain line: no terminal colour codes in the log", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const file = await definitionFile(dir, "orders");
    await Deno.writeTextFile(file, `import "./missing.ts";\n${await Deno.readTextFile(file)}`);
    await assert.rejects(loadPipelines([file]), (e) => {
      assert.ok(e instanceof ConfigError);
      assert.match(e.message, /^pipeline file .*orders\.ts: Module not found/);
      assert.match(e.message, /missing\.ts/);
      // deno prints the import's place in colour; a JSON log line should not carry it.
      assert.ok(!e.message.includes("\u001b["), e.message);
      return true;
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
