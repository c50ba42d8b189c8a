/**
 * `GET /openapi.json`: the gateway's whole HTTP API as OpenAPI 3.1, generated from the
 * route table below, each shipped pipeline's own paths (`pipelines/<name>/openapi.ts`, built
 * with the helpers exported here), the JSON Schemas in schemas/ (the source of truth for
 * validation) and the loaded pipeline definitions (each one's routes, input schema and item
 * state).
 * Written by hand rather than with a Hono OpenAPI library: those describe routes through
 * their own validators (zod, valibot), while Weft's schemas are JSON Schema documents.
 *
 * @module
 */
import { registeredSchemas } from "../schemas.ts";
import type { LoadedPipeline } from "../pipeline/runtime.ts";
import { SHIPPED_PIPELINES } from "../../pipelines/shipped.ts";
import { DEFAULT_SHADOW_PIPELINE } from "../shadow/spec.ts";
import { Role } from "../config.ts";
import { rolesOf } from "./auth.ts";
import { RECENT_EVENTS_MAX } from "./observability.ts";
import { DEADLETTER_PAGE_DEFAULT, DEADLETTER_PAGE_MAX } from "./deadletters.ts";

/** A JSON object: an OpenAPI fragment. */
export type Json = Record<string, unknown>;

/** A reference to the schema document `name` (e.g. `orders.submit`) among the components. */
export const ref = (name: string): Json => ({ $ref: `#/components/schemas/${name}` });

/** Rewrites a schema's `$ref`s (file-relative, or local `#/definitions/...`) to components. */
function rehome(schema: unknown, self: string, files: Map<string, string>): unknown {
  if (Array.isArray(schema)) return schema.map((s) => rehome(s, self, files));
  if (schema === null || typeof schema !== "object") return schema;
  const out: Json = {};
  for (const [k, v] of Object.entries(schema as Json)) {
    if (k === "$id" || k === "$schema") continue;
    if (k === "$ref" && typeof v === "string") {
      const [file, pointer] = v.split("#");
      const target = file ? files.get(file) ?? self : self;
      out.$ref = `#/components/schemas/${target}${pointer ?? ""}`;
      continue;
    }
    out[k] = rehome(v, self, files);
  }
  return out;
}

const problem = {
  description: "An error: application/problem+json naming the field at fault",
  content: { "application/problem+json": { schema: ref("Problem") } },
};
/** A response of server-sent events. */
export const sse = (what: string): Json => ({
  description:
    `${what}: server-sent events (\`id\` is the stream sequence; resume with Last-Event-ID)`,
  content: { "text/event-stream": { schema: { type: "string" } } },
});
/** A JSON response of `schema`. */
export const json = (schema: Json, description = "OK"): Json => ({
  description,
  content: { "application/json": { schema } },
});
/** A required JSON request body of `schema`. */
export const body = (schema: Json): Json => ({
  required: true,
  content: { "application/json": { schema } },
});
/** An item id in the path. */
export const idParam: Json = {
  name: "id",
  in: "path",
  required: true,
  schema: ref("defs/definitions/ItemId"),
};
/** An edge site, in a hub's `/sites/{site}/...` paths. */
const siteParam = { name: "site", in: "path", required: true, schema: { type: "string" } };
/** The answer to an accepted submission: its id and links. */
export const accepted: Json = {
  type: "object",
  required: ["id", "status", "links"],
  properties: {
    id: { type: "string" },
    status: { const: "accepted" },
    links: {
      type: "object",
      properties: { state: { type: "string" }, events: { type: "string" } },
    },
  },
};

/**
 * A schedule's id as GET and DELETE take it: a caller's, or a pipeline's own timer's
 * `<owner>.<id>` (listed by GET /schedules and readable; not cancellable).
 */
