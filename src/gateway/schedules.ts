/**
 * Schedules for admins, over HTTP and NATS request/reply: delayed and recurring submissions
 * to any running pipeline's bus input (the shipped pipelines' and each definition's
 * `<name>.submit`), kept in `weft_schedules` and fired by the scheduler.
 *
 * - `GET /schedules`, `POST /schedules`, `GET /schedules/:id`, `DELETE /schedules/:id`
 * - `weft.schedules.list`, `weft.schedules.create`, `weft.schedules.get ID`,
 *   `weft.schedules.cancel ID`
 *
 * A pipeline's own timers (a wait's timeout, a review's SLA: ids `<owner>.<id>`) are listed
 * too, and cannot be made or cancelled here.
 *
 * @module
 */
import { Hono } from "hono";
import type { Msg, NatsConnection } from "@nats-io/nats-core";
import { Kvm } from "@nats-io/kv";
import { Role } from "../config.ts";
import { ErrorCode, ValidationError, WeftError } from "../errors.ts";
import { bodyLimitProblem, readJson, requireJson } from "./app.ts";
import type { Logger } from "../observability/log.ts";
import { DEFAULT_BODY_LIMIT, maxPayloadOf, replyTo, requestJson } from "./requests.ts";
import {
  assertCallerSchedulable,
  callerSchedulable,
  createScheduleStore,
  scheduleOwner,
  type ScheduleStore,
} from "../scheduler/store.ts";
import { requestDocument, submissionDocument, validateDocument } from "../schemas.ts";
import { checkInput, type LoadedPipeline } from "../pipeline/runtime.ts";
import { SCHEDULE_BUCKET, SCHEDULES_REQUEST_PREFIX } from "../subjects.ts";
import type { Auth } from "./auth.ts";
import { lazy } from "../retry.ts";

/** The schedule store of the gateway's connection, opened on first use. */
export function lazyScheduleStore(
  nc: NatsConnection,
  opts: { maxCallerCrons?: number } = {},
): () => Promise<ScheduleStore> {
  // NATS down at the first request: open again at the next.
  return lazy(() =>
    new Kvm(nc).open(SCHEDULE_BUCKET).then((kv) => createScheduleStore(kv, undefined, opts))
  );
}

/**
 * What callers may schedule with `pipelines` running: the subjects ({@link callerSchedulable})
 * and a check of a payload as the subject's consumer will check it (a submission's or a
 * request's document, a definition's input), so a schedule that could only fail is refused
 * now, naming the field, not dead-lettered when it fires.
 */
export interface ScheduleTargets {
  /** The subjects a caller may schedule. */
  allowed: readonly string[];
  /** Throws a {@link ValidationError} naming `/payload/...` when `payload` would be refused. */
  check(subject: string, payload: unknown): void;
}

/**
 * The schedule targets of the shipped pipelines and `pipelines`.
 *
 * @example
 * ```ts ignore
 * const targets = scheduleTargets(pipelines);
 * targets.check("orders.submit", { qty: "two" }); // throws, field "/payload/qty"
 * ```
 */
export function scheduleTargets(pipelines: readonly LoadedPipeline[]): ScheduleTargets {
  return {
    allowed: callerSchedulable(pipelines),
    check(subject, payload) {
      const doc = submissionDocument(subject) ?? requestDocument(subject);
      const p = pipelines.find((p) => `${p.def.name}.submit` === subject);
      if (!doc && !p) {
        // Inside an allowed pattern (a wiring may allow a wildcard) but read by no one: it would fire
        // into the stream and be lost.
        throw new ValidationError(`/subject ${JSON.stringify(subject)}: nothing running reads it`, {
          field: "/subject",
        });
      }
      try {
        if (doc) validateDocument(doc, payload);
        if (p) checkInput(p.flow, payload);
      } catch (err) {
        if (!(err instanceof ValidationError)) throw err;
        const field = `/payload${err.field === "/" ? "" : err.field ?? ""}`;
        throw new ValidationError(`payload (as ${subject} takes it): ${err.message}`, {
          field,
          cause: err,
        });
      }
    },
  };
}

