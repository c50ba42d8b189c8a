import { definePipeline } from "../../mod.ts";

/** A prompt chain: each LLM step reads the step before's result (docs/PIPELINES.md). */
export const documents = definePipeline({
  name: "documents",
  description: "Document processing: extract -> summarise -> classify",
  input: {
    schema: { type: "object", required: ["text"], properties: { text: { type: "string" } } },
  },
  start: "extract",
  steps: {
    extract: {
      kind: "llm",
      prompt: "prompts/extract.md",
      output: {
        type: "object",
        required: ["sender", "amounts"],
        properties: {
          sender: { type: "string" },
          date: { type: "string" },
          amounts: { type: "array", items: { type: "number" } },
        },
      },
      next: "summarise",
    },
    summarise: {
      kind: "llm",
      prompt: "prompts/summarise.md",
      output: {
        type: "object",
        required: ["summary"],
        properties: { summary: { type: "string" } },
      },
      next: "classify",
    },
    classify: {
      kind: "llm",
      prompt: "prompts/classify.md",
      output: {
        type: "object",
        required: ["kind"],
        properties: { kind: { enum: ["invoice", "contract", "complaint", "other"] } },
      },
      next: "filed",
    },
    filed: { kind: "end", outcome: "filed" },
  },
});
