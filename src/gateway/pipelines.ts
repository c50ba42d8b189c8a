/**
 * HTTP routes and request subjects of the pipelines loaded from definitions, all derived
 * from each definition: submit one item or a batch, read an item's state, stream its events
 * (SSE, resumable with Last-Event-ID), stream all events, deliver an awaited event (a human
 * decision, a callback), and `nats req weft.<name>.submit|get`.
 *
 * @module
 */
import { SHIPPED_PIPELINES } from "../../pipelines/shipped.ts";
import { type Context, Hono, type MiddlewareHandler } from "hono";
import type { Msg, NatsConnection } from "@nats-io/nats-core";
import {
  jetstream,
  type JetStreamClient,
  type JetStreamManager,
  jetstreamManager,
} from "@nats-io/jetstream";
import { type KV, Kvm } from "@nats-io/kv";
import { ulid } from "ulid";
import type { Config } from "../config.ts";
import { type CapacityGuard, isStreamFull, type ItemEvents, streamFullError } from "../capacity.ts";
import { ANONYMOUS_NAME, Role } from "../config.ts";
import {
  ConflictError,
  ErrorCode,
  isOutcomeUnknown,
  NotFoundError,
  OutcomeUnknownError,
  ValidationError,
  WeftError,
} from "../errors.ts";
import { canonicalJson } from "../canonical_json.ts";
import pLimit from "p-limit";
import { allowsAtomicBatch, ATOMIC_BATCHES_IN_FLIGHT, storeBatch } from "../atomic_batch.ts";
import type { OutputEvent } from "../stage.ts";
import { deterministicId, sha256Hex } from "../events.ts";
import type { Logger } from "../observability/log.ts";
import { depthWithin, eventMessage, MAX_DEPTH } from "../runner.ts";
import { readStream } from "../stream_reader.ts";
import { ITEM_ID } from "../subjects.ts";
import type { StateSpec } from "../state_writer.ts";
import type { ItemState } from "../pipeline/fold.ts";
import { childContext, parseTraceparent } from "../observability/trace.ts";
import { activeTraceContext } from "../observability/telemetry.ts";
import { pipelineGraph, pipelineSubjects } from "../pipeline/derive.ts";
import { checkAwaitedEvent, decodeFlowEvent, entryEvent, FAILED } from "../pipeline/flow.ts";
import { eventOf } from "../pipeline/validate.ts";
import { type Claim, type Claims, claimsBucketOf, createClaims } from "../pipeline/claims.ts";
import {
  checkInput,
  controlBucketOf,
  hasWaits,
  itemEntryEvent,
  type LoadedPipeline,
  pipelineStateSpec,
  readItem,
  stateBucketOf,
  submitItem,
} from "../pipeline/runtime.ts";
import { type LiveFeeds, openSlot, type SseClients, streamEvents } from "./sse.ts";
import { boolQuery, intQuery, oneQuery, onlyQuery } from "./query.ts";
import { bodyLimitProblem, readJson, requireJson } from "./app.ts";
import { DEFAULT_BODY_LIMIT, maxPayloadOf, replyTo, requestJson } from "./requests.ts";
import type { Auth } from "./auth.ts";
import type { IngestLimiter } from "./ingest_limits.ts";
import { lazy } from "../retry.ts";
import { idempotencyKey } from "./idempotency_key.ts";

/**
 * What guards intake into a definition's stream, as it guards a hand-wired one's: per-key rate
 * limits and quotas (429) and the stream's high-water mark (507).
 */
export interface IntakeGuards {
  capacity?: CapacityGuard;
  limiter?: IngestLimiter;
  /** Told of new items accepted (stored now, not replayed), by pipeline name. */
  onAccepted?: (pipeline: string, count: number) => void;
}

/** A caller, for per-key limits. */
type Who = { name: string; role: string };
/** With auth off, every caller is one anonymous admin. */
const ANONYMOUS: Who = { name: ANONYMOUS_NAME, role: Role.Admin };

/** What the routes need from the gateway. */
export interface PipelineRouteDeps {
  nc: NatsConnection;
  pipelines: readonly LoadedPipeline[];
  config: Config;
  log: Logger;
  clients: SseClients;
  feeds: LiveFeeds;
  /** Submitting items. */
  ingestAuth: MiddlewareHandler;
  /** Reading items and their events. */
  readAuth: MiddlewareHandler;
  /** Delivering an awaited event (a decision). */
  decideAuth: MiddlewareHandler;
  /** Rate limits, quotas and stream capacity at intake. */
  guards?: IntakeGuards;
}

interface Runtime {
  p: LoadedPipeline;
  stream: string;
  states: () => Promise<KV>;
  /** Reviewers' claims on its waiting items: a pipeline with waits only. */
  claims?: () => Promise<Claims>;
  finals: Set<string>;
  awaited: Set<string>;
  /** The state writer's spec: what a per-item stream folds to tell forged ends. */
  stateSpec: StateSpec<ItemState>;
}

/**
 * Who a reviewer's claim or decision is recorded as: the API key's holder, or, with
 * authentication off (every caller `anonymous`), the name given (`by`), required for a claim.
 * `field` names where `by` came from in a problem: `/by` in a body, `by` as a query parameter.
 */
function reviewerOf(who: Who, by: unknown, required: boolean, field = "/by"): string {
  if (by !== undefined && (typeof by !== "string" || !/^[\w .@-]{1,64}$/.test(by))) {
    throw new ValidationError(
      `${field} must be a name of 1 to 64 letters, digits, _ . @ - or spaces`,
      { field },
    );
  }
  if (who.name !== ANONYMOUS.name) {
    if (by !== undefined && by !== who.name) {
      throw new WeftError(ErrorCode.Forbidden, `this key belongs to ${who.name}, not ${by}`, {
        field,
      });
    }
    return who.name;
  }
  if (by === undefined && required) {
    throw new ValidationError(`${field} is required (who claims: authentication is off)`, {
      field,
    });
  }
  return (by as string | undefined) ?? ANONYMOUS.name;
}

