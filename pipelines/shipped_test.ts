import assert from "node:assert/strict";
import { FEEDBACK_PIPELINE } from "./feedback/pipeline.ts";
import { moderationPipeline } from "./moderation/pipeline.ts";
import {
  durableOf,
  pipelineGraph,
  pipelineSubjects,
  stepConsumers,
} from "../src/pipeline/derive.ts";
import { stageConsumerConfig } from "../src/topology.ts";
import { typeFilter } from "../src/subjects.ts";
import * as FS from "./feedback/subjects.ts";
import { FeedbackEventType } from "./feedback/events.ts";
import { CONTENT_STREAM } from "./moderation/subjects.ts";
import { ContentEventType } from "./moderation/events.ts";

const settings = { ackWaitMs: 30_000, maxAttempts: 5 };

Deno.test("the feedback definition derives the stream, submit subjects and event types used today", () => {
  const s = pipelineSubjects(FEEDBACK_PIPELINE);
  assert.equal(s.stream, FS.FEEDBACK_STREAM);
  assert.equal(s.submit, FS.SUBMIT_SUBJECT);
  assert.equal(s.submitRequest, FS.SUBMIT_REQUEST_SUBJECT);
  assert.equal(s.getRequest, FS.GET_REQUEST_SUBJECT);
  assert.deepEqual(new Set(s.eventTypes), new Set(Object.values(FeedbackEventType)));
});

Deno.test("the feedback definition derives the durable consumers topology.ts creates today", () => {
  const want = [
    { name: "sentiment", filterSubject: typeFilter(FeedbackEventType.Ingested) },
    { name: "topics", filterSubject: typeFilter(FeedbackEventType.SentimentAnalyzed) },
    { name: "dispatch", filterSubject: typeFilter(FeedbackEventType.TopicsExtracted) },
  ].map((st) => stageConsumerConfig(st, settings));
  const got = stepConsumers(FEEDBACK_PIPELINE, settings);
  assert.deepEqual(
    got.map((c) => [c.durable_name, c.filter_subject, c.max_deliver, c.stream]),
    want.map((c) => [
      // Each step keeps the durable it had before it was defined (`durable`).
      c.durable_name!,
      c.filter_subject,
      c.max_deliver,
      FS.FEEDBACK_STREAM,
    ]),
  );
  // Today's ingest stage is the runtime's intake, on the same subject.
  assert.equal(pipelineSubjects(FEEDBACK_PIPELINE).submit, FS.SUBMIT_SUBJECT);
});

Deno.test("the moderation definition derives the CONTENT stream, its event types and today's consumers", () => {
  const def = moderationPipeline();
  const s = pipelineSubjects(def);
  assert.equal(s.stream, CONTENT_STREAM);
  const today = new Set<string>(Object.values(ContentEventType));
  // review_claimed is published by the claim API, not by a step.
  today.delete(ContentEventType.ReviewClaimed);
  assert.deepEqual(new Set(s.eventTypes), today);
  const T = ContentEventType;
  const want = new Map([
    ["moderation", typeFilter(T.Uploaded)],
    ["storage-moderated", typeFilter(T.Moderated)],
    ["review-queue", typeFilter(T.Moderated)],
    ["review-sla", typeFilter(T.SlaExpired)],
    ["storage-decided", typeFilter(T.Decided)],
  ]);
  const got = new Map(stepConsumers(def, settings).map((c) => [c.durable_name, c.filter_subject]));
  assert.deepEqual(got, new Map([...want].map(([step, f]) => [durableOf(def, step), f])));
});

Deno.test("the support agent sketch is valid only with its hand-back loop bounded", async () => {
  const { supportPipeline } = await import("./support/pipeline.ts");
  const { definePipeline } = await import("../src/pipeline/definition.ts");
  const { PipelineDefinitionError } = await import("../src/pipeline/validate.ts");
  const graph = pipelineGraph(supportPipeline);
  assert.ok(graph.edges.some((e) => e.from === "check" && e.to === "route" && e.loop === 3));
  assert.throws(
    () => definePipeline({ ...supportPipeline, loops: [] }),
    (err) => err instanceof PipelineDefinitionError && err.problem === "unbounded_cycle",
  );
});

Deno.test("the shipped pipelines' own settings are read, defaulted and validated with the runtime's", async () => {
  await import("./shipped_settings.ts");
  const { loadConfig, envNames, describeConfig } = await import("../src/config.ts");
  const env = (vars: Record<string, string>) => (name: string) => vars[name];
  const defaults = loadConfig({ env: env({}), args: [] });
  assert.equal(defaults.reviewSlaMs, 3_600_000);
  assert.equal(defaults.digestCron, "0 * * * *");
  assert.equal(
    loadConfig({ env: env({ WEFT_REVIEW_SLA_MS: "12000" }), args: [] }).reviewSlaMs,
    12_000,
  );
  assert.throws(
    () => loadConfig({ env: env({ WEFT_REVIEW_SLA_MS: "soon" }), args: [] }),
    /WEFT_REVIEW_SLA_MS: invalid value "soon"/,
  );
  // A digest window no request may have (366 days at most) is refused at start, not thrown
  // by the digest on every request.
  assert.throws(
    () => loadConfig({ env: env({ WEFT_DIGEST_WINDOW_MS: "99999999999999" }), args: [] }),
    /WEFT_DIGEST_WINDOW_MS: invalid value/,
  );
  assert.ok(
    envNames().includes("WEFT_CONTENT_MAX_BYTES") && envNames().includes("WEFT_DIGEST_CRON"),
  );
  assert.equal(describeConfig(defaults).slaDefaultAction, "reject");
});
