/**
 * What users and reviewers can do with content, in one place behind both the HTTP routes
 * (pipelines/moderation/routes.ts) and the NATS request subjects
 * (pipelines/moderation/requests.ts): upload, read state, list the review queue,
 * claim and decide.
 *
 * @module
 */
import "./settings.ts";
import { headers, type NatsConnection, PermissionViolationError } from "@nats-io/nats-core";
import {
  jetstream,
  type JetStreamClient,
  type JetStreamManager,
  jetstreamManager,
} from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { type ObjectStore, Objm } from "@nats-io/obj";
import { ulid } from "ulid";
import { type CapacityGuard, isStreamFull, streamFullError } from "../../src/capacity.ts";
import type { IngestLimiter } from "../../src/gateway/ingest_limits.ts";
import type { Config } from "../../src/config.ts";
import { createEvent, deterministicId } from "../../src/events.ts";
import {
  ConflictError,
  ErrorCode,
  isOutcomeUnknown,
  NotFoundError,
  OutcomeUnknownError,
  ValidationError,
  WeftError,
} from "../../src/errors.ts";
import type {
  ContentDecided,
  ContentItem,
  ContentState,
  ContentSubmission,
  ReviewDecisionRequest,
} from "./events.gen.ts";
import type { Logger } from "../../src/observability/log.ts";
import { validateEvent } from "../../src/schemas.ts";
import { canonicalJson } from "../../src/canonical_json.ts";
import {
  eventMessage,
  isAlreadyStored,
  messagesOn,
  publishEvent,
  publishUnique,
  storedMessage,
} from "../../src/runner.ts";
import { createScheduleStore } from "../../src/scheduler/store.ts";
import { decidedEventId, humanDecidedEvent, slaScheduleId } from "./stages.ts";
import { readState } from "../../src/state_writer.ts";
import { firstEventSeq } from "../../src/state.ts";
import { eventSubject, ITEM_ID, SCHEDULE_BUCKET } from "../../src/subjects.ts";
import {
  CONTENT_OBJECT_BUCKET,
  CONTENT_STATE_BUCKET,
  CONTENT_STREAM,
  REVIEW_BUCKET,
} from "./subjects.ts";
import { ContentEventType as T } from "./events.ts";
import {
  childContext,
  formatTraceparent,
  type TraceContext,
} from "../../src/observability/trace.ts";
import { activeTraceContext } from "../../src/observability/telemetry.ts";
import type { Principal } from "../../src/gateway/auth.ts";
import {
  createReviewQueue,
  type ReviewEntry,
  type ReviewQueue,
  ReviewStatus,
} from "./review_queue.ts";

/** The answer to an accepted upload. */
export interface ContentAccepted {
  /** The item's id. */
  id: string;
  /** Always `accepted`: moderation runs asynchronously. */
  status: "accepted";
  /** Where to read the item's state, events and binary object. */
  links: { state: string; events: string; object?: string };
}

/** What GET /content/ID answers: the state, with the content once published. */
export type ContentView = Omit<ContentState, "content" | "stages"> & {
  content?: ContentItem;
  links: { events: string; object?: string };
};

