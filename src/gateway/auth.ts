/**
 * API-key authentication with roles. Keys are configured only as SHA-256 hashes
 * (`WEFT_API_KEYS`), a request presents the key as `Authorization: Bearer <key>` (HTTP
 * header or NATS message header), and keys are never logged. No key at all: 401; a key
 * that is not configured: 401; a role that may not do it: 403. `admin` may do anything.
 *
 * With no keys configured authentication is off (the gateway logs a warning at start):
 * every caller acts as `anonymous` with every role, which keeps local development and
 * open ingest working.
 *
 * Written here rather than with `hono/bearer-auth` because the same check must serve NATS
 * requests too, and failures must be problem+json documents like every other error.
 *
 * @module
 */
import { createHash } from "node:crypto";
import type { MiddlewareHandler } from "hono";
import { ANONYMOUS_NAME, type ApiKey, Role } from "../config.ts";
import { ErrorCode, WeftError } from "../errors.ts";

/** Who is calling. */
export interface Principal {
  /** The key's holder: recorded as reviewer or uploader. */
  name: string;
  /** What the key may do. */
  role: Role;
}

/** Checks credentials. */
export interface Auth {
  /** False when no keys are configured. */
  readonly enabled: boolean;
  /** The caller behind an Authorization header value; throws 401/403 problems. */
  authorize(authorization: string | undefined | null, roles: readonly Role[]): Principal;
  /** Hono middleware: authorizes and sets `c.get("principal")`. */
  require(...roles: Role[]): MiddlewareHandler<{ Variables: { principal: Principal } }>;
}

/** The roles each role-checking middleware lets through, by the middleware. */
const ROLES = new WeakMap<object, readonly Role[]>();

/**
 * Marks `middleware` as the check that lets `roles` (and admin) through: what
 * {@link Auth.require} makes is marked already, and a route table read with {@link rolesOf}
 * says which role each route needs (the OpenAPI document's `x-weft-roles`).
 */
export function needsRoles<T extends object>(middleware: T, roles: readonly Role[]): T {
  ROLES.set(middleware, roles);
  return middleware;
}

/**
 * The roles a route handler lets through, when it is a role check ({@link needsRoles}, every
 * {@link Auth.require}); undefined for any other handler.
 *
 * @example
 * ```ts
 * import { createAuth, rolesOf } from "./auth.ts";
 * console.assert(rolesOf(createAuth([]).require("reviewer"))?.[0] === "reviewer");
 * ```
 */
export function rolesOf(handler: unknown): readonly Role[] | undefined {
  return typeof handler === "function" ? ROLES.get(handler) : undefined;
}

/** The SHA-256 hex of a key: what WEFT_API_KEYS holds. */
export function hashKey(key: string): string {
  return createHash("sha256").update(key).digest("hex");
}

/**
 * The key an `Authorization: Bearer <key>` header presents (the scheme in any case, any
 * spaces around the key), or undefined when the header is not one.
 *
 * @example
 * ```ts
 * import { bearerToken } from "./auth.ts";
 * console.assert(bearerToken("bearer   s3cret ") === "s3cret");
 * console.assert(bearerToken("Basic czNjcmV0") === undefined);
 * ```
 */
export function bearerToken(header: string | undefined | null): string | undefined {
  return /^Bearer\s+(\S+)\s*$/i.exec(header ?? "")?.[1];
}

/**
 * Creates the authenticator from configured keys.
 *
 * @example
 * ```ts
 * import { createAuth, hashKey } from "./auth.ts";
 * const auth = createAuth([{ sha256: hashKey("s3cret"), role: "reviewer", name: "alice" }]);
 * console.assert(auth.authorize("Bearer s3cret", ["reviewer"]).name === "alice");
 * ```
 */
export function createAuth(keys: readonly ApiKey[]): Auth {
  const byHash = new Map(keys.map((k) => [k.sha256, k]));
  const enabled = byHash.size > 0;
  const authorize = (header: string | undefined | null, roles: readonly Role[]): Principal => {
    if (!enabled) return { name: ANONYMOUS_NAME, role: Role.Admin };
    const token = bearerToken(header);
    if (token === undefined) {
      throw new WeftError(
        ErrorCode.Unauthorized,
        header ? "Authorization must be 'Bearer <key>'" : "an API key is required",
        { field: "authorization" },
      );
    }
    const key = byHash.get(hashKey(token));
    if (!key) {
      throw new WeftError(ErrorCode.Unauthorized, "unknown API key", { field: "authorization" });
    }
    if (key.role !== Role.Admin && !roles.includes(key.role)) {
      throw new WeftError(
        ErrorCode.Forbidden,
        `role ${key.role} may not do this (needs ${roles.join(" or ")})`,
      );
    }
    return { name: key.name, role: key.role };
  };
  return {
    enabled,
    authorize,
    require(...roles) {
      return needsRoles(async (c, next) => {
        try {
          c.set("principal", authorize(c.req.header("authorization"), roles));
        } catch (err) {
          if (err instanceof WeftError && err.code === ErrorCode.Unauthorized) {
            c.header("WWW-Authenticate", 'Bearer realm="weft"');
          }
          throw err;
        }
        await next();
      }, roles);
    },
  };
}
