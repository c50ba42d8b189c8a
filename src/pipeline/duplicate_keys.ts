/**
 * Two steps with one id in a definition file. An object literal keeps the last of two equal
 * keys without a word, so `steps: { a: {...}, a: {...} }` loaded as a definition of one step
 * `a` (the second) and started: nothing the definition's checks see is wrong. TypeScript
 * refuses it, but `deno task start` does not type-check; `deno lint`'s `no-dupe-keys` rule
 * reads the source, so the start asks it, for each listed file, before anything starts.
 *
 * @module
 */
import { ConfigError } from "../errors.ts";
import { PipelineDefinitionError } from "./validate.ts";
import type { PipelineDefinition } from "./definition.ts";

/** A key written twice in one object literal of a file. */
export interface DuplicateKey {
  /** The key. */
  key: string;
  /** The line (1-based) where the object holding it starts. */
  line: number;
}

/**
 * The keys written twice in one object literal of `file`, as `deno lint` (rule
 * `no-dupe-keys`, without the repository's lint configuration) reports them; none when the
 * linter cannot read the file (the import that loaded it could).
 *
 * @example
 * ```ts ignore
 * import { duplicateKeysIn } from "./duplicate_keys.ts";
 * console.log(await duplicateKeysIn("pipelines/orders/pipeline.ts")); // [] or [{ key: "a", line: 6 }]
 * ```
 */
export async function duplicateKeysIn(file: string): Promise<DuplicateKey[]> {
  const out = await new Deno.Command("deno", {
    args: ["lint", "--no-config", "--json", "--rules-tags=", "--rules-include=no-dupe-keys", file],
    stdout: "piped",
    stderr: "null",
  }).output();
  let report: { diagnostics?: { code?: string; message?: string; range?: unknown }[] };
  try {
    report = JSON.parse(new TextDecoder().decode(out.stdout));
  } catch {
    return [];
  }
  return (report.diagnostics ?? []).flatMap((d) => {
    const key = d.code === "no-dupe-keys" ? /Duplicate key '(.*)'$/.exec(d.message ?? "")?.[1] : "";
    const line = (d.range as { start?: { line?: number } } | undefined)?.start?.line;
    return key && typeof line === "number" ? [{ key, line }] : [];
  });
}

/**
 * Refuses a definition file that writes one step id twice (or any key twice in one object:
 * the first would be dropped as silently), naming the file, the pipeline and the step.
 * Checked when `deno task start` loads the definitions.
 *
 * @example
 * ```ts ignore
 * import { checkDuplicateKeys } from "./duplicate_keys.ts";
 * await checkDuplicateKeys([{ file: "/repo/pipelines/orders/pipeline.ts", def }]);
 * // ConfigError: pipeline file ...: pipeline orders, step a: defined twice in the steps ...
 * ```
 */
export async function checkDuplicateKeys(
  loaded: readonly { file: string; def: PipelineDefinition }[],
  shown: (file: string) => string = (f) => f,
): Promise<void> {
  for (const file of new Set(loaded.map((p) => p.file))) {
    const [dup] = await duplicateKeysIn(file);
    if (!dup) continue;
    const def = loaded.find((p) => p.file === file && dup.key in p.def.steps)?.def;
    const err = def
      ? new PipelineDefinitionError(
        def.name,
        dup.key,
        "duplicate_name",
        `defined twice in the steps at line ${dup.line}: JavaScript keeps the last one ` +
          `without a word; give each step its own id`,
      )
      : new PipelineDefinitionError(
        loaded.find((p) => p.file === file)!.def.name,
        undefined,
        "duplicate_name",
        `the key "${dup.key}" is written twice in the object at line ${dup.line}: ` +
          `JavaScript keeps the last one without a word`,
      );
    // As the loader words a definition's refusal: the file first.
    throw new ConfigError(`pipeline file ${shown(file)}: ${err.message}`, { cause: err });
  }
}
