/**
 * The topics service: `feedback.sentiment_analyzed` -> `feedback.topics_extracted`;
 * abusive text also gets the topic `abuse`.
 *
 * @module
 */
import { feedbackAnalyzers } from "../src/configured_analyzers.ts";
import { runStageService } from "../src/service.ts";
import { topicsStage } from "../src/stages/feedback.ts";

if (import.meta.main) {
  await runStageService("topics", async ({ config }) => {
    const { topics, toxicity } = await feedbackAnalyzers(config);
    return topicsStage(topics, toxicity);
  });
}
