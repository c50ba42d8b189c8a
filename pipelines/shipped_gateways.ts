/**
 * Each shipped pipeline's part of the gateway (its intake, HTTP routes, OpenAPI paths and
 * NATS requests), in the order of pipelines/shipped.ts. Only the gateway service loads this
 * list: a step's process never loads HTTP code.
 *
 * @module
 */
import type { GatewayPartStarter } from "../src/wiring.ts";
import { feedbackGateway } from "./feedback/gateway.ts";
import { moderationGateway } from "./moderation/gateway.ts";

/** The shipped pipelines' parts of the gateway. */
export const SHIPPED_GATEWAYS: readonly GatewayPartStarter[] = [feedbackGateway, moderationGateway];
