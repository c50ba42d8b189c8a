/**
 * The gateway's guard against DNS rebinding: with authentication off, a request whose `Host`
 * is no name of this gateway is refused. A web page on a domain its owner points at
 * 127.0.0.1 after it loads is same-origin with the gateway in the browser's eyes (no CORS,
 * no `Origin` to refuse), and only the `Host` it sends, the page's own domain, tells it apart.
 *
 * @module
 */
import type { MiddlewareHandler } from "hono";
import { isLoopback } from "../config.ts";
import { ErrorCode, WeftError } from "../errors.ts";

/** The names a gateway answers to. */
export interface HostCheckOptions {
  /**
   * The address the gateway listens on (`WEFT_HOST`), a name of it. (`0.0.0.0` too, as the
   * supervisor prints it: no DNS name, so no rebinding page can send it.)
   */
  listenHost: string;
  /** More names (`WEFT_ALLOWED_HOSTS`): `host` (any port) or `host:port`, as a URL's host. */
  allowed: readonly string[];
}

/** `host` as a URL's hostname (lower case, IPv6 bracketed), or undefined if it is none. */
function hostnameOf(host: string): string | undefined {
  const bracketed = host.includes(":") && !host.startsWith("[") ? `[${host}]` : host;
  try {
    return new URL(`http://${bracketed}`).hostname;
  } catch {
    return undefined;
  }
}

/**
 * A predicate telling whether a request URL's host (`Host` header, as Deno.serve puts it in
 * the URL) names this gateway: a loopback name or address (`localhost`, `*.localhost`,
 * 127.0.0.0/8, `[::1]`), the address it listens on, or one of `allowed` (any port unless
 * the entry names one).
 *
 * @example
 * ```ts
 * import { hostAllowed } from "./host_check.ts";
 * const ok = hostAllowed({ listenHost: "127.0.0.1", allowed: ["weft.example.com"] });
 * console.assert(ok(new URL("http://localhost:8000/")) && ok(new URL("http://127.0.0.1/")));
 * console.assert(ok(new URL("http://weft.example.com:8000/")));
 * console.assert(!ok(new URL("http://evil.example:8000/")));
 * ```
 */
export function hostAllowed(options: HostCheckOptions): (url: URL) => boolean {
  const listen = options.listenHost ? hostnameOf(options.listenHost) : undefined;
  const withPort = new Set<string>();
  const anyPort = new Set<string>();
  for (const entry of options.allowed) {
    const url = new URL(`http://${entry}`);
    if (url.port === "") anyPort.add(url.hostname);
    else withPort.add(url.host);
  }
  return (url) => {
    // A fully qualified name's trailing dot names the same host.
    const name = url.hostname.endsWith(".") ? url.hostname.slice(0, -1) : url.hostname;
    return isLoopback(name) || name.endsWith(".localhost") || name === listen ||
      anyPort.has(name) || withPort.has(url.host) ||
      withPort.has(`${name}${url.port ? `:${url.port}` : ""}`);
  };
}

/**
 * Middleware refusing, with a 403 problem naming `host`, every request whose `Host` is not
 * {@link hostAllowed}.
 */
export function hostCheck(options: HostCheckOptions): MiddlewareHandler {
  const allowed = hostAllowed(options);
  return async (c, next) => {
    const url = new URL(c.req.url);
    if (!allowed(url)) {
      throw new WeftError(
        ErrorCode.Forbidden,
        `Host ${
          JSON.stringify(url.host)
        } is not a name of this gateway (with API keys off, it answers loopback names, ` +
          `its WEFT_HOST and those WEFT_ALLOWED_HOSTS lists)`,
        { field: "host" },
      );
    }
    await next();
  };
}
