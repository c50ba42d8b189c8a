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
