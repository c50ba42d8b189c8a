/**
 * `deno task shadow` replays the feedback history through a candidate and reports what it
 * would have decided, next to production, without publishing anything or changing an item.
 */
import assert from "node:assert/strict";
import { jetstreamManager } from "@nats-io/jetstream";
import { chat, startFakeOpenAI } from "./helpers/openai_server.ts";
import { ONE_PROCESS, startMesh, taskArgs } from "./helpers/mesh.ts";
import { waitFor } from "./helpers/wait.ts";
import { SAMPLE_FEEDBACK } from "./helpers/texts.ts";
import { connectClient } from "./helpers/nats.ts";

const TEXTS = SAMPLE_FEEDBACK.slice(0, 8);

Deno.test("deno task shadow reports a candidate's agreement, routing changes and cost, and changes nothing", async () => {
  const llm = startFakeOpenAI((req) => {
    const usage = { prompt_tokens: 100, completion_tokens: 20 };
    if (/sentiment/i.test(req.body.messages[0]!.content)) {
      return chat({ label: "negative", score: -0.5 }, usage);
    }
    return chat({ topics: ["billing"], evidence: { billing: ["charged"] } }, usage);
  });
  try {
    await using mesh = await startMesh(ONE_PROCESS);
    const post = await fetch(`${mesh.gatewayUrl}/feedback/batch`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ items: TEXTS.map((text, i) => ({ id: `S${i}`, text })) }),
    });
    assert.equal(post.status, 202);
    await post.body?.cancel();
    const nc = await connectClient(mesh.natsUrl, "test-ops", mesh.credentials("ops"));
    try {
      const jsm = await jetstreamManager(nc);
      await waitFor(
        async () => {
          const info = await jsm.streams.info("FEEDBACK", {
            subjects_filter: "feedback.dispatched.*",
          });
          return Object.keys(info.state.subjects ?? {}).length === TEXTS.length || undefined;
        },
        30_000,
        "every item dispatched",
      );
      const before = (await jsm.streams.info("FEEDBACK")).state;
      const production = new Map<string, string>();
      for (let i = 0; i < TEXTS.length; i++) {
        // The state follows its events within a few state-writer flushes.
        const s = await waitFor(
          async () => {
            const s = await (await fetch(`${mesh.gatewayUrl}/feedback/S${i}`)).json();
            return s.routing?.team ? s : undefined;
          },
          20_000,
          `S${i}'s state`,
        );
        production.set(TEXTS[i]!, s.routing.team);
      }
      await Deno.writeTextFile(
        `${mesh.storeDir}/labels.jsonl`,
        [
          { text: TEXTS[0], sentiment: "positive" },
          { text: TEXTS[2], sentiment: "negative" },
          { text: TEXTS[6], sentiment: "positive" },
        ].map((r) => JSON.stringify(r)).join("\n") + "\n",
      );

      const out = await new Deno.Command("deno", {
        args: [
          ...await taskArgs("shadow"),
          "--labels",
          `${mesh.storeDir}/labels.jsonl`,
          "--out",
          `${mesh.storeDir}/report`,
        ],
        cwd: new URL("../", import.meta.url),
        env: {
          NATS_URL: mesh.natsUrl,
          WEFT_NATS_NKEY: mesh.credentials("ops").nkeySeedFile!,
          WEFT_ANALYZERS: "llm",
          WEFT_LLM_BASE_URL: llm.baseUrl,
          WEFT_LLM_API_KEY: "test-key",
          WEFT_LLM_MODEL: "candidate-model",
          WEFT_LLM_PRICE_IN_PER_1K: "0.001",
        },
        stdout: "piped",
        stderr: "piped",
      }).output();
      const printed = new TextDecoder().decode(out.stdout);
      assert.ok(out.success, new TextDecoder().decode(out.stderr) + printed);
      assert.match(printed, /shadow: llm:candidate-model/);
      const report = JSON.parse(await Deno.readTextFile(`${mesh.storeDir}/report.json`));
      assert.equal(report.items, TEXTS.length);
      // The candidate calls everything negative billing: routed to Billing.
      const billing = [...production.values()].filter((t) => t === "Billing").length;
      assert.equal(report.routingChanges.count, TEXTS.length - billing);
      assert.equal(report.fields.team.agreement, billing / TEXTS.length);
      assert.ok(report.fields.sentiment.agreement < 1);
      assert.equal(
        Object.values(report.fields.sentiment.confusion as Record<string, Record<string, number>>)
          .reduce((n, row) => n + (row.negative ?? 0), 0),
        TEXTS.length,
        "every item in the candidate's negative column",
      );
      assert.equal(report.llm.calls, 2 * TEXTS.length, "sentiment and topics per item");
      assert.ok(report.llm.cost_usd > 0);
      assert.equal(report.labelled.items, 3);
      assert.equal(report.labelled.candidateAccuracy, 1 / 3, "only the negative one right");
      assert.match(await Deno.readTextFile(`${mesh.storeDir}/report.html`), /Shadow run/);

      // Nothing was published and no item changed.
      const after = (await jsm.streams.info("FEEDBACK")).state;
      assert.equal(after.messages, before.messages);
      assert.equal(after.last_seq, before.last_seq);
      for (let i = 0; i < TEXTS.length; i++) {
        const s = await (await fetch(`${mesh.gatewayUrl}/feedback/S${i}`)).json();
        assert.equal(s.routing.team, production.get(TEXTS[i]!));
      }

      // A sample of the history: --count.
      const some = await new Deno.Command("deno", {
        args: [...await taskArgs("shadow"), "--count", "3"],
        cwd: new URL("../", import.meta.url),
        env: { NATS_URL: mesh.natsUrl, WEFT_NATS_NKEY: mesh.credentials("ops").nkeySeedFile! },
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert.ok(some.success, new TextDecoder().decode(some.stderr));
      assert.match(new TextDecoder().decode(some.stdout), /on 3 items/);
      assert.match(new TextDecoder().decode(some.stdout), /team\s+agreement 100\.0%/);
    } finally {
      await nc.close();
    }
  } finally {
    await llm.close();
  }
});
