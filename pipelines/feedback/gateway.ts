/**
 * The feedback pipeline's part of the gateway: its intake (POST /feedback and the
 * `weft.feedback.submit` request subject share it), its HTTP routes and its NATS requests.
 *
 * @module
 */
import { feedbackPaths } from "./openapi.ts";
import type { GatewayPart, GatewayPartContext } from "../../src/wiring.ts";
import { createIntake } from "./intake.ts";
import { feedbackRoutes } from "./routes.ts";
import { serveRequests } from "./requests.ts";
import { FEEDBACK_PANEL } from "./dashboard.ts";
import { FEEDBACK_STREAM } from "./subjects.ts";
import { FeedbackEventType as T } from "./events.ts";
import { itemEventsByType } from "../../src/capacity.ts";

/** Starts the feedback pipeline's part of the gateway. */
export async function feedbackGateway(ctx: GatewayPartContext): Promise<GatewayPart> {
  const { nc, config, log, metrics, auth, capacity, limiter } = ctx;
  const intake = await createIntake(nc, "weft-gateway", {
    capacity,
    limiter,
    onAccepted: (n) => metrics.accepted.inc({ pipeline: "feedback" }, n),
  });
  const requests = serveRequests(nc, intake, log, auth, config.bodyLimit);
  capacity.watch(FEEDBACK_STREAM); // its alert fires without intake too
  // Room for the items in flight: each stores five events, every one repeating its text.
  await capacity.track(
    FEEDBACK_STREAM,
    itemEventsByType(nc, "feedback", {
      entry: T.Ingested,
      ends: [T.Processed, T.Failed],
      eventsPerItem: 5,
    }),
  );
  return {
    openApi: feedbackPaths(),
    routes: feedbackRoutes(intake),
    dashboard: FEEDBACK_PANEL,
    stop: () => requests.stop(),
  };
}
