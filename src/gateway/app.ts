/**
 * The HTTP gateway as a Hono app: what every pipeline shares (health, readiness, problems,
 * auth, dead letters, shadows, definitions' routes under /pipelines, metrics, the dashboard,
 * OpenAPI), and each hand-wired pipeline's own routes as an extension (its
 * `pipelines/<name>/gateway.ts`). `Deno.serve` lives only in services/gateway.ts; tests
 * drive `app.request()`.
 *
 * @module
 */
import { Hono } from "hono";
import { bodyLimit } from "hono/body-limit";
import { HTTPException } from "hono/http-exception";
import type { Context, MiddlewareHandler } from "hono";
import type { NatsConnection } from "@nats-io/nats-core";
import type { JetStreamClient, JetStreamManager } from "@nats-io/jetstream";
import { watchConnection } from "../nats.ts";
import type { Config } from "../config.ts";
import {
  ErrorCode,
  fromNatsError,
  isServerFault,
  toProblem,
  ValidationError,
  WeftError,
} from "../errors.ts";
import type { Logger } from "../observability/log.ts";
import { maxPayloadOf, requestJson } from "./requests.ts";
import { DEADLETTER_STREAM } from "../subjects.ts";
import { deadLetterRoutes } from "./deadletters.ts";
import { lazyScheduleStore, scheduleRoutes, scheduleTargets } from "./schedules.ts";
import type { ScheduleStore } from "../scheduler/store.ts";
import { type Auth, createAuth, needsRoles } from "./auth.ts";
import { Role } from "../config.ts";
import { LiveFeeds, SseClients } from "./sse.ts";
import {
  definitionRedriveCheck,
  type IntakeGuards,
  pipelineRoutes,
  redriveEntrySubjects,
} from "./pipelines.ts";
import { openApiDocument } from "./openapi.ts";
import { pipelineSubjects } from "../pipeline/derive.ts";
import type { LoadedPipeline } from "../pipeline/runtime.ts";
import { WeftMetrics } from "../observability/metrics.ts";
import { instrumentGateway, mountObservability } from "./observability.ts";
import type { DashboardPanel } from "./dashboard_page.ts";
import { edgeRoutes } from "./edge_routes.ts";
import type { SiteContacts } from "../edge.ts";
import type { ShadowControl } from "../shadow/control.ts";
import { shadowRoutes } from "./shadows.ts";
import { createBodyGuard } from "./body_guard.ts";
import { hostCheck } from "./host_check.ts";

/**
 * What the gateway shares with a pipeline's own routes: its auth, settings, log, SSE slots
 * and live event feeds.
 */
export interface GatewayContext {
  auth: Auth;
  config: Config;
  log: Logger;
  clients: SseClients;
  feeds: LiveFeeds;
}

/**
 * A pipeline's own routes: built once with the gateway's context, mounted at `/`. Their app
 * may declare its own context variables (e.g. the authenticated principal).
 */
// deno-lint-ignore no-explicit-any
export type GatewayExtension = (ctx: GatewayContext) => Hono<any>;

/** What the app needs. */
export interface GatewayDeps {
  /** The NATS connection; `GET /readyz` reports whether it is open. */
  nc: NatsConnection;
  /** JetStream on `nc`: event streams, dead letters and the dashboard read through it. */
  jetStream: { js: JetStreamClient; jsm: JetStreamManager };
  /**
   * The hand-wired pipelines' streams: `GET /readyz` checks them (and the dead letters),
   * and /metrics reports their consumers' backlogs.
   */
  streams?: readonly string[];
  /** Body limits, SSE limits and the other gateway settings. */
  config: Config;
  /** Where request failures are logged. */
  log: Logger;
  /** API keys; when enabled, ingest needs an ingest (or admin) key too. */
  auth?: Auth;
  /**
   * Routes each hand-wired pipeline brings of its own (its `pipelines/<name>/gateway.ts`),
   * each built with what the gateway shares
   * and mounted at `/`.
   */
  extensions?: readonly GatewayExtension[];
  /** The hand-wired pipelines' own dashboard panels (their gateway parts'). */
  dashboardPanels?: readonly DashboardPanel[];
  /** The gateway's own metrics; `GET /metrics` adds every service's to them. */
  metrics?: WeftMetrics;
  /** SSE slots; one set per gateway by default. */
  sseClients?: SseClients;
  /** Live event feeds; one per gateway by default. */
  feeds?: LiveFeeds;
  /** Pipelines loaded from definitions: their routes under /pipelines. */
  pipelines?: readonly LoadedPipeline[];
  /** Rate limits, quotas and stream capacity at the definitions' intake (as the hand-wired pipelines' intakes have). */
  guards?: IntakeGuards;
  /** The shipped pipelines' OpenAPI paths (each one's part of the gateway), for /openapi.json. */
  openApi?: readonly Record<string, unknown>[];
  /** Live shadow control: mounts /shadows (admin). */
  shadows?: ShadowControl;
  /** The schedules behind /schedules (admin); by default `weft_schedules` over `nc`. */
  schedules?: () => Promise<ScheduleStore>;
  /**
   * A hub's: when each edge site was last heard from, kept up to date between requests
   * (`trackSiteContacts` in src/edge.ts); by default only the requests for `/sites` note it.
   */
  siteContacts?: SiteContacts;
  /**
   * This gateway process's instance, as it answers the other gateway processes on
   * `weft.gateway.metrics` (`servePeerMetrics`): `/metrics` and the dashboard then add the
   * items they accepted to this one's.
   */
  instance?: string;
}

