/**
 * The tree shows the architecture: the runtime (src/, services/, mod.ts) knows no pipeline.
 * The shipped pipelines live in their own folders (pipelines/<name>/) and reach the runtime
 * only through the registry it is given (pipelines/shipped*.ts); nothing outside them names
 * one. The embedded analyzers (src/ai/analyzers/) are tuned for customer feedback texts,
 * which their docs say; that is the texts' domain, not a pipeline.
 */
import assert from "node:assert/strict";

const ROOT = new URL("../", import.meta.url);
/** A shipped pipeline's name, stream, subjects or modules. */
const PIPELINE_NAME =
  /[Ff]eedback|FEEDBACK|[Mm]oderation|\bCONTENT\b|\bcontent\.[a-z_]+\.|weft_content|\/content\b/;

async function* sources(dir: URL): AsyncGenerator<URL> {
  for await (const e of Deno.readDir(dir)) {
    const url = new URL(e.isDirectory ? `${e.name}/` : e.name, dir);
    if (e.isDirectory) yield* sources(url);
    else if (e.name.endsWith(".ts") && !e.name.endsWith("_test.ts")) yield url;
  }
}

Deno.test("no runtime source names a shipped pipeline", async () => {
  const named: string[] = [];
  const files = [new URL("mod.ts", ROOT)];
  for (const dir of ["src/", "services/"]) {
    for await (const f of sources(new URL(dir, ROOT))) files.push(f);
  }
  for (const f of files) {
    const path = f.pathname.slice(ROOT.pathname.length);
    if (path.startsWith("src/ai/analyzers/")) continue;
    (await Deno.readTextFile(f)).split("\n").forEach((line, i) => {
      if (PIPELINE_NAME.test(line)) named.push(`${path}:${i + 1}: ${line.trim()}`);
    });
  }
  assert.ok(files.length > 50, `read the runtime's sources (${files.length})`);
  assert.deepEqual(named, []);
});