const scheduleId = {
  name: "id",
  in: "path",
  required: true,
  description: "A caller's schedule id, or a pipeline's own timer's `<owner>.<id>` " +
    "(e.g. `<pipeline>.sla-1-<item>`: readable, not cancellable)",
  schema: { type: "string", pattern: "^(?:[A-Za-z0-9_-]{1,64}\\.)?[A-Za-z0-9_-]{1,128}$" },
};
/** A schedule's field, as the request schema (schemas/schedule.v1.json) has it. */
const scheduleField = (name: string): Json => ref(`schedule/properties/${name}`);
/** A stored schedule, as POST /schedules (201) and GET /schedules[/{id}] answer it. */
const scheduleEntry: Json = {
  type: "object",
  required: ["id", "subject", "payload", "status", "next_at", "created_at", "fired"],
  additionalProperties: false,
  properties: {
    id: scheduleId.schema,
    subject: scheduleField("subject"),
    payload: scheduleField("payload"),
    at: scheduleField("at"),
    cron: scheduleField("cron"),
    description: scheduleField("description"),
    status: { enum: ["active", "done"], description: "`done`: a one-shot schedule that fired" },
    next_at: {
      type: ["string", "null"],
      format: "date-time",
      description: "The next firing; null once done",
    },
    created_at: { type: "string", format: "date-time" },
    fired: { type: "integer", minimum: 0, description: "How many times it fired" },
    last_fired_at: { type: "string", format: "date-time" },
  },
};
const shadowId = {
  name: "id",
  in: "path",
  required: true,
  schema: { type: "string", pattern: "^[a-z0-9][a-z0-9_-]{0,31}$" },
};
/** A live shadow as attached (src/shadow/spec.ts checks it). */
const shadowSpec: Json = {
  type: "object",
  required: ["id", "step", "candidate"],
  properties: {
    id: shadowId.schema,
    pipeline: {
      type: "string",
      description: `A shipped pipeline (${
        SHIPPED_PIPELINES.filter((w) => w.shadowSteps).map((w) => w.name).join(", ")
      }) or a definition's; default ${DEFAULT_SHADOW_PIPELINE}`,
    },
    step: {
      type: "string",
      description: `The step of \`pipeline\`, by its name alone: a shipped pipeline's (${
        SHIPPED_PIPELINES.filter((w) => w.shadowSteps).map((w) =>
          `${w.name}: ${w.shadowSteps!.join(", ")}`
        ).join("; ")
      }) or a definition's work step`,
    },
    candidate: {
      type: "object",
      description: "A shipped pipeline's step: analyzers (rules, model, prompt); " +
        "a definition's step: definition",
      properties: {
        analyzers: { enum: ["embedded", "rules", "llm"] },
        rules: { type: "string", description: "A ruleset in rules/" },
        model: { type: "string" },
        prompt: { type: "string", description: "Prompt version, e.g. v2" },
        definition: {
          type: "string",
          description: "Another version of the definition (.ts), beside the running one",
        },
      },
    },
    limits: {
      type: "object",
      properties: {
        rps: { type: "number" },
        concurrency: { type: "integer" },
        sample: { type: "number" },
        budgetUsd: { type: "number" },
      },
    },
  },
};

/** A route of the gateway app as Hono lists it (`app.routes`): each handler one entry. */
export interface AppRoute {
  method: string;
  path: string;
  handler: unknown;
}

/** What else the document says of the gateway that serves it. */
export interface OpenApiOptions {
  /**
   * The app's route table (`app.routes`): each operation's `security` and `x-weft-roles` come
   * from the role check its route runs ({@link rolesOf}), so they cannot drift from it.
   */
  routes?: readonly AppRoute[];
  /** A hub (`--hub`): its `/sites/...` paths are listed. */
  hub?: boolean;
}

/**
 * Whether Hono's route pattern (`/pipelines/:name/items/:id`, `/deadletters/*`) serves the
 * documented path (`/pipelines/tickets/items/{id}`): a parameter segment takes any segment, a
 * trailing `*` any rest; a documented `{param}` only a parameter.
 */
export function serves(pattern: string, path: string): boolean {
  const want = pattern.split("/");
  const have = path.split("/");
  for (let i = 0; i < want.length; i++) {
    const w = want[i]!;
    if (w === "*" && i === want.length - 1) return true;
    const h = have[i];
    if (h === undefined) return false;
    if (w.startsWith(":")) continue;
    if (h !== w) return false;
  }
  return want.length === have.length;
}

