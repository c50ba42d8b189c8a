/**
 * Generates the event and document types from the JSON Schemas in schemas/, so they are
 * never kept by hand beside the schemas: the runtime's own in src/events.gen.ts, each shipped
 * pipeline's in `pipelines/<name>/events.gen.ts`. `deno task gen` writes the files;
 * `deno task gen --check` fails when a committed one is stale (CI runs it through the test
 * suite).
 *
 * @module
 */
import { compile, type JSONSchema } from "json-schema-to-typescript";

const root = new URL("../", import.meta.url);
const schemaDir = new URL("schemas/", root);

/**
 * Where each schema's types go, in a stable order: the runtime's own documents into src/,
 * each shipped pipeline's events and documents into its folder. A type two files need (a
 * shared definition such as `Metadata`) is declared once, in the runtime's file, and imported
 * by the others. `defs` is only referenced.
 */
export const GROUPS: readonly { out: string; schemas: readonly string[] }[] = [
  { out: "src/events.gen.ts", schemas: ["deadletter.v1.json", "schedule.v1.json"] },
  {
    out: "pipelines/feedback/events.gen.ts",
    schemas: [
      "feedback.submit.v1.json",
      "feedback.submit_batch.v1.json",
      "feedback.ingested.v1.json",
      "feedback.sentiment_analyzed.v1.json",
      "feedback.topics_extracted.v1.json",
      "feedback.dispatched.v1.json",
      "feedback.processed.v1.json",
      "feedback.failed.v1.json",
      "feedback.state.v1.json",
      "rules.v1.json",
      "digest.request.v1.json",
      "digest.feedback_counts.v1.json",
    ],
  },
  {
    out: "pipelines/moderation/events.gen.ts",
    schemas: [
      "content.submit.v1.json",
      "content.uploaded.v1.json",
      "content.moderated.v1.json",
      "content.review_requested.v1.json",
      "content.review_claimed.v1.json",
      "content.sla_expired.v1.json",
      "content.escalated.v1.json",
      "content.decided.v1.json",
      "content.published.v1.json",
      "content.archived.v1.json",
      "content.failed.v1.json",
      "content.state.v1.json",
      "review.decision.v1.json",
    ],
  },
];

/** Each declaration (with its JSDoc) json-schema-to-typescript writes for one schema. */
async function declarations(file: string): Promise<Map<string, string>> {
  const schema = JSON.parse(await Deno.readTextFile(new URL(file, schemaDir))) as JSONSchema;
  const ts = await compile(
    schema,
    String(schema.title),
    {
      bannerComment: "",
      cwd: new URL(".", schemaDir).pathname,
      additionalProperties: false,
      declareExternallyReferenced: true,
      format: false,
      ignoreMinAndMaxItems: true,
      unreachableDefinitions: false,
      // Relative refs resolve against `cwd` (schemas/); never fetch anything remote.
      $refOptions: { resolve: { http: false } },
    } as Parameters<typeof compile>[2],
  );
  // Split before each declaration: before its JSDoc when it has one (so it keeps the comment
  // json-schema-to-typescript wrote from the schema's description), else before `export`.
  const out = new Map<string, string>();
  for (
    const block of ts.split(/\n(?=\/\*\*(?:(?!\*\/)[\s\S])*\*\/\nexport )|(?<!\*\/)\n(?=export )/)
  ) {
    const m = block.match(/^(?:\/\*\*(?:(?!\*\/)[\s\S])*\*\/\n)?export (?:interface|type) (\w+)/);
    if (m?.[1] && !out.has(m[1])) out.set(m[1], block.trim() + "\n");
  }
  return out;
}

/** The path from `from`'s folder to `to`, both relative to the repository root. */
function relative(from: string, to: string): string {
  const up = from.split("/").length - 1;
  return (up === 0 ? "./" : "../".repeat(up)) + to;
}

/** Returns the generated TypeScript source of each group's file, keyed by its path. */
export async function generate(): Promise<Map<string, string>> {
  const groups = await Promise.all(GROUPS.map(async (g) => {
    const decls = new Map<string, string>();
    for (const file of g.schemas) {
      for (const [name, block] of await declarations(file)) {
        if (!decls.has(name)) decls.set(name, block);
      }
    }
    return { out: g.out, decls };
  }));
  // A declaration only one group needs goes there; one several need (a shared definition:
  // two pipelines never import each other) goes to the runtime's, the first group. Each is
  // written as the first group that needs it had it, in the order first met.
  const home = new Map<string, string>();
  const blocks = new Map<string, string>();
  for (const g of groups) {
    for (const [name, block] of g.decls) {
      home.set(name, home.has(name) ? groups[0]!.out : g.out);
      if (!blocks.has(name)) blocks.set(name, block);
    }
  }
  const files = new Map<string, string>();
  for (const g of groups) {
    const own = [...blocks].filter(([name]) => home.get(name) === g.out).map(([, b]) => b);
    const imports = new Map<string, string[]>();
    for (const name of g.decls.keys()) {
      const from = home.get(name)!;
      if (from !== g.out) imports.set(from, [...(imports.get(from) ?? []), name]);
    }
    files.set(
      g.out,
      [
        "// Generated by scripts/gen_types.ts from schemas/*.json: do not edit.\n" +
        "// Run `deno task gen` after changing a schema.\n",
        ...[...imports].map(([from, names]) =>
          `import type { ${names.sort().join(", ")} } from "${relative(g.out, from)}";\n`
        ),
        ...own,
      ].join("\n"),
    );
  }
  return files;
}

/** `source` as `deno fmt` writes it: how the generated files are committed. */
export async function format(source: string): Promise<string> {
  const cmd = new Deno.Command(Deno.execPath(), {
    args: ["fmt", "--ext=ts", "-"],
    stdin: "piped",
    stdout: "piped",
  }).spawn();
  const w = cmd.stdin.getWriter();
  await w.write(new TextEncoder().encode(source));
  await w.close();
  const out = await cmd.output();
  return new TextDecoder().decode(out.stdout);
}

if (import.meta.main) {
  let stale = false;
  for (const [path, generated] of await generate()) {
    const source = await format(generated);
    const file = new URL(path, root);
    if (Deno.args.includes("--check")) {
      if ((await Deno.readTextFile(file).catch(() => "")) !== source) {
        // deno-lint-ignore no-console
        console.error(`${path} is stale: run \`deno task gen\``);
        stale = true;
      }
    } else {
      await Deno.writeTextFile(file, source);
    }
  }
  if (stale) Deno.exit(1);
}
