/**
 * Capacity: nothing accepted is ever discarded to make room. Every stream that holds work
 * refuses new messages when full (discard-new, see topology.ts), and intake stops
 * accepting new items earlier, at a high-water mark of the stream's limits, so items
 * already accepted keep room for the events of their remaining steps. An alert (a log
 * line, and the usage gauges in /metrics) fires well before that.
 *
 * The guard reads stream info (cheap: never consumer info) at most once per refresh
 * interval, shared by every request, and answers from that reading plus what it admitted
 * since: each admission counts as much as the stream grew per admission between its last
 * two readings (at least one message of the stream's average size), so a fast fill cannot
 * outrun a reading up to a second old. Far from the mark a request never waits on a reading
 * once one exists; from the alert level on (by that estimate), a reading older than
 * `nearMs` (50 ms) is refreshed before the answer, one stream-info request shared by every
 * request waiting on it; and an estimate past the mark is confirmed by a reading before a
 * refusal.
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
        `can finish); retry later, or grow the stream (${limitSetting(usage.stream)})`,
      // Written for the client: how full, and that a retry later is the answer.
      { retryAfterSeconds, shown: true },
    );
    this.name = "CapacityError";
  }
}

/** The setting that limits `stream`: an object store's (`OBJ_<name>`) or an event stream's. */
function limitSetting(stream: string): string {
  return stream.startsWith("OBJ_") ? "WEFT_OBJECT_STORE_MAX_BYTES" : "WEFT_STREAM_MAX_BYTES";
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
    `stream ${stream} is full; retry later, or grow the stream (${limitSetting(stream)})`,
    { cause, retryAfterSeconds: 30, shown: true },
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
  /**
   * From the alert level on, how old a reading may be before a check waits for a fresh one,
   * ms. Default 50.
   */
  nearMs?: number;
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
  const nearMs = Math.min(refreshMs, opts.nearMs ?? 50);
  const streams = new Map<string, Watched>();

  function read(stream: string, w: Watched): Promise<Reading> {
    if (w.pending) return w.pending;
    // Admissions from here on may publish after the server answers: they count on top.
    const admittedAt = w.admitted;
    const p = jsm.streams.info(stream).then((info) => {
      const usage = usageOf(info);
      const prev = w.reading;
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
      const reading: Reading = {
        usage,
        at: Date.now(),
        alerted,
        admittedAt,
        perAdmission: perAdmission(info, usage, prev, admittedAt),
      };
      w.reading = reading;
      return reading;
    }).finally(() => (w.pending = undefined));
    w.pending = p;
    return p;
  }

  return {
    async check(stream) {
      let w = streams.get(stream);
      if (!w) streams.set(stream, w = { admitted: 0 });
      let reading = w.reading;
      if (!reading) reading = await read(stream, w);
      else {
        const near = estimate(reading, w.admitted) >= alertAt;
        if (Date.now() - reading.at > (near ? nearMs : refreshMs)) {
          // Near or past the mark, answer from a fresh reading (so a drained stream accepts
          // again at once); far from it, answer from this one and refresh for the next.
          const fresh = read(stream, w);
          if (near) reading = await fresh;
          else fresh.catch(() => {});
        }
      }
      let ratio = estimate(reading, w.admitted);
      if (ratio >= highWater && w.admitted > reading.admittedAt) {
        // Past the mark by the estimate alone: a reading confirms it before a refusal.
        reading = await read(stream, w);
        ratio = estimate(reading, w.admitted);
      }
      if (ratio >= highWater) {
        throw new CapacityError({ ...reading.usage, bytes: ratio }, highWater);
      }
      w.admitted++;
    },
    readings: () => [...streams.values()].flatMap((w) => w.reading ? [w.reading.usage] : []),
  };
}

/** A stream the guard answers for: its latest reading and what it admitted. */
interface Watched {
  /** Admissions so far (a batch is one). */
  admitted: number;
  reading?: Reading;
  pending?: Promise<Reading>;
}

/** One stream-info reading. */
interface Reading {
  usage: StreamUsage;
  /** When it was answered (ms since the epoch). */
  at: number;
  /** Whether the "nearly full" warning is out. */
  alerted: boolean;
  /** {@link Watched.admitted} when it was asked for. */
  admittedAt: number;
  /** What one admission adds, as ratios of the limits. */
  perAdmission: { bytes: number; messages: number };
}

/** Bytes an admission is taken to add to a stream that holds nothing yet. */
const FIRST_ADMISSION_BYTES = 1024;

/**
 * What one admission adds to the stream, as ratios of its limits: how much it grew per
 * admission since the previous reading (an item's later events included), at least one
 * message of its average size.
 */
function perAdmission(
  info: StreamInfo,
  usage: StreamUsage,
  prev: Reading | undefined,
  admittedAt: number,
): { bytes: number; messages: number } {
  const { config, state } = info;
  let bytes = config.max_bytes > 0
    ? (state.messages > 0 ? state.bytes / state.messages : FIRST_ADMISSION_BYTES) /
      config.max_bytes
    : 0;
  let messages = config.max_msgs > 0 ? 1 / config.max_msgs : 0;
  const admissions = prev ? admittedAt - prev.admittedAt : 0;
  if (prev && admissions > 0) {
    bytes = Math.max(bytes, (usage.bytes - prev.usage.bytes) / admissions);
    messages = Math.max(messages, (usage.messages - prev.usage.messages) / admissions);
  }
  return { bytes, messages };
}

/** The usage ratio `reading` and the admissions since it make. */
function estimate(reading: Reading, admitted: number): number {
  const since = admitted - reading.admittedAt;
  return Math.max(
    reading.usage.bytes + since * reading.perAdmission.bytes,
    reading.usage.messages + since * reading.perAdmission.messages,
  );
}

function round(n: number): number {
  return Math.round(n * 1000) / 1000;
}
