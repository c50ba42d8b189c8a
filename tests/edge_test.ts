/**
 * Edge sites on leaf nodes: a hub (`deno task start --hub east,west`) and two sites
 * (`deno task start --leaf HUB --site east|west`), each a whole mesh with its own
 * nats-server and JetStream domain. East's link to the hub is cut for 30 s while both sites
 * go on ingesting over HTTP; east processes its items locally meanwhile. Once the link is
 * back, the hub holds every event of both sites exactly once, in each site's order, and its
 * central view (`GET /sites/...`, the dashboard) shows both sites' items.
 */
import assert from "node:assert/strict";
import { jetstream, jetstreamManager, type JsMsg } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/nats-core";
import { edgeStream } from "../src/edge.ts";
import { connectNats } from "../src/nats.ts";
import { freePort } from "../src/nats_server.ts";
import { IDENTITY_DIR } from "../src/supervisor.ts";
import { readStream } from "../src/stream_reader.ts";
import { startLink } from "./helpers/link.ts";
import { type Mesh, startMesh } from "./helpers/mesh.ts";
import { waitFor } from "./helpers/wait.ts";

/** The outage: a deliberate duration, not a wait for anything. */
const OUTAGE_MS = 30_000;
const SITES = ["east", "west"] as const;

/** Prints the test's figures as one `EDGE-FIGURES {...}` line. */
function printFigures(figures: Record<string, unknown>): void {
  Deno.stdout.writeSync(new TextEncoder().encode(`EDGE-FIGURES ${JSON.stringify(figures)}\n`));
}

/** One stored event: its subject, event id and item. */
interface Stored {
  subject: string;
  id: string;
  item: string;
}

async function storedEvents(nc: NatsConnection, stream: string): Promise<Stored[]> {
  const out: Stored[] = [];
  for await (const m of readStream(jetstream(nc), stream)) out.push(stored(m));
  return out;
}

function stored(m: JsMsg): Stored {
  const e = m.json<{ id: string; item_id: string }>();
  return { subject: m.subject, id: e.id, item: e.item_id };
}

/** Posts one item to a site's gateway; its id, once accepted. */
async function post(mesh: Mesh, body: Record<string, unknown>): Promise<string> {
  const res = await fetch(`${mesh.gatewayUrl}/feedback`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await res.json() as { id?: string };
  assert.equal(res.status, 202, `a site accepts locally: ${JSON.stringify(answer)}`);
  return answer.id!;
}

async function getJson(url: string): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(url);
  return { status: res.status, body: await res.json() };
}

