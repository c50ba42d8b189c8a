/**
 * W3C Trace Context (`traceparent`) for NATS headers and HTTP. Each hop keeps the trace
 * id and takes a new span id, so one item's path can be followed across services.
 * Written here rather than pulled from OpenTelemetry because it is a 55-character
 * format and the runner needs it on every message even when telemetry is off.
 *
 * @module
 */

/** A parsed traceparent. */
export interface TraceContext {
  /** Trace id: 32 lower-case hex characters, shared by every hop. */
  traceId: string;
  /** Span id: 16 lower-case hex characters, new at each hop. */
  spanId: string;
  /** The traceparent's sampled flag. */
  sampled: boolean;
}

const TRACEPARENT = /^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/;

/** Parses a `traceparent` header; null when absent or malformed. */
export function parseTraceparent(header: string | null | undefined): TraceContext | null {
  const m = header ? TRACEPARENT.exec(header.trim()) : null;
  if (!m || /^0+$/.test(m[1]!) || /^0+$/.test(m[2]!)) return null;
  return { traceId: m[1]!, spanId: m[2]!, sampled: (parseInt(m[3]!, 16) & 1) === 1 };
}

/** Formats a traceparent header value. */
export function formatTraceparent(ctx: TraceContext): string {
  return `00-${ctx.traceId}-${ctx.spanId}-${ctx.sampled ? "01" : "00"}`;
}

const HEX = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, "0"));
/** Random bytes drawn 4 KiB at a time: one `getRandomValues` per 512 span ids, not one each. */
let pool = new Uint8Array(0);
let poolAt = 0;

function randomHex(bytes: number): string {
  if (poolAt + bytes > pool.length) {
    pool = crypto.getRandomValues(new Uint8Array(4096));
    poolAt = 0;
  }
  let out = "";
  for (let i = 0; i < bytes; i++) out += HEX[pool[poolAt++]!];
  return out;
}

/** A new span in `parent`'s trace, or in a new trace when there is no parent. */
export function childContext(parent?: TraceContext | null): TraceContext {
  return {
    traceId: parent?.traceId ?? randomHex(16),
    spanId: randomHex(8),
    sampled: parent?.sampled ?? true,
  };
}
