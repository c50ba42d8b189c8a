/**
 * The hub's central view of its edge sites, mounted at `/sites` by a hub's gateway
 * (`deno task start --hub east,west`): `GET /sites` lists each site with how many of its
 * events and items the hub holds and how far behind it is; `GET /sites/{site}/feedback/{id}`
 * is an edge item's state, folded from its events on the hub, with its site.
 *
 * @module
 */
import { Hono } from "hono";
import type { JetStreamClient, JetStreamManager } from "@nats-io/jetstream";
import { siteItemState, siteStatuses } from "../edge.ts";
import { NotFoundError } from "../errors.ts";
import { ITEM_ID } from "../subjects.ts";

/**
 * The routes of a hub with `sites`.
 *
 * @example
 * ```ts ignore
 * app.route("/sites", edgeRoutes(intake, config.hub));
 * ```
 */
export function edgeRoutes(
  jetStream: { js: JetStreamClient; jsm: JetStreamManager },
  sites: readonly string[],
): Hono {
  const app = new Hono();
  app.get("/", async (c) => c.json({ sites: await siteStatuses(jetStream.jsm, sites) }));
  app.get("/:site/feedback/:id", async (c) => {
    const site = c.req.param("site");
    const id = c.req.param("id");
    if (!sites.includes(site)) throw new NotFoundError(`no edge site ${JSON.stringify(site)}`);
    if (!ITEM_ID.test(id)) throw new NotFoundError(`no feedback item ${JSON.stringify(id)}`);
    return c.json(await siteItemState(jetStream.js, jetStream.jsm, site, id));
  });
  return app;
}
