/**
 * A definition's `agent` step: a bounded loop of turns in which the agent calls tools
 * (JSON-Schema arguments, checked before the call) and finally answers with a result of its
 * output schema. With an LLM endpoint the model chooses each move through real tool calls
 * (`tools` / `tool_calls` on the wire, tool results sent back as `tool` messages); without
 * one the step's `offline` policy does, deterministically. Every call and the answer are
 * appended to the item's shared scratchpad (KV `weft_<pipeline>_scratchpad`, compare-and-
 * set, each entry once) and carried on the step's event, so the item's state and SSE
 * stream show them.
 *
 * @module
 */
import { Ajv, type ValidateFunction } from "ajv";
import { InvalidArgumentError, type NatsConnection } from "@nats-io/nats-core";
import { JetStreamApiCodes, JetStreamApiError } from "@nats-io/jetstream";
import { type KV, Kvm } from "@nats-io/kv";
import { ConfigError, ErrorCode, ValidationError, WeftError } from "../errors.ts";
import { decodeJson } from "../runner.ts";
import {
  type ChatClient,
  type ChatMessage,
  createChatClient,
  createDeadline,
} from "../ai/llm/client.ts";
import { createOutputValidator } from "../ai/llm/output.ts";
import { type Budget, createBudget } from "../ai/llm/budget.ts";
import { LlmOverBudgetError } from "../ai/llm/errors.ts";
import type { AgentStep, ScratchEntry, StepContext, ToolContext } from "./definition.ts";
import type { LlmStepOptions } from "./llm_step.ts";
import { pipelineBucketOf } from "./derive.ts";
import { lazy } from "../retry.ts";

