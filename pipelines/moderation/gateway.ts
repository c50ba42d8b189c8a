/**
 * The content moderation pipeline's part of the gateway: its API (uploads, reviews,
 * schedules), its HTTP routes and its NATS requests.
 *
 * @module
 */
import { moderationPaths } from "./openapi.ts";
import { REVIEW_PANEL } from "./dashboard.ts";
import type { GatewayPart, GatewayPartContext } from "../../src/wiring.ts";
import { createModerationApi } from "./api.ts";
import { moderationRoutes } from "./routes.ts";
import { serveModerationRequests } from "./requests.ts";
import { CONTENT_STREAM } from "./subjects.ts";
import { ContentEventType as T } from "./events.ts";
import { itemEventsByType } from "../../src/capacity.ts";

/** Starts the moderation pipeline's part of the gateway. */
export async function moderationGateway(ctx: GatewayPartContext): Promise<GatewayPart> {
  const { nc, config, log, metrics, auth, capacity, limiter } = ctx;
  const api = await createModerationApi({
    nc,
    config,
    log,
    authEnabled: auth.enabled,
    capacity,
    limiter,
    onAccepted: (n) => metrics.accepted.inc({ pipeline: "content" }, n),
  });
  // Decisions a gateway stored in the queue and died before publishing: published now.
  api.healDecisions().catch((err) =>
    log.warn("could not publish the decisions a stopped gateway left unpublished", { err })
  );
  capacity.watch(CONTENT_STREAM); // its alert fires without intake too
  // Room for the items in flight: up to eight events each (a review's claim, escalation, ...).
  await capacity.track(
    CONTENT_STREAM,
    itemEventsByType(nc, "content", {
      entry: T.Uploaded,
      ends: [T.Published, T.Archived, T.Failed],
      eventsPerItem: 8,
    }),
  );
  const requests = serveModerationRequests(nc, api, auth, log, config.bodyLimit);
  return {
    openApi: moderationPaths(),
    routes: moderationRoutes(api),
    dashboard: REVIEW_PANEL,
    stop: () => requests.stop(),
  };
}