/** The problem+json response for an error. */
export function problemResponse(c: Context, error: unknown): Response {
  const err = fromNatsError(error);
  const problem = toProblem(err);
  const headers: Record<string, string> = { "content-type": "application/problem+json" };
  if (err instanceof WeftError && err.retryAfterSeconds !== undefined) {
    headers["retry-after"] = String(err.retryAfterSeconds);
  }
  return c.body(JSON.stringify(problem), problem.status as 400, headers);
}

/** Refuses a body over `maxSize` bytes with a 413 problem, before reading it. */
export function bodyLimitProblem(maxSize: number): MiddlewareHandler {
  return bodyLimit({
    maxSize,
    onError: (c) =>
      problemResponse(
        c,
        new WeftError(ErrorCode.PayloadTooLarge, `body is larger than ${maxSize} bytes`),
      ),
  });
}

/** A JSON media type (`application/json`, `application/<x>+json`), parameters aside. */
const JSON_MEDIA_TYPE = /^application\/(?:[\w.+-]+\+)?json\s*(?:;|$)/i;

/**
 * Whether a body declared in `charset` reads the same as UTF-8: any label of UTF-8 in the
 * WHATWG Encoding Standard (`utf-8`, `utf8`, `unicode-1-1-utf-8`, ...) and US-ASCII, a subset
 * of it (found by re-probing: a client's `charset=utf8` was refused).
 */
function readsAsUtf8(charset: string): boolean {
  const label = charset.trim().toLowerCase();
  if (label === "us-ascii" || label === "ascii") return true;
  try {
    return new TextDecoder(label).encoding === "utf-8";
  } catch {
    return false; // no encoding the standard knows
  }
}

/**
 * True when `type` (a Content-Type header) declares a JSON body. A JSON body is read as UTF-8,
 * so a declared `charset` that does not read as UTF-8 (any case, quoted or not) is a 415 problem naming
 * `content-type`, never decoded as UTF-8 all the same and stored rewritten.
 *
 * @example
 * ```ts
 * import { isJsonType } from "./app.ts";
 * console.assert(isJsonType("application/json; charset=UTF-8"));
 * console.assert(!isJsonType("image/png"));
 * ```
 */
export function isJsonType(type: string): boolean {
  if (!JSON_MEDIA_TYPE.test(type)) return false;
  for (const param of type.split(";").slice(1)) {
    const eq = param.indexOf("=");
    if (eq < 0 || param.slice(0, eq).trim().toLowerCase() !== "charset") continue;
    const charset = param.slice(eq + 1).trim().replace(/^"(.*)"$/, "$1");
    if (!readsAsUtf8(charset)) {
      throw new WeftError(
        ErrorCode.UnsupportedMediaType,
        `content-type's charset must be utf-8, a JSON body's encoding (got ${
          JSON.stringify(charset)
        })`,
        { field: "content-type" },
      );
    }
  }
  return true;
}

/** Refuses bodies that are not declared as JSON (or declared in a charset other than utf-8). */
export const requireJson: MiddlewareHandler = async (c, next) => {
  const type = c.req.header("content-type") ?? "";
  if (!isJsonType(type)) {
    throw new WeftError(
      ErrorCode.UnsupportedMediaType,
      `content-type must be application/json (got ${JSON.stringify(type || "none")})`,
      { field: "content-type" },
    );
  }
  await next();
};

