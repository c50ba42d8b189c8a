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
    await deadline(read, opts.timeoutMs ?? 10_000, `SSE events (got ${events.length})`);
  } catch (err) {
    await reader.cancel().catch(() => {});
    throw err;
  }
  return events;
}
