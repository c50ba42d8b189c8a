/**
 * Edge sites on leaf nodes: a hub (`deno task start --hub east,west`) and two sites
 * (`deno task start --leaf HUB --site east|west`), each a whole mesh with its own
 * nats-server and JetStream domain. East's link to the hub is cut for 30 s while both sites
 * go on ingesting over HTTP; east processes its items locally meanwhile. Once the link is
 * back, the hub holds every event of both sites exactly once, in each site's order, and its
 * central view (`GET /sites/...`, the dashboard) shows both sites' items.
 */
import assert from "node:assert/strict";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/nats-core";
import { edgeStream, siteStreams } from "../src/edge.ts";
import { portFree, serverVersion, versionAtLeast } from "../src/nats_server.ts";
import { clusterPidFile, IDENTITY_DIR } from "../src/supervisor.ts";
import { readStream } from "../src/stream_reader.ts";
import { launchChromium } from "./helpers/chromium.ts";
import { startLink } from "./helpers/link.ts";
import { type Mesh, meshTempDir, startMesh } from "./helpers/mesh.ts";
import { readSse } from "./helpers/sse.ts";
import { waitFor } from "./helpers/wait.ts";
import { connectClient } from "./helpers/nats.ts";

/** Features of nats-server 2.10 and later (fsync interval, subject transforms for hubs): not run on 2.9. */
const CURRENT_SERVER = { ignore: !versionAtLeast((await serverVersion()) ?? "0.0.0", "2.10.0") };

/**
 * `n` consecutive free loopback ports below the kernel's ephemeral range (32768 and up on
 * Linux): a port chosen with `freePort()` is not held, and a later `freePort()` (a cluster
 * node's route or monitoring port, picked by the supervisor) could be handed the same one;
 * never one below that range.
 */
function freeLowPorts(n: number): number {
  for (let attempt = 0; attempt < 200; attempt++) {
    const p = 20_000 + Math.floor(Math.random() * (12_000 - n));
    if (Array.from({ length: n }, (_, i) => p + i).every(portFree)) return p;
  }
  throw new Error(`no ${n} free ports found below 32000`);
}

/** The outage: a deliberate duration, not a wait for anything. */
const OUTAGE_MS = 30_000;
const SITES = ["east", "west"] as const;
/** A pipeline definition the hub and the sites run: the hub collects its stream too. */
const DEFINITION = "pipelines/support/pipeline.ts";
/** What the hub collects from a site, with the definition's stream. */
const COLLECTED = siteStreams([{ stream: "SUPPORT", root: "support" }]);

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

/** Uploads one text to a site's content moderation; its id, once accepted. */
async function postContent(mesh: Mesh, text: string): Promise<string> {
  const res = await fetch(`${mesh.gatewayUrl}/content`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ text }),
  });
  const answer = await res.json() as { id?: string };
  assert.equal(res.status, 202, `a site accepts content locally: ${JSON.stringify(answer)}`);
  return answer.id!;
}

/** Waits until every accepted item has exactly one processed event at its site. */
async function allProcessed(nc: NatsConnection, accepted: readonly string[], site: string) {
  const jsm = await jetstreamManager(nc);
  await waitFor(
    async () => {
      const info = await jsm.streams.info("FEEDBACK", { subjects_filter: "feedback.processed.*" });
      const done = info.state.subjects ?? {};
      return accepted.every((id) => done[`feedback.processed.${id}`] === 1) || undefined;
    },
    90_000,
    `every item processed at ${site}`,
  );
}

/**
 * Waits until the hub holds as many of `site`'s events and dead letters as the site does,
 * then checks that they are the site's, stream by stream, message for message, in the
 * site's order (so in order per item), none twice, on `site.<site>.` subjects. Returns the
 * site's feedback events and how many messages the hub holds from it in all.
 */
