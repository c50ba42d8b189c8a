/**
 * Server-sent event frames as an async stream, for tests that must see each frame as it
 * arrives (e.g. to resume with Last-Event-ID after a gateway dies mid-stream).
 * eventsource-parser does the wire format.
 *
 * @module
 */
import { createParser, type EventSourceMessage } from "eventsource-parser";

/** Yields the frames of an SSE response body until it ends (or throws when it breaks). */
export async function* sseFrames(
  body: ReadableStream<Uint8Array>,
): AsyncGenerator<EventSourceMessage> {
  const pending: EventSourceMessage[] = [];
  const parser = createParser({ onEvent: (e) => pending.push(e) });
  for await (const chunk of body.pipeThrough(new TextDecoderStream())) {
    parser.feed(chunk);
    while (pending.length > 0) yield pending.shift()!;
  }
}
