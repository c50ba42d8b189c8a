/**
 * The runner in-process against a real nats-server: a permanent failure skips retries.
 */
import assert from "node:assert/strict";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import { loadConfig } from "../src/config.ts";
import { PermanentError } from "../src/errors.ts";
import { createLogger } from "../src/observability/log.ts";
import { startNatsServer } from "../src/nats_server.ts";
import { listDeadLetters } from "../src/redrive.ts";
import { runStage } from "../src/runner.ts";
import type { Stage } from "../src/stage.ts";
import { ensureTopology } from "../src/topology.ts";
import { waitUntil } from "./helpers/wait.ts";

Deno.test("a handler's PermanentError dead-letters the item on the first attempt, without retries", async () => {
  await using server = await startNatsServer();
  const nc = await connect({ servers: server.url });
  try {
    const config = loadConfig({ env: () => undefined, args: [] });
    await ensureTopology(nc, await jetstreamManager(nc), config);
    let calls = 0;
    const stage: Stage<{ kind: "document"; name: "feedback.submit" }> = {
      name: "refuser",
      filterSubject: "feedback.submit",
      stream: "FEEDBACK",
      failedType: "feedback.failed",
      input: { kind: "document", name: "feedback.submit" },
      handle() {
        calls++;
        throw new PermanentError("policy says no");
      },
    };
    const runner = await runStage({ nc, stage, config, log: createLogger("t", "error", () => {}) });
    const js = jetstream(nc);
    await js.publish("feedback.submit", JSON.stringify({ id: "p1", text: "no" }));
    let letters: Awaited<ReturnType<typeof listDeadLetters>> = [];
    await waitUntil(async () => (letters = await listDeadLetters(js)).length === 1, 10_000);
    assert.equal(letters[0]!.letter.code, "rejected");
    assert.equal(letters[0]!.letter.attempts, 1);
    assert.equal(calls, 1);
    assert.equal(runner.stats.retried, 0);
    await runner.stop();
  } finally {
    await nc.close();
  }
});