async function hubMatchesSite(
  hub: NatsConnection,
  siteNc: NatsConnection,
  site: string,
  collected = siteStreams(),
): Promise<{ feedback: Stored[]; total: number; content: Stored[]; deadLetters: number }> {
  const read = async (nc: NatsConnection, stream: string, filter?: string) => {
    const out: { subject: string; data: string }[] = [];
    for await (const m of readStream(jetstream(nc), stream, filter ? { filter } : {})) {
      out.push({ subject: m.subject, data: m.string() });
    }
    return out;
  };
  // The site's events (not its submissions: `feedback.submit` is ingest's input) and dead letters.
  const atSite = Object.fromEntries(
    await Promise.all(collected.map(async ({ stream, root }) =>
      [
        root,
        (await read(siteNc, stream)).filter((m) => m.subject.split(".").length === 3),
      ] as const
    )),
  );
  const total = Object.values(atSite).reduce((n, ms) => n + ms.length, 0);
  const jsm = await jetstreamManager(hub);
  await waitFor(
    async () => (await jsm.streams.info(edgeStream(site))).state.messages >= total || undefined,
    120_000,
    `the hub holding ${site}'s ${total} events and dead letters`,
  );
  assert.equal(
    (await jsm.streams.info(edgeStream(site))).state.messages,
    total,
    `${site}: as many messages at the hub as at the site`,
  );
  for (const { root } of collected) {
    const hubCopies = await read(hub, edgeStream(site), `site.${site}.${root}.>`);
    assert.deepEqual(
      hubCopies,
      atSite[root]!.map((m) => ({ subject: `site.${site}.${m.subject}`, data: m.data })),
      `${site}: the hub's ${root} messages are the site's, once each, in order`,
    );
  }
  // (Events that are not JSON, forged ones, were dead-lettered: compared above, not items.)
  const events = (root: string) =>
    atSite[root]!.flatMap((m) => {
      try {
        const e = JSON.parse(m.data) as { id: string; item_id: string };
        return [{ subject: m.subject, id: e.id, item: e.item_id }];
      } catch {
        return [];
      }
    });
  const feedback = events("feedback");
  assert.equal(new Set(feedback.map((e) => e.id)).size, feedback.length, `${site}: no event twice`);
  return {
    feedback,
    content: events("content"),
    total,
    deadLetters: atSite.deadletter!.length,
  };
}

/** Waits until the hub hears from every site (GET /sites), within `ms`. */
async function sitesLinked(hubUrl: string, ms: number): Promise<void> {
  let last: unknown;
  await waitFor(
    async () => {
      const { body } = await getJson(`${hubUrl}/sites`);
      last = body;
      const sites = body.sites as { site: string; last_seen_ms: number | null }[];
      return sites.every((s) => s.last_seen_ms !== null && s.last_seen_ms < 10_000) || undefined;
    },
    ms,
    "the hub sourcing every site",
  ).catch((err) => {
    throw new Error(`${err.message}; GET /sites: ${JSON.stringify(last)}`);
  });
}

async function getJson(url: string): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(url);
  return { status: res.status, body: await res.json() };
}