Deno.test("edge sites keep processing through a 30 s cut of their link, and the hub then has every event once, in order", async () => {
  const leafPort = freePort();
  // Each mesh runs its services in one process: three meshes share the 2 cores.
  await using hub = await startMesh({
    WEFT_HUB: SITES.join(","),
    WEFT_LEAF_PORT: String(leafPort),
    WEFT_TOGETHER: "all",
  });
  await hub.waitForLog((l) => l.msg === "weft is ready", 90_000, "the hub ready");
  // East's uplink goes through a relay the test can cut; west's is direct.
  await using eastLink = startLink(leafPort);
  const site = (name: string, port: number) =>
    startMesh({
      WEFT_LEAF: `nats-leaf://127.0.0.1:${port}`,
      WEFT_SITE: name,
      WEFT_LEAF_NKEY: `${hub.storeDir}/${IDENTITY_DIR}/leaf-${name}.nk`,
      WEFT_TOGETHER: "all",
    });
  await using east = await site("east", eastLink.port);
  await using west = await site("west", leafPort);
  const meshes = { east, west };
  for (const [name, m] of Object.entries(meshes)) {
    await m.waitForLog((l) => l.msg === "weft is ready", 90_000, `site ${name} ready`);
  }
  const ncs = {
    hub: await connectNats(hub.natsUrl, "test-hub", hub.credentials("ops")),
    east: await connectNats(east.natsUrl, "test-east", east.credentials("ops")),
    west: await connectNats(west.natsUrl, "test-west", west.credentials("ops")),
  };
  try {
    // The hub sources each site across the leafnode link once it is up.
    const linkedAt = performance.now();
    let last: unknown;
    await waitFor(
      async () => {
        const { body } = await getJson(`${hub.gatewayUrl}/sites`);
        last = body;
        const sites = body.sites as { site: string; last_seen_ms: number | null }[];
        return sites.every((s) => s.last_seen_ms !== null && s.last_seen_ms < 10_000) ||
          undefined;
      },
      120_000,
      "the hub sourcing both sites",
    ).catch((err) => {
      throw new Error(`${err.message}; GET /sites: ${JSON.stringify(last)}`);
    });
    const linkMs = performance.now() - linkedAt;

    // Load: both sites ingest 4 items/s each, before, during and after the cut. One client
    // id is used at both sites, during the cut: the hub must keep both items apart.
    const accepted: Record<string, string[]> = { east: [], west: [] };
    let stop = false;
    const load = (async () => {
      for (let n = 0; !stop; n++) {
        const at = performance.now();
        await Promise.all(SITES.map(async (name) => {
          accepted[name]!.push(
            await post(meshes[name], { text: `${name} item ${n}: the export keeps crashing` }),
          );
        }));
        await new Promise((r) => setTimeout(r, Math.max(0, 250 - (performance.now() - at))));
      }
    })();
    await waitFor(() => accepted.east!.length >= 20 || undefined, 30_000, "20 items at east");

    // Cut east's link for 30 s.
    eastLink.cut();
    const restoreAt = new Promise<void>((r) => setTimeout(r, OUTAGE_MS));
    const shared = "SHARED-1";
    for (const name of SITES) {
      await post(meshes[name], { id: shared, text: `${name}: billing charged me twice` });
    }
    // East ingests and processes locally while cut off: an item accepted after the cut is
    // processed at the site, and the hub has not seen it.
    const during = await post(east, { text: "posted during the outage, thanks for the fix" });
    await waitFor(
      async () =>
        (await getJson(`${east.gatewayUrl}/feedback/${during}`)).body.status ===
          "processed" || undefined,
      20_000,
      "east processing an item during the outage",
    );
    const hubJsm = await jetstreamManager(ncs.hub);
    const atHub = async () =>
      (await hubJsm.streams.info(edgeStream("east"), {
        subjects_filter: `site.east.feedback.*.${during}`,
      })).state.subjects !== undefined;
    assert.equal(await atHub(), false, "the hub has none of it while the link is cut");
    await restoreAt;
    // (Still cut to the end: the site found no other way to the hub.)
    assert.equal(await atHub(), false, "the hub still has none of it at the end of the outage");
    eastLink.restore();
    const restoredAt = performance.now();
    // Catching up: until the hub has the outage's last item's final event.
    const caughtUp = waitFor(
      async () =>
        (await hubJsm.streams.info(edgeStream("east"), {
            subjects_filter: `site.east.feedback.processed.${during}`,
          })).state.subjects !== undefined || undefined,
      180_000,
      "the hub catching up with east",
    ).then(() => performance.now() - restoredAt);
    await new Promise((r) => setTimeout(r, 5_000)); // a few seconds more load after the cut
    stop = true;
    await load;
    const caughtUpMs = await caughtUp;
    accepted.east!.push(shared, during);
    accepted.west!.push(shared);

    // Every item reaches its final state at its own site.
    for (const name of SITES) {
      const nc = ncs[name];
      const jsm = await jetstreamManager(nc);
      await waitFor(
        async () => {
          const info = await jsm.streams.info("FEEDBACK", {
            subjects_filter: "feedback.processed.*",
          });
          const done = info.state.subjects ?? {};
          return accepted[name]!.every((id) => done[`feedback.processed.${id}`] === 1) ||
            undefined;
        },
        90_000,
        `every item processed at ${name}`,
      );
    }

    // The hub catches up: each site's stream, event for event, exactly once, in order.
    const siteEvents: Record<string, Stored[]> = {};
    const counts: Record<string, { items: number; events: number }> = {};
    for (const name of SITES) {
      siteEvents[name] = (await storedEvents(ncs[name], "FEEDBACK"))
        .filter((e) => e.subject.split(".").length === 3);
      const want = siteEvents[name]!.length;
      await waitFor(
        async () =>
          (await hubJsm.streams.info(edgeStream(name))).state.messages >= want ||
          undefined,
        120_000,
        `the hub holding ${name}'s ${want} events`,
      );
      const hubEvents = await storedEvents(ncs.hub, edgeStream(name));
      assert.equal(hubEvents.length, want, `${name}: as many events at the hub as at the site`);
      assert.equal(new Set(hubEvents.map((e) => e.id)).size, want, `${name}: no event twice`);
      // In the site's order (so in order per item), on the site's own subjects.
      assert.deepEqual(
        hubEvents.map((e) => [e.subject, e.id]),
        siteEvents[name]!.map((e) => [`site.${name}.${e.subject}`, e.id]),
        `${name}: the hub's stream is the site's, in order`,
      );
      const items = new Set(siteEvents[name]!.map((e) => e.item));
      assert.ok(accepted[name]!.every((id) => items.has(id)), `${name}: every accepted item`);
      counts[name] = { items: items.size, events: want };
    }

    // Subjects never cross: the hub's own FEEDBACK stored none of the sites' publishes
    // (the leaf identities may carry sourcing traffic only), nor a site the other's.
    assert.equal((await hubJsm.streams.info("FEEDBACK")).state.messages, 0, "hub FEEDBACK empty");
    const eastItems = new Set(siteEvents.east!.map((e) => e.item));
    assert.ok(
      siteEvents.west!.every((e) => e.item === shared || !eastItems.has(e.item)),
      "no east item at west",
    );

    // The central view: each site, its items' states, the dashboard.
    const { body: sitesBody } = await getJson(`${hub.gatewayUrl}/sites`);
    for (const s of sitesBody.sites as { site: string; items: number; events: number }[]) {
      assert.equal(s.items, counts[s.site]!.items, `${s.site}: items on GET /sites`);
      assert.equal(s.events, counts[s.site]!.events, `${s.site}: events on GET /sites`);
    }
    for (const name of SITES) {
      for (const id of [shared, ...accepted[name]!.slice(0, 10)]) {
        const { status, body } = await getJson(`${hub.gatewayUrl}/sites/${name}/feedback/${id}`);
        assert.equal(status, 200, `${name}/${id} on the hub`);
        assert.equal(body.site, name);
        assert.equal(body.id, id);
        assert.equal(body.status, "processed", `${name}/${id} processed, seen from the hub`);
      }
    }
    const sharedEast = await getJson(`${hub.gatewayUrl}/sites/east/feedback/${shared}`);
    const sharedWest = await getJson(`${hub.gatewayUrl}/sites/west/feedback/${shared}`);
    assert.notEqual(
      sharedEast.body.trace_id,
      sharedWest.body.trace_id,
      "one client id at two sites: two items at the hub",
    );
    assert.equal((await getJson(`${hub.gatewayUrl}/sites/north/feedback/${shared}`)).status, 404);
    const page = await fetch(`${hub.gatewayUrl}/dashboard`);
    assert.ok((await page.text()).includes("site_events"), "the dashboard lists edge items");
    const { body: recent } = await getJson(`${hub.gatewayUrl}/dashboard/recent?limit=100`);
    const shown = recent.site_events as { site: string; event: { item_id: string } }[];
    for (const name of SITES) {
      const mine = shown.filter((e) => e.site === name);
      assert.ok(mine.length > 0, `the dashboard's recent items include ${name}'s`);
      assert.ok(mine.every((e) => accepted[name]!.includes(e.event.item_id)));
    }

    printFigures({
      test: "hub + 2 sites; east's link cut for 30 s under 4 items/s per site",
      outage_ms: OUTAGE_MS,
      first_link_ms: Math.round(linkMs),
      east_catch_up_ms: Math.round(caughtUpMs),
      source_restarts: hub.logs.filter((l) => l.msg === "edge source restarted").length,
      sites: counts,
      duplicates: 0,
    });
  } finally {
    await Promise.all(Object.values(ncs).map((nc) => nc.close()));
  }
});
