/**
 * Fault injection for testing and chaos drills: make one stage fail on matching text,
 * or run slowly. Off by default; configured with `WEFT_FAIL_ON` / `WEFT_FAIL_STAGE` and
 * `WEFT_SLOW_MS` / `WEFT_SLOW_STAGE`. The runner wraps every stage with
 * {@link withFaults}, which returns the stage unchanged when nothing is configured, so a
 * production mesh pays nothing for it.
 *
 * The reference case of the reliability guarantees is `WEFT_FAIL_ON=crash
 * WEFT_FAIL_STAGE=topics`: every item whose text contains "crash" (any case) fails in the
 * topics stage on every attempt, is retried with backoff, then dead-lettered.
 *
 * @module
 */
import type { Config } from "./config.ts";
import { ErrorCode, WeftError } from "./errors.ts";
import { sleep } from "./retry.ts";
import type { Stage, StageInput } from "./stage.ts";

/** The fault settings of {@link Config}. */
export type FaultConfig = Pick<Config, "failOn" | "failStage" | "slowMs" | "slowStage">;

/** The error an injected failure throws: retryable, like a flaky dependency. */
export class InjectedFault extends WeftError {
  /** A fault of `stage`, triggered by text containing `needle`. */
  constructor(stage: string, needle: string) {
    super(
      ErrorCode.HandlerFailed,
      `injected fault: ${stage} fails on text containing ${JSON.stringify(needle)}`,
    );
    this.name = "InjectedFault";
  }
}

/** The text of a handler's input: a submission's, an event's, or a definition item's input. */
function textOf(input: unknown): string | undefined {
  const v = input as
    | { text?: unknown; data?: { text?: unknown; input?: { text?: unknown } } }
    | null;
  const t = v?.data?.text ?? v?.text ?? v?.data?.input?.text;
  return typeof t === "string" ? t : undefined;
}

function applies(stageFilter: string, name: string): boolean {
  return stageFilter === "" || stageFilter === "*" ||
    stageFilter.split(",").map((s) => s.trim()).includes(name);
}

/**
 * The stage with the configured faults injected; the same object when none apply.
 *
 * @example
 * ```ts
 * import { withFaults } from "./faults.ts";
 * const stage = {
 *   name: "topics", filterSubject: "x", stream: "X", failedType: "x.failed",
 *   input: { kind: "event", types: [] },
 *   handle: () => [],
 * } as const;
 * const faulty = withFaults(stage, { failOn: "crash", failStage: "topics", slowMs: 0, slowStage: "" });
 * console.assert(faulty !== stage);
 * ```
 */
export function withFaults<I extends StageInput>(stage: Stage<I>, config: FaultConfig): Stage<I> {
  const needle = config.failOn.toLowerCase();
  const fail = needle !== "" && applies(config.failStage, stage.name);
  const slow = config.slowMs > 0 && applies(config.slowStage, stage.name);
  if (!fail && !slow) return stage;
  return {
    ...stage,
    async handle(input, ctx) {
      if (slow) await sleep(config.slowMs, ctx.signal);
      if (fail && textOf(input)?.toLowerCase().includes(needle)) {
        throw new InjectedFault(stage.name, config.failOn);
      }
      return await stage.handle(input, ctx);
    },
  };
}
