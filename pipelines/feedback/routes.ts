/**
 * HTTP routes of the feedback pipeline, mounted on the gateway app:
 *
 * - `POST /feedback` (ingest): one submission -> 202 `{id, status, links}`;
 * - `POST /feedback/batch` (ingest): 1 to 1,000 submissions, all valid or none accepted;
 * - `GET /feedback/:id` (ingest or reviewer): the item's state;
 * - `GET /feedback/:id/events` (ingest or reviewer): its events over SSE, from the first,
 *   closed after its final event (Last-Event-ID resumes);
 * - `GET /events?type=&replay=` (ingest or reviewer): every item's events over SSE.
 *
 * @module
 */
import { Hono } from "hono";
import type { Context } from "hono";
import { Role } from "../../src/config.ts";
import { ErrorCode, ValidationError, WeftError } from "../../src/errors.ts";
import { validateDocument } from "../../src/schemas.ts";
import { typeFilter } from "../../src/subjects.ts";
import { FEEDBACK_STREAM, itemEventsFilter } from "./subjects.ts";
import { FeedbackEventType, FINAL_EVENT_TYPES } from "./events.ts";
import { parseTraceparent } from "../../src/observability/trace.ts";
import { FEEDBACK_STATE_SPEC } from "./state.ts";
import type { StateSpec } from "../../src/state_writer.ts";
import type { Principal } from "../../src/gateway/auth.ts";
import { openSlot, streamEvents } from "../../src/gateway/sse.ts";
import { boolQuery, oneQuery, onlyQuery } from "../../src/gateway/query.ts";
import { idempotencyKey } from "../../src/gateway/idempotency_key.ts";
import {
  bodyLimitProblem,
  type GatewayExtension,
  readJson,
  requireJson,
} from "../../src/gateway/app.ts";
import type { Intake } from "./intake.ts";

type Env = { Variables: { principal: Principal } };

const EVENT_TYPES = new Set<string>(Object.values(FeedbackEventType));

/**
 * The feedback routes on `intake`, as a gateway extension.
 *
 * @example
 * ```ts ignore
 * const app = createApp({ nc, config, log, extensions: [feedbackRoutes(intake)] });
 * ```
 */
export function feedbackRoutes(intake: Intake): GatewayExtension {
  return ({ auth, config, log, clients, feeds }) => {
    const app = new Hono<Env>();
    const ingestAuth = auth.require(Role.Ingest);
    const readAuth = auth.require(Role.Ingest, Role.Reviewer);
    const keyOf = (c: Context<Env>) => idempotencyKey([c.req.header("Idempotency-Key")]);
    const traceOf = (c: Context<Env>) => parseTraceparent(c.req.header("traceparent"));
    const sse = { config, clients, feeds, log };

    app.post(
      "/feedback",
      ingestAuth,
      requireJson,
      bodyLimitProblem(config.bodyLimit),
      async (c) => {
        const submission = validateDocument("feedback.submit", await readJson(c));
        const { body, replayed } = await intake.submit(submission, {
          idempotencyKey: keyOf(c),
          trace: traceOf(c),
          who: c.get("principal"),
        });
        if (replayed) c.header("Idempotent-Replayed", "true");
        c.header("Location", body.links.state);
        return c.json(body, 202);
      },
    );

    app.post(
      "/feedback/batch",
      ingestAuth,
      requireJson,
      bodyLimitProblem(config.batchBodyLimit),
      async (c) => {
        const batch = validateDocument("feedback.submit_batch", await readJson(c));
        const { body, replayed } = await intake.submitBatch(batch.items, {
          idempotencyKey: keyOf(c),
          trace: traceOf(c),
          who: c.get("principal"),
        });
        if (replayed) c.header("Idempotent-Replayed", "true");
        return c.json(body, 202);
      },
    );

    app.get("/feedback/:id", readAuth, async (c) => c.json(await intake.state(c.req.param("id"))));

    app.get("/feedback/:id/events", readAuth, async (c) => {
      onlyQuery(c.req.query(), []);
      const id = c.req.param("id");
      const from = await intake.eventsStart(id);
      if (from === null) {
        throw new WeftError(ErrorCode.NotFound, `no feedback item ${JSON.stringify(id)}`);
      }
      const key = openSlot(clients, c);
      return streamEvents(c, intake.js, {
        stream: FEEDBACK_STREAM,
        filter: itemEventsFilter(id),
        finalTypes: FINAL_EVENT_TYPES,
        closeOnFinal: true,
        replay: true,
        from,
        itemId: id,
        // An end its history does not lead to (a step's key's) is not shown and ends nothing.
        state: FEEDBACK_STATE_SPEC as StateSpec<unknown>,
      }, { ...sse, key });
    });

    app.get("/events", readAuth, (c) => {
      onlyQuery(c.req.query(), ["type", "replay"]);
      const type = oneQuery(c.req.queries("type"), "type");
      let filter = "feedback.*.*";
      if (type !== undefined) {
        const full = type.startsWith("feedback.") ? type : `feedback.${type}`;
        if (!EVENT_TYPES.has(full)) {
          throw new ValidationError(
            `type must be one of ${[...EVENT_TYPES].map((t) => t.slice(9)).join(", ")}`,
            { field: "type" },
          );
        }
        filter = typeFilter(full);
      }
      // Checked before a slot is taken: a refused request holds none.
      const replay = boolQuery(oneQuery(c.req.queries("replay"), "replay"), "replay") === true;
      const key = openSlot(clients, c);
      return streamEvents(c, intake.js, {
        stream: FEEDBACK_STREAM,
        filter,
        finalTypes: FINAL_EVENT_TYPES,
        closeOnFinal: false,
        replay,
      }, { ...sse, key });
    });

    return app;
  };
}