/**
 * The roles the route serving `method path` lets through (admin always, when any is needed;
 * none for an open route), from the role checks on it and on its path (`app.use`); undefined
 * when no route serves it.
 */
export function routeRoles(
  routes: readonly AppRoute[],
  method: string,
  path: string,
): Role[] | undefined {
  const upper = method.toUpperCase();
  const route = routes.find((r) => r.method === upper && serves(r.path, path));
  if (!route) return undefined;
  const roles = new Set<Role>();
  for (const r of routes) {
    const on = r.method === "ALL" ? serves(r.path, path) : r === route ||
      (r.method === upper && r.path === route.path);
    for (const role of on ? rolesOf(r.handler) ?? [] : []) roles.add(role);
  }
  return roles.size === 0 ? [] : [...roles, ...(roles.has(Role.Admin) ? [] : [Role.Admin])];
}

/**
 * Each operation's `security` and `x-weft-roles` from the route table, and a sentence saying
 * which key it needs; an operation no route serves is left as it is (a test fails on it).
 */
function annotateRoles(paths: Json, routes: readonly AppRoute[]): void {
  for (const [path, item] of Object.entries(paths)) {
    for (const [method, operation] of Object.entries(item as Record<string, Json>)) {
      const roles = routeRoles(routes, method, path);
      if (roles === undefined) continue;
      operation.security = roles.length === 0 ? [] : [{ apiKey: [] }];
      operation["x-weft-roles"] = roles;
      const needs = roles.length === 0
        ? "Needs no API key."
        : `With API keys configured, needs a key of role ${roles.join(" or ")}.`;
      operation.description = operation.description ? `${operation.description} ${needs}` : needs;
    }
  }
}

/** A hub's (`--hub`) central view of its edge sites (src/gateway/edge_routes.ts). */
function hubPaths(): Json {
  return {
    "/sites": {
      get: op(
        "A hub only: each edge site's events, items of each shipped pipeline, dead letters, " +
          "lag and last contact",
        {
          "200": json({ type: "object" }),
        },
      ),
    },
    // Each shipped pipeline's items at the hub (src/gateway/edge_routes.ts).
    ...Object.fromEntries(SHIPPED_PIPELINES.flatMap((w) =>
      w.items
        ? [
          [`/sites/{site}/${w.name}/{id}`, {
            get: op(
              `A hub only: an edge ${w.items.what}'s state, folded from its events at the hub, ` +
                "with its site",
              { "200": json({ type: "object" }) },
              { parameters: [siteParam, idParam] },
            ),
          }],
          [`/sites/{site}/${w.name}/{id}/events`, {
            get: op(
              `A hub only: an edge ${w.items.what}'s events as the hub receives them ` +
                "(server-sent events, resumable with Last-Event-ID, closed after its final event)",
              { "200": sse(`the ${w.items.what}'s events at the hub`) },
              { parameters: [siteParam, idParam] },
            ),
          }],
        ]
        : []
    )),
    "/sites/{site}/pipelines/{name}/items/{id}": {
      get: op(
        "A hub only: an edge item of a pipeline definition the hub runs, folded from its " +
          "events at the hub, with its site",
        { "200": json({ type: "object" }) },
        {
          parameters: [
            siteParam,
            { name: "name", in: "path", required: true, schema: { type: "string" } },
            idParam,
          ],
        },
      ),
    },
    "/sites/{site}/events": {
      get: op(
        "A hub only: every event and dead letter of an edge site as the hub receives them " +
          "(server-sent events; replay=true from the first; resumable with Last-Event-ID)",
        { "200": sse("the site's events at the hub") },
        {
          parameters: [
            siteParam,
            { name: "replay", in: "query", required: false, schema: { type: "boolean" } },
          ],
        },
      ),
    },
  };
}

