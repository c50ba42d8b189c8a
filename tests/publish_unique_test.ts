/**
 * `publishUnique` when the stream answers "duplicate" and the message held under the id
 * cannot be read (as during a leader election, when no node answers for the stream): the
 * publish is retried, and what is held is never taken for this message unread. The read is
 * made to fail for real: the publishing identity may publish to the stream but not read it.
 */
import assert from "node:assert/strict";
import { connect } from "@nats-io/transport-node";
import { headers } from "@nats-io/nats-core";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { publishEvent, publishUnique } from "../src/runner.ts";
import type { OutputEvent } from "../src/stage.ts";
import { WeftError } from "../src/errors.ts";
import { freePort, startNatsServer } from "../src/nats_server.ts";

/** A server with `admin` (anything) and `blind` (publishes, but reads no stored message). */
async function serverWithBlindWriter() {
  const dir = await Deno.makeTempDir({ prefix: "weft-unique-" });
  const conf = `${dir}/nats.conf`;
  await Deno.writeTextFile(
    conf,
    `jetstream { store_dir: "${dir}/js" }
authorization {
  users = [
    { user: admin, password: admin }
    {
      user: blind, password: blind
      permissions: {
        publish: { allow: [">"], deny: ["$JS.API.STREAM.MSG.GET.>", "$JS.API.DIRECT.GET.>"] }
        subscribe: { allow: [">"] }
      }
    }
  ]
}
`,
  );
  const server = await startNatsServer({ configFile: conf, port: freePort() });
  return {
    server,
    async [Symbol.asyncDispose]() {
      await server[Symbol.asyncDispose]();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };
}

Deno.test("publishUnique retries a duplicate whose held message it cannot read, and never takes junk under the id for its own", async () => {
  await using s = await serverWithBlindWriter();
  const admin = await connect({ servers: s.server.url, user: "admin", pass: "admin" });
  const blind = await connect({ servers: s.server.url, user: "blind", pass: "blind" });
  try {
    const jsm = await jetstreamManager(admin);
    await jsm.streams.add({ name: "ORDERS", subjects: ["orders.>"] });
    // Junk stored first under the id the item's own event will carry (ids are predictable).
    const junk = headers();
    junk.set("Nats-Msg-Id", "evt-1");
    await jetstream(admin).publish("orders.placed.o1", JSON.stringify({ junk: true }), {
      headers: junk,
    });

    const own = headers();
    own.set("Nats-Msg-Id", "evt-1");
    const data = new TextEncoder().encode(JSON.stringify({ type: "orders.placed", id: "evt-1" }));
    const asked: number[] = [];
    const isOwn = (held: { seq: number }) => {
      asked.push(held.seq);
      return Promise.resolve(false); // the held message is junk
    };
    // The read fails: the publish is not taken as stored, it fails to be retried.
    const err = await publishUnique(
      jetstream(blind, { timeout: 2_000 }),
      "orders.placed.o1",
      data,
      own,
      isOwn,
    ).then(() => undefined, (e) => e);
    assert.ok(err instanceof WeftError, `retried with a Weft error, got ${err}`);
    assert.equal(err.permanent, false, "a failed read is retried, not final");
    assert.equal(
      (await jsm.streams.info("ORDERS")).state.messages,
      1,
      "nothing stored on a read that failed",
    );

    // The retry reads the junk (here, with an identity that may), judges it, and stores the
    // event after it.
    const ack = await publishUnique(jetstream(admin), "orders.placed.o1", data, own, isOwn);
    assert.equal(ack.duplicate, false);
    assert.deepEqual(asked, [1]);
    const last = await jsm.streams.getMessage("ORDERS", { last_by_subj: "orders.placed.o1" });
    assert.equal(last?.seq, 2);
    assert.deepEqual(last?.json(), { type: "orders.placed", id: "evt-1" });
  } finally {
    await blind.close();
    await admin.close();
  }
});

Deno.test("publishEvent stores a once event whose refusal's message is gone when it looks, never taking it as stored", async () => {
  // An "expected last subject sequence 0" publish refused for what the subject held, and that
  // message removed before the subject is read (deleted, purged, aged out; in a cluster, a
  // publish still in flight when the leader refused this one, that may never be stored).
  // Taken as stored, the step acked its input and the item stalled with no letter.
  await using s = await serverWithBlindWriter();
  const admin = await connect({ servers: s.server.url, user: "admin", pass: "admin" });
  const other = await connect({ servers: s.server.url, user: "admin", pass: "admin" });
  try {
    const jsm = await jetstreamManager(admin);
    await jsm.streams.add({ name: "ORDERS", subjects: ["orders.>"] });
    // Another order's event for the item, stored first: the once publish is refused for it.
    await jetstream(admin).publish(
      "orders.placed.o1",
      JSON.stringify({ id: "other", type: "orders.placed", item_id: "o1", data: { total: 1 } }),
    );
    const event = {
      id: "evt-1",
      type: "orders.placed",
      version: 1,
      item_id: "o1",
      trace_id: "0123456789abcdef0123456789abcdef",
      time: new Date().toISOString(),
      source: "test",
      data: { total: 2 },
    } as unknown as OutputEvent;
    const judged: number[] = [];
    // Judging what the subject holds, the step finds it is not the item's; meanwhile (driven
    // from here, deterministically) an operator on another connection deletes it.
    const stands = async (held: { seq: number }) => {
      judged.push(held.seq);
      await jetstreamManager(other).then((m) => m.streams.deleteMessage("ORDERS", held.seq));
      return false;
    };
    const stored = await publishEvent(
      jetstream(admin),
      event,
      null,
      true,
      undefined,
      undefined,
      stands,
    );
    assert.deepEqual(judged, [1]);
    assert.equal(stored, true, "the event was not stored: it is not taken as stored");
    const last = await jsm.streams.getMessage("ORDERS", { last_by_subj: "orders.placed.o1" });
    assert.equal(last?.json<{ id: string }>().id, "evt-1", "the event is in the stream");
  } finally {
    await other.close();
    await admin.close();
  }
});
