/**
 * The hub's side of edge sites on real nats-servers, without whole meshes: how the hub
 * folds the events it holds from a site into the site's items.
 */
import assert from "node:assert/strict";
import { jetstream } from "@nats-io/jetstream";
import { edgeStream, siteWiredItem } from "../src/edge.ts";
import { NotFoundError } from "../src/errors.ts";
import { createEvent } from "../src/events.ts";
import { rebuildStates } from "../src/rebuild.ts";
import { SHIPPED_PIPELINES } from "../pipelines/shipped.ts";
import { startTestNats } from "./helpers/nats.ts";

const TRACE = "0af7651916cd43dd8448eb211c80319c";

Deno.test("the hub folds a site's items as the site's state writer does: what the site refused (not JSON, invalid, another item's, no time) is skipped, not a 500 or a wrong state", async () => {
  await using t = await startTestNats();
  const js = jetstream(t.nc);
  // The hub's copies of site east's events, as sourcing stores them: on site.east.<subject>.
  await t.jsm.streams.add({ name: edgeStream("east"), subjects: ["site.east.>"] });
  const ingested = (id: string, text: string) =>
    createEvent({
      type: "feedback.ingested",
      itemId: id,
      traceId: TRACE,
      source: "gateway",
      data: { text },
    });
  const body = (e: unknown) => JSON.stringify(e);
  const atSite: [string, string][] = [
    ["feedback.ingested.OK-1", body(ingested("OK-1", "the export works"))],
    // Not JSON: the site dead-letters it; its consumer fails the item.
    ["feedback.ingested.FORGED-1", body(ingested("FORGED-1", "a real one"))],
    ["feedback.sentiment_analyzed.FORGED-1", "{not json"],
    [
      "feedback.failed.FORGED-1",
      body(createEvent({
        type: "feedback.failed",
        itemId: "FORGED-1",
        traceId: TRACE,
        source: "weft-sentiment",
        data: { stage: "sentiment", code: "invalid_event", reason: "not JSON", attempts: 1 },
      })),
    ],
    // Not an event, or not one at all: nothing the site would fold.
    ["feedback.ingested.FORGED-3", "{}"],
    ["feedback.ingested.FORGED-4", "null"],
    // An event about another item than its subject's.
    ["feedback.ingested.FORGED-7", body(ingested("OTHER-ITEM", "someone else's"))],
    // A time that is no time.
    [
      "feedback.ingested.FORGED-6",
      body({ ...ingested("FORGED-6", "when?"), time: "not a time" }),
    ],
    ["content.uploaded.ct_FORGED", "{bad"],
  ];
  for (const [subject, data] of atSite) {
    await js.publish(subject, data);
    await js.publish(`site.east.${subject}`, data);
  }
  for (const wiring of SHIPPED_PIPELINES.filter((w) => w.items)) {
    // The site's view: what its state writer folds (a rebuild folds the same).
    const { states } = await rebuildStates(js, wiring.items!.state);
    const ids = atSite.map(([s]) => s.split(".")).filter((p) => p[0] === wiring.name)
      .map((p) => p[2]!);
    for (const id of new Set(ids)) {
      const site = states.get(id);
      if (site === undefined) {
        await assert.rejects(
          siteWiredItem(js, "east", wiring, id),
          NotFoundError,
          `${wiring.name} ${id}: none at the site, none at the hub`,
        );
        continue;
      }
      const { site: name, ...atHub } = await siteWiredItem(js, "east", wiring, id);
      assert.equal(name, "east");
      // (Stream sequences differ between the site's stream and the hub's.)
      const noSeq = (s: unknown) => JSON.parse(JSON.stringify(s), (k, v) => k === "seq" ? 0 : v);
      assert.deepEqual(noSeq(atHub), noSeq(site), `${wiring.name} ${id}: the site's state`);
    }
  }
  const [feedback, content] = SHIPPED_PIPELINES;
  assert.equal((await siteWiredItem(js, "east", feedback!, "FORGED-1")).status, "failed");
  assert.equal((await siteWiredItem(js, "east", feedback!, "OK-1")).status, "accepted");
  for (const id of ["FORGED-3", "FORGED-4", "FORGED-6", "FORGED-7"]) {
    await assert.rejects(siteWiredItem(js, "east", feedback!, id), NotFoundError, id);
  }
  await assert.rejects(siteWiredItem(js, "east", content!, "ct_FORGED"), NotFoundError);
});
