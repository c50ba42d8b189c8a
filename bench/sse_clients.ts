/**
 * The SSE clients of `deno task bench:sse`, in a process of their own so that reading
 * 2,000 streams never delays the bench's POST timings: opens `--clients` streams on
 * `--url` (a third reading, a third reading one chunk a second, a third raw sockets that
 * never read), prints `opened N` once all are open, and when its stdin closes prints the
 * reading clients' delivery lags (event time to receipt, ms) and how long each fetching
 * client waited for its response headers (ms, from the start of the storm) as one JSON
 * line, and exits.
 *
 * @module
 */
import { parseArgs } from "node:util";

const args = parseArgs({
  args: Deno.args,
  options: { url: { type: "string" }, clients: { type: "string", default: "2000" } },
});
const base = args.values.url!;
const CLIENTS = Number(args.values.clients);
const { hostname, port } = new URL(base);
const encoder = new TextEncoder();
const out = (line: string) => Deno.stdout.writeSync(encoder.encode(line + "\n"));

const lags: number[] = [];
const opens: number[] = [];
const stormStart = performance.now();
const aborts = new AbortController();
const sockets: Deno.Conn[] = [];
let opened = 0;
const opening: Promise<void>[] = [];
for (let i = 0; i < CLIENTS; i++) {
  const kind = i % 3;
  if (kind === 2) {
    const conn = await Deno.connect({ hostname, port: Number(port) });
    await conn.write(encoder.encode(
      "GET /events HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n",
    ));
    sockets.push(conn);
    opened++;
    continue;
  }
  opening.push(
    fetch(`${base}/events`, { signal: aborts.signal }).then((res) => {
      opened++;
      opens.push(performance.now() - stormStart);
      const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
      (async () => {
        let buf = "";
        while (true) {
          if (kind === 1) await new Promise((r) => setTimeout(r, 1000));
          const { value, done } = await reader.read();
          if (done) return;
          buf += value;
          let at;
          while ((at = buf.indexOf("\n\n")) >= 0) {
            const frame = buf.slice(0, at);
            buf = buf.slice(at + 2);
            // The event's time, without parsing the whole event.
            const time = /"time":"([^"]+)"/.exec(frame)?.[1];
            if (time && kind === 0) lags.push(Date.now() - Date.parse(time));
          }
        }
      })().catch(() => {});
    }).catch(() => {}),
  );
}
await Promise.all(opening);
out(`opened ${opened}`);
for await (const _ of Deno.stdin.readable) { /* wait for the end of stdin */ }
out(JSON.stringify({ lags, opens }));
aborts.abort();
for (const s of sockets) s.close();
Deno.exit(0);
