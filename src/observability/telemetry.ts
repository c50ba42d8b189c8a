/**
 * Tracing through OpenTelemetry's API (`@opentelemetry/api`, no SDK). Deno's built-in
 * OpenTelemetry (`OTEL_DENO=true`) registers a tracer provider and context manager behind
 * that API and exports spans to the OTLP endpoint in the standard `OTEL_*` variables;
 * without it every call here is the API's no-op (no spans, no export, no cost beyond a
 * function call), and trace context still flows through the `traceparent` headers of
 * src/observability/trace.ts.
 *
 * @module
 */
import {
  type Attributes,
  type Context,
  context,
  ROOT_CONTEXT,
  type Span,
  SpanKind,
  SpanStatusCode,
  trace,
  TraceFlags,
} from "@opentelemetry/api";
import type { TraceContext } from "./trace.ts";

export { SpanKind };

const tracer = trace.getTracer("weft");

/** The OTel context whose parent span is `parent` (a remote traceparent). */
export function contextOf(parent: TraceContext | null | undefined): Context {
  if (!parent) return ROOT_CONTEXT;
  return trace.setSpanContext(ROOT_CONTEXT, {
    traceId: parent.traceId,
    spanId: parent.spanId,
    traceFlags: parent.sampled ? TraceFlags.SAMPLED : TraceFlags.NONE,
    isRemote: true,
  });
}

/**
 * Starts a span whose parent is `parent` (a traceparent from a message header), or the
 * active span when `parent` is "active".
 *
 * @example
 * ```ts
 * import { startSpan, SpanKind } from "./telemetry.ts";
 * const span = startSpan("sentiment process", SpanKind.CONSUMER, null, { "weft.stage": "sentiment" });
 * span.end();
 * ```
 */
export function startSpan(
  name: string,
  kind: SpanKind,
  parent: TraceContext | null | "active",
  attributes?: Attributes,
): Span {
  const ctx = parent === "active" ? context.active() : contextOf(parent);
  return tracer.startSpan(name, { kind, attributes }, ctx);
}

/** The trace context of a span that is being recorded; null for a no-op span. */
export function traceContextOf(span: Span | undefined): TraceContext | null {
  if (!span || !span.isRecording()) return null;
  const sc = span.spanContext();
  return {
    traceId: sc.traceId,
    spanId: sc.spanId,
    sampled: (sc.traceFlags & TraceFlags.SAMPLED) === TraceFlags.SAMPLED,
  };
}

/**
 * The active span's trace context when telemetry records it; null otherwise. What
 * outgoing `traceparent` headers carry, so the next hop's span is this span's child.
 *
 * @example
 * ```ts
 * import { activeTraceContext } from "./telemetry.ts";
 * activeTraceContext(); // null unless OTEL_DENO=true and a span is active
 * ```
 */
export function activeTraceContext(): TraceContext | null {
  return traceContextOf(trace.getActiveSpan());
}

/** Runs `fn` with `span` active, so the publishes inside it carry its context. */
export function withSpan<T>(span: Span, fn: () => T): T {
  return context.with(trace.setSpan(context.active(), span), fn);
}

/** Marks a span failed with the error. */
export function recordFailure(span: Span, err: unknown): void {
  if (!span.isRecording()) return;
  span.recordException(err instanceof Error ? err : String(err));
  span.setStatus({ code: SpanStatusCode.ERROR, message: (err as Error)?.message });
}
