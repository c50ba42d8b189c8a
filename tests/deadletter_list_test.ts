/**
 * Listing dead letters costs what the answer needs, not what DEADLETTER holds: a page of the
 * oldest letters reads those letters, a filter reads only its subjects, and `total` comes
 * from the stream's counts where it can. Against a real nats-server holding thousands of
 * large letters; what each listing read is measured on its own connection's byte counter.
 */
import assert from "node:assert/strict";
import type { NatsConnection } from "@nats-io/nats-core";
import { jetstream } from "@nats-io/jetstream";
import type { DeadLetter } from "../src/events.gen.ts";
import { deadLetterRoutes } from "../src/gateway/deadletters.ts";
import { type DeadLetterEntry, REDRIVEN_PREFIX, serveDeadLetterRequests } from "../src/redrive.ts";
import { connectClient, startTestNats } from "./helpers/nats.ts";

const STAGES = ["s0", "s1", "s2", "s3"];
const PER_STAGE = 500;
const PAYLOAD = "p".repeat(32 * 1024);

function letter(stage: string, i: number): DeadLetter {
  return {
    stage,
    code: i % 2 === 0 ? "handler_failed" : "invalid_event",
    reason: `letter ${i}`,
    attempts: 1,
    subject: `orders.placed.${stage}_${i}`,
    stream_seq: i + 1,
    time: "2026-01-01T00:00:00.000Z",
    item_id: `${stage}_${i}`,
    payload: PAYLOAD,
    payload_encoding: "utf8",
  };
}

/** Bytes `nc` received while `work` ran. */
async function bytesRead<T>(nc: NatsConnection, work: () => Promise<T>) {
  const before = nc.stats().inBytes;
  const value = await work();
  return { value, read: nc.stats().inBytes - before };
}

Deno.test("listing dead letters reads the page it answers and the filter's subjects, not the whole DEADLETTER stream", async () => {
  await using t = await startTestNats();
  const dl = await t.jsm.streams.info("DEADLETTER");
  await t.jsm.streams.update("DEADLETTER", { ...dl.config, max_bytes: 512 * 1024 * 1024 });
  const js = jetstream(t.nc);
  // 2,000 letters of 32 KiB, interleaved across four stages (about 66 MB).
  for (let i = 0; i < PER_STAGE; i++) {
    await Promise.all(
      STAGES.map((stage) =>
        js.publish(`deadletter.${stage}.${stage}_${i}`, JSON.stringify(letter(stage, i)))
      ),
    );
  }
  // The first letter was redriven once.
  await js.publish(`${REDRIVEN_PREFIX}.1`, JSON.stringify({ dl_seq: 1, msg_id: "m", time: "" }));
  const stored = (await t.jsm.streams.info("DEADLETTER")).state.bytes;
  assert.ok(stored > 60 * 1024 * 1024, `DEADLETTER holds ${stored} bytes`);

  // The gateway's own connection, as in production: everything a listing reads comes in on it.
  const gateway = await connectClient(t.server.url, "gateway");
  const served = serveDeadLetterRequests(gateway, t.log);
  await gateway.flush(); // its subscriptions are on the server before the first request
  const http = deadLetterRoutes(jetstream(gateway));
  try {
    const ask = async (req: unknown) => {
      const r = await t.nc.request("weft.deadletters.list", JSON.stringify(req), {
        timeout: 30_000,
      });
      return r.json<{ items: DeadLetterEntry[]; total: number; truncated?: boolean }>();
    };
    // Before: every listing read all 66 MB (the gateway's connection was closed as a slow
    // consumer on a larger stream).
    const one = await bytesRead(gateway, () => ask({ limit: 1 }));
    assert.equal(one.value.items.length, 1);
    assert.equal(one.value.items[0]!.seq, 1);
    assert.equal(one.value.items[0]!.redrives, 1);
    assert.equal(one.value.total, 2000, "total from the stream's counts");
    assert.ok(one.read < 1024 * 1024, `limit 1 read ${one.read} bytes`);

    const pending = await bytesRead(gateway, () => ask({ pending: true, limit: 3 }));
    assert.deepEqual(pending.value.items.map((e) => e.seq), [2, 3, 4]);
    assert.equal(pending.value.total, 1999);
    assert.ok(pending.read < 1024 * 1024, `pending, limit 3 read ${pending.read} bytes`);

    const item = await bytesRead(gateway, () => ask({ item_id: "s2_7" }));
    assert.deepEqual(item.value.items.map((e) => e.letter.item_id), ["s2_7"]);
    assert.equal(item.value.total, 1);
    assert.ok(item.read < 1024 * 1024, `one item read ${item.read} bytes`);

    // A filter on the body (code) counts its total by reading the stage's letters only.
    const coded = await bytesRead(
      gateway,
      () => ask({ stage: "s1", code: "invalid_event", limit: 2 }),
    );
    assert.deepEqual(
      coded.value.items.map((e) => [e.letter.stage, e.letter.code, e.letter.item_id]),
      [["s1", "invalid_event", "s1_1"], ["s1", "invalid_event", "s1_3"]],
    );
    assert.equal(coded.value.total, PER_STAGE / 2);
    // (A direct read carries the letter in base64: a quarter of the stream is a third of it.)
    assert.ok(coded.read < stored / 2, `one stage's letters read: ${coded.read} of ${stored}`);

    // No limit: no more letters are kept than one reply carries; the reply says it was cut.
    const all = await bytesRead(gateway, () => ask({}));
    assert.equal(all.value.total, 2000);
    assert.equal(all.value.truncated, true);
    assert.ok(all.value.items.length > 0 && all.value.items.length < 40);
    assert.ok(all.read < 4 * 1024 * 1024, `an unlimited list read ${all.read} bytes`);

    // A redrive selects its letters the same way: one item's, read from its subject alone
    // (these letters name no stream, so it is refused, and says which letter it chose).
    const seq = (await ask({ item_id: "s1_3" })).items[0]!.seq;
    const redrive = await bytesRead(gateway, async () => {
      const r = await t.nc.request(
        "weft.deadletters.redrive",
        JSON.stringify({ filter: { item_id: "s1_3" } }),
        { timeout: 30_000 },
      );
      return r.json<{ error?: { detail: string } }>();
    });
    assert.match(redrive.value.error?.detail ?? "", new RegExp(`^nothing redriven: ${seq}: `));
    assert.match(redrive.value.error!.detail, /no stream holds orders\.placed\.s1_3/);
    assert.ok(redrive.read < 1024 * 1024, `one item's redrive read ${redrive.read} bytes`);

    // HTTP: the page only.
    const page = await bytesRead(gateway, async () => {
      const res = await http.request("/?limit=10&stage=s3");
      assert.equal(res.status, 200);
      return await res.json() as { items: DeadLetterEntry[] };
    });
    assert.equal(page.value.items.length, 10);
    assert.ok(page.value.items.every((e) => e.letter.stage === "s3"));
    assert.ok(page.read < 2 * 1024 * 1024, `HTTP limit 10 read ${page.read} bytes`);
    assert.equal(gateway.isClosed(), false);
  } finally {
    served.stop();
    await gateway.close();
  }
});
