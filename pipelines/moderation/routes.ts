/**
 * HTTP routes of content moderation, mounted on the gateway app:
 *
 * - `POST /content` (ingest): JSON `{text, metadata?, id?}`, or any other content type as
 *   a binary upload (at most `WEFT_CONTENT_MAX_BYTES`) kept in the object store -> 202.
 * - `GET /content/:id`, `GET /content/:id/events` (SSE), `GET /content/:id/object`.
 * - `GET /reviews?status=pending|escalated|decided`, `GET /reviews/:id`,
 *   `POST /reviews/:id/claim`, `POST /reviews/:id/decision` (reviewer).
 *
 * @module
 */
import "./settings.ts";
import { Hono } from "hono";
import { bodyLimit } from "hono/body-limit";
import { type Config, Role } from "../../src/config.ts";
import { ErrorCode, ValidationError, WeftError } from "../../src/errors.ts";
import type { Logger } from "../../src/observability/log.ts";
import { claimBody, type ModerationApi, refuseIdempotencyKey } from "./api.ts";
import { ReviewStatus } from "./review_queue.ts";
import { validateDocument } from "../../src/schemas.ts";
import { CONTENT_FINAL_EVENT_TYPES } from "./events.ts";
import { CONTENT_STREAM, contentEventsFilter } from "./subjects.ts";
import { parseTraceparent } from "../../src/observability/trace.ts";
import { CONTENT_STATE_SPEC } from "./state.ts";
import type { StateSpec } from "../../src/state_writer.ts";
import type { Auth, Principal } from "../../src/gateway/auth.ts";
import { LiveFeeds, openSlot, SseClients, streamEvents } from "../../src/gateway/sse.ts";
import { type GatewayExtension, isJsonType, readJson, requireJson } from "../../src/gateway/app.ts";
import { oneQuery, onlyQuery, strictQuery } from "../../src/gateway/query.ts";

type Env = { Variables: { principal: Principal } };

const STATUSES = new Set<string>(Object.values(ReviewStatus));

/** Most `meta.*` parameters an upload may carry (the schema's Metadata maxProperties). */
const MAX_META = 32;

/**
 * Creates the moderation routes.
 *
 * @example
 * ```ts ignore
 * app.route("/", createModerationRoutes({ api, auth, config, log }));
 * ```
 */
