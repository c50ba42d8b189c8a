/**
 * HTTP routes for dead letters, mounted by the gateway at `/deadletters`:
 * `GET /deadletters?stage=&code=&item_id=&pending=true&limit=` lists them with reasons,
 * `POST /deadletters/redrive` with `{"ids":[...]}`, `{"filter":{...}}` or `{"all":true}`
 * re-submits them (see src/redrive.ts).
 *
 * @module
 */
import { Hono } from "hono";
import type { JetStreamClient } from "@nats-io/jetstream";
import { bodyLimit } from "hono/body-limit";
import { ErrorCode, WeftError } from "../errors.ts";
import { boolQuery, intQuery, oneQuery, onlyQuery } from "./query.ts";
import { requireJson } from "./app.ts";
import { requestJson } from "./requests.ts";
import {
  FILTER_KEYS,
  LIST_MAX_BYTES,
  listDeadLetterPage,
  parseFilter,
  parseRedriveRequest,
  redrive,
  REDRIVE_BODY_LIMIT,
  type RedriveOptions,
} from "../redrive.ts";

export { REDRIVE_BODY_LIMIT };

/** Most dead letters one `GET /deadletters` lists (`limit`). */
export const DEADLETTER_PAGE_MAX = 100_000;
/** Dead letters `GET /deadletters` lists without a `limit`. */
export const DEADLETTER_PAGE_DEFAULT = 1000;

/**
 * The dead-letter routes.
 *
 * @example
 * ```ts ignore
 * app.route("/deadletters", deadLetterRoutes(intake.js));
 * ```
 */
export function deadLetterRoutes(js: JetStreamClient, opts: RedriveOptions = {}): Hono {
  const app = new Hono();
  app.get("/", async (c) => {
    // Only its own parameters, each once: another or a repeated one is refused, naming it.
    onlyQuery(c.req.query(), [...FILTER_KEYS, "limit"]);
    const q = Object.fromEntries(
      Object.keys(c.req.query()).map((k) => [k, oneQuery(c.req.queries(k), k)!]),
    );
    const limit = intQuery(q.limit, "limit", 1, DEADLETTER_PAGE_MAX) ?? DEADLETTER_PAGE_DEFAULT;
    delete q.limit;
    const filter = parseFilter(
      Object.fromEntries(
        Object.entries(q).map(([k, v]) => [k, k === "pending" ? boolQuery(v, "pending") : v]),
      ),
      "",
      (k) => k,
    );
    // Only the page is read (the filter's subjects, up to `limit` matches), and no more
    // than LIST_MAX_BYTES of letters are kept: a page cut so says `truncated`.
    const page = await listDeadLetterPage(js, filter, limit, { total: false });
    return c.json(
      page.truncated
        ? {
          items: page.items,
          truncated: true,
          hint: `the oldest letters within ${LIST_MAX_BYTES} bytes; narrow with a filter ` +
            "(stage, code, item_id, pending) or a smaller limit",
        }
        : { items: page.items },
    );
  });
  // Ids of 10,000 letters fit in ~120 KB; anything larger is refused before it is read.
  app.post(
    "/redrive",
    requireJson, // 415 for another content type, as every JSON route
    bodyLimit({
      maxSize: REDRIVE_BODY_LIMIT,
      onError: () => {
        throw new WeftError(
          ErrorCode.PayloadTooLarge,
          `body is larger than ${REDRIVE_BODY_LIMIT} bytes`,
        );
      },
    }),
    async (c) => {
      const body = requestJson(new Uint8Array(await c.req.arrayBuffer()));
      return c.json(await redrive(js, parseRedriveRequest(body), opts));
    },
  );
  return app;
}
