/**
 * The content moderation pipeline as a library (uploaded -> moderation -> safe: published;
 * flagged: human review -> decision -> published or archived): its definition, events,
 * subjects, and the types of its review queue and HTTP API. Weft's own API is the
 * repository's mod.ts.
 *
 * @example
 * ```ts
 * import { MODERATION_PIPELINE } from "./mod.ts";
 * console.log(Object.keys(MODERATION_PIPELINE.steps));
 * ```
 *
 * @module
 */

export { MODERATION_PIPELINE } from "./pipeline.ts";
export type * from "./events.gen.ts";
export * from "./subjects.ts";
export type { ContentAccepted, ContentView, ModerationApi } from "./api.ts";
export type { Decision, ReviewEntry, ReviewStatus } from "./review_queue.ts";