/** The moderation API. */
export interface ModerationApi {
  /** Accepts a text submission. */
  submitText(
    s: ContentSubmission,
    who: Principal,
    trace?: TraceContext | null,
  ): Promise<{ body: ContentAccepted; replayed: boolean }>;
  /** Accepts a binary upload into the object store. */
  submitObject(
    body: ReadableStream<Uint8Array>,
    meta: { contentType: string; metadata?: Record<string, string> },
    who: Principal,
    trace?: TraceContext | null,
  ): Promise<{ body: ContentAccepted; replayed: boolean }>;
  /** The item's state; content only once published. */
  content(id: string): Promise<ContentView>;
  /** True when anything is known about the item. */
  exists(id: string): Promise<boolean>;
  /**
   * The stream sequence of the item's first event, where its event stream starts; null
   * when nothing is known about the item.
   */
  eventsStart(id: string): Promise<number | null>;
  /** The bytes of a binary upload: to reviewers always, to others once published. */
  object(id: string, who: Principal): Promise<{ data: Uint8Array; contentType: string }>;
  /** Queue entries with `status`, oldest first. */
  listReviews(status: ReviewStatus): Promise<ReviewEntry[]>;
  /** One queue entry; a {@link NotFoundError} when unknown. */
  getReview(id: string): Promise<ReviewEntry>;
  /** Claims an item for the caller (or, auth off, the named reviewer). */
  claim(id: string, who: Principal, reviewer?: string): Promise<ReviewEntry>;
  /** Decides an item and publishes the decision. */
  decide(
    id: string,
    req: ReviewDecisionRequest,
    who: Principal,
  ): Promise<{ entry: ReviewEntry; replayed: boolean }>;
  /**
   * Publishes the decision of every reviewer-decided queue entry whose `content.decided` the
   * stream does not hold (a gateway that died between its compare-and-set and its publish),
   * and cancels those items' SLA schedules; how many it published. The gateway runs it when
   * it starts.
   */
  healDecisions(): Promise<number>;
  /** JetStream client (SSE reads the CONTENT stream through it). */
  readonly js: JetStreamClient;
  /** JetStream manager. */
  readonly jsm: JetStreamManager;
}

const encoder = new TextEncoder();

/**
 * How many messages on an item's decided subject are read looking for its decision (each one
 * not a decision was published on the bus around the gateway).
 */
/** The stream behind the object store of uploads (nats.js names it `OBJ_<bucket>`). */
const OBJECT_STREAM = `OBJ_${CONTENT_OBJECT_BUCKET}`;

const MAX_DECIDED_SCAN = 64;

/** The size of an object's chunks: nats.js's default, which uploads keep. */
const OBJECT_CHUNK_BYTES = 128 * 1024;

/** The links of a content item. */
export function contentLinks(id: string, hasObject: boolean): ContentAccepted["links"] {
  const links: ContentAccepted["links"] = {
    state: `/content/${id}`,
    events: `/content/${id}/events`,
  };
  if (hasObject) links.object = `/content/${id}/object`;
  return links;
}

/** The id of an item's upload event: one per item, so re-uploads de-duplicate. */
export function uploadedEventId(itemId: string): string {
  return deterministicId(itemId, T.Uploaded);
}

/**
 * What a submission of an item consists of, to tell a repeat from another submission under
 * the same id: the text or the object's content (its digest, size and type: the bytes'
 * hash), and the metadata. Not who submitted it, nor where the object is kept (named by
 * the id).
 */
export function submissionOf(item: ContentItem): unknown {
  const view: Record<string, unknown> = {};
  if (item.text !== undefined) view.text = item.text;
  if (item.object !== undefined) {
    const { digest, size, content_type } = item.object;
    view.object = { digest, size, content_type };
  }
  if (item.metadata !== undefined) view.metadata = item.metadata;
  return view;
}

/**
 * Refuses (422 `idempotency_mismatch`, as feedback does) a submission under an id the
 * stream already holds with another body; the same body, its keys in any order, passes.
 */
export function assertSameSubmission(id: string, stored: ContentItem, item: ContentItem): void {
  // Canonical JSON (src/canonical_json.ts): keys in any order, and -0 and 0, are one body.
  if (canonicalJson(submissionOf(stored)) !== canonicalJson(submissionOf(item))) {
    throw new WeftError(
      ErrorCode.IdempotencyMismatch,
      `item ${id} was already submitted with a different body`,
      { field: "/id" },
    );
  }
}

/**
 * Refuses (422 naming the header) an Idempotency-Key on a content submission, HTTP and NATS
 * alike: it takes none, and one ignored would make a repeat a second item. A JSON submission's
 * `id` in the body is what makes a repeat the same item; a binary upload is always a new one.
 */
export function refuseIdempotencyKey(present: boolean): void {
  if (!present) return;
  throw new ValidationError(
    "a content submission takes no Idempotency-Key: send the item's id in the JSON body " +
      "(a repeat with the same body is the same item); a binary upload is always a new item",
    { field: "Idempotency-Key" },
  );
}