/** Checks a caller's schedule and stores it. */
async function create(
  store: () => Promise<ScheduleStore>,
  targets: ScheduleTargets,
  body: unknown,
) {
  const doc = validateDocument("schedule", body);
  if (doc.id !== undefined && scheduleOwner(doc.id) !== undefined) {
    throw new ValidationError(
      "/id may not hold a '.': ids with one are the pipelines' own timers (<owner>.<id>)",
      { field: "/id" },
    );
  }
  assertCallerSchedulable(doc.subject, targets.allowed);
  targets.check(doc.subject, doc.payload);
  return await (await store()).create(doc, { caller: true });
}

/**
 * The `/schedules` routes (mount them behind the admin role).
 *
 * @example
 * ```ts ignore
 * app.route("/schedules", scheduleRoutes(lazyScheduleStore(nc), scheduleTargets(pipelines), 65536));
 * ```
 */
export function scheduleRoutes(
  store: () => Promise<ScheduleStore>,
  targets: ScheduleTargets,
  maxBody: number,
): Hono {
  const app = new Hono();
  app.get("/", async (c) => c.json({ items: await (await store()).list() }));
  app.post(
    "/",
    requireJson,
    bodyLimitProblem(maxBody),
    async (c) => {
      const entry = await create(store, targets, await readJson(c));
      c.header("Location", `/schedules/${entry.id}`);
      return c.json(entry, 201);
    },
  );
  app.get("/:id", async (c) => c.json(await (await store()).get(c.req.param("id"))));
  app.delete("/:id", async (c) => {
    if (!(await (await store()).cancel(c.req.param("id"), { caller: true }))) {
      throw new WeftError(ErrorCode.NotFound, `no schedule ${JSON.stringify(c.req.param("id"))}`);
    }
    return c.body(null, 204);
  });
  return app;
}

/** The id a get or cancel request names: the body itself, or `{"id": ...}`. */
function idOf(m: Msg): string {
  const text = m.string().trim();
  if (!text.startsWith("{")) return text;
  const id = (requestJson(m.data) as { id?: unknown } | null)?.id;
  if (typeof id !== "string") throw new ValidationError("/id is required", { field: "/id" });
  return id;
}

const SCHEDULES_HINT = "the first schedules that fit the server's max_payload; GET /schedules " +
  "lists every one, weft.schedules.get '<id>' answers one";

/**
 * Serves `weft.schedules.*` for admins (with API keys configured, a request carries an admin
 * key in an `Authorization: Bearer <key>` header). Errors answer `{"error": <problem>}`; a
 * create past `maxBody` (POST /schedules's limit, `WEFT_BODY_LIMIT`) is the same 413.
 *
 * @example
 * ```ts ignore
 * const requests = serveScheduleRequests(nc, lazyScheduleStore(nc), targets, log, auth);
 * // nats req weft.schedules.list ''
 * requests.stop();
 * ```
 */
export function serveScheduleRequests(
  nc: NatsConnection,
  store: () => Promise<ScheduleStore>,
  targets: ScheduleTargets,
  log: Logger,
  auth: Auth,
  maxBody: number = DEFAULT_BODY_LIMIT,
): { stop(): void } {
  const handlers: Record<string, (m: Msg) => Promise<unknown>> = {
    create: (m) => create(store, targets, m.data.length === 0 ? {} : requestJson(m.data, maxBody)),
    list: async () => {
      const items = await (await store()).list();
      return { items, total: items.length };
    },
    get: async (m) => await (await store()).get(idOf(m)),
    cancel: async (m) => ({ cancelled: await (await store()).cancel(idOf(m), { caller: true }) }),
  };
  const subs = Object.entries(handlers).map(([verb, run]) =>
    nc.subscribe(`${SCHEDULES_REQUEST_PREFIX}.${verb}`, {
      queue: "weft-gateway",
      // A list past max_payload is cut to fit, never a 500 (see fitReply).
      callback: (_e, m) =>
        void replyTo(
          m,
          log,
          async () => {
            auth.authorize(m.headers?.get("Authorization"), [Role.Admin]);
            return await run(m);
          },
          maxPayloadOf(nc),
          SCHEDULES_HINT,
        ),
    })
  );
  return { stop: () => subs.forEach((s) => s.unsubscribe()) };
}