/** The scratchpad bucket of a pipeline. */
export function scratchpadBucketOf(name: string): string {
  return pipelineBucketOf(name, "scratchpad");
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** JetStream's refusal of a message larger than the stream's maximum message size. */
const MESSAGE_TOO_LARGE = 10054;

/** Another writer changed the entry since it was read (a compare-and-set conflict). */
function isConflict(err: unknown): boolean {
  return err instanceof JetStreamApiError &&
    (err.code === JetStreamApiCodes.StreamWrongLastSequence ||
      err.code === JetStreamApiCodes.StreamWrongLastSequenceUnknown);
}

/** The write is larger than the server takes (its max_payload, or the bucket's limit). */
function isTooLarge(err: unknown): boolean {
  return (err instanceof InvalidArgumentError && /max_payload/.test(err.message)) ||
    (err instanceof JetStreamApiError && err.code === MESSAGE_TOO_LARGE);
}

/**
 * How an append treats entries an earlier attempt of the same run stored (ids starting with
 * `prefix`): an attempt that failed after its append (its event refused, the process gone)
 * left them, though no stored event shows them.
 */
export interface AppendRun {
  /** The run's id prefix, `<input event id>:<step>:`. */
  prefix: string;
  /**
   * Asked only when such entries are stored: true when the earlier attempt's event was never
   * stored, so its entries give way to these; false (its event is stored, and is what the
   * item's history shows) keeps them, as an append of ids already stored always did.
   */
  replaces(): Promise<boolean>;
}

/** An item's scratchpad in KV: read it, append entries once each (compare-and-set). */
export interface Scratchpad {
  read(item: string): Promise<ScratchEntry[]>;
  append(item: string, entries: readonly ScratchEntry[], run?: AppendRun): Promise<void>;
}

const ENTRY_KINDS: ReadonlySet<string> = new Set(["tool_call", "answer", "note"]);

/**
 * The entries of an item's stored scratchpad. Anything else there (not JSON, not a list of
 * entries: written by hand or by a key holder, not by an agent) fails the step for good,
 * naming the key, instead of a parse error retried to exhaustion or a forged shape handed to
 * the next agent.
 */
function scratchEntries(name: string, item: string, text: string): ScratchEntry[] {
  const bad = (why: string): never => {
    throw new WeftError(
      ErrorCode.InvalidScratchpad,
      `the scratchpad of ${name} item ${item} (key ${item} of ${
        scratchpadBucketOf(name)
      }) is not a list of scratchpad entries: ${why}; delete or fix the key, then redrive`,
      { permanent: true },
    );
  };
  let list: unknown;
  try {
    list = JSON.parse(text);
  } catch (err) {
    return bad(`not JSON (${(err as Error).message.slice(0, 120)})`);
  }
  if (!Array.isArray(list)) return bad("not a JSON array");
  list.forEach((e, i) => {
    const entry = e as Partial<ScratchEntry> | null;
    if (
      entry === null || typeof entry !== "object" || Array.isArray(entry) ||
      typeof entry.id !== "string" || typeof entry.step !== "string" ||
      typeof entry.at !== "string" || !ENTRY_KINDS.has(entry.kind as string)
    ) {
      bad(`entry ${i} needs a string id, step and at, and a kind (tool_call, answer, note)`);
    }
  });
  return list as ScratchEntry[];
}

/** The scratchpad of pipeline `name` on `nc`. */
export function openScratchpad(nc: NatsConnection, name: string): Scratchpad {
  const open = lazy(() => new Kvm(nc).open(scratchpadBucketOf(name)));
  const get = async (item: string) => {
    const e = await (await open()).get(item);
    return e && e.operation === "PUT" && e.length > 0
      ? { list: scratchEntries(name, item, e.string()), revision: e.revision }
      : { list: [] as ScratchEntry[], revision: 0 };
  };
  return {
    async read(item) {
      return (await get(item)).list;
    },
    async append(item, entries, run) {
      let replaces: boolean | undefined;
      for (let attempt = 0; attempt < 20; attempt++) {
        const got = await get(item);
        const { revision } = got;
        let list = got.list;
        // One write holds a whole attempt's entries: these are an earlier attempt's, all of them.
        const earlier = run ? list.filter((e) => e.id.startsWith(run.prefix)) : [];
        if (earlier.length > 0) {
          if (JSON.stringify(earlier) === JSON.stringify(entries)) return;
          if (!(replaces ??= await run!.replaces())) return;
          list = list.filter((e) => !e.id.startsWith(run!.prefix));
        }
        const have = new Set(list.map((e) => e.id));
        const fresh = entries.filter((e) => !have.has(e.id));
        if (fresh.length === 0 && list.length === got.list.length) return;
        const body = encoder.encode(JSON.stringify([...list, ...fresh]));
        try {
          if (revision === 0) await (await open()).create(item, body);
          else await (await open()).update(item, body, revision);
          return;
        } catch (err) {
          // Another step of the item appended first: read again. Anything else is no conflict.
          if (isConflict(err)) continue;
          if (isTooLarge(err)) {
            throw new WeftError(
              ErrorCode.PayloadTooLarge,
              `the scratchpad of ${item} would be ${body.length} bytes, too large for the ` +
                `server to store: ${(err as Error).message}`,
              { permanent: true, cause: err },
            );
          }
          throw err;
        }
      }
      throw new WeftError(ErrorCode.HandlerFailed, `the scratchpad of ${item} kept changing`);
    },
  };
}

/** What an agent run produced: its result and the entries it appended. */
export interface AgentOutcome {
  result: unknown;
  notes: ScratchEntry[];
}

/** Runs one agent step for one item. */
export type AgentRunner = (
  value: unknown,
  ctx: StepContext & { eventId: string },
) => Promise<AgentOutcome>;

/**
 * At most this many of one model turn's tool calls are run; each call past them is answered
 * with an error the model can read, and is not run. A model asking for hundreds of calls in
 * one turn (a prompt injected through an item's text can ask for that) would otherwise run
 * every one and grow the item's scratchpad past what one event or KV entry may hold. With
 * `maxTurns`, this bounds an agent step's tool calls.
 */
export const MAX_TOOL_CALLS_PER_TURN = 16;

/**
 * A note records at most this many bytes of a tool call's arguments and of its result (their
 * JSON): a longer one is replaced by `{ cut: true, bytes, head }`, its size and its first
 * bytes. The agent and the model see the whole value; the scratchpad and the step's event
 * keep the cut one, so a turn's calls (at most {@link MAX_TOOL_CALLS_PER_TURN}) cannot grow
 * the item's scratchpad past what one KV entry may hold, whatever the model sends.
 */
export const MAX_NOTE_VALUE_BYTES = 1024;

/** A tool name (the model's, for an unknown tool) recorded up to this many characters. */
const MAX_NOTE_TOOL_CHARS = 64;

/** `value` as a note records it: whole, or cut to {@link MAX_NOTE_VALUE_BYTES}, marked. */
function noted(value: unknown): unknown {
  if (value === undefined) return undefined;
  const bytes = encoder.encode(JSON.stringify(value));
  if (bytes.length <= MAX_NOTE_VALUE_BYTES) return value;
  // A character cut in two at the end is dropped.
  const head = decoder.decode(bytes.subarray(0, MAX_NOTE_VALUE_BYTES)).replace(/\uFFFD$/, "");
  return { cut: true, bytes: bytes.length, head };
}

/** A tool call as a note records it. */
function toolNote(tool: string, args: unknown, result: unknown) {
  return {
    kind: "tool_call" as const,
    tool: tool.length > MAX_NOTE_TOOL_CHARS ? `${tool.slice(0, MAX_NOTE_TOOL_CHARS)}…` : tool,
    args: noted(args),
    result: noted(result),
  };
}

/** Deadline of one model call of an agent without a configured one (as `WEFT_LLM_TIMEOUT_MS`). */
const DEFAULT_LLM_TIMEOUT_MS = 15_000;

/** The agent of step `id`: the LLM when `llm` is given, else its offline policy. */
export function createAgent(
  p: { file: string; def: { name: string } },
  id: string,
  step: AgentStep,
  opts: { nc: NatsConnection; llm?: LlmStepOptions },
): AgentRunner {
  const ajv = new Ajv({ strict: false, allErrors: false });
  const params = new Map<string, ValidateFunction>(
    Object.entries(step.tools).map(([name, t]) => [name, ajv.compile(t.parameters as object)]),
  );
  const checkOutput = ajv.compile(step.output as object);
  // The model's answer is read as an llm step's is: a single code fence is unwrapped first.
  const parseAnswer = createOutputValidator<unknown>({});
  const kvm = new Kvm(opts.nc);
  const buckets = new Map<string, Promise<KV>>();
  let chat: ChatClient | undefined;
  let prompt: Promise<string> | undefined;
  const timeoutMs = opts.llm?.timeoutMs ?? DEFAULT_LLM_TIMEOUT_MS;
  // Its spend limit (WEFT_LLM_BUDGET_USD, shared by the step's service as an llm step's is):
  // past it no request is sent, and the attempt fails with over_budget.
  const configured = opts.llm?.budget;
  const budget: Budget = configured !== undefined && "exceeded" in configured
    ? configured
    : createBudget(configured);
  if (opts.llm) chat = createChatClient({ ...opts.llm });
  else if (!step.offline) {
    throw new ConfigError(
      `pipeline ${p.def.name}, step ${id}: an agent needs an LLM endpoint (WEFT_LLM_BASE_URL) ` +
        `or an offline policy`,
    );
  }

  const toolCtx = (ctx: StepContext): ToolContext => ({
    item: ctx.item,
    input: ctx.input,
    signal: ctx.signal,
    async kv(bucket, key) {
      if (!(step.reads ?? []).includes(bucket)) {
        throw new WeftError(ErrorCode.Forbidden, `step ${id} does not read bucket ${bucket}`);
      }
      let b = buckets.get(bucket);
      if (!b) buckets.set(bucket, b = kvm.open(bucket));
      const e = await (await b).get(key);
      if (!e || e.operation !== "PUT" || e.length === 0) return null;
      // Read as every message is: a number it cannot keep as written is refused, not rounded.
      try {
        return decodeJson(e.value);
      } catch (err) {
        throw new WeftError(ErrorCode.InvalidField, `${bucket} ${key}: ${(err as Error).message}`);
      }
    },
  });

  /** Runs one tool call; a bad call answers with an error the agent can read, as a model's would. */
  async function call(name: string, args: unknown, ctx: StepContext): Promise<unknown> {
    const tool = step.tools[name];
    if (!tool) {
      return { error: `no tool ${name}; the tools are ${Object.keys(step.tools).join(", ")}` };
    }
    const check = params.get(name)!;
    if (!check(args)) {
      const e = check.errors?.[0];
      return { error: `invalid arguments: ${e?.instancePath || "/"} ${e?.message ?? ""}`.trim() };
    }
    if (!tool.run) return { error: `tool ${name} has no implementation` };
    try {
      return await tool.run(args, toolCtx(ctx));
    } catch (err) {
      if (ctx.signal.aborted) throw err;
      return { error: (err as Error).message };
    }
  }

  function final(value: unknown): unknown {
    if (checkOutput(value)) return value;
    const e = checkOutput.errors?.[0];
    throw new ValidationError(
      `agent ${id}'s answer does not match its output schema: ${e?.instancePath || "/"} ${
        e?.message ?? ""
      }`,
      { field: e?.instancePath || "/", permanent: true },
    );
  }

  return async (value, ctx) => {
    const notes: ScratchEntry[] = [];
    const calls: { tool: string; args: unknown; result: unknown }[] = [];
    const at = ctx.now().toISOString();
    const note = (e: Omit<ScratchEntry, "id" | "step" | "at">) =>
      notes.push({ id: `${ctx.eventId}:${id}:${notes.length}`, step: id, at, ...e });
    const done = (result: unknown): AgentOutcome => {
      // The result whole is the step's; its note is bounded like a tool call's.
      note({ kind: "answer", result: noted(result) });
      return { result, notes };
    };
    if (!chat) {
      for (let turn = 1; turn <= step.maxTurns; turn++) {
        const action = await step.offline!({
          value,
          input: ctx.input,
          scratchpad: ctx.scratchpad,
          calls,
          turn,
          runs: ctx.runs,
        });
        if ("final" in action) return done(final(action.final));
        const result = await call(action.call, action.args, ctx);
        calls.push({ tool: action.call, args: action.args, result });
        note(toolNote(action.call, action.args, result));
      }
    } else {
      // A failed read is not kept: the next item reads the file again (as an llm step does).
      prompt ??= Deno.readTextFile(new URL(step.prompt, `file://${p.file}`)).catch((err) => {
        prompt = undefined;
        throw err;
      });
      const schema = JSON.stringify(step.output);
      const messages: ChatMessage[] = [
        {
          role: "system",
          content: `${(await prompt).replaceAll("{{schema}}", schema)}\n\nCall the tools you ` +
            `need. When done, reply with only a JSON object matching this JSON Schema: ${schema}`,
        },
        {
          role: "user",
          content: JSON.stringify({ request: value, input: ctx.input, scratchpad: ctx.scratchpad }),
        },
      ];
      const tools = Object.entries(step.tools).map(([name, t]) => ({
        name,
        description: t.description,
        parameters: t.parameters as Record<string, unknown>,
      }));
      let repaired = false;
      for (let turn = 1; turn <= step.maxTurns; turn++) {
        // Each model call has the LLM timeout (with the step's signal): a hanging model or a
        // Retry-After past it fails this attempt, as an llm step's call does.
        const over = budget.exceeded();
        if (over !== undefined) {
          opts.llm?.stats?.count("over_budget");
          throw new LlmOverBudgetError(`agent ${id} budget exceeded: ${over}`);
        }
        const limit = createDeadline(timeoutMs, ctx.signal);
        let r;
        try {
          r = await chat.complete(messages, {
            tools,
            signal: limit.signal,
            deadline: limit.deadline,
            // Checked again when the request leaves its queue (spent by those before it).
            beforeSend: () => {
              const spent = budget.exceeded();
              if (spent === undefined) return;
              opts.llm?.stats?.count("over_budget");
              throw new LlmOverBudgetError(`agent ${id} budget exceeded: ${spent}`);
            },
          });
        } finally {
          limit.dispose();
        }
        budget.record(r.usage);
        opts.llm?.stats?.count("calls");
        opts.llm?.stats?.addUsage(r.usage);
        if (r.toolCalls && r.toolCalls.length > 0) {
          messages.push({
            role: "assistant",
            content: r.content,
            tool_calls: r.toolCalls.map((c) => ({
              id: c.id,
              type: "function" as const,
              function: { name: c.name, arguments: c.arguments },
            })),
          });
          for (const [k, c] of r.toolCalls.entries()) {
            if (k >= MAX_TOOL_CALLS_PER_TURN) {
              const refused = {
                error: `too many tool calls in one turn: the first ${MAX_TOOL_CALLS_PER_TURN} ` +
                  `were run, this one was not`,
              };
              messages.push({ role: "tool", tool_call_id: c.id, content: JSON.stringify(refused) });
              continue;
            }
            let args: unknown;
            try {
              args = JSON.parse(c.arguments);
            } catch {
              args = undefined;
            }
            const result = args === undefined
              ? { error: "arguments are not JSON" }
              : await call(c.name, args, ctx);
            calls.push({ tool: c.name, args, result });
            note(toolNote(c.name, args, result));
            messages.push({ role: "tool", tool_call_id: c.id, content: JSON.stringify(result) });
          }
          continue;
        }
        const answer = parseAnswer(r.content);
        if (answer.ok && checkOutput(answer.value)) return done(answer.value);
        if (!repaired) {
          // One repair request, as an llm step makes: the bad answer and what is wrong with it.
          // It is not counted as a turn (the model may still call tools after it).
          repaired = true;
          const e = checkOutput.errors?.[0];
          const error = answer.ok
            ? `does not match the schema: ${e?.instancePath || "/"} ${e?.message ?? ""}`.trim()
            : answer.error;
          messages.push(
            { role: "assistant", content: r.content },
            {
              role: "user",
              content: `Your previous reply is invalid: ${error}. Reply again with only the ` +
                `corrected JSON object, matching this JSON Schema: ${schema}`,
            },
          );
          turn--;
          continue;
        }
        if (!answer.ok) {
          throw new WeftError(ErrorCode.HandlerFailed, `agent ${id} answered with no JSON object`);
        }
        return done(final(answer.value));
      }
    }
    throw new WeftError(
      ErrorCode.LoopLimit,
      `agent ${id} used its ${step.maxTurns} turns without an answer`,
    );
  };
}
