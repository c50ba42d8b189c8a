/**
 * Two tenants on one nats-server, isolated by NATS accounts: each runs Weft's topology and
 * services under the same names, and neither sees the other's subjects, streams or
 * buckets. An account is a separate subject namespace with its own JetStream; nothing
 * crosses unless the accounts export and import it explicitly.
 */
import assert from "node:assert/strict";
import { jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/nats-core";
import { loadConfig } from "../src/config.ts";
import { ensureIdentities, type Identity } from "../src/identities.ts";
import { freePort, startNatsServer } from "../src/nats_server.ts";
import { ensureTopology } from "../src/topology.ts";
import { startService } from "./helpers/mesh.ts";
import { waitFor } from "./helpers/wait.ts";
import { connectClient } from "./helpers/nats.ts";

async function stateOf(nc: NatsConnection, id: string): Promise<string | undefined> {
  const e = await (await new Kvm(nc).open("weft_feedback_state")).get(id);
  return e && e.length > 0 ? e.json<{ status: string }>().status : undefined;
}

Deno.test("two tenants on one server are isolated by accounts, each running Weft as is", async () => {
  const dir = await Deno.makeTempDir({ prefix: "weft-tenants-" });
  try {
    const [a, b] = await ensureIdentities(`${dir}/ids`, ["tenant-a", "tenant-b"]) as [
      Identity,
      Identity,
    ];
    await Deno.writeTextFile(
      `${dir}/nats.conf`,
      `jetstream { store_dir: "${dir}/store" }
accounts {
  TENANT_A { jetstream: enabled, users: [ { nkey: "${a.publicKey}" } ] }
  TENANT_B { jetstream: enabled, users: [ { nkey: "${b.publicKey}" } ] }
}
`,
    );
    await using server = await startNatsServer({
      configFile: `${dir}/nats.conf`,
      port: freePort(),
      cwd: dir,
    });
    const config = { ...loadConfig({ env: () => undefined, args: [] }), natsUrl: server.url };
    const ncA = await connectClient(server.url, "tenant-a", { nkeySeedFile: a.seedFile });
    const ncB = await connectClient(server.url, "tenant-b", { nkeySeedFile: b.seedFile });
    try {
      for (const nc of [ncA, ncB]) await ensureTopology(nc, await jetstreamManager(nc), config);
      const env = (id: Identity) => ({ NATS_URL: server.url, WEFT_NATS_NKEY: id.seedFile });
      await using _stateA = await startService("state", env(a));
      await using _ingestA = await startService("ingest", env(a));
      await using _stateB = await startService("state", env(b));
      await using _ingestB = await startService("ingest", env(b));

      const seenByB: string[] = [];
      const subB = ncB.subscribe("feedback.>", {
        callback: (_e, m) => void seenByB.push(m.subject),
      });
      await ncB.flush();

      ncA.publish("feedback.submit", JSON.stringify({ id: "SAME", text: "tenant A's words" }));
      await waitFor(async () => await stateOf(ncA, "SAME"), 15_000, "A's item ingested");
      ncB.publish("feedback.submit", JSON.stringify({ id: "SAME", text: "tenant B's words" }));
      await waitFor(async () => await stateOf(ncB, "SAME"), 15_000, "B's item ingested");
      subB.unsubscribe();

      // One item id, two tenants: each stream holds only its own tenant's messages.
      for (const [nc, words] of [[ncA, "tenant A's words"], [ncB, "tenant B's words"]] as const) {
        const jsm = await jetstreamManager(nc);
        const info = await jsm.streams.info("FEEDBACK");
        assert.equal(info.state.messages, 2, "a submission and its ingested event");
        const ingested = await jsm.streams.getMessage("FEEDBACK", {
          last_by_subj: "feedback.ingested.SAME",
        });
        assert.equal(ingested!.json<{ data: { text: string } }>().data.text, words);
      }
      assert.ok(
        seenByB.every((s) => s === "feedback.submit" || s === "feedback.ingested.SAME"),
        "B's subscriber saw only B's subjects",
      );
      assert.equal(seenByB.length, 2, "and only B's two messages, none of A's");
    } finally {
      await ncA.close();
      await ncB.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});
