/**
 * A real local OpenAI-compatible chat-completions server for tests: Deno.serve on
 * 127.0.0.1, port 0, answering from a script (normal answers with usage, error bodies,
 * 429 + Retry-After, slow or hanging answers, raw bodies) and recording every request.
 *
 * @module
 */

/**
 * One scripted answer.
 *
 * @example
 * ```ts
 * import type { FakeReply } from "./openai_server.ts";
 * const r: FakeReply = { kind: "chat", content: '{"label":"positive","score":0.9}' };
 * ```
 */
export type FakeReply =
  | {
    kind: "chat";
    content: string;
    usage?: { prompt_tokens: number; completion_tokens: number; total_tokens?: number };
    delayMs?: number;
  }
  | {
    kind: "error";
    status: number;
    message: string;
    type?: string;
    code?: string | null;
    headers?: Record<string, string>;
  }
  | { kind: "raw"; status: number; body: string; headers?: Record<string, string> }
  /** The assistant calls tools (OpenAI's `tool_calls`, `finish_reason: "tool_calls"`). */
  | { kind: "tool_calls"; calls: { name: string; arguments: unknown }[] }
  | { kind: "hang" };

/**
 * A request the server got.
 *
 * @example
 * ```ts
 * import type { RecordedRequest } from "./openai_server.ts";
 * declare const r: RecordedRequest;
 * r.body.messages.at(-1)?.content;
 * ```
 */
export interface RecordedRequest {
  /** HTTP method. */
  method: string;
  /** URL path. */
  path: string;
  /** Authorization header, verbatim. */
  authorization: string | null;
  /** Content-Type header. */
  contentType: string | null;
  /** Parsed JSON body. */
  body: {
    model: string;
    messages: {
      role: string;
      content: string;
      tool_calls?: { id: string; function: { name: string; arguments: string } }[];
      tool_call_id?: string;
    }[];
    temperature?: number;
    response_format?: { type: string };
    tools?: {
      type: string;
      function: { name: string; description: string; parameters: unknown };
    }[];
    tool_choice?: string;
  };
}

/**
 * A running fake server.
 *
 * @example
 * ```ts
 * import { startFakeOpenAI } from "./openai_server.ts";
 * const server = startFakeOpenAI([{ kind: "chat", content: "{}" }]);
 * server.baseUrl; // "http://127.0.0.1:<port>/v1"
 * await server.close();
 * ```
 */
export interface FakeOpenAI {
  /** `http://127.0.0.1:<port>/v1`. */
  baseUrl: string;
  /** Requests in arrival order. */
  requests: RecordedRequest[];
  /** Most requests being handled at the same time. */
  readonly maxInFlight: number;
  /** Stops the server; hanging and delayed answers are cut short. */
  close(): Promise<void>;
}

/**
 * Script: replies used in order, or a function of the request and its index.
 *
 * @example
 * ```ts
 * import type { FakeScript } from "./openai_server.ts";
 * const s: FakeScript = (_req, i) => ({ kind: "chat", content: `{"n":${i}}` });
 * ```
 */
export type FakeScript =
  | FakeReply[]
  | ((req: RecordedRequest, index: number) => FakeReply | Promise<FakeReply>);

/**
 * A normal chat answer with `content` and usage.
 *
 * @example
 * ```ts
 * import { chat } from "./openai_server.ts";
 * chat({ label: "neutral", score: 0 });
 * ```
 */
export function chat(
  content: unknown,
  usage = { prompt_tokens: 100, completion_tokens: 20 },
  delayMs?: number,
): FakeReply {
  return {
    kind: "chat",
    content: typeof content === "string" ? content : JSON.stringify(content),
    usage,
    delayMs,
  };
}

/**
 * Starts the server.
 *
 * @example
 * ```ts
 * import { chat, startFakeOpenAI } from "./openai_server.ts";
 * const server = startFakeOpenAI([chat({ label: "positive", score: 1 })]);
 * await server.close();
 * ```
 */
