/**
 * Server-sent event streams of feedback events, replayed from JetStream and then live.
 *
 * Each stream reads an ordered consumer that pulls only as the client takes frames, so
 * a slow client holds at most one small buffer and never the pipeline: its durable
 * consumers are untouched. A client that cannot take a frame within the write timeout is
 * dropped; it resumes with Last-Event-ID (event ids are stream sequences) and misses
 * nothing. When the stream ends, its server-side consumer is deleted.
 *
 * @module
 */
import type { Context } from "hono";
import { streamSSE } from "hono/streaming";
import { DeliverPolicy, type JetStreamClient } from "@nats-io/jetstream";
import type { Config } from "../config.ts";
import type { Logger } from "../log.ts";
import { FEEDBACK_STREAM, FINAL_EVENT_TYPES } from "../subjects.ts";

/** What to stream. */
export interface SseSelection {
  /** Subject filter, e.g. `feedback.*.ID` or `feedback.*.*`. */
  filter: string;
  /** Close after an item's final event (per-item streams). */
  closeOnFinal: boolean;
  /** Without Last-Event-ID: replay everything (true) or start with new events (false). */
  replay: boolean;
  /**
   * Where a replay starts: the item's first event's stream sequence. Without it a replay
   * reads the stream from its first message, which on nats-server 2.9 with a wildcard
   * filter means matching every message the stream holds, under its locks.
   */
  from?: number;
  /** The stream to read; defaults to FEEDBACK. */
  stream?: string;
  /** The event types that end a per-item stream; defaults to the feedback ones. */
  finalTypes?: ReadonlySet<string>;
}

/** Counts open SSE clients against the configured maximum. */
export class SseClients {
  #open = 0;
  constructor(readonly max: number) {}
  get open(): number {
    return this.#open;
  }
  tryOpen(): boolean {
    if (this.#open >= this.max) return false;
    this.#open++;
    return true;
  }
  close(): void {
    this.#open--;
  }
}

const decoder = new TextDecoder();

/** The stream sequence to resume after, from a Last-Event-ID header. */
export function resumeAfter(lastEventId: string | undefined): number | undefined {
  if (lastEventId === undefined) return undefined;
  const n = Number(lastEventId.trim());
  return Number.isSafeInteger(n) && n >= 0 ? n : undefined;
}

/** Streams events matching `sel` to the client as SSE. */
export function streamEvents(
  c: Context,
  js: JetStreamClient,
  sel: SseSelection,
  opts: {
    config: Pick<Config, "sseKeepAliveMs" | "sseWriteTimeoutMs">;
    clients: SseClients;
    log: Logger;
  },
): Response {
  const after = resumeAfter(c.req.header("Last-Event-ID"));
  return streamSSE(c, async (stream) => {
    let messages:
      | Awaited<ReturnType<Awaited<ReturnType<typeof js.consumers.get>>["consume"]>>
      | undefined;
    let keepAlive: ReturnType<typeof setInterval> | undefined;
    let consumer: Awaited<ReturnType<typeof js.consumers.get>> | undefined;
    try {
      consumer = await js.consumers.get(sel.stream ?? FEEDBACK_STREAM, {
        filter_subjects: sel.filter,
        ...(after !== undefined
          ? { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: after + 1 }
          : sel.replay && sel.from !== undefined
          ? { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: sel.from }
          : { deliver_policy: sel.replay ? DeliverPolicy.All : DeliverPolicy.New }),
      });
      const msgs = messages = await consumer.consume({ max_messages: 64 });
      if (stream.aborted) return;
      stream.onAbort(() => {
        msgs.stop();
      });
      keepAlive = setInterval(() => {
        stream.write(": ping\n\n").catch(() => msgs.stop());
      }, opts.config.sseKeepAliveMs);
      for await (const m of msgs) {
        const text = decoder.decode(m.data);
        const type = m.headers?.get("Weft-Event-Type") || typeOfSubject(m.subject);
        let timer: ReturnType<typeof setTimeout> | undefined;
        const timedOut = new Promise<"timeout">((r) => {
          timer = setTimeout(() => r("timeout"), opts.config.sseWriteTimeoutMs);
        });
        const outcome = await Promise.race([
          stream.writeSSE({ id: String(m.seq), event: type, data: text }).then(() => "ok"),
          timedOut,
        ]);
        clearTimeout(timer);
        if (outcome === "timeout") {
          opts.log.warn("sse client too slow: dropped", { filter: sel.filter, seq: m.seq });
          break;
        }
        // Close at a final event only when nothing follows it: a redriven item's replay
        // goes past its earlier failure to the outcome of the new attempt.
        if (
          sel.closeOnFinal && (sel.finalTypes ?? FINAL_EVENT_TYPES).has(type) &&
          m.info.pending === 0
        ) break;
      }
    } finally {
      clearInterval(keepAlive);
      messages?.stop();
      // nats.js leaves an ordered consumer on the server for 5 minutes after stop():
      // delete it, or every reconnecting client would leave one behind.
      await consumer?.delete().catch(() => {});
      opts.clients.close();
    }
  }, async (err, stream) => {
    opts.log.error("sse stream failed", { err });
    await stream.writeSSE({ event: "error", data: JSON.stringify({ error: "stream failed" }) })
      .catch(() => {});
  });
}

function typeOfSubject(subject: string): string {
  const parts = subject.split(".");
  return parts.length === 3 ? `${parts[0]}.${parts[1]}` : subject;
}