/**
 * An awaited event's body as it is published, checked by `check` (the wait's schema). With
 * authentication on, its `by` is the caller's: a `by` naming anyone else is a 403 naming
 * `/by` (as a claim's is), and a body without one is recorded with the caller's name where the
 * wait's schema has room for it. With authentication off (every caller `anonymous`), the body
 * as given.
 */
function decidedBy(
  who: Who,
  body: Record<string, unknown>,
  check: (body: unknown) => void,
): Record<string, unknown> {
  const keyed = who.name !== ANONYMOUS.name;
  if (keyed && body.by !== undefined && body.by !== who.name) {
    throw new WeftError(
      ErrorCode.Forbidden,
      `this key belongs to ${who.name}, not ${JSON.stringify(body.by).slice(0, 100)}`,
      { field: "/by" },
    );
  }
  check(body);
  if (!keyed || body.by !== undefined) return body;
  const stamped = { ...body, by: who.name };
  try {
    check(stamped);
    return stamped;
  } catch {
    return body; // the schema has no room for `by` (additionalProperties, another type)
  }
}

/** A claim's body: an object with at most `by` (and, over NATS, `id`); 422 naming another. */
function claimBody(raw: unknown, allowed: readonly string[]): { id?: unknown; by?: unknown } {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    throw new ValidationError("the body must be a JSON object", { field: "/" });
  }
  for (const k of Object.keys(raw)) {
    if (!allowed.includes(k)) {
      throw new ValidationError(`/${k} is not a field of a claim (${allowed.join(", ")})`, {
        field: `/${k}`,
      });
    }
  }
  return raw as { id?: unknown; by?: unknown };
}

const encoder = new TextEncoder();
/** Most items in one batch submission. */
const BATCH_MAX_ITEMS = 1000;
/** Most items a waiting list shows (`limit`), and how many when it names none. */
const WAITING_MAX = 1000;
const WAITING_DEFAULT = 100;

/**
 * A `weft.<name>.waiting` request: empty, or a JSON object taking what
 * `GET /pipelines/<name>/waiting` takes, `limit` (an integer from 1 to 1000; 100 when absent).
 * Anything else is 422 naming the field, as a misspelt query parameter is over HTTP.
 */
function waitingRequest(data: Uint8Array): { limit: number } {
  if (new TextDecoder().decode(data).trim() === "") return { limit: WAITING_DEFAULT };
  const body = requestJson(data, CLAIM_BODY_LIMIT);
  if (body === null || typeof body !== "object" || Array.isArray(body)) {
    throw new ValidationError('the body must be empty or a JSON object ({"limit": N})', {
      field: "/",
    });
  }
  for (const k of Object.keys(body)) {
    if (k !== "limit") {
      throw new ValidationError(`/${k} is not a parameter of the waiting list (limit)`, {
        field: `/${k}`,
      });
    }
  }
  const { limit } = body as { limit?: unknown };
  if (limit === undefined) return { limit: WAITING_DEFAULT };
  if (
    typeof limit !== "number" || !Number.isSafeInteger(limit) || limit < 1 || limit > WAITING_MAX
  ) {
    throw new ValidationError(`/limit must be an integer from 1 to ${WAITING_MAX}`, {
      field: "/limit",
    });
  }
  return { limit };
}

/** Largest body of a claim or its release, bytes (HTTP and NATS). */
const CLAIM_BODY_LIMIT = 4096;

/**
 * The id of a new item: from the caller's Idempotency-Key when given (a repeat is the same
 * item; each API key holder's keys are its own, so two callers who pick one key do not share
 * items).
 */
function newId(name: string, key: string | undefined, caller: string): string {
  if (key === undefined) return ulid();
  if (key.length === 0 || key.length > 256) {
    throw new ValidationError("Idempotency-Key must be 1 to 256 characters", {
      field: "Idempotency-Key",
    });
  }
  return deterministicId(name, "idempotency", caller, key).slice(0, 26);
}

/**
 * How the capacity guard follows `p`'s items on `nc` (see {@link CapacityGuard.track}): every
 * event `<name>.<event>.<item>` of its flow, an item ending with an end step's event or
 * `failed`; until one has ended, an item is taken to store an event per step plus its entry.
 */
export function itemEventsOf(p: LoadedPipeline, nc: NatsConnection): ItemEvents {
  const prefix = `${p.def.name}.`;
  return {
    nc,
    subject: `${prefix}>`,
    itemOf(subject) {
      if (!subject.startsWith(prefix)) return undefined;
      const dot = subject.indexOf(".", prefix.length);
      if (dot < 0) return undefined;
      const role = p.flow.roles.get(subject.slice(prefix.length, dot));
      if (!role) return undefined;
      return {
        item: subject.slice(dot + 1),
        entry: role.role === "entry",
        end: role.role === "end" || role.role === "failed",
      };
    },
    eventsPerItem: Object.keys(p.def.steps).length + 1,
  };
}

/** Has `capacity` reserve room for the items in flight of every pipeline of `loaded`. */
export async function trackItems(
  capacity: CapacityGuard,
  loaded: readonly LoadedPipeline[],
  nc: NatsConnection,
): Promise<void> {
  for (const p of loaded) {
    await capacity.track(pipelineSubjects(p.def).stream, itemEventsOf(p, nc));
  }
}

/**
 * Submits `items` of `p`, after the intake guards: the caller's rate and quota, each input
 * checked, a reused Idempotency-Key's items compared, then the stream's capacity. A stream
 * that refuses a publish for being full answers 507, like every intake. Several items go as
 * one atomic batch where the stream takes them (nats-server 2.14+): all stored, or none.
 */
