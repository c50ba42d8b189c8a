import assert from "node:assert/strict";
import { Validator } from "@seriousme/openapi-schema-validator";
import { openApiDocument } from "./openapi.ts";
import { loadPipelines } from "../pipeline/runtime.ts";
import { feedbackPaths } from "../../pipelines/feedback/openapi.ts";
import { moderationPaths } from "../../pipelines/moderation/openapi.ts";

const root = new URL("../../", import.meta.url).pathname;

/** Every `$ref` in `doc`, and whether it points at something in `doc`. */
function danglingRefs(doc: unknown): string[] {
  const out: string[] = [];
  const resolve = (pointer: string) =>
    pointer.slice(2).split("/").reduce<unknown>(
      (v, part) =>
        v && typeof v === "object"
          ? (v as Record<string, unknown>)[part.replaceAll("~1", "/").replaceAll("~0", "~")]
          : undefined,
      doc,
    );
  const walk = (v: unknown) => {
    if (Array.isArray(v)) return v.forEach(walk);
    if (v === null || typeof v !== "object") return;
    for (const [k, x] of Object.entries(v)) {
      if (k === "$ref" && typeof x === "string" && resolve(x) === undefined) out.push(x);
      else walk(x);
    }
  };
  walk(doc);
  return out;
}

Deno.test("the OpenAPI document is valid 3.1, every $ref resolves, and a pipeline's routes follow from its definition", async () => {
  const pipelines = await loadPipelines(["pipelines/examples/tickets.ts"], root);
  const doc = openApiDocument(pipelines, [feedbackPaths(), moderationPaths()]);
  const result = await new Validator().validate(doc);
  assert.ok(result.valid, JSON.stringify(result).slice(0, 2000));
  assert.deepEqual(danglingRefs(doc), []);
  const paths = doc.paths as Record<string, Record<string, unknown>>;
  for (
    const p of [
      "/feedback",
      "/content",
      "/reviews/{id}/decision",
      "/deadletters/redrive",
      "/sites/{site}/feedback/{id}",
    ]
  ) {
    assert.ok(paths[p], p);
  }
  assert.ok(paths["/pipelines/tickets/items"]?.post);
  assert.ok(paths["/pipelines/tickets/items/{id}/approved"]?.post, "the awaited event's route");
  const schemas = (doc.components as { schemas: Record<string, unknown> }).schemas;
  assert.deepEqual(schemas["pipeline.tickets.input"], pipelines[0]!.def.input.schema);
});
