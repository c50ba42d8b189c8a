import assert from "node:assert/strict";
import { Hono } from "hono";
import type { JetStreamClient, JetStreamManager } from "@nats-io/jetstream";
import { problemResponse } from "./app.ts";
import { edgeRoutes } from "./edge_routes.ts";

/** A hub's /sites routes for site east; nothing here reaches NATS. */
function hub(): Hono {
  const app = new Hono();
  const jetStream = { js: {} as JetStreamClient, jsm: {} as JetStreamManager };
  app.route("/sites", edgeRoutes(jetStream, ["east"]));
  app.onError((err, c) => problemResponse(c, err));
  return app;
}

Deno.test("edgeRoutes: a 404 for an unknown site or an invalid id names the field, and quotes at most 64 characters of it", async () => {
  const app = hub();
  const problem = async (path: string) => {
    const res = await app.request(path);
    assert.equal(res.status, 404, path);
    return await res.json() as { field?: string; detail: string };
  };
  assert.equal((await problem("/sites/EAST/feedback/x")).field, "site");
  assert.equal((await problem("/sites/east/feedback/a.b")).field, "id");
  assert.equal((await problem("/sites/east/content/a.b")).field, "id");
  assert.equal((await problem("/sites/east/pipelines/nope/items/x")).field, "name");
  const long = "x".repeat(5_000);
  for (const path of [`/sites/east/feedback/${long}`, `/sites/${long}/feedback/x`]) {
    const { detail } = await problem(path);
    assert.ok(detail.length < 200, `${path.slice(0, 30)}: ${detail.length} characters`);
    assert.match(detail, /\.\.\. \(5000 characters\)/);
  }
});