async function admit(
  nc: NatsConnection,
  p: LoadedPipeline,
  guards: IntakeGuards | undefined,
  who: Who,
  items: readonly { id: string; input: unknown }[],
  traceId: string,
  keyed = false,
): Promise<{ replayed: boolean }> {
  const stream = pipelineSubjects(p.def).stream;
  guards?.limiter?.take(who, items.length);
  for (const { input } of items) checkInput(p.flow, input); // a bad input is told as such first
  // An Idempotency-Key names its items: a repeat with the same input (whatever its key
  // order) is the same items, one with another input is refused before anything is stored.
  const known = keyed ? await storedInputs(nc, p, items.map((i) => i.id)) : new Map();
  for (const { id, input } of items) if (known.has(id)) assertSameInput(known.get(id), input);
  const todo = items.filter((i) => !known.has(i.id));
  if (todo.length === 0) return { replayed: true };
  // Room for each of them, given back when the request stores nothing.
  const giveBack = await guards?.capacity?.check(stream, todo.length);
  try {
    if (todo.length > 1 && await takesAtomicBatches(nc, stream)) {
      await batchSlots(() => publishBatch(nc, p, guards, todo, traceId));
    } else await publishEach(nc, p, todo, traceId, keyed);
  } catch (err) {
    giveBack?.();
    throw err;
  }
  guards?.onAccepted?.(p.def.name, todo.length);
  return { replayed: false };
}

/** Publishes items one by one; a request racing this one with the same key is checked. */
async function publishEach(
  nc: NatsConnection,
  p: LoadedPipeline,
  items: readonly { id: string; input: unknown }[],
  traceId: string,
  keyed: boolean,
): Promise<void> {
  const stream = pipelineSubjects(p.def).stream;
  let results: { stored: boolean }[];
  try {
    results = await Promise.all(
      items.map(({ id, input }) =>
        submitItem(nc, p, id, input, { source: "weft-gateway", traceId })
      ),
    );
  } catch (err) {
    if (isStreamFull(err)) throw streamFullError(stream, err);
    // One item whose publish NATS left unanswered (it may still land): the answer names its
    // id, and how to retry without making a second item.
    if (items.length === 1 && isOutcomeUnknown(err)) {
      const id = items[0]!.id;
      throw new OutcomeUnknownError(id, {
        cause: err,
        advice: keyed
          ? "retry shortly with the same Idempotency-Key, which stores it once"
          : `GET /pipelines/${p.def.name}/items/${id} tells whether it was; a retry without ` +
            "an Idempotency-Key makes a second item",
      });
    }
    throw err;
  }
  // A request racing this one with the same key stored some first: the same check.
  const raced = items.filter((_, i) => !results[i]!.stored);
  if (raced.length > 0) {
    const again = await storedInputs(nc, p, raced.map((i) => i.id));
    for (const { id, input } of raced) assertSameInput(again.get(id), input);
  }
}

/** Whether each connection's streams take atomic batches, asked once per stream. */
const atomicStreams = new WeakMap<NatsConnection, Map<string, Promise<boolean>>>();
function takesAtomicBatches(nc: NatsConnection, stream: string): Promise<boolean> {
  let byStream = atomicStreams.get(nc);
  if (!byStream) atomicStreams.set(nc, byStream = new Map());
  let p = byStream.get(stream);
  if (!p) {
    p = jetstreamManager(nc, { checkAPI: false })
      .then((jsm) => allowsAtomicBatch(jsm, stream))
      .catch(() => false);
    byStream.set(stream, p);
  }
  return p;
}
const batchSlots = pLimit(ATOMIC_BATCHES_IN_FLIGHT);

/**
 * Publishes a batch's items as one atomic batch (nats-server 2.14+, {@link storeBatch}): the
 * stream stores all of them or none, so a batch answered with an error has left nothing on
 * the bus. After a refusal, items another request stored meanwhile under the same key are
 * checked and left out.
 */
async function publishBatch(
  nc: NatsConnection,
  p: LoadedPipeline,
  guards: IntakeGuards | undefined,
  items: readonly { id: string; input: unknown }[],
  traceId: string,
): Promise<void> {
  const stream = pipelineSubjects(p.def).stream;
  try {
    await storeBatch({
      js: jetstream(nc),
      jsm: await jetstreamManager(nc, { checkAPI: false }),
      stream,
      items,
      remaining: async (todo, again) => {
        if (!again) return todo; // admit left out what the stream had
        const stored = await storedInputs(nc, p, todo.map((i) => i.id));
        for (const { id, input } of todo) {
          if (stored.has(id)) assertSameInput(stored.get(id), input);
        }
        return todo.filter((i) => !stored.has(i.id));
      },
      message: ({ id, input }) =>
        eventMessage(
          itemEntryEvent(p, id, input, {
            source: "weft-gateway",
            traceId,
          }) as unknown as OutputEvent,
          null,
          true,
        ),
      oneByOne: (todo) => {
        atomicStreams.get(nc)?.delete(stream);
        return publishEach(nc, p, todo, traceId, false);
      },
      // (The batch's room was kept by its first check: this one only asks whether it is full.)
      checkCapacity: async () => (await guards?.capacity?.check(stream))?.(),
    });
  } catch (err) {
    throw isStreamFull(err) ? streamFullError(stream, err) : err;
  }
}

