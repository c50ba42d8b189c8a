import assert from "node:assert/strict";
import { headers, type NatsConnection } from "@nats-io/nats-core";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { connectNats } from "./nats.ts";
import { startNatsServer } from "./nats_server.ts";
import { answersBatchedReads, lastMessagesReader, storedFirstOnSubject } from "./last_messages.ts";

/** A server with stream ORDERS (`allow_direct` as asked) and a count of the API requests made. */
async function serverWithStream(allowDirect = true) {
  const server = await startNatsServer();
  const nc = await connectNats(server.url, "last-messages-test");
  const jsm = await jetstreamManager(nc);
  await jsm.streams.add({ name: "ORDERS", subjects: ["orders.>"], allow_direct: allowDirect });
  const requests: string[] = [];
  const spy = nc.subscribe("$JS.API.>", {
    callback: (_err, m) => void requests.push(m.subject),
  });
  await nc.flush();
  return {
    nc,
    js: jetstream(nc),
    requests,
    stopCounting: () => spy.unsubscribe(),
    async [Symbol.asyncDispose]() {
      spy.unsubscribe();
      await nc.close();
      await server[Symbol.asyncDispose]();
    },
  };
}

const once = () => {
  const h = headers();
  h.set("Nats-Expected-Last-Subject-Sequence", "0");
  return { headers: h };
};

/** Runs `body` only on nats-server 2.11+ (batched direct gets), else checks it is not tried. */
async function onBatchingServer(
  nc: NatsConnection,
  requests: string[],
  body: () => Promise<void>,
): Promise<void> {
  if (answersBatchedReads(nc)) return await body();
  // Older servers: the reader answers null without asking anything.
  const read = lastMessagesReader(nc, "ORDERS");
  requests.length = 0;
  assert.equal(await read(["orders.placed.o1"]), null);
  await nc.flush();
  assert.deepEqual(requests, []);
}

Deno.test("lastMessagesReader() reads the last message of each subject in one request", async () => {
  await using t = await serverWithStream();
  await onBatchingServer(t.nc, t.requests, async () => {
    await t.js.publish("orders.placed.o1", "first", once());
    await t.js.publish("orders.failed.o1", "f1");
    await t.js.publish("orders.failed.o1", "f2");
    const last = await t.js.publish("orders.placed.o2", "other");
    const read = lastMessagesReader(t.nc, "ORDERS");
    t.requests.length = 0;
    const got = await read(["orders.placed.o1", "orders.failed.o1", "orders.shipped.o1"], {
      atLeastSeq: last.seq,
    });
    await t.nc.flush();
    assert.ok(got);
    assert.deepEqual([...got.keys()].sort(), ["orders.failed.o1", "orders.placed.o1"]);
    assert.equal(new TextDecoder().decode(got.get("orders.placed.o1")!.data), "first");
    assert.equal(got.get("orders.placed.o1")!.seq, 1);
    assert.ok(storedFirstOnSubject(got.get("orders.placed.o1")!));
    assert.equal(new TextDecoder().decode(got.get("orders.failed.o1")!.data), "f2");
    assert.equal(got.get("orders.failed.o1")!.seq, 3);
    assert.ok(!storedFirstOnSubject(got.get("orders.failed.o1")!));
    assert.deepEqual(t.requests, ["$JS.API.DIRECT.GET.ORDERS"]);
  });
});

Deno.test("lastMessagesReader() answers null when the server that answered holds less of the stream than atLeastSeq", async () => {
  await using t = await serverWithStream();
  await onBatchingServer(t.nc, t.requests, async () => {
    const ack = await t.js.publish("orders.placed.o1", "first", once());
    const read = lastMessagesReader(t.nc, "ORDERS");
    assert.ok(await read(["orders.placed.o1"], { atLeastSeq: ack.seq }));
    assert.equal(await read(["orders.placed.o1"], { atLeastSeq: ack.seq + 1 }), null);
  });
});

Deno.test("lastMessagesReader() answers null when nothing matched, and when a message's empty body ends the answer early", async () => {
  await using t = await serverWithStream();
  await onBatchingServer(t.nc, t.requests, async () => {
    const read = lastMessagesReader(t.nc, "ORDERS");
    assert.equal(await read(["orders.placed.none", "orders.failed.none"]), null);
    await t.js.publish("orders.failed.o1", "");
    await t.js.publish("orders.placed.o1", "first", once());
    // The empty failure comes first: what follows it is never seen, so nothing is trusted.
    assert.equal(await read(["orders.placed.o1", "orders.failed.o1"]), null);
  });
});

Deno.test("lastMessagesReader() answers null on a stream without allow_direct, and asks again only after a minute", async () => {
  await using t = await serverWithStream(false);
  // (The count of requests is a subscriber to them: with it, the request would have one.)
  t.stopCounting();
  await onBatchingServer(t.nc, t.requests, async () => {
    await t.js.publish("orders.placed.o1", "first", once());
    const read = lastMessagesReader(t.nc, "ORDERS");
    assert.equal(await read(["orders.placed.o1"]), null);
    // The stream takes direct gets from now on, but the reader does not ask again so soon.
    const jsm = await jetstreamManager(t.nc);
    const info = await jsm.streams.info("ORDERS");
    await jsm.streams.update("ORDERS", { ...info.config, allow_direct: true });
    assert.equal(await read(["orders.placed.o1"]), null);
    assert.ok(await lastMessagesReader(t.nc, "ORDERS")(["orders.placed.o1"]));
  });
});

Deno.test("storedFirstOnSubject() takes only 'expected last subject sequence 0' checked against its own subject", () => {
  const h = headers();
  assert.ok(!storedFirstOnSubject({ headers: h }));
  h.set("Nats-Expected-Last-Subject-Sequence", "3");
  assert.ok(!storedFirstOnSubject({ headers: h }));
  h.set("Nats-Expected-Last-Subject-Sequence", "0");
  assert.ok(storedFirstOnSubject({ headers: h }));
  h.set("Nats-Expected-Last-Subject-Sequence-Subject", "orders.*.o1");
  assert.ok(!storedFirstOnSubject({ headers: h }));
});

Deno.test("lastMessagesReader() reads an item's whole subject space by wildcard in one request, and no more than it can trust whole", async () => {
  await using t = await serverWithStream();
  await onBatchingServer(t.nc, t.requests, async () => {
    await t.js.publish("orders.placed.o1", "placed");
    await t.js.publish("orders.paid.o1", "paid 1");
    await t.js.publish("orders.placed.o12", "another item");
    const paid = await t.js.publish("orders.paid.o1", "paid 2");
    const read = lastMessagesReader(t.nc, "ORDERS");
    t.requests.length = 0;
    const last = await read(["orders.*.o1"], { atLeastSeq: paid.seq });
    await t.nc.flush();
    assert.deepEqual(t.requests, ["$JS.API.DIRECT.GET.ORDERS"]);
    assert.ok(last);
    assert.deepEqual([...last.keys()].sort(), ["orders.paid.o1", "orders.placed.o1"]);
    assert.equal(new TextDecoder().decode(last.get("orders.paid.o1")!.data), "paid 2");
    assert.equal(last.get("orders.paid.o1")!.seq, paid.seq);
    // More subjects than one answer holds (256): not trusted whole.
    await Promise.all(
      Array.from({ length: 257 }, (_, i) => t.js.publish(`orders.e${i}.big`, "x")),
    );
    assert.equal(await read(["orders.*.big"]), null);
  });
});
