/**
 * The sentiment service: `feedback.ingested` -> `feedback.sentiment_analyzed`.
 *
 * @module
 */
import { feedbackAnalyzers } from "../src/configured_analyzers.ts";
import { runStageService } from "../src/service.ts";
import { sentimentStage } from "../src/stages/feedback.ts";

if (import.meta.main) {
  await runStageService(
    "sentiment",
    async ({ config }) => sentimentStage((await feedbackAnalyzers(config)).sentiment),
  );
}