/** The inputs the stream holds for the items `ids` (those it has). */
async function storedInputs(
  nc: NatsConnection,
  p: LoadedPipeline,
  ids: readonly string[],
): Promise<Map<string, unknown>> {
  const jsm = await jetstreamManager(nc, { checkAPI: false }); // no round trip of its own
  const { stream } = pipelineSubjects(p.def);
  const entry = entryEvent(p.def);
  const found = await Promise.all(ids.map(async (id) => {
    const m = await jsm.streams.getMessage(stream, {
      last_by_subj: `${p.def.name}.${entry}.${id}`,
    });
    return m ? [id, m.json<{ data?: { input?: unknown } }>().data?.input] as const : null;
  }));
  return new Map(found.filter((f) => f !== null));
}

/** Refuses a reused Idempotency-Key whose input differs from the stored item's. */
function assertSameInput(stored: unknown, input: unknown): void {
  // Canonical JSON (src/canonical_json.ts): the same input with its keys in another order matches.
  if (canonicalJson(stored) !== canonicalJson(input)) {
    throw new WeftError(
      ErrorCode.IdempotencyMismatch,
      "this Idempotency-Key was used with a different request",
      { field: "Idempotency-Key" },
    );
  }
}

/** The links of an item of `name`. */
function links(name: string, id: string) {
  return {
    state: `/pipelines/${name}/items/${id}`,
    events: `/pipelines/${name}/items/${id}/events`,
  };
}