/**
 * The request body as JSON; a 400 problem naming the body when it is not. With `optional`, an
 * empty body is `{}`.
 */
export async function readJson(c: Context, opts: { optional?: boolean } = {}): Promise<unknown> {
  try {
    const bytes = new Uint8Array(await c.req.arrayBuffer());
    if (opts.optional && bytes.length === 0) return {};
    return requestJson(bytes);
  } catch (err) {
    // A body that did not arrive in time (408), a number it cannot keep (422) or any other
    // Weft error keeps its own answer.
    if (err instanceof HTTPException || err instanceof WeftError) throw err;
    throw new ValidationError((err as Error).message, {
      code: ErrorCode.MalformedJson,
      field: "/",
      cause: err,
    });
  }
}

/**
 * Whether a Content-Encoding header declares no coding: empty, or only `identity` (any case,
 * in a list too).
 *
 * @example
 * ```ts
 * import { isIdentityCoding } from "./app.ts";
 * console.assert(isIdentityCoding("identity") && isIdentityCoding(""));
 * console.assert(!isIdentityCoding("gzip") && !isIdentityCoding("identity, gzip"));
 * ```
 */
export function isIdentityCoding(header: string): boolean {
  return header.split(",").every((c) => ["", "identity"].includes(c.trim().toLowerCase()));
}

/** Methods that change nothing: a cross-site request may use them. */
const SAFE_METHODS: ReadonlySet<string> = new Set(["GET", "HEAD", "OPTIONS"]);

/**
 * Whether a browser sent `req` from another origin: its `Sec-Fetch-Site` says so (anything
 * but `same-origin` or `none`), or, from a browser that sends none, its `Origin` names
 * another host than the request's. A request with neither header is no browser's.
 *
 * @example
 * ```ts
 * import { crossSite } from "./app.ts";
 * const post = (headers: Record<string, string>) =>
 *   new Request("http://127.0.0.1:8000/orders", { method: "POST", headers });
 * console.assert(crossSite(post({ "sec-fetch-site": "cross-site" })));
 * console.assert(crossSite(post({ origin: "https://evil.example" })));
 * console.assert(!crossSite(post({ origin: "http://127.0.0.1:8000" })));
 * console.assert(!crossSite(post({})));
 * ```
 */
export function crossSite(req: Request): boolean {
  const site = req.headers.get("sec-fetch-site");
  if (site !== null) return site !== "same-origin" && site !== "none";
  const origin = req.headers.get("origin");
  if (origin === null) return false;
  try {
    return new URL(origin).host !== new URL(req.url).host;
  } catch {
    return true; // "null" (a sandboxed or file page) or no URL at all
  }
}

/** The methods a route may have; HEAD and OPTIONS follow from them. */
const ALLOWABLE = ["GET", "POST", "PUT", "PATCH", "DELETE"] as const;

/** Whether `app` has a route (not a middleware for every method) for `method path`. */
function routed(app: Hono, method: string, path: string): boolean {
  const [matched] = app.router.match(method, path) as unknown as [
    [[unknown, { method: string }], unknown][],
  ];
  return matched.some(([[, route]]) => route.method !== "ALL");
}

/** Routes that answer without NATS. */
const NO_NATS_NEEDED = new Set(["/healthz", "/", "/dashboard", "/openapi.json"]);

/**
 * Creates the gateway app.
 *
 * @example
 * ```ts ignore
 * const jetStream = { js: jetstream(nc), jsm: await jetstreamManager(nc) };
 * const app = createApp({ nc, jetStream, config, log, extensions: [ordersRoutes] });
 * Deno.serve({ port: config.port }, app.fetch);
 * ```
 */
