/**
 * The feedback pipeline as a library (ingested -> sentiment -> topics -> dispatch ->
 * processed): its stages as pure handlers, its events, subjects and state fold, its routing
 * rules and analyzers, and its intake, HTTP routes and request subjects. Weft's own API (the
 * runtime every pipeline runs on) is the repository's mod.ts; this module is the shipped
 * pipeline's, for code that works with feedback items.
 *
 * @example Run the sentiment stage of your own, against a NATS server
 * ```ts ignore
 * import { connectNats, createLogger, loadConfig, runStage } from "../../mod.ts";
 * import { feedbackAnalyzers, sentimentStage } from "./mod.ts";
 *
 * const config = loadConfig();
 * const nc = await connectNats(config.natsUrl, "my-sentiment");
 * const { sentiment } = await feedbackAnalyzers(config);
 * await runStage({ nc, stage: sentimentStage(sentiment), config, log: createLogger("sentiment") });
 * ```
 *
 * @module
 */

export { FEEDBACK_PIPELINE } from "./pipeline.ts";
export { ABUSE_TOPIC, dispatchStage, ingestStage, sentimentStage, topicsStage } from "./stages.ts";
export type * from "./events.gen.ts";
export * from "./subjects.ts";
export { applyEvent, FEEDBACK_STATE_SPEC, foldEvents } from "./state.ts";
export { compileRules, loadRules } from "./rules.ts";
export type { CompiledRules, Router } from "./rules.ts";
export { feedbackAnalyzers } from "./analyzers.ts";
export type { FeedbackAnalyzers } from "./analyzers.ts";
export { createIntake } from "./intake.ts";
export type { Accepted, Intake, IntakeResult, SubmitOptions } from "./intake.ts";
export { feedbackRoutes } from "./routes.ts";
export { serveRequests } from "./requests.ts";