/** The routes, mounted at `/pipelines`. */
export function pipelineRoutes(deps: PipelineRouteDeps): Hono {
  const { nc, config, log, clients, feeds } = deps;
  const kvm = new Kvm(nc);
  const js = jetstream(nc);
  // Opened on first use: a gateway whose connection closes early leaves no request pending.
  const jsm = lazy(() => jetstreamManager(nc));
  const byName = new Map<string, Runtime>(deps.pipelines.map((p) => {
    const finals = new Set<string>([`${p.def.name}.${FAILED}`]);
    const awaited = new Set<string>();
    for (const [id, s] of Object.entries(p.def.steps)) {
      if (s.kind === "end") finals.add(`${p.def.name}.${eventOf(id, s)}`);
      if (s.kind === "wait") awaited.add(s.event);
    }
    return [p.def.name, {
      p,
      stream: pipelineSubjects(p.def).stream,
      states: lazy(() => kvm.open(stateBucketOf(p.def.name))),
      ...(hasWaits(p.def)
        ? {
          claims: lazy(async () =>
            createClaims(await kvm.open(claimsBucketOf(p.def.name)), config.claimTtlMs)
          ),
        }
        : {}),
      finals,
      awaited,
      stateSpec: pipelineStateSpec(p),
    }];
  }));
  const runtimeOf = (name: string): Runtime => {
    const r = byName.get(name);
    if (!r) throw new NotFoundError(`no pipeline ${JSON.stringify(name)}`);
    return r;
  };
  const itemId = (raw: string): string => {
    if (!ITEM_ID.test(raw)) {
      throw new ValidationError("the item id must be 1 to 64 of A-Z a-z 0-9 _ -", { field: "id" });
    }
    return raw;
  };
  const limit = bodyLimitProblem;
  // With telemetry on, the item's trace is the HTTP request's span's (which the entry event's
  // traceparent names as its parent), with or without a client's traceparent.
  const traceId = (header: string | undefined) =>
    (activeTraceContext() ?? childContext(parseTraceparent(header))).traceId;

  const whoOf = (c: Context): Who => (c.get("principal") as Who | undefined) ?? ANONYMOUS;
  const accepted = (r: Runtime, id: string) => ({
    id,
    status: "accepted",
    links: links(r.p.def.name, id),
  });

  async function state(r: Runtime, id: string) {
    const s = await readItem(await r.states(), itemId(id));
    if (s) return s;
    // Accepted a moment ago: its entry event is stored, its state not written yet.
    const first = await entrySeq(r, id);
    if (first !== null) return { id, status: "accepted" };
    throw new NotFoundError(`no ${r.p.def.name} item ${JSON.stringify(id)}`);
  }

  async function entrySeq(r: Runtime, id: string): Promise<number | null> {
    try {
      const m = await (await jsm()).streams.getMessage(r.stream, {
        last_by_subj: `${r.p.def.name}.${entryEvent(r.p.def)}.${id}`,
      });
      return m?.seq ?? null;
    } catch {
      return null;
    }
  }

  const app = new Hono();
  app.get("/", deps.readAuth, (c) =>
    c.json({
      pipelines: deps.pipelines.map((p) => ({
        name: p.def.name,
        description: p.def.description,
        definition: p.def.hash,
        subjects: pipelineSubjects(p.def),
        graph: pipelineGraph(p.def),
        submit: `/pipelines/${p.def.name}/items`,
        // Its waits for a person or a callback: what each awaits, and the body's schema.
        waits: Object.entries(p.def.steps).flatMap(([step, s]) =>
          s.kind === "wait"
            ? [{
              step,
              event: s.event,
              timeoutMs: s.timeoutMs,
              onTimeout: s.onTimeout,
              ...(s.schema ? { schema: s.schema } : {}),
            }]
            : []
        ),
      })),
    }));

  // The items waiting at a wait step now, soonest deadline first: a reviewer's queue.
  app.get("/:name/waiting", deps.readAuth, async (c) => {
    const r = runtimeOf(c.req.param("name"));
    if (!r.claims) throw new NotFoundError(`${r.p.def.name} has no wait step: nothing waits`);
    onlyQuery(c.req.query(), ["limit"]); // as every listing: a misspelt filter is no filter
    const max = intQuery(oneQuery(c.req.queries("limit"), "limit"), "limit", 1, WAITING_MAX) ??
      WAITING_DEFAULT;
    const claims = r.claims ? await r.claims() : undefined;
    return c.json(await waitingItems(r.p, js, await r.states(), max, new Date(), claims));
  });

  app.post(
    "/:name/items",
    deps.ingestAuth,
    requireJson,
    limit(config.bodyLimit),
    async (c) => {
      const r = runtimeOf(c.req.param("name"));
      const input = await readJson(c);
      const key = idempotencyKey([c.req.header("Idempotency-Key")]);
      const id = newId(r.p.def.name, key, whoOf(c).name);
      const { replayed } = await admit(
        nc,
        r.p,
        deps.guards,
        whoOf(c),
        [{ id, input }],
        traceId(c.req.header("traceparent")),
        key !== undefined,
      );
      const body = accepted(r, id);
      c.header("Location", body.links.state);
      if (replayed) c.header("Idempotent-Replayed", "true");
      return c.json(body, 202);
    },
  );

  app.post(
    "/:name/items/batch",
    deps.ingestAuth,
    requireJson,
    limit(config.batchBodyLimit),
    async (c) => {
      const r = runtimeOf(c.req.param("name"));
      const body = await readJson(c) as { items?: unknown };
      const extra = body !== null && typeof body === "object" && !Array.isArray(body)
        ? Object.keys(body).find((k) => k !== "items")
        : undefined;
      if (extra !== undefined) {
        throw new ValidationError(`/${extra} is not a field of a batch (items)`, {
          field: `/${extra}`,
        });
      }
      if (!body || !Array.isArray(body.items) || body.items.length === 0) {
        throw new ValidationError("/items must be a non-empty array", { field: "/items" });
      }
      if (body.items.length > BATCH_MAX_ITEMS) {
        throw new ValidationError(`/items holds at most ${BATCH_MAX_ITEMS} items`, {
          field: "/items",
        });
      }
      // Every item is checked before any is accepted: a bad one names its index.
      body.items.forEach((item, i) => checkInput(r.p.flow, item, `/items/${i}`));
      const key = idempotencyKey([c.req.header("Idempotency-Key")]);
      const trace = traceId(c.req.header("traceparent"));
      const items = body.items.map((input, i) => ({
        id: key === undefined ? ulid() : newId(r.p.def.name, `${key}#${i}`, whoOf(c).name),
        input,
      }));
      const { replayed } = await admit(
        nc,
        r.p,
        deps.guards,
        whoOf(c),
        items,
        trace,
        key !== undefined,
      );
      if (replayed) c.header("Idempotent-Replayed", "true");
      return c.json({ items: items.map(({ id }) => accepted(r, id)) }, 202);
    },
  );

  app.get(
    "/:name/items/:id",
    deps.readAuth,
    async (c) => c.json(await state(runtimeOf(c.req.param("name")), c.req.param("id"))),
  );

  app.get("/:name/items/:id/events", deps.readAuth, async (c) => {
    const r = runtimeOf(c.req.param("name"));
    onlyQuery(c.req.query(), []);
    const id = itemId(c.req.param("id"));
    // From the item's first event: its state knows it. The entry event is the latest one on
    // its subject, which after a redrive of the entry is the redriven copy, so alone it would
    // hide the first try and its failure. An item with a state and no entry event failed at
    // intake (a bus submission refused before its entry event existed): its events are its
    // failure, from its first one, as `GET .../items/<id>` shows it.
    const [entry, s] = await Promise.all([
      entrySeq(r, id),
      r.states().then((kv) => readItem(kv, id)).catch(() => null),
    ]);
    if (entry === null && !s) {
      throw new NotFoundError(`no ${r.p.def.name} item ${JSON.stringify(id)}`);
    }
    const from = Math.min(entry ?? Infinity, s?.first_seq ?? Infinity);
    const key = openSlot(clients, c);
    return streamEvents(c, js, {
      stream: r.stream,
      filter: `${r.p.def.name}.*.${id}`,
      closeOnFinal: true,
      replay: true,
      from,
      itemId: id,
      finalTypes: r.finals,
      // An end the item's history does not lead to (a step's key's) is not shown.
      state: r.stateSpec as StateSpec<unknown>,
    }, { config, clients, feeds, log, key });
  });

  app.get("/:name/events", deps.readAuth, (c) => {
    const r = runtimeOf(c.req.param("name"));
    // Checked before a slot is taken: a refused request holds none.
    onlyQuery(c.req.query(), ["replay"]);
    const replay = boolQuery(oneQuery(c.req.queries("replay"), "replay"), "replay") === true;
    const key = openSlot(clients, c);
    return streamEvents(c, js, {
      stream: r.stream,
      filter: `${r.p.def.name}.*.*`,
      closeOnFinal: false,
      replay,
      finalTypes: r.finals,
    }, { config, clients, feeds, log, key });
  });

  /** The claims of a pipeline with waits; 404 for one without. */
  async function claimsOf(r: Runtime): Promise<Claims> {
    if (!r.claims) throw new NotFoundError(`${r.p.def.name} has no wait step: nothing to claim`);
    return await r.claims();
  }

  // A reviewer's claim on a waiting item: while it lasts, only its holder's decision is
  // taken. `{"by": "carol"}` names the reviewer when authentication is off.
  app.post(
    "/:name/claims/:id",
    deps.decideAuth,
    requireJson,
    limit(CLAIM_BODY_LIMIT),
    async (c) => {
      const r = runtimeOf(c.req.param("name"));
      const id = itemId(c.req.param("id"));
      const claims = await claimsOf(r); // a pipeline without waits: 404 before anything else
      const body = claimBody(await readJson(c, { optional: true }), ["by"]);
      const who = reviewerOf(whoOf(c), body.by, true);
      await assertWaiting(r.p, await r.states(), id, await jsm());
      return c.json({ id, claim: await claims.take(id, who) });
    },
  );
  // Released by its holder: with authentication off, named by `?by=` or a JSON body `{"by"}`.
  app.delete("/:name/claims/:id", deps.decideAuth, async (c) => {
    onlyQuery(c.req.query(), ["by"]);
    const r = runtimeOf(c.req.param("name"));
    const claims = await claimsOf(r);
    const id = itemId(c.req.param("id"));
    const query = oneQuery(c.req.queries("by"), "by");
    const body = query === undefined && /json/i.test(c.req.header("content-type") ?? "")
      ? claimBody(await readJson(c, { optional: true }), ["by"])
      : {};
    const who = query !== undefined
      ? reviewerOf(whoOf(c), query, true, "by")
      : reviewerOf(whoOf(c), body.by, true);
    if (!(await claims.release(id, who))) {
      throw new NotFoundError(`${who} holds no claim on ${r.p.def.name} item ${id}`);
    }
    return c.body(null, 204);
  });

  // An awaited event: `POST /pipelines/tickets/items/ID/approved {"by":"carol"}`, the
  // same as `nats pub tickets.approved.ID '{"by":"carol"}'`.
  app.post(
    "/:name/items/:id/:event",
    deps.decideAuth,
    requireJson,
    limit(config.bodyLimit),
    async (c) => {
      onlyQuery(c.req.query(), ["by"]);
      const r = runtimeOf(c.req.param("name"));
      const id = itemId(c.req.param("id"));
      const event = c.req.param("event");
      // Who decides, when authentication is off (checked against a claim below).
      const by = oneQuery(c.req.queries("by"), "by");
      if (!r.awaited.has(event)) {
        throw new NotFoundError(
          `${r.p.def.name} awaits no event ${JSON.stringify(event)} (it awaits: ${
            [...r.awaited].join(", ") || "none"
          })`,
        );
      }
      const body = await readJson(c);
      if (body === null || typeof body !== "object" || Array.isArray(body)) {
        throw new ValidationError("the body must be a JSON object", { field: "/" });
      }
      // The bus's limit (the control step dead-letters a deeper event): refused now, not
      // accepted and then dead-lettered while the item waits on.
      if (!depthWithin(body, MAX_DEPTH)) {
        throw new ValidationError(
          `the awaited event ${r.p.def.name}.${event} nests deeper than ${MAX_DEPTH} levels`,
          { code: ErrorCode.InvalidAwaitedEvent, field: "/" },
        );
      }
      const role = r.p.flow.roles.get(event);
      const waits = role?.role === "awaited" ? role.waits : [];
      const decision = decidedBy(whoOf(c), body as Record<string, unknown>, (b) => {
        checkAwaitedEvent(r.p.flow, waits, b);
      });
      if ((await entrySeq(r, id)) === null) {
        throw new NotFoundError(`no ${r.p.def.name} item ${JSON.stringify(id)}`);
      }
      // A failed item takes no decision (its control step would dead-letter it): say so now.
      const now = await readItem(await r.states(), id).catch(() => null);
      if (now?.status === "failed") {
        throw new ConflictError(
          `${r.p.def.name} item ${id} has failed (${now.error?.code ?? "failed"}` +
            `${now.error?.stage ? ` in ${now.error.stage}` : ""}): a decision counts only once a ` +
            `redrive of its dead letter has resumed it`,
          { field: "/" },
        );
      }
      // An item with its outcome takes no decision: no step would take it (the first end
      // stands). Said now instead of accepted and stored for nothing. (One still running,
      // not yet at the wait, may be decided early: it counts once the item reaches it.)
      if (now?.status === "done") {
        throw new ConflictError(
          `${r.p.def.name} item ${id} has ended (outcome ${now.outcome ?? "done"}): a ` +
            `decision changes nothing now`,
          { field: "/" },
        );
      }
      // Held at a wait the running definition no longer has (renamed or removed since the
      // item reached it): no step would take the decision, and its letter comes at the old
      // deadline. Said now instead of accepted and lost.
      const held = now?.status === "waiting" ? now.waiting?.step : undefined;
      if (held !== undefined && r.p.def.steps[held]?.kind !== "wait") {
        throw new ConflictError(
          `${r.p.def.name} item ${id} waits at step ${held}, which the running definition ` +
            `(${r.p.def.hash}) no longer has: its decision cannot be taken (the item is ` +
            `dead-lettered as definition_changed at its deadline; restore the step to decide it)`,
          { field: "/" },
        );
      }
      // Another reviewer's live claim holds the item (`?by=` names the decider when
      // authentication is off).
      await (await claimsOf(r)).assertMayDecide(
        id,
        reviewerOf(whoOf(c), by, false, "by"),
      );
      const bytes = encoder.encode(JSON.stringify(decision));
      const ack = await js.publish(`${r.p.def.name}.${event}.${id}`, bytes, {
        msgID: `${r.p.def.name}-${event}-${id}-${sha256Hex(bytes).slice(0, 16)}`,
      });
      return c.json({ id, event, seq: ack.seq, duplicate: ack.duplicate }, 202);
    },
  );
  return app;
}

