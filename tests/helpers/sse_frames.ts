/**
 * A small SSE client for tests: reads frames from a real HTTP response.
 *
 * @module
 */

/** One server-sent event. */
export interface SseFrame {
  id?: string;
  event?: string;
  data: string;
}

/** Yields the frames of an SSE response body until it ends. */
export async function* sseFrames(body: ReadableStream<Uint8Array>): AsyncGenerator<SseFrame> {
  let buf = "";
  for await (const chunk of body.pipeThrough(new TextDecoderStream())) {
    buf += chunk;
    let end: number;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const frame: SseFrame = { data: "" };
      const data: string[] = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "id") frame.id = value;
        else if (field === "event") frame.event = value;
        else if (field === "data") data.push(value);
      }
      if (data.length === 0 && frame.id === undefined) continue;
      frame.data = data.join("\n");
      yield frame;
    }
  }
}
