/**
 * The HTTP load generator of `deno task bench`: a process of its own that POSTs feedback
 * to a running gateway over keep-alive HTTP (Deno's `fetch` keeps and reuses its
 * connections), as `POST /feedback` (one item a request) or `POST /feedback/batch`.
 *
 * Driven by JSON lines on stdin; answers on stdout, one line each:
 * - `{"cmd":"ping"}` -> `pong <now>` (its clock, for the bench to align with its own);
 * - `{"cmd":"throughput","items":N,"window":W,"batch":B}`: N items as fast as the gateway
 *   takes them, with at most W items (W/B requests) awaiting their answer;
 * - `{"cmd":"latency","rate":R,"seconds":S,"batch":B}`: R items/s for S s, one request every
 *   B/R s, paced by the clock and never by answers.
 * For every answered request: `s <time> <id> [<id>...]`, the request's send time (its
 * scheduled time in a latency run) and the accepted ids; then `done <items> <send_ms>`.
 * A request that is not answered 202 ends the process with the answer on stderr.
 *
 * At most CONNECTIONS (64) requests are in flight, so at most that many connections are
 * open; further requests wait in this process (in a latency run, from their scheduled
 * time, so the wait is measured), as with a load generator's fixed connection pool.
 *
 * Usage: `deno run --allow-net=127.0.0.1:PORT bench/http_load.ts http://127.0.0.1:PORT [CONNECTIONS]`
 *
 * @module
 */
import { dueSends } from "./stats.ts";
import { BENCH_TEXTS } from "./texts.ts";

const TEXTS = BENCH_TEXTS;

const encoder = new TextEncoder();
let out: string[] = [];
let flushing = false;

/** Queues a line for stdout; lines go out together once the current work yields. */
function emit(line: string) {
  out.push(line);
  if (flushing) return;
  flushing = true;
  setTimeout(() => {
    flushing = false;
    const text = out.join("\n") + "\n";
    out = [];
    Deno.stdout.writeSync(encoder.encode(text));
  }, 0);
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * At most `connections` requests in flight, so at most that many keep-alive connections
 * (HTTP/1.1 carries one request at a time): the rest wait here, first come first served,
 * and a latency run still counts their wait from their scheduled time.
 */
let connections = 64;
let inFlight = 0;
const waiting: (() => void)[] = [];

async function slot(): Promise<void> {
  if (inFlight < connections) {
    inFlight++;
    return;
  }
  await new Promise<void>((r) => waiting.push(r));
}

function release() {
  const next = waiting.shift();
  if (next) next();
  else inFlight--;
}

/** POSTs `count` items (from item number `first`) and returns their accepted ids. */
async function post(base: string, first: number, count: number, batch: boolean) {
  await slot();
  try {
    return await send(base, first, count, batch);
  } finally {
    release();
  }
}

async function send(base: string, first: number, count: number, batch: boolean) {
  const item = (i: number) => ({ text: TEXTS[i % TEXTS.length]!, channel: "bench" });
  const res = await fetch(batch ? `${base}/feedback/batch` : `${base}/feedback`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(
      batch ? { items: Array.from({ length: count }, (_, k) => item(first + k)) } : item(first),
    ),
  });
  const text = await res.text();
  if (res.status !== 202) {
    Deno.stderr.writeSync(encoder.encode(`POST answered ${res.status}: ${text}\n`));
    Deno.exit(1);
  }
  const body = JSON.parse(text);
  return batch
    ? (body as { items: { id: string }[] }).items.map((x) => x.id)
    : [(body as { id: string }).id];
}

let sent = 0;

async function throughput(base: string, items: number, window: number, batch: number) {
  const start = performance.now();
  const requests = Math.ceil(items / batch);
  const maxInFlight = Math.max(1, Math.floor(window / batch));
  let pending = 0;
  let wake: (() => void) | undefined;
  const all: Promise<void>[] = [];
  for (let r = 0; r < requests; r++) {
    while (pending >= maxInFlight) await new Promise<void>((res) => (wake = res));
    pending++;
    const count = Math.min(batch, items - r * batch);
    const at = performance.now();
    all.push(
      post(base, sent, count, batch > 1).then((ids) => {
        emit(`s ${at} ${ids.join(" ")}`);
        pending--;
        wake?.();
      }),
    );
    sent += count;
  }
  await Promise.all(all);
  emit(`done ${items} ${performance.now() - start}`);
}

async function latency(base: string, rate: number, seconds: number, batch: number) {
  const items = Math.round(rate * seconds);
  const requests = Math.ceil(items / batch);
  const perS = rate / batch;
  const start = performance.now();
  const all: Promise<void>[] = [];
  let r = 0;
  while (r < requests) {
    const due = dueSends(performance.now() - start, perS, requests);
    for (; r < due; r++) {
      const scheduled = start + (r * 1000) / perS;
      const count = Math.min(batch, items - r * batch);
      all.push(
        post(base, sent, count, batch > 1).then((ids) => {
          emit(`s ${scheduled} ${ids.join(" ")}`);
        }),
      );
      sent += count;
    }
    await sleep(1);
  }
  const sendMs = performance.now() - start;
  await Promise.all(all);
  emit(`done ${items} ${sendMs}`);
}

if (import.meta.main) {
  const base = Deno.args[0];
  if (!base) throw new Error("usage: http_load.ts http://HOST:PORT [CONNECTIONS]");
  connections = Number(Deno.args[1] ?? connections);
  const lines = Deno.stdin.readable.pipeThrough(new TextDecoderStream());
  let buf = "";
  for await (const chunk of lines) {
    buf += chunk;
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (line.trim() === "") continue;
      const c = JSON.parse(line);
      // At once, not queued: the bench times the round trip.
      if (c.cmd === "ping") Deno.stdout.writeSync(encoder.encode(`pong ${performance.now()}\n`));
      else if (c.cmd === "throughput") await throughput(base, c.items, c.window, c.batch);
      else if (c.cmd === "latency") await latency(base, c.rate, c.seconds, c.batch);
      else throw new Error(`unknown command ${line}`);
    }
  }
}