/** Refuses a claim on an item of `p` not held at one of its wait steps now: 404 or 409. */
async function assertWaiting(
  p: LoadedPipeline,
  states: KV,
  id: string,
  jsm: JetStreamManager,
): Promise<void> {
  const now = await readItem(states, id).catch(() => null);
  const step = now?.status === "waiting" ? now.waiting?.step : undefined;
  if (step !== undefined && p.def.steps[step]?.kind === "wait") return;
  if (now === null) {
    const entry = await jsm.streams.getMessage(pipelineSubjects(p.def).stream, {
      last_by_subj: `${p.def.name}.${entryEvent(p.def)}.${id}`,
    }).catch(() => null);
    if (!entry) throw new NotFoundError(`no ${p.def.name} item ${JSON.stringify(id)}`);
  }
  throw new ConflictError(
    `${p.def.name} item ${id} is not waiting for a person (${now?.status ?? "accepted"})`,
  );
}

/** An item held at a wait step (`GET /pipelines/<name>/waiting`, `weft.<name>.waiting`). */
export interface WaitingItem {
  id: string;
  step: string;
  /** The awaited event type. */
  event: string;
  /** Its deadline (ISO). */
  until: string;
  input: unknown;
  /** What the wait was handed. */
  value: unknown;
  /** The reviewer's claim on it, while live. */
  claim?: Claim;
}

