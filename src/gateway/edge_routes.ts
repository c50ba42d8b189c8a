/**
 * The hub's central view of its edge sites, mounted at `/sites` by a hub's gateway
 * (`deno task start --hub east,west`): `GET /sites` lists each site with how many of its
 * events and items the hub holds and how far behind it is; `GET /sites/{site}/<pipeline>/{id}`
 * is an edge item of a shipped pipeline, folded from its events on the hub, with its site;
 * `GET /sites/{site}/<pipeline>/{id}/events` streams its events as the hub receives them
 * (server-sent events, resumable with Last-Event-ID, closed after the item's final event);
 * `GET /sites/{site}/pipelines/{name}/items/{id}` does the same
 * for the items of the pipeline definitions the hub runs; `GET /sites/{site}/events` streams
 * every event and dead letter of the site as the hub receives them (SSE, `replay=true` from
 * the first, resumable with Last-Event-ID).
 *
 * @module
 */
import { Hono } from "hono";
import type { JetStreamClient, JetStreamManager } from "@nats-io/jetstream";
import {
  edgeStream,
  type SiteContacts,
  siteEventsFilter,
  siteItem,
  siteItemStart,
  siteLetterReads,
  siteStatuses,
  siteSubjectPrefix,
  siteWiredItem,
} from "../edge.ts";
import { NotFoundError } from "../errors.ts";
import type { StateSpec } from "../state_writer.ts";
import { ITEM_ID } from "../subjects.ts";
import { SHIPPED_PIPELINES } from "../../pipelines/shipped.ts";
import { openSlot, streamEvents } from "./sse.ts";
import { type LoadedPipeline, pipelineStateSpec } from "../pipeline/runtime.ts";
import { boolQuery, oneQuery, onlyQuery } from "./query.ts";

/** Longest part of a path parameter a problem's detail quotes. */
const SHOWN_CHARS = 64;

/** A path parameter as a problem's detail quotes it: JSON, cut to {@link SHOWN_CHARS}. */
function shown(value: string): string {
  return value.length <= SHOWN_CHARS
    ? JSON.stringify(value)
    : `${JSON.stringify(value.slice(0, SHOWN_CHARS))}... (${value.length} characters)`;
}

/** What the per-item event stream needs: the gateway's SSE settings, slots and feeds. */
export type EdgeSse = Omit<Parameters<typeof streamEvents>[3], "key">;

/**
 * The routes of a hub with `sites`; `contacts` remembers when each site was last heard from
 * (the gateway's `trackSiteContacts`, src/edge.ts, keeps it up to date; by default only the
 * requests for `/sites` do); `natsDir` is the hub's nats-server directory (`WEFT_NATS_DIR`),
 * where it keeps its sites' keys.
 *
 * @example
 * ```ts ignore
 * app.route("/sites", edgeRoutes(intake, config.hub));
 * ```
 */
export function edgeRoutes(
  jetStream: { js: JetStreamClient; jsm: JetStreamManager },
  sites: readonly string[],
  sse?: EdgeSse,
  pipelines: readonly LoadedPipeline[] = [],
  contacts: SiteContacts = new Map(),
  natsDir = "",
): Hono {
  const app = new Hono();
  const knownSite = (site: string) => {
    if (!sites.includes(site)) {
      throw new NotFoundError(`no edge site ${shown(site)}`, { field: "site" });
    }
  };
  const known = (site: string, id: string, what: string) => {
    knownSite(site);
    if (!ITEM_ID.test(id)) throw new NotFoundError(`no ${what} ${shown(id)}`, { field: "id" });
  };
  // When each site was last heard from, across restarts of its sources: the gateway's
  // trackSiteContacts keeps it up to date between requests (src/edge.ts).
  app.get(
    "/",
    async (c) => c.json({ sites: await siteStatuses(jetStream.jsm, sites, contacts, natsDir) }),
  );
  // Each shipped pipeline's items: /sites/{site}/<pipeline>/{id}(/events).
  const kinds = SHIPPED_PIPELINES.flatMap((w) =>
    w.items
      ? [{ wiring: w, pipeline: w.name, what: w.items.what, finalTypes: w.items.finalTypes }]
      : []
  );
  app.get("/:site/pipelines/:name/items/:id", async (c) => {
    const site = c.req.param("site");
    const id = c.req.param("id");
    const name = c.req.param("name");
    const loaded = pipelines.find((p) => p.def.name === name);
    if (!loaded) {
      throw new NotFoundError(`no pipeline ${shown(name)} at this hub`, { field: "name" });
    }
    known(site, id, `${name} item`);
    const spec = pipelineStateSpec(loaded);
    return c.json(await siteItem(jetStream.js, site, name, spec, `${name} item`, id));
  });
  if (sse) {
    app.get("/:site/events", (c) => {
      const site = c.req.param("site");
      knownSite(site);
      // Checked before a slot is taken: a refused request holds none.
      onlyQuery(c.req.query(), ["replay"]);
      const replay = boolQuery(oneQuery(c.req.queries("replay"), "replay"), "replay") === true;
      const key = openSlot(sse.clients, c);
      const all = `${siteSubjectPrefix(site)}.>`;
      return streamEvents(c, jetStream.js, {
        filter: all,
        stream: edgeStream(site),
        closeOnFinal: false,
        replay,
        feedFilter: all,
      }, { ...sse, key });
    });
  }
  for (const { wiring, pipeline, what, finalTypes } of kinds) {
    app.get(`/:site/${pipeline}/:id`, async (c) => {
      const site = c.req.param("site");
      const id = c.req.param("id");
      known(site, id, what);
      return c.json(await siteWiredItem(jetStream.js, site, wiring, id));
    });
    if (!sse) continue;
    app.get(`/:site/${pipeline}/:id/events`, async (c) => {
      const site = c.req.param("site");
      const id = c.req.param("id");
      known(site, id, what);
      onlyQuery(c.req.query(), []);
      // From its first event of the site's current life (a site whose store was reset may
      // have had an item of that id before).
      const from = await siteItemStart(jetStream.js, site, id, pipeline);
      if (from === null) {
        throw new NotFoundError(`no ${what} ${id} from site ${site}`, { field: "id" });
      }
      const key = openSlot(sse.clients, c);
      return streamEvents(c, jetStream.js, {
        filter: siteEventsFilter(site, id, pipeline),
        stream: edgeStream(site),
        closeOnFinal: true,
        replay: true,
        from,
        itemId: id,
        finalTypes,
        // Its history judged as the site's writer judges it: a forged end or a failure no
        // runner's letter vouches for is not shown and ends nothing, as at the site.
        state: wiring.items!.state as StateSpec<unknown>,
        letters: siteLetterReads(jetStream.js, site, pipeline),
        subjectPrefix: `${siteSubjectPrefix(site)}.`,
        subjectOf: (type, item) => `${siteSubjectPrefix(site)}.${type}.${item}`,
        feedFilter: siteEventsFilter(site, "*", pipeline),
      }, { ...sse, key });
    });
  }
  return app;
}
