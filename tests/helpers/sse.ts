/**
 * Reading server-sent events in tests, with eventsource-parser doing the wire format.
 *
 * @module
 */
import { createParser, type EventSourceMessage } from "eventsource-parser";
import { deadline } from "./wait.ts";

/** Reads SSE frames from a response until it ends or `stopAfter` says so. */
export async function readSse(
  res: Response,
  opts: {
    timeoutMs?: number;
    stopAfter?: (e: EventSourceMessage, all: EventSourceMessage[]) => boolean;
  } = {},
): Promise<EventSourceMessage[]> {
  const events: EventSourceMessage[] = [];
  let stop = false;
  const parser = createParser({
    onEvent(e) {
      events.push(e);
      if (opts.stopAfter?.(e, events)) stop = true;
    },
  });
  const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
  const read = (async () => {
    while (!stop) {
      const { value, done } = await reader.read();
      if (done) return;
      parser.feed(value);
    }
    await reader.cancel();
  })();
  try {
    await deadline(read, opts.timeoutMs ?? 10_000, "SSE events");
  } catch (err) {
    await reader.cancel().catch(() => {});
    // What had arrived by the deadline (named when the error is made, not when the read began:
    // the message said "got 0" whatever came).
    const got = events.map((e) => `${e.id ?? "-"} ${e.event ?? "message"}`).join(", ");
    throw new Error(`${(err as Error).message} (got ${events.length}: ${got})`, { cause: err });
  }
  return events;
}

/**
 * An SSE reader of GET /events that reconnects with Last-Event-ID until told to stop; with
 * `await using`, stopped however the test ends (left running, its reconnect timer would be
 * reported as a leak by the next test).
 */
export function resumingClient(url: string) {
  const seqs: number[] = [];
  let reconnects = 0;
  let stopped = false;
  let abort = new AbortController();
  // Stopping cancels the body's reader itself: an aborted signal does not always end a
  // pending read of a streamed body under Deno's fetch.
  let reader: ReadableStreamDefaultReader<string> | undefined;
  const done = (async () => {
    while (!stopped) {
      try {
        const headers: Record<string, string> = {};
        if (seqs.length > 0) headers["Last-Event-ID"] = String(seqs.at(-1));
        const res = await fetch(`${url}/events?replay=true`, { headers, signal: abort.signal });
        if (res.status !== 200) {
          await res.body?.cancel();
          throw new Error(`status ${res.status}`);
        }
        // Only frames that carry a stream sequence count: a frame without an id (a notice
        // such as a slow-client warning) would otherwise resume from Last-Event-ID: NaN.
        const parser = createParser({
          onEvent: (e) => {
            if (e.id !== undefined && /^\d+$/.test(e.id)) seqs.push(Number(e.id));
          },
        });
        reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
        if (stopped) await reader.cancel();
        while (true) {
          const { value, done } = await reader.read();
          if (done) break;
          parser.feed(value);
        }
      } catch { /* gateway gone: reconnect */ }
      if (stopped) break;
      reconnects++;
      await new Promise((r) => setTimeout(r, 100));
    }
  })();
  return {
    seqs,
    get reconnects() {
      return reconnects;
    },
    async stop() {
      stopped = true;
      abort.abort();
      abort = new AbortController();
      await reader?.cancel().catch(() => {});
      await deadline(done, 15_000, "the SSE client to stop");
    },
    /** Stops it (again: stopping twice is harmless), so `await using` leaves no timer. */
    async [Symbol.asyncDispose]() {
      await this.stop();
    },
  };
}