/**
 * The items of `p` held at a wait step now, soonest deadline first (at most `max`). Reads the
 * held-items bucket's records written within each wait's timeout (an item armed earlier has
 * timed out), not every record the bucket keeps: the work follows the waits' recent traffic,
 * not the retention.
 */
export async function waitingItems(
  p: LoadedPipeline,
  js: JetStreamClient,
  states: KV,
  max: number,
  now: Date = new Date(),
  claims?: Claims,
): Promise<{ items: WaitingItem[]; total: number }> {
  const bucket = controlBucketOf(p.def.name);
  const items: WaitingItem[] = [];
  for (const [step, s] of Object.entries(p.def.steps)) {
    if (s.kind !== "wait") continue;
    // Each record's latest revision in the window; a closed one waits no more. (A minute of
    // slack covers a deadline's timer firing late.)
    const open = new Map<string, unknown>();
    for await (
      const m of readStream(js, `KV_${bucket}`, {
        filter: `$KV.${bucket}.${step}.*`,
        startTime: new Date(now.getTime() - s.timeoutMs - 60_000),
      })
    ) {
      const id = m.subject.slice(`$KV.${bucket}.${step}.`.length);
      const rec = m.data.length > 0
        ? m.json<{ closed?: string; armed?: { data?: { value?: unknown } } }>()
        : null;
      if (rec && !rec.closed && rec.armed) open.set(id, rec.armed.data?.value ?? null);
      else open.delete(id);
    }
    for (const [id, value] of open) {
      const state = await readItem(states, id);
      if (state?.status !== "waiting" || state.waiting?.step !== step) continue;
      items.push({
        id,
        step,
        event: `${p.def.name}.${s.event}`,
        until: state.waiting.until,
        input: state.input,
        value,
      });
    }
  }
  items.sort((a, b) => a.until.localeCompare(b.until));
  const shown = items.slice(0, max);
  if (claims) {
    await Promise.all(shown.map(async (item) => {
      const claim = await claims.get(item.id);
      if (claim && Date.parse(claim.until) > now.getTime()) item.claim = claim;
    }));
  }
  return { items: shown, total: items.length };
}

/**
 * `nats req weft.<name>.submit '<input>'`, `nats req weft.<name>.get <id>` and
 * `nats req weft.<name>.waiting '{"limit": N}'` (the items held at its wait steps, as
 * `GET /pipelines/<name>/waiting?limit=N` lists them; an empty body is no limit given). With API keys
 * configured, a request needs an `Authorization: Bearer <key>` header with the same roles as
 * over HTTP, and submissions pass the same intake guards. A body past its HTTP route's limit
 * (`bodyLimit`, `WEFT_BODY_LIMIT`, for a submission; 4 KiB for a claim) is the same 413.
 */
export function servePipelineRequests(
  nc: NatsConnection,
  pipelines: readonly LoadedPipeline[],
  log: Logger,
  opts: { auth?: Auth; guards?: IntakeGuards; claimTtlMs?: number; bodyLimit?: number } = {},
): { stop(): void } {
  const bodyLimit = opts.bodyLimit ?? DEFAULT_BODY_LIMIT;
  const kvm = new Kvm(nc);
  const jsm = lazy(() => jetstreamManager(nc));
  const reply = (m: Msg, work: () => Promise<unknown>) => replyTo(m, log, work, maxPayloadOf(nc));
  const check = (m: Msg, ...roles: Role[]): Who | undefined =>
    opts.auth?.authorize(m.headers?.get("Authorization"), roles);
  const subs = pipelines.flatMap((p) => {
    const n = p.def.name;
    const states = lazy(() => kvm.open(stateBucketOf(n)));
    const claims = hasWaits(p.def)
      ? lazy(async () =>
        createClaims(await kvm.open(claimsBucketOf(n)), opts.claimTtlMs ?? 15 * 60_000)
      )
      : undefined;
    /** `{"id": ..., "by"?: ...}`: the item and (auth off) the reviewer. */
    const claimRequest = (m: Msg) => {
      const who = check(m, Role.Reviewer) ?? ANONYMOUS;
      if (!claims) throw new NotFoundError(`${n} has no wait step: nothing to claim`);
      const body = claimBody(requestJson(m.data, CLAIM_BODY_LIMIT), ["id", "by"]);
      if (typeof body.id !== "string" || !ITEM_ID.test(body.id)) {
        throw new ValidationError("/id must be an item id", { field: "/id" });
      }
      return { id: body.id, who: reviewerOf(who, body.by, true) };
    };
    const waitingSubs = claims
      ? [
        nc.subscribe(`weft.${n}.claim`, {
          queue: "weft-gateway",
          callback: (_e, m) =>
            void reply(m, async () => {
              const { id, who } = claimRequest(m);
              await assertWaiting(p, await states(), id, await jsm());
              return { id, claim: await (await claims()).take(id, who) };
            }),
        }),
        nc.subscribe(`weft.${n}.release`, {
          queue: "weft-gateway",
          callback: (_e, m) =>
            void reply(m, async () => {
              const { id, who } = claimRequest(m);
              return { id, released: await (await claims()).release(id, who) };
            }),
        }),
      ]
      : [];
    return [
      ...waitingSubs,
      nc.subscribe(`weft.${n}.submit`, {
        queue: "weft-gateway",
        callback: (_e, m) =>
          void reply(m, async () => {
            const who = check(m, Role.Ingest) ?? ANONYMOUS;
            const input = requestJson(m.data, bodyLimit);
            // Present but empty is refused (422), as over HTTP; absent is no key.
            const key = idempotencyKey(m.headers?.values("Idempotency-Key"));
            const id = newId(n, key, who.name);
            const trace = childContext(parseTraceparent(m.headers?.get("traceparent"))).traceId;
            await admit(nc, p, opts.guards, who, [{ id, input }], trace, key !== undefined);
            return { id, status: "accepted", links: links(n, id) };
          }),
      }),
      nc.subscribe(`weft.${n}.get`, {
        queue: "weft-gateway",
        callback: (_e, m) =>
          void reply(m, async () => {
            check(m, Role.Ingest, Role.Reviewer);
            const id = new TextDecoder().decode(m.data).trim();
            if (!ITEM_ID.test(id)) {
              throw new ValidationError("id is not an item id", { field: "id" });
            }
            const s = await readItem(await states(), id);
            if (!s) throw new NotFoundError(`no ${n} item ${JSON.stringify(id)}`);
            return s;
          }),
      }),
      nc.subscribe(`weft.${n}.waiting`, {
        queue: "weft-gateway",
        callback: (_e, m) =>
          void reply(m, async () => {
            check(m, Role.Ingest, Role.Reviewer);
            // As GET /pipelines/<name>/waiting: no wait step, no list (not an empty one).
            if (!claims) throw new NotFoundError(`${n} has no wait step: nothing waits`);
            const { limit } = waitingRequest(m.data);
            return await waitingItems(
              p,
              jetstream(nc),
              await states(),
              limit,
              new Date(),
              claims ? await claims() : undefined,
            );
          }),
      }),
    ];
  });
  return { stop: () => subs.forEach((s) => s.unsubscribe()) };
}

