import assert from "node:assert/strict";
import { Validator } from "@seriousme/openapi-schema-validator";
import { Ajv } from "ajv";
import { openApiDocument } from "./openapi.ts";
import { loadPipelines } from "../pipeline/runtime.ts";
import { feedbackPaths } from "../../pipelines/feedback/openapi.ts";
import { moderationPaths } from "../../pipelines/moderation/openapi.ts";
import { parseShadowSpec, SHADOW_STEPS } from "../shadow/spec.ts";

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
  const doc = openApiDocument(pipelines, [feedbackPaths(), moderationPaths()], { hub: true });
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

Deno.test("POST /shadows as documented is what the server takes: a shipped step by its name, a definition's step with its candidate definition", () => {
  const doc = openApiDocument([], [feedbackPaths(), moderationPaths()]);
  const post = (doc.paths as Record<string, Record<string, Record<string, unknown>>>)["/shadows"]!
    .post!;
  const schema = (post.requestBody as { content: Record<string, { schema: unknown }> })
    .content["application/json"]!.schema as {
      properties: { step: { description: string } };
    };
  // docs/SHADOW.md's two specs: the server takes both, and so does the documented schema.
  const specs = [
    {
      id: "sentiment-v2",
      step: "sentiment",
      candidate: { analyzers: "llm", prompt: "v2" },
      limits: { rps: 20, budgetUsd: 1 },
    },
    {
      id: "route-v2",
      pipeline: "support",
      step: "route",
      candidate: { definition: "pipelines/support/support_v2.ts" },
      limits: { rps: 5 },
    },
  ];
  const validate = new Ajv({ strict: false }).compile(schema);
  for (const spec of specs) {
    parseShadowSpec(spec);
    assert.ok(validate(spec), `${JSON.stringify(spec)}: ${JSON.stringify(validate.errors)}`);
  }
  // A shipped step is named as the server takes it: `sentiment` (with `pipeline`), not
  // `feedback.sentiment` (the form of DELETE /shadows/versions/{step}).
  const described = schema.properties.step.description;
  for (const [pipeline, steps] of Object.entries(SHADOW_STEPS)) {
    for (const step of steps) {
      parseShadowSpec({ id: "x", pipeline, step, candidate: { analyzers: "rules" } });
      assert.ok(described.includes(step), `${step} in ${described}`);
      assert.ok(!described.includes(`${pipeline}.${step}`), described);
      assert.throws(() =>
        parseShadowSpec({
          id: "x",
          pipeline,
          step: `${pipeline}.${step}`,
          candidate: { analyzers: "rules" },
        })
      );
    }
  }
});
