/**
 * The runtime knows no pipeline: outside the pipelines' own folders, no code names a shipped
 * pipeline's subjects, streams, buckets or routes. Each pipeline brings them through its
 * wiring, events, settings and gateway part (docs/PIPELINES.md).
 */
import assert from "node:assert/strict";
import { SHIPPED_PIPELINES } from "../pipelines/shipped.ts";

const root = new URL("../", import.meta.url);

/** The source files of `dir` (tests aside), relative to the repository root. */
async function sources(dir: string): Promise<string[]> {
  const out: string[] = [];
  for await (const e of Deno.readDir(new URL(dir, root))) {
    const path = `${dir}/${e.name}`;
    if (e.isDirectory) out.push(...await sources(path));
    else if (path.endsWith(".ts") && !path.endsWith("_test.ts")) out.push(path);
  }
  return out;
}

/** The string literals of a module's code, comments left out (doc examples may name any). */
function literals(source: string): string[] {
  const code = source
    .replace(/\/\*[\s\S]*?\*\//g, "")
    .replace(/(^|[^:"'`\\])\/\/.*$/gm, "$1");
  return [...code.matchAll(/"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`(?:[^`\\]|\\.)*`/g)]
    .map((m) => m[0].slice(1, -1));
}

Deno.test("no runtime code names a shipped pipeline's subjects, streams, buckets or routes", async () => {
  const names = SHIPPED_PIPELINES.flatMap((w) => [
    w.name,
    ...w.streams.map((s) => s.name),
    ...(w.buckets ?? []).map((b) => b.name),
    ...(w.objectStores ?? []).map((o) => o.name),
  ]);
  assert.ok(names.includes("feedback") && names.includes("CONTENT"), "the list is derived");
  // A subject or subject filter (`feedback.`, `CONTENT.>`), a route (`/feedback`), a bucket or
  // stream as a whole literal, or a pipeline's name as one.
  const subject = new RegExp(`(^|[^\\w])(${names.join("|")})\\.`);
  const route = new RegExp(`/(${names.join("|")})(\\b|$)`);
  const found: string[] = [];
  for (const file of [...await sources("src"), ...await sources("services")]) {
    const text = await Deno.readTextFile(new URL(file, root));
    for (const literal of literals(text)) {
      if (names.includes(literal) || subject.test(literal) || route.test(literal)) {
        found.push(`${file}: ${JSON.stringify(literal.slice(0, 80))}`);
      }
    }
  }
  assert.deepEqual(found, []);
});
