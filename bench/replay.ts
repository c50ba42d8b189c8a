/**
 * `deno task bench:replay`: what opening an old item's event stream costs the server, on
 * whichever nats-server is first on the PATH, so releases can be compared on the same
 * machine (docs/BENCH.md: nats-server 2.9 against 2.15), e.g. Debian's 2.9.10 with
 * `PATH=/usr/sbin:$PATH deno task bench:replay`.
 *
 * A stream shaped like FEEDBACK (subjects `feedback.<type>.<id>`, file storage) is filled
 * with `--items` items of 5 events each (600-byte bodies). The server is then restarted, so
 * no per-subject state of the fill is still loaded. Each case then reads one item's
 * events as `GET /feedback/{id}/events` does (an ordered consumer filtered on
 * `feedback.*.<id>`), either from the stream's first message or from the item's first
 * event, while a publisher keeps publishing (one publish every 5 ms, awaiting each ack) to
 * the same stream; the figures are the read's time and the longest publish during it.
 *
 * Flags: --items N (100000), --json FILE.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { connect } from "@nats-io/transport-node";
import type { NatsConnection } from "@nats-io/nats-core";
import {
  DeliverPolicy,
  jetstream,
  type JetStreamClient,
  jetstreamManager,
  StorageType,
} from "@nats-io/jetstream";
import { freePort, serverVersion, startNatsServer } from "../src/nats_server.ts";
import { readStream } from "../src/stream_reader.ts";

const STREAM = "REPLAY";
const TYPES = ["ingested", "sentiment_analyzed", "topics_extracted", "dispatched", "processed"];
const encoder = new TextEncoder();
const say = (line: string) => Deno.stdout.writeSync(encoder.encode(`${line}\n`));

interface Case {
  item: string;
  from: "stream start" | "item's first event";
  readMs: number;
  events: number;
  publishMaxMs: number;
  publishes: number;
}

/** Fills the stream: `items` items of 5 events, publishes pipelined 512 at a time. */
async function fill(js: JetStreamClient, items: number): Promise<Map<string, number>> {
  const firstSeq = new Map<string, number>();
  const body = "x".repeat(560);
  let pending: Promise<unknown>[] = [];
  for (let i = 0; i < items; i++) {
    const id = `item${i}`;
    for (const type of TYPES) {
      const p = js.publish(`feedback.${type}.${id}`, JSON.stringify({ item_id: id, body }));
      if (type === "ingested") p.then((ack) => firstSeq.set(id, ack.seq));
      pending.push(p);
      if (pending.length >= 512) {
        await Promise.all(pending);
        pending = [];
      }
    }
    if (i % 20_000 === 0 && i > 0) say(`fill.progress ${i}`);
  }
  await Promise.all(pending);
  return firstSeq;
}

/** Publishes every 5 ms until stopped; reports the longest publish (send to ack). */
function publisher(js: JetStreamClient) {
  let stop = false;
  let max = 0;
  let count = 0;
  const done = (async () => {
    while (!stop) {
      const t0 = performance.now();
      await js.publish("feedback.ingested.probe", "{}");
      max = Math.max(max, performance.now() - t0);
      count++;
      await new Promise((r) => setTimeout(r, 5));
    }
  })();
  return {
    async stop() {
      stop = true;
      await done;
      return { max, count };
    },
  };
}

async function replay(
  nc: NatsConnection,
  id: string,
  startSeq: number | undefined,
): Promise<Omit<Case, "item" | "from">> {
  const js = jetstream(nc);
  const pub = publisher(js);
  // Let the publisher's first publishes set its baseline before the read starts.
  await new Promise((r) => setTimeout(r, 50));
  const t0 = performance.now();
  let events = 0;
  for await (
    const _m of readStream(js, STREAM, {
      filter: `feedback.*.${id}`,
      ...(startSeq !== undefined ? { startSeq } : { deliverPolicy: DeliverPolicy.All }),
    })
  ) events++;
  const readMs = performance.now() - t0;
  const { max, count } = await pub.stop();
  return { readMs: round(readMs), events, publishMaxMs: round(max), publishes: count };
}

const round = (x: number) => Math.round(x * 10) / 10;

async function main() {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      items: { type: "string", default: "100000" },
      json: { type: "string" },
    },
  });
  const items = Number(values.items);
  if (!Number.isInteger(items) || items < 10) throw new Error("--items must be 10 or more");
  const binary = "nats-server";
  const version = await serverVersion(binary);
  say(`server ${version}`);
  const dir = await Deno.makeTempDir({ prefix: "weft-replay-" });
  const server = await startNatsServer({ binary, port: freePort(), storeDir: `${dir}/store` });
  let nc: NatsConnection | undefined;
  try {
    nc = await connect({ servers: server.url, maxReconnectAttempts: -1, reconnectTimeWait: 100 });
    const jsm = await jetstreamManager(nc);
    await jsm.streams.add({
      name: STREAM,
      subjects: ["feedback.>"],
      storage: StorageType.File,
      max_bytes: 4 * 1024 ** 3,
    });
    const t0 = performance.now();
    const firstSeq = await fill(jetstream(nc), items);
    say(`fill.events ${items * TYPES.length}`);
    say(`fill.seconds ${round((performance.now() - t0) / 1000)}`);
    await nc.close();
    // A restart: the server reloads the stream from its files, with nothing of the fill warm.
    await server.stop("SIGTERM");
    await server.restart();
    nc = await connect({ servers: server.url, maxReconnectAttempts: -1, reconnectTimeWait: 100 });
    const jsm2 = await jetstreamManager(nc);
    for (let i = 0;; i++) {
      const info = await jsm2.streams.info(STREAM).catch(() => undefined);
      if (info && info.state.messages >= items * TYPES.length) break;
      if (i > 600) throw new Error("the stream did not come back after the restart");
      await new Promise((r) => setTimeout(r, 100));
    }
    const last = `item${items - 1}`;
    const middle = `item${Math.floor(items / 2)}`;
    const cases: Case[] = [];
    for (
      const [item, from] of [
        [last, "stream start"],
        [last, "item's first event"],
        [middle, "stream start"],
        [middle, "item's first event"],
      ] as const
    ) {
      const r = await replay(nc, item, from === "stream start" ? undefined : firstSeq.get(item));
      if (r.events !== TYPES.length) {
        throw new Error(`${item} from ${from}: read ${r.events} events, expected ${TYPES.length}`);
      }
      cases.push({ item, from, ...r });
      const key = `replay.${item === last ? "last" : "middle"}.${
        from === "stream start" ? "from_start" : "from_first_event"
      }`;
      say(`${key}.read_ms ${r.readMs}`);
      say(`${key}.publish_max_ms ${r.publishMaxMs}`);
    }
    say("");
    say(`nats-server ${version}, ${items} items (${items * TYPES.length} events):`);
    say("| item opened | from | read | longest publish meanwhile |");
    say("| --- | --- | ---: | ---: |");
    for (const c of cases) {
      say(
        `| ${c.item === last ? "the last" : "the middle one"} | ${c.from} | ${c.readMs} ms | ` +
          `${c.publishMaxMs} ms |`,
      );
    }
    if (values.json) {
      await Deno.writeTextFile(
        values.json,
        JSON.stringify({ version, items, cases }, null, 2) + "\n",
      );
    }
  } finally {
    await nc?.close().catch(() => {});
    await server.stop().catch(() => {});
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

if (import.meta.main) await main();
