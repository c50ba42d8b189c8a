/**
 * Bounds on reading request bodies, which Deno.serve has none of: at most `maxReads` bodies
 * are read at once (a request with a body beyond that is answered 503 with Retry-After, its
 * body never read), and a body must be read to its end within `timeoutMs` of its request
 * reaching the gateway (past it the read fails with a 408 `request_timeout` problem).
 *
 * Why a cap and not only a deadline: measured on Deno 2.9.6, a connection whose body the
 * gateway has started to read costs ~190-280 KB of memory while it waits for the rest, one
 * whose body it has not touched ~30 KB (the unread bytes stay in the kernel's socket buffer).
 * The cap bounds how many cost the former at once, whatever the clients do.
 *
 * @module
 */
import type { MiddlewareHandler } from "hono";
import { ErrorCode, WeftError } from "../errors.ts";

/** The bounds. */
export interface BodyGuardOptions {
  /** Request bodies read at once, at most. */
  maxReads: number;
  /** How long a body may take to arrive in full, ms, from when its request reached the app. */
  timeoutMs: number;
}

/** A body guard: its middleware and how many bodies it is reading now. */
export interface BodyGuard {
  /** Takes a slot for a request with a body and wraps the body in the deadline. */
  middleware: MiddlewareHandler;
  /** Bodies being read now (slots taken). */
  readonly reading: number;
}

/** Methods whose requests never carry a body the gateway reads. */
const NO_BODY = new Set(["GET", "HEAD", "OPTIONS"]);

/**
 * Creates a body guard; mount its middleware before any route reads a body.
 *
 * @example
 * ```ts
 * import { Hono } from "hono";
 * import { createBodyGuard } from "./body_guard.ts";
 * const guard = createBodyGuard({ maxReads: 256, timeoutMs: 30_000 });
 * const app = new Hono().use(guard.middleware).post("/", async (c) => c.text(await c.req.text()));
 * const res = await app.request("/", { method: "POST", body: "hi" });
 * console.assert((await res.text()) === "hi" && guard.reading === 0);
 * ```
 */
export function createBodyGuard(opts: BodyGuardOptions): BodyGuard {
  let reading = 0;
  const middleware: MiddlewareHandler = async (c, next) => {
    const source = c.req.raw.body;
    if (source === null || NO_BODY.has(c.req.method)) return await next();
    if (reading >= opts.maxReads) {
      throw new WeftError(
        ErrorCode.Unavailable,
        `the gateway is reading ${opts.maxReads} request bodies already ` +
          `(WEFT_BODY_READS_MAX); retry shortly`,
        { retryAfterSeconds: 1, shown: true },
      );
    }
    reading++;
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      reading--;
      clearTimeout(timer);
    };
    const reader = source.getReader();
    let out: ReadableStreamDefaultController<Uint8Array> | undefined;
    const late = new WeftError(
      ErrorCode.RequestTimeout,
      `the request body did not arrive in full within ${opts.timeoutMs} ms ` +
        `(WEFT_BODY_TIMEOUT_MS)`,
      { field: "/" },
    );
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      release();
      out?.error(late);
      reader.cancel(late).catch(() => {});
    }, opts.timeoutMs);
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        out = controller;
      },
      async pull(controller) {
        try {
          const r = await reader.read();
          if (timedOut) return;
          if (r.done) {
            release();
            controller.close();
          } else {
            controller.enqueue(r.value);
          }
        } catch (err) {
          release();
          if (!timedOut) controller.error(err);
        }
      },
      cancel(reason) {
        release();
        return reader.cancel(reason);
      },
    });
    c.req.raw = new Request(c.req.raw, { body, duplex: "half" } as RequestInit);
    try {
      await next();
    } finally {
      // Answered (or failed) without reading the body to its end: the slot is free again.
      release();
    }
    if (timedOut) c.header("Connection", "close");
  };
  return {
    middleware,
    get reading() {
      return reading;
    },
  };
}