/** An operation: summary, responses (problems added), and anything else (body, parameters). */
export function op(
  summary: string,
  responses: Json,
  extra: Json = {},
): Json {
  return {
    summary,
    responses: { ...responses, "4XX": problem, "5XX": problem },
    ...extra,
  };
}

/**
 * The OpenAPI document of the gateway with `pipelines` loaded and the shipped pipelines'
 * own `paths` (each one's, from its part of the gateway).
 */
export function openApiDocument(
  pipelines: readonly LoadedPipeline[] = [],
  shippedPaths: readonly Json[] = [],
  opts: OpenApiOptions = {},
): Json {
  const files = new Map(
    Object.keys(registeredSchemas()).map((name) => [`${name}.v1.json`, name] as const),
  );
  const schemas: Json = {
    Problem: {
      type: "object",
      required: ["type", "title", "status", "code"],
      properties: {
        type: { type: "string" },
        title: { type: "string" },
        status: { type: "integer" },
        detail: { type: "string" },
        code: { type: "string", description: "Stable error code (src/errors.ts)" },
        field: { type: "string", description: "JSON pointer of the field at fault" },
      },
    },
  };
  for (const [name, schema] of Object.entries(registeredSchemas())) {
    schemas[name] = rehome(schema, name, files);
  }
  const paths: Json = {
    ...Object.assign({}, ...shippedPaths),
    "/deadletters": {
      get: op("Dead letters with their reasons", { "200": json({ type: "object" }) }, {
        parameters: [
          ...["stage", "code", "item_id"].map((name) => ({
            name,
            in: "query",
            schema: { type: "string" },
          })),
          { name: "pending", in: "query", schema: { type: "boolean" } },
          {
            name: "limit",
            in: "query",
            description: "Decimal digits only",
            schema: {
              type: "integer",
              minimum: 1,
              maximum: DEADLETTER_PAGE_MAX,
              default: DEADLETTER_PAGE_DEFAULT,
            },
          },
        ],
      }),
    },
    "/deadletters/redrive": {
      post: op("Redrive dead letters", { "200": json({ type: "object" }) }, {
        requestBody: body({ type: "object" }),
      }),
    },
    "/schedules": {
      get: op("Every schedule, the pipelines' own timers included (admin)", {
        "200": json({
          type: "object",
          required: ["items"],
          properties: { items: { type: "array", items: scheduleEntry } },
        }),
      }),
      post: op(
        "Schedule a submission to a running pipeline's bus input (`<name>.submit`; admin)",
        {
          "201": {
            ...json(scheduleEntry, "Created"),
            headers: { Location: { schema: { type: "string" }, description: "/schedules/{id}" } },
          },
        },
        { requestBody: body(ref("schedule")) },
      ),
    },
    "/schedules/{id}": {
      get: op("One schedule (admin)", { "200": json(scheduleEntry) }, {
        parameters: [scheduleId],
      }),
      delete: op("Cancel a caller's schedule (admin)", { "204": { description: "Cancelled" } }, {
        parameters: [scheduleId],
      }),
    },
    "/shadows": {
      get: op("Live shadows with their figures, and promoted step versions (admin)", {
        "200": json({ type: "object" }),
      }),
      post: op("Attach a live shadow (admin; docs/SHADOW.md)", {
        "201": json(shadowSpec, "Attached"),
      }, { requestBody: body(shadowSpec) }),
    },
    "/shadows/{id}": {
      delete: op("Detach a live shadow (admin)", { "200": json({ type: "object" }) }, {
        parameters: [shadowId],
      }),
    },
    "/shadows/{id}/promote": {
      post: op("Promote a shadow's candidate to production for its step (admin)", {
        "200": json({ type: "object" }),
      }, { parameters: [shadowId] }),
    },
    "/shadows/versions/{step}": {
      delete: op("Roll a step (`<pipeline>.<step>`) back to its configured version (admin)", {
        "200": json({ type: "object" }),
      }, {
        parameters: [{
          name: "step",
          in: "path",
          required: true,
          description: "`<pipeline>.<step>`, e.g. orders.price",
          schema: { type: "string" },
        }],
      }),
    },
    "/metrics": {
      get: op("Prometheus metrics of the whole mesh", {
        "200": { description: "text/plain; version=0.0.4" },
      }),
    },
    ...(opts.hub ? hubPaths() : {}),
    "/healthz": { get: op("Liveness", { "200": json({ type: "object" }) }) },
    "/readyz": { get: op("Readiness: NATS and the streams", { "200": json({ type: "object" }) }) },
    "/openapi.json": { get: op("This document", { "200": json({ type: "object" }) }) },
    "/": {
      get: op("The dashboard's address", {
        "302": {
          description: "Redirect to /dashboard",
          headers: { Location: { schema: { const: "/dashboard" } } },
        },
      }),
    },
    "/dashboard": {
      get: op("The live dashboard (an HTML page; it asks for an API key when keys are on)", {
        "200": {
          description: "The page",
          content: { "text/html": { schema: { type: "string" } } },
        },
      }),
    },
    "/favicon.ico": {
      get: op("No icon: an empty answer rather than a 404", {
        "204": { description: "No content" },
      }),
    },
    "/dashboard/recent": {
      get: op(
        "A hand-wired pipeline's latest events (oldest first) and the stream's last sequence, " +
          "for the dashboard to follow live from there; a hub adds its sites' latest events",
        {
          "200": json({
            type: "object",
            required: ["events", "last_seq"],
            properties: {
              events: {
                type: "array",
                items: {
                  type: "object",
                  required: ["seq", "event"],
                  properties: { seq: { type: "integer" }, event: { type: "object" } },
                },
              },
              last_seq: { type: "integer" },
              site_events: { type: "array" },
            },
          }),
        },
        {
          parameters: [
            {
              name: "limit",
              in: "query",
              schema: { type: "integer", minimum: 1, maximum: RECENT_EVENTS_MAX, default: 200 },
            },
            {
              name: "pipeline",
              in: "query",
              description: "A hand-wired pipeline with items (by default the first)",
              schema: {
                enum: SHIPPED_PIPELINES.filter((w) => w.items && w.streams.length > 0).map((w) =>
                  w.name
                ),
              },
            },
          ],
        },
      ),
    },
    "/dashboard/stream": {
      get: op("The dashboard's mesh figures, one `metrics` frame a second", {
        "200": sse("Mesh figures"),
      }),
    },
  };
  paths["/pipelines"] = {
    get: op("The pipelines loaded from definitions", { "200": json({ type: "object" }) }),
  };
  const idempotencyKey = {
    name: "Idempotency-Key",
    in: "header",
    description: "Names the item (a batch's items by position): a repeat with the same input " +
      "is the same item (answered with Idempotent-Replayed: true), another input is refused " +
      "with 422 idempotency_mismatch. Sent once: a repeated header (joined by commas) or a " +
      "key with a comma is refused with 422 naming it",
    schema: { type: "string", minLength: 1, maxLength: 256, pattern: "^[^,]*$" },
  };
  for (const { def } of pipelines) {
    const n = def.name;
    const input = `pipeline.${n}.input`;
    schemas[input] = def.input.schema;
    const base = `/pipelines/${n}`;
    const tag = { tags: [n] };
    paths[`${base}/items`] = {
      post: op(`Submit one ${n} item`, { "202": json(accepted, "Accepted") }, {
        ...tag,
        requestBody: body(ref(input)),
        parameters: [idempotencyKey],
      }),
    };
    paths[`${base}/items/batch`] = {
      post: op(`Submit up to 1000 ${n} items`, { "202": json({ type: "object" }) }, {
        ...tag,
        parameters: [idempotencyKey],
        requestBody: body({
          type: "object",
          required: ["items"],
          properties: { items: { type: "array", items: ref(input), minItems: 1, maxItems: 1000 } },
        }),
      }),
    };
    paths[`${base}/items/{id}`] = {
      get: op(`A ${n} item's state`, { "200": json({ type: "object" }) }, {
        ...tag,
        parameters: [idParam],
      }),
    };
    paths[`${base}/items/{id}/events`] = {
      get: op(`A ${n} item's events, to its end`, { "200": sse("The item's events") }, {
        ...tag,
        parameters: [idParam],
      }),
    };
    paths[`${base}/events`] = {
      get: op(`Every ${n} event`, { "200": sse(`${n} events`) }, {
        ...tag,
        parameters: [{ name: "replay", in: "query", schema: { type: "boolean" } }],
      }),
    };
    const by = {
      name: "by",
      in: "query",
      description: "Who acts, when authentication is off (with keys: the key's holder)",
      schema: { type: "string" },
    };
    if (Object.values(def.steps).some((s) => s.kind === "wait")) {
      paths[`${base}/waiting`] = {
        get: op(
          `Items of ${n} waiting at a wait step now, soonest deadline first`,
          {
            "200": json({
              type: "object",
              required: ["items", "total"],
              properties: {
                items: {
                  type: "array",
                  items: {
                    type: "object",
                    required: ["id", "step", "event", "until"],
                    properties: {
                      id: { type: "string" },
                      step: { type: "string" },
                      event: { type: "string" },
                      until: { type: "string", format: "date-time" },
                      input: {},
                      value: {},
                      claim: {
                        type: "object",
                        description: "The reviewer's claim on it, while live",
                        properties: {
                          by: { type: "string" },
                          at: { type: "string", format: "date-time" },
                          until: { type: "string", format: "date-time" },
                        },
                      },
                    },
                  },
                },
                total: { type: "integer" },
              },
            }, "Waiting items"),
          },
          {
            ...tag,
            parameters: [{
              name: "limit",
              in: "query",
              schema: { type: "integer", minimum: 1, maximum: 1000 },
            }],
          },
        ),
      };
      paths[`${base}/claims/{id}`] = {
        post: op(
          `Claim a ${n} item waiting for a person (reviewer): while the claim lasts ` +
            "(WEFT_CLAIM_TTL_MS), only its holder's decision is taken",
          {
            "200": json({ type: "object" }, "The claim"),
            "409": { ...problem, description: "Another holds a live claim, or it is not waiting" },
          },
          {
            ...tag,
            parameters: [idParam],
            requestBody: body({
              type: "object",
              properties: { by: { type: "string", description: "Authentication off only" } },
            }),
          },
        ),
        delete: op(
          `Release a claim on a ${n} item (its holder)`,
          { "204": { description: "Released" } },
          { ...tag, parameters: [idParam, by] },
        ),
      };
    }
    for (const [id, step] of Object.entries(def.steps)) {
      if (step.kind !== "wait") continue;
      paths[`${base}/items/{id}/${step.event}`] = {
        post: op(
          `Deliver ${step.event} to a ${n} item waiting at ${id} (else ${step.onTimeout} after ${step.timeoutMs} ms)`,
          {
            "202": json({ type: "object" }, "Accepted"),
            "409": {
              ...problem,
              description: "The item has ended (`conflict`: a decision changes nothing), " +
                "has failed (a decision counts only once a redrive of its dead letter has " +
                "resumed it), or waits at a step the running definition no longer has",
            },
          },
          {
            ...tag,
            parameters: [idParam, by],
            requestBody: {
              ...body((step.schema as Record<string, unknown>) ?? { type: "object" }),
              description: "The awaited event, checked against the wait's schema. With API " +
                "keys, its `by` is the key's holder: a `by` naming anyone else is 403 naming " +
                "`/by`, and a body without one is published with the holder's name where the " +
                "schema has room for it; with authentication off, `by` as given",
            },
          },
        ),
      };
    }
  }
  if (opts.routes) annotateRoles(paths, opts.routes);
  return {
    openapi: "3.1.0",
    info: {
      title: "Weft gateway",
      version: "1",
      description: "Ingest items, read their state, stream their events (SSE). Generated from " +
        "the JSON Schemas in schemas/ and the loaded pipeline definitions.",
    },
    components: {
      schemas,
      securitySchemes: { apiKey: { type: "http", scheme: "bearer" } },
    },
    security: [{}, { apiKey: [] }],
    paths,
  };
}