Deno.test(
  "edge sites keep processing through a 30 s cut of their link, and the hub then has every event once, in order",
  CURRENT_SERVER,
  async () => {
    const leafPort = freeLowPorts(1);
    // Each mesh runs its services in one process: three meshes share the 2 cores.
    await using hub = await startMesh({
      WEFT_HUB: SITES.join(","),
      WEFT_LEAF_PORT: String(leafPort),
      WEFT_TOGETHER: "all",
      WEFT_PIPELINES: DEFINITION,
    });
    await hub.waitForLog((l) => l.msg === "weft is ready", 90_000, "the hub ready");
    // Before any site runs, each says it has not been heard from and what to check (a site
    // linked with another site's key looks the same), not only a lag of 0.
    const before = (await getJson(`${hub.gatewayUrl}/sites`)).body as {
      sites: { last_seen_ms: number | null; error?: string }[];
    };
    for (const s of before.sites) {
      assert.equal(s.last_seen_ms, null, JSON.stringify(s));
      assert.match(s.error ?? "", /not heard from yet|\S: /, JSON.stringify(s));
    }
    // East's uplink goes through a relay the test can cut; west's is direct.
    await using eastLink = startLink(leafPort);
    // East names its key (--leaf-nkey); west finds it where the hub keeps it, copied into the
    // site's own data/identities/, as `deno task start --leaf URL --site west` does.
    const hubKey = (name: string) => `${hub.storeDir}/${IDENTITY_DIR}/leaf-${name}.nk`;
    await using east = await startMesh({
      WEFT_LEAF: `nats-leaf://127.0.0.1:${eastLink.port}`,
      WEFT_SITE: "east",
      WEFT_LEAF_NKEY: hubKey("east"),
      WEFT_TOGETHER: "all",
      WEFT_PIPELINES: DEFINITION,
    });
    const westDir = await meshTempDir("weft-west-");
    await Deno.mkdir(`${westDir}/${IDENTITY_DIR}`, { recursive: true, mode: 0o700 });
    await Deno.copyFile(hubKey("west"), `${westDir}/${IDENTITY_DIR}/leaf-west.nk`);
    await using west = await startMesh({
      WEFT_LEAF: `nats-leaf://127.0.0.1:${leafPort}`,
      WEFT_SITE: "west",
      WEFT_TOGETHER: "all",
      WEFT_PIPELINES: DEFINITION,
    }, { storeDir: westDir });
    const meshes = { east, west };
    for (const [name, m] of Object.entries(meshes)) {
      await m.waitForLog((l) => l.msg === "weft is ready", 90_000, `site ${name} ready`);
    }
    const ncs = {
      hub: await connectClient(hub.natsUrl, "test-hub", hub.credentials("ops")),
      east: await connectClient(east.natsUrl, "test-east", east.credentials("ops")),
      west: await connectClient(west.natsUrl, "test-west", west.credentials("ops")),
    };
    let stopLoad = async () => {};
    try {
      // The hub sources each site across the leafnode link once it is up.
      const linkedAt = performance.now();
      await sitesLinked(hub.gatewayUrl, 120_000);
      const linkMs = performance.now() - linkedAt;

      // Load: both sites ingest 4 items/s each, before, during and after the cut. One client
      // id is used at both sites, during the cut: the hub must keep both items apart.
      const accepted: Record<string, string[]> = { east: [], west: [] };
      let stop = false;
      stopLoad = async () => {
        stop = true;
        await load.catch(() => {});
      };
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
      // Content moderation runs at the sites too, and its events reach the hub with theirs.
      const uploads: Record<string, string[]> = {
        east: [await postContent(east, "a photo of the sunset over the harbour")],
        west: [await postContent(west, "our new shop opens on Monday, all welcome")],
      };
      // A forged event at west, dead-lettered there: the hub collects its dead letters too.
      const forger = await connectClient(west.natsUrl, "test-forger", west.credentials("admin"));
      try {
        await jetstream(forger).publish("feedback.sentiment_analyzed.FORGED-1", "{not json");
      } finally {
        await forger.close();
      }

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
      uploads.east!.push(await postContent(east, "uploaded during the outage: a picture of a cat"));
      // A definition's item too: the support agent answers it from its FAQ, at the site.
      const request = await fetch(`${east.gatewayUrl}/pipelines/support/items`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({
          customer: "ann",
          text: "I cannot log in, how do I reset my password?",
        }),
      });
      assert.equal(request.status, 202);
      const supportId = (await request.json() as { id: string }).id;
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
      await load; // (a failed POST fails the test here)
      const caughtUpMs = await caughtUp;
      accepted.east!.push(shared, during);
      accepted.west!.push(shared);

      // Every item reaches its final state at its own site.
      for (const name of SITES) await allProcessed(ncs[name], accepted[name]!, name);

      // Every upload reaches its final state at its own site.
      const uploadStatus: Record<string, string> = {};
      for (const name of SITES) {
        for (const id of uploads[name]!) {
          uploadStatus[`${name}/${id}`] = await waitFor<string>(
            async () => {
              const { body } = await getJson(`${meshes[name].gatewayUrl}/content/${id}`);
              const status = String(body.status);
              return ["published", "archived", "pending_review"].includes(status) && status;
            },
            60_000,
            `upload ${id} settled at ${name}`,
          );
        }
      }
      await waitFor(
        async () =>
          (await getJson(`${east.gatewayUrl}/pipelines/support/items/${supportId}`)).body.status ===
            "done" || undefined,
        60_000,
        "the support request answered at east",
      );
      // West dead-lettered the forged event.
      await waitFor(
        async () =>
          (await jetstreamManager(ncs.west).then((j) => j.streams.info("DEADLETTER"))).state
              .messages > 0 || undefined,
        30_000,
        "the forged event dead-lettered at west",
      );

      // The hub catches up: each site's streams, message for message, exactly once, in order.
      const siteEvents: Record<string, Stored[]> = {};
      const counts: Record<
        string,
        { items: number; events: number; content_items: number; dead_letters: number }
      > = {};
      for (const name of SITES) {
        const held = await hubMatchesSite(ncs.hub, ncs[name], name, COLLECTED);
        siteEvents[name] = held.feedback;
        // Items are what started: a forged event's item (failed, never ingested) is not one.
        const started = (events: Stored[], type: string) =>
          new Set(events.filter((e) => e.subject.startsWith(`${type}.`)).map((e) => e.item));
        const items = started(held.feedback, "feedback.ingested");
        assert.ok(accepted[name]!.every((id) => items.has(id)), `${name}: every accepted item`);
        const contentItems = started(held.content, "content.uploaded");
        assert.ok(uploads[name]!.every((id) => contentItems.has(id)), `${name}: every upload`);
        counts[name] = {
          items: items.size,
          events: held.total,
          content_items: contentItems.size,
          dead_letters: held.deadLetters,
        };
      }
      assert.ok(counts.west!.dead_letters > 0, "west's dead letter at the hub");
      const supportAtHub = await hubJsm.streams.info(edgeStream("east"), {
        subjects_filter: `site.east.support.*.${supportId}`,
      });
      assert.ok(
        Object.keys(supportAtHub.state.subjects ?? {}).includes(
          `site.east.support.answered.${supportId}`,
        ),
        "the definition's item, to its end, at the hub",
      );

      // Subjects never cross: the hub's own FEEDBACK stored none of the sites' publishes
      // (the leaf identities may carry sourcing traffic only), nor a site the other's.
      assert.equal((await hubJsm.streams.info("FEEDBACK")).state.messages, 0, "hub FEEDBACK empty");
      const eastItems = new Set(siteEvents.east!.map((e) => e.item));
      assert.ok(
        siteEvents.west!.every((e) => e.item === shared || !eastItems.has(e.item)),
        "no east item at west",
      );

      // On the hub, the sites' keys serve leafnode connections only, and every other key
      // client connections only.
      const conf = await Deno.readTextFile(`${hub.storeDir}/data/nats-weft.conf`);
      const users = conf.split("\n").filter((l) => l.includes("{ nkey:"));
      assert.ok(users.length > 2);
      for (const u of users) assert.match(u, /allowed_connection_types: \["(STANDARD|LEAFNODE)"\]/);
      assert.equal(users.filter((u) => u.includes('"LEAFNODE"')).length, 2, "one per site");
      // A site's leafnode key opens no client connection at the hub.
      await assert.rejects(
        connectClient(hub.natsUrl, "test-as-leaf", {
          nkeySeedFile: `${hub.storeDir}/${IDENTITY_DIR}/leaf-east.nk`,
        }).then((nc) => nc.close()),
        "leaf-east is for leafnode connections only",
      );

      // The central view: each site, its items' states, the dashboard.
      const { body: sitesBody } = await getJson(`${hub.gatewayUrl}/sites`);
      for (
        const s of sitesBody.sites as {
          site: string;
          items: number;
          events: number;
          content_items: number;
          dead_letters: number;
        }[]
      ) {
        assert.equal(s.items, counts[s.site]!.items, `${s.site}: items on GET /sites`);
        assert.equal(s.events, counts[s.site]!.events, `${s.site}: events on GET /sites`);
        assert.equal(s.content_items, counts[s.site]!.content_items, `${s.site}: content items`);
        assert.equal(s.dead_letters, counts[s.site]!.dead_letters, `${s.site}: dead letters`);
      }
      // Each upload's state, seen from the hub, is its state at its site; so is its event stream.
      for (const name of SITES) {
        for (const id of uploads[name]!) {
          const { status, body } = await getJson(`${hub.gatewayUrl}/sites/${name}/content/${id}`);
          assert.equal(status, 200, `${name}/${id} content on the hub`);
          assert.equal(body.site, name);
          assert.equal(body.status, uploadStatus[`${name}/${id}`], `${name}/${id} content status`);
        }
      }
      const outageUpload = uploads.east!.at(-1)!;
      const contentFrames = await readSse(
        await fetch(`${hub.gatewayUrl}/sites/east/content/${outageUpload}/events`),
        {
          timeoutMs: 15_000,
          // Closed after a final event; one waiting for a reviewer stays open.
          stopAfter: (e) => e.event === "content.review_requested",
        },
      );
      assert.equal(contentFrames[0]!.event, "content.uploaded");
      assert.equal((await getJson(`${hub.gatewayUrl}/sites/east/content/NOPE1`)).status, 404);
      // The definition's item, folded at the hub with the definition's own fold.
      const supportItem = await getJson(
        `${hub.gatewayUrl}/sites/east/pipelines/support/items/${supportId}`,
      );
      assert.equal(supportItem.status, 200);
      assert.equal(supportItem.body.site, "east");
      assert.equal(supportItem.body.status, "done");
      assert.equal(supportItem.body.outcome, "answered");
      assert.equal(
        (await getJson(`${hub.gatewayUrl}/sites/east/pipelines/nope/items/${supportId}`)).status,
        404,
      );
      // All of west's events and dead letters, live from the hub (replayed from the first).
      const westFrames = await readSse(
        await fetch(`${hub.gatewayUrl}/sites/west/events?replay=true`),
        {
          timeoutMs: 15_000,
          stopAfter: (_e, all) =>
            all.some((f) => f.event === "content.uploaded") &&
            all.some((f) => f.event?.startsWith("deadletter.")),
        },
      );
      const seqs = westFrames.map((f) => Number(f.id));
      assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b), "in the hub's order");
      // Replayed from the first: the site's first item event comes first (the hourly feedback
      // digest's request may come before it when the run crosses the hour).
      assert.equal(
        westFrames.find((f) => !f.event?.startsWith("digest."))!.event,
        "feedback.ingested",
      );
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
      // An edge item's events, streamed from the hub (SSE): the hub's copies, in order, ending
      // with the final event; resumed after the end, the stream closes at once.
      const eventsUrl = `${hub.gatewayUrl}/sites/east/feedback/${during}/events`;
      const frames = await readSse(await fetch(eventsUrl), { timeoutMs: 15_000 });
      const expected = siteEvents.east!.filter((e) => e.item === during);
      assert.deepEqual(
        frames.map((f) => JSON.parse(f.data).id),
        expected.map((e) => e.id),
        "every event of the item, once, in the hub's order",
      );
      assert.equal(frames.at(-1)!.event, "feedback.processed");
      const resumed = await readSse(
        await fetch(eventsUrl, { headers: { "Last-Event-ID": frames.at(-1)!.id! } }),
        { timeoutMs: 15_000 },
      );
      assert.deepEqual(resumed, [], "resumed after the final event: closed at once");
      const unknown = await fetch(`${hub.gatewayUrl}/sites/east/feedback/NOPE1/events`);
      await unknown.body?.cancel();
      assert.equal(unknown.status, 404);
      const page = await fetch(`${hub.gatewayUrl}/dashboard`);
      assert.ok((await page.text()).includes("site_events"), "the dashboard lists edge items");
      // In a real browser: the hub's dashboard lists processed items of both sites as site/id.
      const browser = await launchChromium();
      try {
        const page = await browser.newPage();
        const errors: string[] = [];
        page.on("pageerror", (e) => errors.push(String(e)));
        await page.goto(`${hub.gatewayUrl}/dashboard`);
        for (const name of SITES) {
          await page.locator(`tr[data-item^="${name}/"] td.step`, { hasText: "processed" }).first()
            .waitFor({ timeout: 15_000 });
        }
        // A site's row opens the item's state, read from the hub.
        await page.locator(`tr[data-item^="west/"]`).first().click();
        await page.locator("#history", { hasText: "site west: processed" }).waitFor({
          timeout: 10_000,
        });
        // The page follows each site live: its metrics, its own events and one stream per site.
        await waitFor(
          async () => {
            const text = await (await fetch(`${hub.gatewayUrl}/metrics`)).text();
            const open = Number(/^weft_sse_clients (\d+)/m.exec(text)?.[1] ?? 0);
            return open >= 2 + SITES.length || undefined;
          },
          15_000,
          "the dashboard's streams, one per site among them",
        );
        // A new item at a site shows up live, to its processed step.
        const live = await post(west, { text: "posted while the hub's dashboard is open" });
        accepted.west!.push(live);
        await page.locator(`tr[data-item="west/${live}"] td.step`, { hasText: "processed" })
          .waitFor({ timeout: 30_000 });
        assert.deepEqual(errors, []);
      } finally {
        await browser.close();
      }
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
      await stopLoad();
      await Promise.all(Object.values(ncs).map((nc) => nc.close()));
    }
  },
);