/**
 * A claim's body, as HTTP (`{"reviewer"?}`) and NATS (`{"id", "reviewer"?}`) take it, the
 * fields given in `fields`: another field, or a reviewer that is not a string, is a 422
 * naming it, never ignored.
 *
 * @example
 * ```ts
 * import { claimBody } from "./api.ts";
 * console.assert(claimBody({ reviewer: "amy" }, ["reviewer"]).reviewer === "amy");
 * ```
 */
export function claimBody(
  value: unknown,
  fields: readonly ("id" | "reviewer")[],
): { id?: unknown; reviewer?: string } {
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new ValidationError("the body must be a JSON object", { field: "/" });
  }
  for (const k of Object.keys(value)) {
    if (!(fields as readonly string[]).includes(k)) {
      throw new ValidationError(`/${k} is not an allowed field`, { field: `/${k}` });
    }
  }
  const body = value as { id?: unknown; reviewer?: unknown };
  if (body.reviewer !== undefined && typeof body.reviewer !== "string") {
    throw new ValidationError("/reviewer must be a string", { field: "/reviewer" });
  }
  return body as { id?: unknown; reviewer?: string };
}

/** Who a reviewer action is recorded as: the credential's name, or (auth off) the body's. */
export function reviewerOf(
  who: Principal,
  claimed: string | undefined,
  authEnabled: boolean,
): string {
  if (!authEnabled) {
    if (!claimed) throw new ValidationError("reviewer is required", { field: "/reviewer" });
    return claimed;
  }
  if (claimed !== undefined && claimed !== who.name) {
    throw new WeftError(ErrorCode.Forbidden, `this key belongs to ${who.name}, not ${claimed}`, {
      field: "/reviewer",
    });
  }
  return who.name;
}

/**
 * Creates the API (and the object store bucket when missing).
 *
 * @example
 * ```ts ignore
 * const api = await createModerationApi({ nc, config, log, authEnabled: true });
 * await api.claim("ct_1", { name: "alice", role: "reviewer" });
 * ```
 */
