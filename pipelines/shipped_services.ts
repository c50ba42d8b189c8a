/**
 * How to load each shipped pipeline's services by name, for running several in one process
 * (`deno task start --together`, services/together.ts): each is imported only when asked
 * for. (Kept apart from the wirings, which every service loads: a module naming these
 * imports would bring every service's code into every process.)
 *
 * @module
 */
import type { ServiceDef } from "../src/service.ts";

/** The shipped pipelines' services by name, in start order. */
export const SHIPPED_SERVICES: ReadonlyMap<string, () => Promise<ServiceDef>> = new Map([
  // Feedback
  ["state", async () => (await import("./feedback/services/state.ts")).service],
  ["ingest", async () => (await import("./feedback/services/ingest.ts")).service],
  ["sentiment", async () => (await import("./feedback/services/sentiment.ts")).service],
  ["topics", async () => (await import("./feedback/services/topics.ts")).service],
  ["dispatch", async () => (await import("./feedback/services/dispatch.ts")).service],
  ["digest", async () => (await import("./feedback/services/digest.ts")).service],
  // Content moderation
  ["content-state", async () => (await import("./moderation/services/content_state.ts")).service],
  ["moderation", async () => (await import("./moderation/services/moderation.ts")).service],
  ["review", async () => (await import("./moderation/services/review.ts")).service],
  ["storage", async () => (await import("./moderation/services/storage.ts")).service],
]);
