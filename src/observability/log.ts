/**
 * Structured logs: one JSON object a line on stdout, with time, level, service and
 * whatever fields the caller adds (item id, trace id, stage, event type).
 *
 * @module
 */
import { LogLevel, type LogLevelName } from "../config.ts";

/** Fields attached to a log line. */
export type LogFields = Record<string, unknown>;

/** A structured logger bound to a service and optional fixed fields. */
export interface Logger {
  /** Logs `msg` with `fields` at level `debug`. */
  debug(msg: string, fields?: LogFields): void;
  /** Logs `msg` with `fields` at level `info`. */
  info(msg: string, fields?: LogFields): void;
  /** Logs `msg` with `fields` at level `warn`. */
  warn(msg: string, fields?: LogFields): void;
  /** Logs `msg` with `fields` at level `error`. */
  error(msg: string, fields?: LogFields): void;
  /** A logger that adds `fields` to every line. */
  with(fields: LogFields): Logger;
}

/** Where log lines go; stdout unless a test captures them. */
export type LogSink = (line: string) => void;

const encoder = new TextEncoder();
const stdoutSink: LogSink = (line) => {
  Deno.stdout.writeSync(encoder.encode(line + "\n"));
};

/**
 * Creates a JSON-lines logger.
 *
 * @example
 * ```ts
 * import { createLogger } from "./log.ts";
 * const lines: string[] = [];
 * const log = createLogger("sentiment", "info", (l) => lines.push(l));
 * log.info("handled", { item_id: "fb1" });
 * console.assert(JSON.parse(lines[0]!).item_id === "fb1");
 * ```
 */
export function createLogger(
  service: string,
  level: LogLevelName = "info",
  sink: LogSink = stdoutSink,
  base: LogFields = {},
): Logger {
  const threshold = LogLevel[level];
  const emit = (lvl: LogLevelName, msg: string, fields?: LogFields) => {
    if (LogLevel[lvl] < threshold) return;
    sink(JSON.stringify({
      time: new Date().toISOString(),
      level: lvl,
      service,
      msg,
      ...base,
      ...fields,
    }, errorReplacer));
  };
  return {
    debug: (m, f) => emit("debug", m, f),
    info: (m, f) => emit("info", m, f),
    warn: (m, f) => emit("warn", m, f),
    error: (m, f) => emit("error", m, f),
    with: (fields) => createLogger(service, level, sink, { ...base, ...fields }),
  };
}

function errorReplacer(_key: string, value: unknown): unknown {
  if (value instanceof Error) {
    return {
      name: value.name,
      message: value.message,
      ...("code" in value ? { code: value.code } : {}),
    };
  }
  return value;
}
