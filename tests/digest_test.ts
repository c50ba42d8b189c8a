/**
 * The feedback digest as a recurring schedule over real processes: the scheduler fires
 * the `feedback-digest` cron, the digest service counts dispatched items per team and
 * publishes `digest.feedback_counts`.
 */
import assert from "node:assert/strict";
import { DeliverPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { loadConfig } from "../src/config.ts";
import { createEvent } from "../src/events.ts";
import { startNatsServer } from "../src/nats_server.ts";
import { publishEvent } from "../src/runner.ts";
import { DIGEST_STREAM } from "../src/subjects.ts";
import { ensureTopology } from "../src/topology.ts";
import { startService } from "./helpers/mesh.ts";
import { connectClient } from "./helpers/nats.ts";

Deno.test({
  name: "a recurring schedule publishes the feedback digest with counts per team",
  sanitizeOps: true,
  sanitizeResources: true,
  async fn() {
    await using server = await startNatsServer();
    const nc = await connectClient(server.url, "test");
    try {
      const js = jetstream(nc);
      await ensureTopology(
        nc,
        await jetstreamManager(nc),
        loadConfig({ env: () => undefined, args: [] }),
      );
      const teams = ["billing", "billing", "support"];
      for (const [i, team] of teams.entries()) {
        await publishEvent(
          js,
          createEvent({
            type: "feedback.dispatched",
            itemId: `fb${i}`,
            traceId: "0af7651916cd43dd8448eb211c80319c",
            source: "test",
            data: {
              text: "the invoice is wrong",
              sentiment: { label: "negative", score: -0.5, analyzer: "rules" },
              topics: { topics: ["billing"], evidence: {}, analyzer: "rules" },
              routing: { team, rule: 0 },
            },
          }),
          null,
        );
      }
      const env = { NATS_URL: server.url, WEFT_LOG_LEVEL: "info", WEFT_DIGEST_CRON: "* * * * * *" };
      await using _scheduler = await startService("scheduler", env);
      await using _digest = await startService("digest", env);

      const consumer = await js.consumers.get(DIGEST_STREAM, {
        filter_subjects: "digest.feedback_counts.*",
        deliver_policy: DeliverPolicy.All,
      });
      const m = await consumer.next({ expires: 10_000 });
      assert.ok(m, "a digest was published within 10 s");
      const digest = m.json<
        { type: string; data: { total: number; teams: Record<string, number> } }
      >();
      assert.equal(digest.type, "digest.feedback_counts");
      assert.equal(digest.data.total, 3);
      assert.deepEqual(digest.data.teams, { billing: 2, support: 1 });
    } finally {
      await nc.close();
    }
  },
});