Deno.test(
  "a clustered hub (3 nodes, the site's stream at R3) keeps collecting a site through the loss of the stream's leader and of the node the site is linked to",
  CURRENT_SERVER,
  async () => {
    // The nodes' client and leafnode ports, where no port picked later can fall.
    const natsPort = freeLowPorts(3);
    let leafPort = freeLowPorts(3);
    while (Math.abs(leafPort - natsPort) < 3) leafPort = freeLowPorts(3);
    await using hub = await startMesh({
      WEFT_HUB: "north",
      WEFT_CLUSTER: "3",
      WEFT_LEAF_PORT: String(leafPort),
      WEFT_TOGETHER: "all",
    }, { natsPort });
    const hubReady = await hub.waitForLog((l) => l.msg === "weft is ready", 90_000, "hub ready");
    // The site knows every node of the hub (the hub advertises none).
    await using north = await startMesh({
      WEFT_LEAF: [0, 1, 2].map((i) => `nats-leaf://127.0.0.1:${leafPort + i}`).join(","),
      WEFT_SITE: "north",
      WEFT_LEAF_NKEY: `${hub.storeDir}/${IDENTITY_DIR}/leaf-north.nk`,
      WEFT_TOGETHER: "all",
    });
    const siteReady = await north.waitForLog((l) => l.msg === "weft is ready", 90_000, "site");
    const hubNc = await connectClient(String(hubReady.nats), "test-hub", hub.credentials("ops"));
    const siteNc = await connectClient(north.natsUrl, "test-north", north.credentials("ops"));
    let stopLoad = async () => {};
    try {
      const jsm = await jetstreamManager(hubNc);
      await sitesLinked(hub.gatewayUrl, 120_000);
      const info = await jsm.streams.info(edgeStream("north"));
      assert.equal(info.config.num_replicas, 3, "the site's stream at R3");

      // 4 items/s through both faults.
      const accepted: string[] = [];
      /** POSTs the site did not accept: none, as its own server never went down. */
      const refused: string[] = [];
      let stop = false;
      stopLoad = async () => {
        stop = true;
        await load;
      };
      const load = (async () => {
        for (let n = 0; !stop; n++) {
          const at = performance.now();
          try {
            accepted.push(await post(north, { text: `north item ${n}: love the new search` }));
          } catch (err) {
            refused.push(String(err));
          }
          await new Promise((r) => setTimeout(r, Math.max(0, 250 - (performance.now() - at))));
        }
      })();
      const pidOf = async (node: string) =>
        Number(
          await Deno.readTextFile(
            `${hub.storeDir}/${clusterPidFile(Number(node.replace("weft-", "")) - 1)}`,
          ),
        );
      const nodeBack = async (node: string, after: number) =>
        await waitFor(
          () =>
            hub.logs.filter((l) => l.msg === "nats-server node back" && l.node === node).length >
              after || undefined,
          60_000,
          `${node} back`,
        );
      const backs = (node: string) =>
        hub.logs.filter((l) => l.msg === "nats-server node back" && l.node === node).length;
      await waitFor(() => accepted.length >= 12 || undefined, 30_000, "12 items");

      // 1. SIGKILL the leader of the site's stream: a replica takes the source over.
      const leader = (await jsm.streams.info(edgeStream("north"))).cluster!.leader!;
      const leaderBacks = backs(leader);
      Deno.kill(await pidOf(leader), "SIGKILL");
      await nodeBack(leader, leaderBacks);

      // 2. SIGKILL the node the site's leafnode is connected to: the site links to another.
      // (The site may be relinking after the first kill: wait until it is linked.)
      const linkedPort = await waitFor(
        async () => {
          const leafz = await (await fetch(`${siteReady.nats_monitoring}/leafz`)).json();
          return leafz.leafs?.[0]?.port as number | undefined;
        },
        60_000,
        "the site linked to a hub node",
      );
      const linked = `weft-${linkedPort - leafPort + 1}`;
      const linkedBacks = backs(linked);
      Deno.kill(await pidOf(linked), "SIGKILL");
      await nodeBack(linked, linkedBacks);
      await waitFor(() => accepted.length >= 60 || undefined, 60_000, "60 items");
      await stopLoad();
      assert.deepEqual(
        refused,
        [],
        `the site's gateway took every item; site log: ${
          JSON.stringify(north.logs.filter((l) => l.level !== "info" && l.level !== "debug"))
        }`,
      );

      await allProcessed(siteNc, accepted, "north");
      const { feedback: events } = await hubMatchesSite(hubNc, siteNc, "north");
      const items = new Set(events.map((e) => e.item));
      assert.ok(accepted.every((id) => items.has(id)), "every accepted item at the hub");
      const { body } = await getJson(`${hub.gatewayUrl}/sites/north/feedback/${accepted.at(-1)}`);
      assert.equal(body.status, "processed");
      printFigures({
        test: "clustered hub: SIGKILL of the site stream's leader, then of the site's linked node",
        killed: [leader, linked],
        items: items.size,
        events: events.length,
        source_restarts: hub.logs.filter((l) => l.msg === "edge source restarted").length,
        duplicates: 0,
      });
    } finally {
      await stopLoad();
      await hubNc.close();
      await siteNc.close();
    }
  },
);