export function createModerationRoutes(deps: {
  api: ModerationApi;
  auth: Auth;
  config: Pick<
    Config,
    | "bodyLimit"
    | "contentMaxBytes"
    | "sseMaxClients"
    | "sseMaxPerKey"
    | "sseFlushMs"
    | "sseKeepAliveMs"
    | "sseWriteTimeoutMs"
    | "sseWritesPerSecond"
    | "sseReplayBytes"
  >;
  log: Logger;
  /** SSE slots shared with the rest of the gateway; its own when absent. */
  clients?: SseClients;
  /** The CONTENT stream's live feed; its own when absent. */
  feeds?: LiveFeeds;
}): Hono<Env> {
  const { api, auth, config, log } = deps;
  const clients = deps.clients ??
    new SseClients(config.sseMaxClients, config.sseMaxPerKey, 0, undefined, config.sseReplayBytes);
  const feeds = deps.feeds ??
    new LiveFeeds(api.js, log, config.sseFlushMs, config.sseWritesPerSecond);
  const app = new Hono<Env>();
  const tooLarge = (max: number) =>
    bodyLimit({
      maxSize: max,
      onError: () => {
        throw new WeftError(ErrorCode.PayloadTooLarge, `body is larger than ${max} bytes`);
      },
    });
  const anyRole = auth.require(Role.Ingest, Role.Reviewer);
  const reviewer = auth.require(Role.Reviewer);

  app.post("/content", auth.require(Role.Ingest), async (c, next) => {
    const isJson = isJsonType(c.req.header("content-type") ?? "");
    return await tooLarge(isJson ? config.bodyLimit : config.contentMaxBytes)(c, next);
  }, async (c) => {
    const who = c.get("principal");
    const trace = parseTraceparent(c.req.header("traceparent"));
    const type = c.req.header("content-type") ?? "";
    refuseIdempotencyKey(c.req.header("Idempotency-Key") !== undefined);
    let result;
    if (isJsonType(type)) {
      // Metadata goes in the body: a query parameter (meta.<key> included) is refused, not
      // silently dropped.
      const [name] = strictQuery(c.req.url).map(([k]) => k);
      if (name !== undefined) {
        throw new ValidationError(
          `unknown query parameter ${name}; a JSON submission takes none (its metadata goes in the body)`,
          { field: name },
        );
      }
      const submission = validateDocument("content.submit", await readJson(c));
      result = await api.submitText(submission, who, trace);
    } else {
      // `meta.<key>=<value>` parameters, each once: nothing else is silently ignored and no
      // value silently replaced by the last, nor one whose bytes are not UTF-8 rewritten.
      const metadata: Record<string, string> = {};
      const params = new Map<string, string[]>();
      for (const [k, v] of strictQuery(c.req.url)) params.set(k, [...params.get(k) ?? [], v]);
      for (const [k, values] of params) {
        if (!k.startsWith("meta.")) {
          throw new ValidationError(
            `unknown query parameter ${k}; an upload takes meta.<key> parameters only`,
            { field: k },
          );
        }
        metadata[k.slice(5)] = oneQuery(values, k)!;
      }
      if (Object.keys(metadata).length > MAX_META) {
        throw new ValidationError(`at most ${MAX_META} meta.* parameters`, { field: "meta.*" });
      }
      // Bounded by the body limit above, so reading it whole is safe.
      const bytes = new Uint8Array(await c.req.arrayBuffer());
      if (bytes.length === 0) throw new ValidationError("the upload is empty", { field: "/" });
      result = await api.submitObject(
        new Blob([bytes]).stream(),
        {
          contentType: type || "application/octet-stream",
          metadata,
        },
        who,
        trace,
      );
    }
    if (result.replayed) c.header("Idempotent-Replayed", "true");
    c.header("Location", result.body.links.state);
    return c.json(result.body, 202);
  });

  app.get("/content/:id", anyRole, async (c) => c.json(await api.content(c.req.param("id"))));

  app.get("/content/:id/object", anyRole, async (c) => {
    const { data, contentType } = await api.object(c.req.param("id"), c.get("principal"));
    // The uploader chose the content type: served from the dashboard's origin, an uploaded
    // HTML page must not run script there (the dashboard keeps the API key in the tab).
    return c.body(data as Uint8Array<ArrayBuffer>, 200, {
      "content-type": contentType,
      "x-content-type-options": "nosniff",
      "content-security-policy":
        "sandbox; default-src 'none'; img-src 'self' data:; media-src 'self'",
    });
  });

  app.get("/content/:id/events", anyRole, async (c) => {
    // From the item's first event, always: it takes no parameter (no replay).
    onlyQuery(c.req.query(), []);
    const id = c.req.param("id");
    const from = await api.eventsStart(id);
    if (from === null) {
      throw new WeftError(ErrorCode.NotFound, `no content item ${JSON.stringify(id)}`);
    }
    const key = openSlot(clients, c);
    return streamEvents(c, api.js, {
      filter: contentEventsFilter(id),
      closeOnFinal: true,
      replay: true,
      from,
      stream: CONTENT_STREAM,
      finalTypes: CONTENT_FINAL_EVENT_TYPES,
      itemId: id,
      // An end its history does not lead to (the storage key's) is not shown and ends nothing.
      state: CONTENT_STATE_SPEC as StateSpec<unknown>,
    }, { config, clients, feeds, log, key });
  });

  app.get("/reviews", reviewer, async (c) => {
    // The whole queue of a status (no limit, no paging): any other parameter is refused.
    onlyQuery(c.req.query(), ["status"]);
    const status = oneQuery(c.req.queries("status"), "status") ?? ReviewStatus.Pending;
    if (!STATUSES.has(status)) {
      throw new ValidationError(`status must be one of ${[...STATUSES].join(", ")}`, {
        field: "status",
      });
    }
    return c.json({ items: await api.listReviews(status as ReviewStatus) });
  });

  app.get("/reviews/:id", reviewer, async (c) => c.json(await api.getReview(c.req.param("id"))));

  // A JSON content type, an empty claim body included: a browser sends one cross-site only
  // after a CORS preflight this gateway does not grant, so a page elsewhere cannot claim or
  // decide in a reviewer's browser (with no API keys, in anyone's name).
  app.post("/reviews/:id/claim", reviewer, requireJson, tooLarge(4096), async (c) => {
    const body = claimBody(await readJson(c, { optional: true }), ["reviewer"]);
    return c.json(await api.claim(c.req.param("id"), c.get("principal"), body.reviewer));
  });

  app.post("/reviews/:id/decision", reviewer, requireJson, tooLarge(16 * 1024), async (c) => {
    const req = validateDocument("review.decision", await readJson(c));
    if (req.id !== undefined && req.id !== c.req.param("id")) {
      throw new ValidationError(`/id ${req.id} is not the item of the path`, { field: "/id" });
    }
    const { entry, replayed } = await api.decide(c.req.param("id"), req, c.get("principal"));
    if (replayed) c.header("Idempotent-Replayed", "true");
    return c.json(entry);
  });

  return app;
}

/**
 * Content moderation's routes as a gateway extension (`createApp({ extensions })`): built with
 * the gateway's auth, settings, log and SSE slots, with a live feed of the CONTENT stream.
 *
 * @example
 * ```ts ignore
 * const app = createApp({ nc, intake, config, log, auth, extensions: [moderationRoutes(api)] });
 * ```
 */
export function moderationRoutes(api: ModerationApi): GatewayExtension {
  return (ctx) =>
    createModerationRoutes({
      ...ctx,
      api,
      feeds: new LiveFeeds(api.js, ctx.log, ctx.config.sseFlushMs, ctx.config.sseWritesPerSecond),
    });
}
