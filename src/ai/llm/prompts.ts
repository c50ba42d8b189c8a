/**
 * Versioned prompt templates. A template is a file `prompts/<kind>.<version>.md` holding
 * the system message, with `{{name}}` placeholders (e.g. `{{schema}}`, `{{taxonomy}}`)
 * filled in by the analyzer. The version is part of the cache key and recorded on results.
 *
 * @module
 */

/**
 * A loaded template.
 *
 * @example
 * ```ts
 * import type { PromptTemplate } from "./prompts.ts";
 * const p: PromptTemplate = { kind: "sentiment", version: "v1", text: "Classify... {{schema}}" };
 * ```
 */
export interface PromptTemplate {
  /** Analyzer kind, e.g. `"sentiment"`. */
  kind: string;
  /** Version, e.g. `"v1"`. */
  version: string;
  /** System message with `{{placeholders}}`. */
  text: string;
}

/**
 * The repository's prompts/ folder.
 *
 * @example
 * ```ts
 * import { DEFAULT_PROMPTS_DIR } from "./prompts.ts";
 * DEFAULT_PROMPTS_DIR.pathname.endsWith("/prompts/"); // true
 * ```
 */
export const DEFAULT_PROMPTS_DIR: URL = new URL("../../../prompts/", import.meta.url);

/**
 * Reads `<dir>/<kind>.<version>.md` (needs read permission on the folder).
 *
 * @example
 * ```ts
 * import { loadPrompt } from "./prompts.ts";
 * const prompt = await loadPrompt("sentiment", "v1");
 * ```
 */
export async function loadPrompt(
  kind: string,
  version = "v1",
  dir: URL | string = DEFAULT_PROMPTS_DIR,
): Promise<PromptTemplate> {
  if (!/^[a-z0-9_-]+$/i.test(kind) || !/^[a-z0-9_-]+$/i.test(version)) {
    throw new TypeError(`bad prompt kind or version: ${kind}.${version}`);
  }
  const base = typeof dir === "string" ? dir.replace(/\/*$/, "/") : dir;
  const file = typeof base === "string" ? `${base}${kind}.${version}.md` : new URL(
    `${kind}.${version}.md`,
    base,
  );
  return { kind, version, text: await Deno.readTextFile(file) };
}

/**
 * Fills `{{name}}` placeholders; throws on a placeholder with no value, so a template and
 * its analyzer cannot silently drift apart.
 *
 * @example
 * ```ts
 * import { renderPrompt } from "./prompts.ts";
 * renderPrompt("Labels: {{labels}}", { labels: "a, b" }); // "Labels: a, b"
 * ```
 */
export function renderPrompt(text: string, vars: Record<string, string>): string {
  return text.replace(/\{\{\s*([A-Za-z0-9_]+)\s*\}\}/g, (_, name: string) => {
    const value = vars[name];
    if (value === undefined) throw new TypeError(`prompt placeholder {{${name}}} has no value`);
    return value;
  });
}