export async function createModerationApi(deps: {
  nc: NatsConnection;
  config: Pick<Config, "claimTtlMs" | "retentionMs">;
  log: Logger;
  authEnabled: boolean;
  now?: () => Date;
  /** Refuses new items when the CONTENT stream is past its high-water mark. */
  capacity?: CapacityGuard;
  /** Told of each new item accepted (not a replay). */
  onAccepted?: (count: number) => void;
  /** Refuses uploaders over their ingest rate or quota (429). */
  limiter?: IngestLimiter;
}): Promise<ModerationApi> {
  const { nc, log, authEnabled } = deps;
  const now = deps.now ?? (() => new Date());
  const js = jetstream(nc);
  const jsm = await jetstreamManager(nc);
  const kvm = new Kvm(nc);
  const stateKv = await kvm.open(CONTENT_STATE_BUCKET);
  const queue: ReviewQueue = createReviewQueue(await kvm.open(REVIEW_BUCKET), deps.config);
  const schedules = createScheduleStore(await kvm.open(SCHEDULE_BUCKET), now);
  // Made with the topology (src/topology.ts), like the buckets.
  const objects: ObjectStore = await new Objm(nc).open(CONTENT_OBJECT_BUCKET);

  async function publishUpload(id: string, item: ContentItem, trace?: TraceContext | null) {
    // With telemetry on, the active span (the HTTP request's) is the parent of the next hop,
    // in its trace; otherwise a new span in the caller's trace (or a new one).
    const span = activeTraceContext() ?? childContext(trace ?? null);
    const event = createEvent({
      type: T.Uploaded,
      id: uploadedEventId(id),
      itemId: id,
      traceId: span.traceId,
      source: "weft-gateway",
      data: item,
      time: now(),
    });
    // What the moderation stage will validate, validated before anything is accepted.
    validateEvent(event, [T.Uploaded]);
    const h = headers();
    h.set("traceparent", formatTraceparent(span));
    h.set("Weft-Event-Type", event.type);
    // Published here rather than by publishEvent: the PubAck's duplicate flag tells a replay.
    // Once per item: a subject that already holds an upload refuses another, however late.
    try {
      h.set("Nats-Msg-Id", event.id);
      h.set("Nats-Expected-Last-Subject-Sequence", "0");
      const ack = await publishUnique(
        js,
        eventSubject(event.type, id),
        encoder.encode(JSON.stringify(event)),
        h,
      );
      return ack.duplicate;
    } catch (err) {
      if (isAlreadyStored(err)) {
        return true;
      }
      // The stream's own refusal (behind the high-water mark): 507, as every intake answers.
      throw isStreamFull(err) ? streamFullError(CONTENT_STREAM, err) : err;
    }
  }

  /**
   * Checks what a binary upload's event will carry, answering for the request's own fields: its
   * content type (the `content-type` header) and metadata (`meta.<key>` parameters).
   */
  function checkUpload(id: string, item: ContentItem): void {
    try {
      validateEvent(
        createEvent({
          type: T.Uploaded,
          id: uploadedEventId(id),
          itemId: id,
          traceId: "0".repeat(32),
          source: "weft-gateway",
          data: item,
          time: now(),
        }),
        [T.Uploaded],
      );
    } catch (err) {
      const field = err instanceof WeftError ? err.field ?? "" : "";
      const header = field.startsWith("/data/object/content_type")
        ? "content-type"
        : field.startsWith("/data/metadata/")
        ? `meta.${field.slice("/data/metadata/".length).split("/")[0]}`
        : field.startsWith("/data/metadata")
        ? "meta.*"
        : undefined;
      if (header === undefined) throw err;
      const message = (err as Error).message.replace(field, header);
      throw new ValidationError(message, { field: header, cause: err });
    }
  }

  /**
   * Removes the object of an upload that was refused after it was stored (the stream refused
   * its event, NATS failed): only when its event is surely not stored, since a stored event
   * (a publish whose answer was lost) names the object. Under the mesh's identities only its
   * delete marker is written: the purge of its chunks is the admin identity's alone.
   */
  async function discardObject(id: string): Promise<void> {
    try {
      const m = await storedMessage(jsm, CONTENT_STREAM, {
        last_by_subj: eventSubject(T.Uploaded, id),
      });
      if (m) return;
      await objects.delete(id);
    } catch (err) {
      if (purgeRefused(err)) {
        // The delete marker is written (the object reads as gone); its chunks stay.
        log.warn("the object of a refused upload is deleted; its chunks stay until purged", {
          item_id: id,
          stream: OBJECT_STREAM,
        });
      } else log.warn("could not remove the object of a refused upload", { item_id: id, err });
    }
  }

  /** Whether `err` is the server's refusal of a purge of the object store. */
  function purgeRefused(err: unknown): boolean {
    // nats.js rejects a refused request with a RequestError whose cause is the refusal.
    let refusal: unknown = err;
    while (refusal instanceof Error && !(refusal instanceof PermissionViolationError)) {
      refusal = refusal.cause;
    }
    return refusal instanceof PermissionViolationError &&
      refusal.subject === `$JS.API.STREAM.PURGE.${OBJECT_STREAM}`;
  }

  /**
   * Whether a failed upload was the object store refusing a chunk for lack of room. nats.js
   * purges the chunks a failed put stored, and under the mesh's identities that purge is
   * refused (no identity but admin may purge: a purge's filter is in its body, so the right
   * was the right to erase every object), so the put rejects with the refusal instead: the
   * store's room left, less than a chunk, then tells.
   */
  async function objectStoreFull(err: unknown): Promise<boolean> {
    if (isStreamFull(err)) return true;
    if (!purgeRefused(err)) return false;
    try {
      const { config, state } = await jsm.streams.info(OBJECT_STREAM);
      return config.max_bytes > 0 && config.max_bytes - state.bytes < OBJECT_CHUNK_BYTES + 1024;
    } catch {
      return false;
    }
  }

  /**
   * The item's uploaded event in the stream, by its subject: there before any state is
   * written. The FIRST one, the gateway's, as the stages read it (uploadedContentReader): a
   * later event re-published on the subject (the gateway key can publish there) names
   * nothing the item serves, so it cannot swap a reviewed item's bytes or text.
   */
  async function uploadedEvent(id: string): Promise<{ item: ContentItem; seq: number } | null> {
    if (!ITEM_ID.test(id)) return null;
    try {
      // STREAM.MSG.GET takes next_by_subj (nats-server 2.9+); nats.js types only seq/last_by_subj.
      const m = await jsm.streams.getMessage(CONTENT_STREAM, {
        next_by_subj: eventSubject(T.Uploaded, id),
        seq: 0,
      } as unknown as { seq: number });
      return m ? { item: m.json<{ data: ContentItem }>().data, seq: m.seq } : null;
    } catch {
      return null;
    }
  }
  /** The item as uploaded. */
  const uploaded = async (id: string) => (await uploadedEvent(id))?.item ?? null;
  const uploadedExists = async (id: string) => (await uploadedEvent(id)) !== null;

  async function stateOf(id: string): Promise<ContentState | null> {
    if (!ITEM_ID.test(id)) return null;
    return (await readState<ContentState>(stateKv, id))?.state ?? null;
  }

  /**
   * The item's decision as the stream holds it: the first decision event on its decided
   * subject (a message there that is no decision, not JSON or another type, is not one: the
   * storage step dead-letters it), and the last stream sequence on that subject.
   */
  async function decisionOnStream(
    id: string,
  ): Promise<{ decision?: { seq: number; event: ContentDecided }; last: number }> {
    const subject = eventSubject(T.Decided, id);
    const last = await storedMessage(jsm, CONTENT_STREAM, { last_by_subj: subject });
    if (!last) return { last: 0 };
    const held = messagesOn(jsm, CONTENT_STREAM, subject, {
      before: last.seq + 1,
      max: MAX_DECIDED_SCAN,
    });
    for await (const m of held) {
      try {
        const event = validateEvent(m.json(), [T.Decided]);
        if (event.item_id === id) return { decision: { seq: m.seq, event }, last: last.seq };
      } catch {
        // not a decision: the storage step dead-letters it
      }
    }
    return { last: last.seq };
  }

  /** Refuses (409) a decision when the stream holds another one for the item. */
  function assertSameDecision(
    id: string,
    stored: { seq: number; event: ContentDecided },
    d: { decision: string; reviewer: string },
  ): void {
    const e = stored.event;
    if (
      e.id === decidedEventId(id) && e.data.decision === d.decision &&
      e.data.reviewer === d.reviewer
    ) return;
    throw new ConflictError(
      `item ${id} already has a decision on ${eventSubject(T.Decided, id)} (stream sequence ` +
        `${stored.seq}: ${JSON.stringify(e.data.decision)} by ${
          JSON.stringify(e.data.reviewer)
        }), not this one`,
    );
  }

  /**
   * Publishes a human decision unless the stream holds one: with "expected last subject
   * sequence" on the item's decided subject, so the stream stores one decision per item
   * however late a repeat comes. A decision found there is a replay when it is this one, a
   * conflict (409) otherwise. A stream too full to store it is a 503 with Retry-After: the
   * decision stays in the queue, and the same decision retried publishes it.
   */
  async function publishDecision(entry: ReviewEntry): Promise<void> {
    const event = humanDecidedEvent(entry, "weft-gateway", now());
    for (let attempt = 0; attempt < 5; attempt++) {
      const held = await decisionOnStream(entry.id);
      if (held.decision) return assertSameDecision(entry.id, held.decision, entry.decision!);
      const m = eventMessage(event, null, false);
      m.headers.set("Nats-Expected-Last-Subject-Sequence", String(held.last));
      try {
        await publishUnique(js, m.subject, m.data, m.headers);
        return;
      } catch (err) {
        if (isStreamFull(err)) {
          throw new WeftError(
            ErrorCode.Unavailable,
            `the decision on item ${entry.id} is recorded, but stream ${CONTENT_STREAM} is full ` +
              `and did not store it; retry the same decision later (it is replayed and ` +
              `published), or grow the stream (WEFT_STREAM_MAX_BYTES)`,
            { cause: err, retryAfterSeconds: 30, shown: true },
          );
        }
        if (!isAlreadyStored(err)) throw err;
        // Something was stored on the subject meanwhile: look again.
      }
    }
    throw new ConflictError(`the decision of item ${entry.id} kept being raced; retry`);
  }

  const api: ModerationApi = {
    js,
    jsm,
    async submitText(s, who, trace) {
      deps.limiter?.take(who);
      // Room for the item, given back when the request stores nothing.
      const giveBack = await deps.capacity?.check(CONTENT_STREAM) ?? (() => {});
      const answer = await (async () => {
        const id = s.id ?? `ct_${ulid()}`;
        const item: ContentItem = { text: s.text, submitted_by: who.name };
        if (s.metadata !== undefined) item.metadata = s.metadata;
        const accepted = (replayed: boolean) => ({
          body: { id, status: "accepted" as const, links: contentLinks(id, false) },
          replayed,
        });
        // A client id already known: a replay only with the same body.
        if (s.id !== undefined) {
          const stored = await uploaded(id);
          if (stored) {
            assertSameSubmission(id, stored, item);
            return accepted(true);
          }
        }
        const replayed = await publishUpload(id, item, trace).catch((err) => {
          // Perhaps stored (now, or when the publish queued in the client lands): the answer
          // names the id to retry with.
          throw isOutcomeUnknown(err) ? new OutcomeUnknownError(id, { cause: err }) : err;
        });
        // Another submission of the id stored first (a race): the same check.
        if (replayed) {
          const stored = await uploaded(id);
          if (stored) assertSameSubmission(id, stored, item);
        } else deps.onAccepted?.(1);
        return accepted(replayed);
      })().catch((err) => {
        giveBack();
        throw err;
      });
      if (answer.replayed) giveBack(); // stored already: nothing new in flight
      return answer;
    },
    async submitObject(body, meta, who, trace) {
      deps.limiter?.take(who);
      // Room for the item, given back when the request stores nothing.
      const giveBack = await deps.capacity?.check(CONTENT_STREAM) ?? (() => {});
      // The bytes go to the object store, which has a limit of its own (a full one would
      // refuse every upload, not just this one's share): refused from its mark too.
      await deps.capacity?.check(OBJECT_STREAM).catch((err) => {
        giveBack();
        throw err;
      });
      const id = `ct_${ulid()}`;
      const itemOf = (info: { size: number; digest: string }): ContentItem => {
        const item: ContentItem = {
          object: {
            bucket: CONTENT_OBJECT_BUCKET,
            name: id,
            size: info.size,
            content_type: meta.contentType,
            digest: info.digest,
          },
          submitted_by: who.name,
        };
        if (meta.metadata && Object.keys(meta.metadata).length > 0) item.metadata = meta.metadata;
        return item;
      };
      // The upload event checked before the bytes are stored (its size and digest are not
      // known yet): a refused request leaves nothing behind.
      try {
        checkUpload(id, itemOf({ size: 0, digest: "SHA-256=" }));
      } catch (err) {
        giveBack();
        throw err;
      }
      try {
        const info = await objects.put({
          name: id,
          description: `upload by ${who.name}`,
          headers: undefined,
        }, body);
        await publishUpload(id, itemOf(info), trace);
      } catch (err) {
        giveBack();
        await discardObject(id);
        throw (await objectStoreFull(err)) ? streamFullError(OBJECT_STREAM, err) : err;
      }
      deps.onAccepted?.(1);
      return { body: { id, status: "accepted", links: contentLinks(id, true) }, replayed: false };
    },
    async content(id) {
      let state = await stateOf(id);
      if (!state) {
        if (!ITEM_ID.test(id) || !(await uploadedExists(id))) {
          throw new NotFoundError(`no content item ${JSON.stringify(id)}`);
        }
        const at = now().toISOString();
        state = {
          id,
          status: "uploaded",
          stage: "uploaded",
          trace_id: "",
          created_at: at,
          updated_at: at,
          stages: {},
        };
      }
      const { content, stages: _stages, ...rest } = state;
      const view: ContentView = { ...rest, links: { events: `/content/${id}/events` } };
      if (content?.object) view.links.object = `/content/${id}/object`;
      if (state.status === "published" && content) view.content = content;
      if (!view.trace_id) delete (view as { trace_id?: string }).trace_id;
      return view;
    },
    async exists(id) {
      return ITEM_ID.test(id) && ((await stateOf(id)) !== null || await uploadedExists(id));
    },
    async eventsStart(id) {
      const state = await stateOf(id);
      const first = state ? firstEventSeq(state) : undefined;
      if (first !== undefined) return first;
      const up = await uploadedEvent(id);
      if (up) return up.seq;
      return state ? 1 : null; // known, but no event sequence recorded: from the start
    },
    async object(id, who) {
      const ref = (await uploaded(id))?.object;
      if (!ref) throw new NotFoundError(`no binary content for ${JSON.stringify(id)}`);
      const reviewer = who.role === "reviewer" || who.role === "admin";
      if (!reviewer && (await stateOf(id))?.status !== "published") {
        throw new NotFoundError(`content ${id} is not published`);
      }
      const data = await objects.getBlob(ref.name);
      if (!data) throw new NotFoundError(`object of ${id} is gone`);
      return { data, contentType: ref.content_type };
    },
    listReviews(status) {
      return queue.list(status);
    },
    async getReview(id) {
      const entry = await queue.get(id);
      if (!entry) throw new NotFoundError(`no review for item ${JSON.stringify(id)}`);
      return entry;
    },
    async claim(id, who, claimed) {
      const reviewer = reviewerOf(who, claimed, authEnabled);
      const entry = await queue.claim(id, reviewer, now());
      const claim = entry.claim!;
      await publishEvent(
        js,
        createEvent({
          type: T.ReviewClaimed,
          id: deterministicId(id, T.ReviewClaimed, reviewer, claim.claimed_at),
          itemId: id,
          traceId: entry.trace_id,
          source: "weft-gateway",
          time: new Date(claim.claimed_at),
          data: { reviewer, claimed_at: claim.claimed_at },
        }),
        null,
      );
      return entry;
    },
    async decide(id, req, who) {
      const reviewer = reviewerOf(who, req.reviewer, authEnabled);
      // The stream already holds a decision that is not this one (forged on the bus): the
      // queue is left as it is.
      const held = (await decisionOnStream(id)).decision;
      if (held) assertSameDecision(id, held, { decision: req.decision, reviewer });
      const result = await queue.decide(id, {
        decision: req.decision,
        reason: req.reason,
        reviewer,
        automatic: false,
      }, now());
      // Published after the compare-and-set won, once per item: a replay, however late,
      // stores nothing again, and a crash between the two is healed by retrying, or by the
      // next gateway's start (healDecisions).
      await publishDecision(result.entry);
      await cancelSla(id);
      return result;
    },
    async healDecisions() {
      let healed = 0;
      for (const entry of await queue.list(ReviewStatus.Decided)) {
        if (!entry.decision || entry.decision.automatic) continue; // the SLA step's own
        if ((await decisionOnStream(entry.id)).decision) continue;
        await publishDecision(entry);
        await cancelSla(entry.id);
        log.warn("published a decision the stream lacked (the gateway stopped before it)", {
          item_id: entry.id,
          reviewer: entry.decision.reviewer,
        });
        healed++;
      }
      return healed;
    },
  };

  async function cancelSla(id: string): Promise<void> {
    for (const level of [1, 2] as const) {
      await schedules.cancel(slaScheduleId(id, level)).catch((err) =>
        log.warn("could not cancel an SLA schedule", { item_id: id, err })
      );
    }
  }
  return api;
}