export function startFakeOpenAI(script: FakeScript): FakeOpenAI {
  const requests: RecordedRequest[] = [];
  const stop = new AbortController();
  let inFlight = 0;
  let maxInFlight = 0;

  // Waits are cut short by close() only: request.signal is not used, as Deno.serve's
  // legacy request.signal also fires on successful responses and warns about it.
  const wait = (ms: number) =>
    new Promise<boolean>((resolve) => {
      const all = stop.signal;
      if (all.aborted) return resolve(false);
      const onAbort = () => {
        clearTimeout(timer);
        resolve(false);
      };
      const timer = ms === Infinity ? undefined : setTimeout(() => {
        all.removeEventListener("abort", onAbort);
        resolve(true);
      }, ms);
      all.addEventListener("abort", onAbort, { once: true });
    });

  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    async (req) => {
      inFlight++;
      maxInFlight = Math.max(maxInFlight, inFlight);
      try {
        const url = new URL(req.url);
        const recorded: RecordedRequest = {
          method: req.method,
          path: url.pathname,
          authorization: req.headers.get("authorization"),
          contentType: req.headers.get("content-type"),
          body: await req.json(),
        };
        const index = requests.length;
        requests.push(recorded);
        const reply: FakeReply | undefined = typeof script === "function"
          ? await script(recorded, index)
          : script[index];
        if (reply === undefined) {
          return errorResponse(500, "no scripted reply", "server_error", null, {});
        }
        switch (reply.kind) {
          case "chat": {
            if (reply.delayMs !== undefined && !(await wait(reply.delayMs))) {
              return new Response(null, { status: 499 });
            }
            const u = reply.usage;
            return Response.json({
              id: `chatcmpl-${index}`,
              object: "chat.completion",
              created: 0,
              model: recorded.body.model,
              choices: [{
                index: 0,
                message: { role: "assistant", content: reply.content },
                finish_reason: "stop",
              }],
              ...(u
                ? {
                  usage: {
                    prompt_tokens: u.prompt_tokens,
                    completion_tokens: u.completion_tokens,
                    total_tokens: u.total_tokens ?? u.prompt_tokens + u.completion_tokens,
                  },
                }
                : {}),
            });
          }
          case "error":
            return errorResponse(
              reply.status,
              reply.message,
              reply.type ?? "invalid_request_error",
              reply.code ?? null,
              reply.headers ?? {},
            );
          case "raw":
            return new Response(reply.body, {
              status: reply.status,
              headers: { "content-type": "application/json", ...reply.headers },
            });
          case "tool_calls":
            return Response.json({
              id: `chatcmpl-${index}`,
              object: "chat.completion",
              created: 0,
              model: recorded.body.model,
              choices: [{
                index: 0,
                message: {
                  role: "assistant",
                  content: null,
                  tool_calls: reply.calls.map((c, i) => ({
                    id: `call_${index}_${i}`,
                    type: "function",
                    function: { name: c.name, arguments: JSON.stringify(c.arguments) },
                  })),
                },
                finish_reason: "tool_calls",
              }],
              usage: { prompt_tokens: 50, completion_tokens: 10, total_tokens: 60 },
            });
          case "hang":
            await wait(Infinity);
            return new Response(null, { status: 499 });
        }
      } finally {
        inFlight--;
      }
    },
  );
  const { port } = server.addr as Deno.NetAddr;
  return {
    baseUrl: `http://127.0.0.1:${port}/v1`,
    requests,
    get maxInFlight() {
      return maxInFlight;
    },
    async close() {
      stop.abort();
      await server.shutdown();
    },
  };
}

function errorResponse(
  status: number,
  message: string,
  type: string,
  code: string | null,
  headers: Record<string, string>,
): Response {
  return Response.json({ error: { message, type, code, param: null } }, { status, headers });
}