export function createApp(deps: GatewayDeps): Hono {
  const { jetStream, config, log } = deps;
  const clients = deps.sseClients ??
    new SseClients(
      config.sseMaxClients,
      config.sseMaxPerKey,
      config.sseOpensPerSecond,
      undefined,
      config.sseReplayBytes,
    );
  const feeds = deps.feeds ??
    new LiveFeeds(jetStream.js, log, config.sseFlushMs, config.sseWritesPerSecond);
  const app = new Hono();
  // HEAD: Hono answers it with the GET route's status and headers and drops that response's
  // body unread. A streamed body (an event stream, an object) must be cancelled, or nothing
  // ever ends it: an event stream kept its SSE slot and live subscription while it was quiet
  // (found by probing: 100 HEADs of /events locked their key out of every event stream).
  app.use(async (c, next) => {
    await next();
    if (c.req.method === "HEAD") await c.res.body?.cancel().catch(() => {});
  });
  const metrics = deps.metrics ?? new WeftMetrics();
  instrumentGateway(app, metrics, clients);

  // With authentication off, a request whose Host is no name of this gateway is a 403
  // problem naming host: a page on a DNS-rebinding domain (one that resolves to 127.0.0.1
  // once loaded) is same-origin to the browser, so neither CORS nor the cross-site check
  // below stops it reading and writing the mesh (found by a tester). With API keys on, such
  // a page cannot send a key (docs/SECURITY.md).
  if (!deps.auth?.enabled) {
    app.use(hostCheck({ listenHost: config.host ?? "", allowed: config.allowedHosts ?? [] }));
  }

  // Request bodies: at most `bodyReadsMax` read at once (503 beyond), each within
  // `bodyTimeoutMs` (408 past it). Deno.serve bounds neither (docs/SECURITY.md).
  app.use(
    createBodyGuard({ maxReads: config.bodyReadsMax, timeoutMs: config.bodyTimeoutMs })
      .middleware,
  );

  // A path served with other methods: OPTIONS is 204 and any other method 405, each with
  // `Allow` listing them, before a path's key check (an OPTIONS or a wrong method is told the
  // same with a key or without). A path served with none goes on to 404.
  app.use(async (c, next) => {
    const method = c.req.method === "HEAD" ? "GET" : c.req.method;
    if (method !== "OPTIONS" && routed(app, method, c.req.path)) return await next();
    const allowed = ALLOWABLE.filter((m) => routed(app, m, c.req.path));
    if (allowed.length === 0) return await next();
    const allow = [...allowed, ...(allowed.includes("GET") ? ["HEAD"] : []), "OPTIONS"].join(", ");
    if (method === "OPTIONS") return c.body(null, 204, { Allow: allow });
    c.header("Allow", allow);
    throw new WeftError(
      ErrorCode.MethodNotAllowed,
      `${c.req.path} takes ${allow}, not ${c.req.method}`,
    );
  });

  // A browser's cross-site request that could change something is a 403 problem naming
  // origin: a web page's form POST needs no CORS preflight, so with authentication off any
  // page a user visited could upload content or promote a shadow on their mesh (found by
  // probing). Callers that are no browser send neither Sec-Fetch-Site nor Origin.
  app.use(async (c, next) => {
    if (!SAFE_METHODS.has(c.req.method) && crossSite(c.req.raw)) {
      throw new WeftError(
        ErrorCode.Forbidden,
        "a browser's cross-site request may not change anything here",
        { field: "origin" },
      );
    }
    await next();
  });

  // A body in a content coding (gzip, br, ...) is a 415 problem naming content-encoding: the
  // gateway decodes none, and read as it came an upload was stored as its coded bytes under
  // its declared type, and a JSON body refused as "not valid UTF-8" (found by probing).
  app.use(async (c, next) => {
    const coding = c.req.header("content-encoding");
    if (c.req.raw.body !== null && coding !== undefined && !isIdentityCoding(coding)) {
      throw new WeftError(
        ErrorCode.UnsupportedMediaType,
        `content-encoding ${
          JSON.stringify(coding)
        } is not taken: send the body as it is (identity), uncompressed`,
        { field: "content-encoding" },
      );
    }
    await next();
  });

  // While NATS is unreachable, answer 503 at once instead of waiting out a publish timeout.
  const health = watchConnection(deps.nc);
  app.use(async (c, next) => {
    if (!health.up && !NO_NATS_NEEDED.has(c.req.path)) {
      throw new WeftError(ErrorCode.Unavailable, "NATS is unreachable; retry shortly", {
        retryAfterSeconds: 5,
      });
    }
    await next();
  });

  app.onError((err, c) => {
    if (err instanceof HTTPException && err.status === 413) {
      return problemResponse(c, new WeftError(ErrorCode.PayloadTooLarge, err.message));
    }
    if (isServerFault(err)) log.error("request failed", { path: c.req.path, err });
    return problemResponse(c, err);
  });
  app.notFound((c) =>
    problemResponse(c, new WeftError(ErrorCode.NotFound, `no route ${c.req.method} ${c.req.path}`))
  );

  // With API keys configured: ingest needs an ingest key, reading items any key, dead
  // letters an admin key (admin may do everything). Without keys, auth is off.
  // Marked with its roles either way: /openapi.json says which role each route needs.
  const guard = (...roles: Role[]): MiddlewareHandler =>
    needsRoles(
      deps.auth?.enabled
        ? deps.auth.require(...roles) as unknown as MiddlewareHandler
        : (_c, next) => next(),
      roles,
    );
  const ingestAuth = guard(Role.Ingest);
  const readAuth = guard(Role.Ingest, Role.Reviewer);
  const adminAuth = guard(Role.Admin);
  /** The caller, for per-key limits: the key's holder, or (auth off) one anonymous caller. */
  const whoOf = (c: Context): { name: string; role: string } =>
    (c.get("principal") as { name: string; role: string } | undefined) ??
      { name: "anonymous", role: Role.Admin };

  app.get("/healthz", (c) => c.json({ status: "ok" }));
  // The whole HTTP API, from schemas/ and the loaded definitions: built once.
  let openApi: unknown;
  app.get(
    "/openapi.json",
    (c) =>
      c.json(
        openApi ??= openApiDocument(deps.pipelines ?? [], deps.openApi ?? [], {
          routes: app.routes,
          hub: config.hub.length > 0,
        }),
      ),
  );
  app.get("/readyz", async (c) => {
    if (deps.nc.isClosed()) {
      return problemResponse(
        c,
        new WeftError(ErrorCode.Unavailable, "NATS connection closed", { retryAfterSeconds: 5 }),
      );
    }
    try {
      for (const stream of [...deps.streams ?? [], DEADLETTER_STREAM]) {
        await jetStream.jsm.streams.info(stream);
      }
    } catch (err) {
      return problemResponse(
        c,
        new WeftError(ErrorCode.Unavailable, "JetStream streams are not available", {
          cause: err,
          retryAfterSeconds: 5,
        }),
      );
    }
    return c.json({ status: "ready", nats: deps.nc.getServer() });
  });

  {
    // Mounted with none loaded too: GET /pipelines then lists none.
    app.route(
      "/pipelines",
      pipelineRoutes({
        nc: deps.nc,
        pipelines: deps.pipelines ?? [],
        config,
        log,
        clients,
        feeds,
        ingestAuth,
        readAuth,
        decideAuth: guard(Role.Reviewer),
        guards: deps.guards,
      }),
    );
  }

  app.use("/deadletters", adminAuth);
  app.use("/deadletters/*", adminAuth);
  app.route(
    "/deadletters",
    deadLetterRoutes(jetStream.js, {
      check: definitionRedriveCheck(deps.pipelines ?? [], () => maxPayloadOf(deps.nc)),
      entrySubject: redriveEntrySubjects(deps.pipelines ?? []),
    }),
  );
  app.use("/schedules", adminAuth);
  app.use("/schedules/*", adminAuth);
  app.route(
    "/schedules",
    scheduleRoutes(
      deps.schedules ?? lazyScheduleStore(deps.nc),
      scheduleTargets(deps.pipelines ?? []),
      config.bodyLimit,
    ),
  );
  if (deps.shadows) {
    app.use("/shadows", adminAuth);
    app.use("/shadows/*", adminAuth);
    app.route("/shadows", shadowRoutes(deps.shadows, (c) => whoOf(c).name));
  }
  const auth = deps.auth ?? createAuth([]);
  for (const extension of deps.extensions ?? []) {
    app.route("/", extension({ auth, config, log, clients, feeds }));
  }
  if (config.hub.length > 0) {
    // A hub: its edge sites' items, read from the streams that source them.
    app.use("/sites", readAuth);
    app.use("/sites/*", readAuth);
    app.route(
      "/sites",
      edgeRoutes(
        jetStream,
        config.hub,
        {
          config,
          clients,
          feeds: new LiveFeeds(jetStream.js, log, config.sseFlushMs, config.sseWritesPerSecond),
          log,
        },
        deps.pipelines,
        deps.siteContacts,
        config.natsDir,
      ),
    );
  }
  // Every stage's and consumer's figures, and a gather across the mesh per scrape: behind a
  // key like the other reads (any role; Prometheus sends it as its scrape's bearer token).
  app.use("/metrics", readAuth);
  app.use("/dashboard/recent", readAuth); // item texts: behind a key like the other reads
  app.use("/dashboard/stream", readAuth); // takes SSE slots: anonymous clients must not
  mountObservability(app, {
    ...deps,
    metrics,
    clients,
    pipelineStreams: [
      ...deps.streams ?? [],
      ...(deps.pipelines ?? []).map((p) => pipelineSubjects(p.def).stream),
    ],
  });

  return app;
}