/**
 * Where the item a subject names has its entry event stored, for the running definitions
 * and the shipped pipelines (redrive's `entrySubject`); undefined for any other subject.
 *
 * @example
 * ```ts ignore
 * const entryOf = redriveEntrySubjects(loaded);
 * entryOf("orders.priced.o1"); // "orders.submitted.o1"
 * entryOf("orders.submit", "o1"); // "orders.submitted.o1"
 * ```
 */
export function redriveEntrySubjects(
  pipelines: readonly LoadedPipeline[],
): (subject: string, item?: string) => string | undefined {
  const entries = new Map<string, string>();
  for (const w of SHIPPED_PIPELINES) if (w.items) entries.set(w.name, w.items.entryType);
  for (const p of pipelines) entries.set(p.def.name, `${p.def.name}.${entryEvent(p.def)}`);
  return (subject, item) => {
    const parts = subject.split(".");
    // A submission (`orders.submit`) names its item in its body: `item`.
    const id = parts.length === 3 ? parts[2] : parts.length === 2 ? item : undefined;
    const entry = id === undefined ? undefined : entries.get(parts[0]!);
    return entry === undefined ? undefined : `${entry}.${id}`;
  };
}

/**
 * How a redrive checks a definition's letter before republishing it, as the definition's
 * consumers would (src/redrive.ts checks the catalog's events and documents itself): a
 * submission against the input schema, an awaited event against its waits' schemas, any
 * other event it knows as an event of the flow on its subject, and a timer only while the
 * running definition has its step. Throws what would dead-letter it again (or strand it).
 */
export function definitionRedriveCheck(
  pipelines: readonly LoadedPipeline[],
  /**
   * The server's max_payload: a submission whose entry event (which carries the input twice)
   * is larger is refused, as its intake would dead-letter it `payload_too_large` again.
   */
  maxPayload?: () => number,
): (subject: string, value: unknown) => void {
  const byName = new Map(pipelines.map((p) => [p.def.name, p]));
  return (subject, value) => {
    const [root, token] = subject.split(".");
    const p = byName.get(root!);
    if (!p) return;
    if (subject === pipelineSubjects(p.def).submit) {
      checkInput(p.flow, value);
      const limit = maxPayload?.();
      if (limit !== undefined) {
        // The shortest item id and source it could have: a body past the limit even so is
        // past it for certain.
        const entry = itemEntryEvent(p, "x", value, { source: "", traceId: "0".repeat(32) });
        const bytes = eventMessage(entry as unknown as OutputEvent, null, true).data.length;
        if (bytes > limit) {
          throw new WeftError(
            ErrorCode.PayloadTooLarge,
            `its entry event ${entry.type} would be at least ${bytes} bytes, more than the ` +
              `server takes in one message (max_payload, ${limit})`,
          );
        }
      }
      return;
    }
    const role = p.flow.roles.get(token!);
    // An event the running definition does not know (a step since removed: its letter says
    // `definition_changed`) is not judged by it: redriven once the step is back.
    if (role === undefined) return;
    if (role.role === "awaited") checkAwaitedEvent(p.flow, role.waits, value);
    else decodeFlowEvent(p.flow, value, subject);
    // A timer of a step the running definition lacks (a wait since removed) could only fail
    // again: the control step acks it, but the item's state would resume on the copy and be
    // left running at no step. It is redriven once the step is back.
    if (role.role === "timer") {
      const step = (value as { data?: { step?: unknown } }).data?.step;
      if (typeof step !== "string" || !Object.hasOwn(p.def.steps, step)) {
        throw new WeftError(
          ErrorCode.DefinitionChanged,
          `a timer of the step ${JSON.stringify(step)}, which the running definition of ` +
            `${p.def.name} lacks: redrive it once the step is back`,
        );
      }
    }
  };
}
