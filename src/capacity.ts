/**
 * Capacity: nothing accepted is ever discarded to make room. Every stream that holds work
 * refuses new messages when full (discard-new, see topology.ts), and intake stops
 * accepting new items earlier, at a high-water mark of the stream's limits, so items
 * already accepted keep room for the events of their remaining steps. An alert (a log
 * line, and the usage gauges in /metrics) fires well before that.
 *
 * The guard reads stream info (cheap: never consumer info) at most once per refresh
 * interval, shared by every request; a request never waits on it once a reading exists.
 *
 * @module
 */
import { JetStreamApiError, type JetStreamManager, type StreamInfo } from "@nats-io/jetstream";
import { ErrorCode, WeftError } from "./errors.ts";
import type { Logger } from "./observability/log.ts";

/** A stream's use of its limits. */
export interface StreamUsage {
  stream: string;
  /** Bytes stored / max_bytes (0 when unlimited). */
  bytes: number;
  /** Messages stored / max_msgs (0 when unlimited). */
  messages: number;
}

/** The larger of a stream's byte and message usage ratios. */
export function usageOf(info: StreamInfo): StreamUsage {
  const { config, state } = info;
  return {
    stream: config.name,
    bytes: config.max_bytes > 0 ? state.bytes / config.max_bytes : 0,
    messages: config.max_msgs > 0 ? state.messages / config.max_msgs : 0,
  };
}

/** Thrown at intake when a stream is past its high-water mark: HTTP 507 with Retry-After. */
export class CapacityError extends WeftError {
  /** The error for `usage` past `highWater`. */
  constructor(usage: StreamUsage, highWater: number, retryAfterSeconds = 30) {
    super(
      ErrorCode.InsufficientStorage,
      `stream ${usage.stream} is ${Math.round(Math.max(usage.bytes, usage.messages) * 100)}% ` +
        `full (new items are refused from ${Math.round(highWater * 100)}%, so accepted ones ` +
        `can finish); retry later, or grow the stream (WEFT_STREAM_MAX_BYTES)`,
      { retryAfterSeconds },
    );
    this.name = "CapacityError";
  }
}

/** JetStream's "store failed" API error code (nats-server JSStreamStoreFailedF). */
const STREAM_STORE_FAILED = 10077;

/** True when a publish was refused because the stream is at a limit (discard-new). */
export function isStreamFull(err: unknown): boolean {
  return err instanceof JetStreamApiError && err.code === STREAM_STORE_FAILED &&
    /maximum (bytes|messages)/i.test(err.message);
}

/**
 * The error intake answers when the stream itself refused a publish for being full (the
 * backstop behind the high-water mark): 507 with Retry-After.
 */
export function streamFullError(stream: string, cause: unknown): WeftError {
  return new WeftError(
    ErrorCode.InsufficientStorage,
    `stream ${stream} is full; retry later, or grow the stream (WEFT_STREAM_MAX_BYTES)`,
    { cause, retryAfterSeconds: 30 },
  );
}

/** Settings of a {@link CapacityGuard}. */
export interface CapacityOptions {
  /** Usage ratio from which intake refuses new items. Default 0.9. */
  highWater?: number;
  /** Usage ratio from which a warning is logged (once per crossing). Default 0.8. */
  alertAt?: number;
  /** How old a reading may be before the next check refreshes it, ms. Default 1000. */
  refreshMs?: number;
  log?: Logger;
}

/** Refuses intake into streams past their high-water mark. */
export interface CapacityGuard {
  /** Throws {@link CapacityError} when `stream` is at or past the high-water mark. */
  check(stream: string): Promise<void>;
  /** The latest reading of every stream checked so far (for /metrics). */
  readings(): StreamUsage[];
}

/**
 * A guard over `jsm`'s streams.
 *
 * @example
 * ```ts ignore
 * const guard = createCapacityGuard(jsm, { highWater: 0.9, log });
 * await guard.check("ORDERS"); // CapacityError (507) when 90% full
 * ```
 */
export function createCapacityGuard(
  jsm: JetStreamManager,
  opts: CapacityOptions = {},
): CapacityGuard {
  const highWater = opts.highWater ?? 0.9;
  const alertAt = opts.alertAt ?? 0.8;
  const refreshMs = opts.refreshMs ?? 1000;
  const latest = new Map<string, { usage: StreamUsage; at: number; alerted: boolean }>();
  const pending = new Map<string, Promise<StreamUsage>>();

  function read(stream: string): Promise<StreamUsage> {
    let p = pending.get(stream);
    if (!p) {
      p = jsm.streams.info(stream).then((info) => {
        const usage = usageOf(info);
        const prev = latest.get(stream);
        const ratio = Math.max(usage.bytes, usage.messages);
        let alerted = prev?.alerted ?? false;
        if (ratio >= alertAt && !alerted) {
          alerted = true;
          opts.log?.warn("stream nearly full", {
            stream,
            bytes_ratio: round(usage.bytes),
            messages_ratio: round(usage.messages),
            refuse_from: highWater,
          });
        } else if (ratio < alertAt && alerted) {
          alerted = false;
          opts.log?.info("stream below its alert level again", { stream, ratio: round(ratio) });
        }
        latest.set(stream, { usage, at: Date.now(), alerted });
        return usage;
      }).finally(() => pending.delete(stream));
      pending.set(stream, p);
    }
    return p;
  }

  return {
    async check(stream) {
      const known = latest.get(stream);
      let usage = known?.usage;
      if (!known) usage = await read(stream);
      else if (Date.now() - known.at > refreshMs) {
        // Answer from the last reading; refresh for the next request. A stream that was
        // past the mark is read now, so a drained stream accepts again at once.
        const fresh = read(stream);
        if (Math.max(known.usage.bytes, known.usage.messages) >= highWater) usage = await fresh;
        else fresh.catch(() => {});
      }
      if (Math.max(usage!.bytes, usage!.messages) >= highWater) {
        throw new CapacityError(usage!, highWater);
      }
    },
    readings: () => [...latest.values()].map((l) => l.usage),
  };
}

function round(n: number): number {
  return Math.round(n * 1000) / 1000;
}
