/**
 * Live shadow control over HTTP and NATS, admin only (src/shadow/control.ts does the work):
 *
 * - `GET /shadows`, `nats req weft.shadow.list ''`: every shadow with its live figures, and
 *   every step's promoted version;
 * - `POST /shadows {spec}`, `nats req weft.shadow.attach '{spec}'`: attach (201);
 * - `DELETE /shadows/:id`, `nats req weft.shadow.detach ID`: detach;
 * - `POST /shadows/:id/promote`, `nats req weft.shadow.promote ID`: promote;
 * - `DELETE /shadows/versions/:step`, `nats req weft.shadow.reset <pipeline>.<step>`: roll a
 *   step back to its configured version.
 *
 * Over NATS, with API keys configured, a request carries `Authorization: Bearer <key>` of
 * an admin key, as over HTTP; errors answer `{"error": <problem>}`.
 *
 * @module
 */
import { Hono } from "hono";
import type { Context } from "hono";
import type { Msg, NatsConnection } from "@nats-io/nats-core";
import { Role } from "../config.ts";
import type { Logger } from "../observability/log.ts";
import type { ShadowControl } from "../shadow/control.ts";
import { SHADOW_REQUEST_PREFIX } from "../subjects.ts";
import type { Auth } from "./auth.ts";
import { bodyLimitProblem, readJson, requireJson } from "./app.ts";
import { maxPayloadOf, replyTo, requestedId, requestJson } from "./requests.ts";

/** Largest accepted shadow spec, bytes. */
const SPEC_LIMIT = 16 * 1024;

/**
 * The `/shadows` routes (mount behind an admin guard).
 *
 * @example
 * ```ts ignore
 * app.route("/shadows", shadowRoutes(control, (c) => "alice"));
 * ```
 */
export function shadowRoutes(control: ShadowControl, who: (c: Context) => string): Hono {
  const app = new Hono();
  app.get("/", async (c) => c.json(await control.list()));
  app.post("/", requireJson, bodyLimitProblem(SPEC_LIMIT), async (c) => {
    const spec = await control.attach(await readJson(c), who(c));
    c.header("Location", `/shadows/${spec.id}`);
    return c.json(spec, 201);
  });
  app.delete(
    "/versions/:step",
    async (c) => c.json(await control.reset(c.req.param("step"), who(c))),
  );
  app.delete("/:id", async (c) => c.json(await control.detach(c.req.param("id"), who(c))));
  app.post("/:id/promote", async (c) => c.json(await control.promote(c.req.param("id"), who(c))));
  return app;
}

/** Serves `weft.shadow.<attach|detach|promote|list>`; an attach past 16 KiB is a 413, as over HTTP. */
export function serveShadowRequests(
  nc: NatsConnection,
  control: ShadowControl,
  log: Logger,
  auth?: Auth,
): { stop(): void } {
  const whoOf = (m: Msg) =>
    (auth?.authorize(m.headers?.get("Authorization"), [Role.Admin]) ?? { name: "anonymous" })
      .name;
  const serve = (verb: string, work: (m: Msg, who: string) => Promise<unknown>) =>
    nc.subscribe(`${SHADOW_REQUEST_PREFIX}.${verb}`, {
      queue: "weft-gateway",
      callback: (_e, m) => void replyTo(m, log, () => work(m, whoOf(m)), maxPayloadOf(nc)),
    });
  const subs = [
    serve("list", () => control.list()),
    serve("attach", (m, who) => control.attach(requestJson(m.data, SPEC_LIMIT), who)),
    serve("detach", (m, who) => control.detach(requestedId(m.data), who)),
    serve("promote", (m, who) => control.promote(requestedId(m.data), who)),
    serve("reset", (m, who) => control.reset(requestedId(m.data), who)),
  ];
  return { stop: () => subs.forEach((s) => s.unsubscribe()) };
}
