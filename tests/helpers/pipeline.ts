/**
 * The feedback pipeline in-process (every stage, the state writer, the gateway app) on a
 * real nats-server: for tests of behaviour that is not about processes.
 *
 * @module
 */
import type { Hono } from "hono";
import { runStage, type StageRunner } from "../../src/runner.ts";
import { feedbackAnalyzers } from "../../pipelines/feedback/analyzers.ts";
import {
  dispatchStage,
  feedbackItemReader,
  ingestStage,
  sentimentStage,
  topicsStage,
} from "../../pipelines/feedback/stages.ts";
import { runStateWriter, type StateWriter } from "../../src/state_writer.ts";
import { FEEDBACK_STATE_SPEC } from "../../pipelines/feedback/state.ts";
import { createIntake, type Intake } from "../../pipelines/feedback/intake.ts";
import { createApp, type GatewayDeps } from "../../src/gateway/app.ts";
import { feedbackRoutes } from "../../pipelines/feedback/routes.ts";
import type { TestNats } from "./nats.ts";
import { definePipeline } from "../../src/pipeline/definition.ts";
import { compileFlow } from "../../src/pipeline/flow.ts";
import type { LoadedPipeline } from "../../src/pipeline/runtime.ts";
import { jetstream } from "@nats-io/jetstream";
import { deterministicId } from "../../src/events.ts";
import { pipelineSubjects } from "../../src/pipeline/derive.ts";

/** A running in-process pipeline. */
export interface Pipeline extends AsyncDisposable {
  app: Hono;
  intake: Intake;
  runners: (StageRunner | StateWriter)[];
}

/** Starts every stage, the state writer and the gateway app on `t`'s server. */
export async function startPipeline(t: TestNats): Promise<Pipeline> {
  const rules = await feedbackAnalyzers(t.config);
  const deps = { nc: t.nc, config: t.config, log: t.log };
  const runners: (StageRunner | StateWriter)[] = [
    await runStateWriter({ ...deps, spec: FEEDBACK_STATE_SPEC }),
    await runStage({ ...deps, stage: ingestStage() }),
    await runStage({ ...deps, stage: sentimentStage(rules.sentiment) }),
    await runStage({ ...deps, stage: topicsStage(rules.topics, rules.toxicity) }),
    await runStage({ ...deps, stage: dispatchStage(rules.route, feedbackItemReader(t.jsm, t.nc)) }),
  ];
  const intake = await createIntake(t.nc);
  const app = createApp({ ...deps, jetStream: intake, extensions: [feedbackRoutes(intake)] });
  return {
    app,
    intake,
    runners,
    async [Symbol.asyncDispose]() {
      await Promise.all(runners.map((r) => r.stop()));
    },
  };
}

/**
 * The gateway app on `t`'s server with the feedback routes on `intake` (and `deps`' extensions
 * after them), as the gateway service mounts them.
 */
export function feedbackApp(
  t: TestNats,
  intake: Intake,
  deps: Partial<Omit<GatewayDeps, "nc" | "jetStream">> = {},
): Hono {
  return createApp({
    nc: t.nc,
    jetStream: intake,
    config: t.config,
    log: t.log,
    ...deps,
    extensions: [feedbackRoutes(intake), ...deps.extensions ?? []],
  });
}

/**
 * The gateway app serving `pipelines` (loaded definitions) on `t`'s server, with the
 * configuration `config` overrides: their routes under /pipelines, dead letters, the rest.
 */
export async function definitionsApp(
  t: TestNats,
  pipelines: NonNullable<GatewayDeps["pipelines"]>,
  config: Partial<TestNats["config"]> = {},
): Promise<Hono> {
  return createApp({
    nc: t.nc,
    jetStream: await createIntake(t.nc),
    config: { ...t.config, ...config },
    log: t.log,
    pipelines,
  });
}

/**
 * A small definition with a person in it, loaded as the runtime loads one: `check` (a task),
 * then the wait `approval` for the event `approved` (else `expired` after `timeoutMs`), then
 * `done`.
 */
export function approvalsPipeline(timeoutMs = 60_000): LoadedPipeline {
  const obj = { type: "object" } as const;
  const def = definePipeline({
    name: "approvals",
    input: { schema: obj },
    start: "check",
    steps: {
      check: { kind: "task", output: obj, handle: () => ({}), next: "approval" },
      approval: { kind: "wait", event: "approved", timeoutMs, onTimeout: "expired", next: "done" },
      done: { kind: "end", outcome: "done" },
      expired: { kind: "end", outcome: "expired" },
    },
  });
  return { file: "inline", def, flow: compileFlow(def) };
}

/**
 * Stores a `failed` event for `item` of `p`, as a step giving up on the message last stored on
 * `subject` publishes it: its dead letter too (a failure counts only with it, failure_letter.ts).
 * Returns the failure's stream sequence.
 */
export async function failItem(
  t: TestNats,
  p: LoadedPipeline,
  item: string,
  subject: string,
  eventId?: string,
): Promise<number> {
  const stream = pipelineSubjects(p.def).stream;
  // (The message it gave up on: junk on that subject when nothing is stored there.)
  const on = await t.jsm.streams.getMessage(stream, { last_by_subj: subject }).catch(() => null) ??
    await jetstream(t.nc).publish(subject, "{}");
  await jetstream(t.nc).publish(
    `deadletter.test.${item}`,
    JSON.stringify({
      stage: "test",
      code: "handler_failed",
      reason: "down",
      attempts: 5,
      subject,
      stream_seq: on!.seq,
      time: "2026-01-01T00:00:30.000Z",
      item_id: item,
    }),
  );
  const stored = await jetstream(t.nc).publish(
    `${p.def.name}.failed.${item}`,
    JSON.stringify({
      id: deterministicId(item, `${p.def.name}.failed`, String(on!.seq)),
      type: `${p.def.name}.failed`,
      version: 1,
      item_id: item,
      trace_id: "0af7651916cd43dd8448eb211c80319c",
      time: "2026-01-01T00:00:30.000Z",
      source: "test",
      data: {
        stage: "test",
        code: "handler_failed",
        reason: "down",
        attempts: 5,
        dead_letter_subject: `deadletter.test.${item}`,
        subject,
        ...(eventId ? { event_id: eventId } : {}),
      },
    }),
  );
  return stored.seq;
}
