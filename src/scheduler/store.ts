/**
 * Schedules kept in the KV bucket `weft_schedules`: publish a JSON payload on a subject
 * once at a time (`at`) or on every tick of a cron expression (`cron`, UTC, parsed by
 * croner). The store only keeps definitions and their next firing time; the scheduler
 * replicas (src/scheduler/scheduler.ts) watch the bucket and fire.
 *
 * Callers' schedules have ids without a `.`; a pipeline's own timers (a wait's timeout, a
 * review's SLA, a digest) are `<owner>.<id>`, where the owner is the pipeline's name: each
 * pipeline's services may write only their own keys (NATS permissions on
 * `$KV.weft_schedules.<owner>.>`), and the scheduler fires an owner's schedule only on that
 * pipeline's subjects, so one service's key cannot set, move or cancel another's deadline.
 *
 * @module
 */
import type { KV } from "@nats-io/kv";
import { nextCronTime, shortestCronGap } from "./cron.ts";
import { ulid } from "ulid";
import { ConflictError, NotFoundError, ValidationError } from "../errors.ts";
import type { Schedule } from "../events.gen.ts";
import { validateDocument } from "../schemas.ts";
import { subjectAllowed } from "../subjects.ts";
import { callerSchedulableSubjects } from "../wiring.ts";
import { SHIPPED_PIPELINES } from "../../pipelines/shipped.ts";

/** A stored schedule. */
export interface ScheduleEntry {
  /** Schedule id: a caller's (given, or a ULID), or a pipeline's own `<owner>.<id>`. */
  id: string;
  /** Subject the payload is published on. */
  subject: string;
  /** The JSON body published. */
  payload: Record<string, unknown>;
  /** One-shot: fire once at this time. */
  at?: string;
  /** Recurring: fire on every tick (UTC). */
  cron?: string;
  /** What it is for. */
  description?: string;
  /** `done`: a one-shot schedule that fired. */
  status: "active" | "done";
  /** The next firing time; null once done. */
  next_at: string | null;
  /** When it was created. */
  created_at: string;
  /** How many times it fired. */
  fired: number;
  /** When it last fired. */
  last_fired_at?: string;
}

export { nextCronTime } from "./cron.ts";

/**
 * The shortest time between two firings of a caller's recurring schedule, ms: a minute, what
 * a five-field cron can say (croner also takes a sixth, seconds, field). Its firings are bus
 * publishes, which pass neither the intake's high-water mark nor the per-key rate limits that
 * bind submissions over HTTP: every-second schedules were a flood anyone allowed to schedule
 * could start (found by probing: 300 of them, made with 300 requests, submitted 300 items a
 * second until cancelled). A pipeline's own timers are not bound by it.
 */
export const CALLER_CRON_MIN_GAP_MS = 60_000;

/**
 * How many recurring schedules callers may have active at once, by default: with
 * {@link CALLER_CRON_MIN_GAP_MS}, at most about 17 firings a second in all.
 */
export const CALLER_CRONS_MAX = 1_000;

/**
 * Checks a schedule definition and builds its stored entry.
 *
 * @example
 * ```ts
 * import { newScheduleEntry } from "./store.ts";
 * const e = newScheduleEntry(
 *   { id: "digest", subject: "digest.request.orders", payload: {}, cron: "0 * * * *" },
 *   new Date("2026-01-01T00:30:00Z"),
 * );
 * console.assert(e.next_at === "2026-01-01T01:00:00.000Z");
 * ```
 */
export function newScheduleEntry(def: Schedule, now: Date): ScheduleEntry {
  const s = validateDocument("schedule", def);
  if ((s.at === undefined) === (s.cron === undefined)) {
    throw new ValidationError("exactly one of at and cron is required", { field: "/at" });
  }
  let next: Date | null;
  if (s.cron !== undefined) {
    try {
      next = nextCronTime(s.cron, now);
    } catch (cause) {
      throw new ValidationError(`cron: ${(cause as Error).message}`, { field: "/cron", cause });
    }
    if (!next) throw new ValidationError("cron never fires", { field: "/cron" });
  } else {
    next = new Date(s.at!);
    // The schema's date-time takes what Date cannot hold (a leap second, 23:59:60).
    if (Number.isNaN(next.getTime())) {
      throw new ValidationError("at is not a time this server can schedule", { field: "/at" });
    }
  }
  const entry: ScheduleEntry = {
    id: s.id ?? ulid(),
    subject: s.subject,
    payload: s.payload,
    status: "active",
    next_at: next.toISOString(),
    created_at: now.toISOString(),
    fired: 0,
  };
  if (s.at !== undefined) entry.at = new Date(s.at).toISOString();
  if (s.cron !== undefined) entry.cron = s.cron;
  if (s.description !== undefined) entry.description = s.description;
  return entry;
}

/** Where a schedule goes after firing at `firedAt` (now is `now`). */
export function afterFiring(entry: ScheduleEntry, firedAt: Date, now: Date): ScheduleEntry {
  const next = entry.cron
    ? nextCronTime(entry.cron, new Date(Math.max(firedAt.getTime(), now.getTime())))
    : null;
  return {
    ...entry,
    fired: entry.fired + 1,
    last_fired_at: firedAt.toISOString(),
    next_at: next ? next.toISOString() : null,
    status: next ? "active" : "done",
  };
}

/** Manages schedules. */
export interface ScheduleStore {
  /**
   * Creates a schedule; the same definition again answers the existing one. With `caller` (a
   * request over HTTP or NATS), a recurring one may fire at most every
   * {@link CALLER_CRON_MIN_GAP_MS} (a {@link ValidationError} naming `/cron`), and only while
   * fewer than the store's `maxCallerCrons` are active (a {@link ConflictError}).
   */
  create(def: Schedule, opts?: { caller?: boolean }): Promise<ScheduleEntry>;
  /** One schedule; a {@link NotFoundError} when unknown. */
  get(id: string): Promise<ScheduleEntry>;
  /** Every schedule, soonest first. */
  list(): Promise<ScheduleEntry[]>;
  /**
   * Cancels (deletes) a schedule; false when there was none. With `caller` (a request over
   * HTTP or NATS), only one a caller could have made: a pipeline's own timer (its subject no
   * caller may schedule) is refused with a {@link ConflictError}.
   */
  cancel(id: string, opts?: { caller?: boolean }): Promise<boolean>;
}

/** Every pipeline's bus input: `<name>.submit` (a definition's intake validates what it reads). */
const SUBMIT_SUBJECTS = "*.submit";

/** Whether a caller may have made a schedule on `subject` ({@link assertCallerSchedulable}). */
function callerMay(subject: string): boolean {
  return subjectAllowed(
    [...callerSchedulableSubjects(SHIPPED_PIPELINES), SUBMIT_SUBJECTS],
    subject,
  );
}

/**
 * The subjects a caller may schedule with these definitions running: the shipped pipelines'
 * schedulable bus inputs and each definition's `<name>.submit`.
 *
 * @example
 * ```ts
 * import { callerSchedulable } from "./store.ts";
 * console.assert(callerSchedulable([{ def: { name: "tickets" } }]).includes("tickets.submit"));
 * ```
 */
export function callerSchedulable(
  pipelines: readonly { def: { name: string } }[] = [],
): string[] {
  return [
    ...callerSchedulableSubjects(SHIPPED_PIPELINES),
    ...pipelines.map((p) => `${p.def.name}.submit`),
  ];
}

const encoder = new TextEncoder();
const ID = /^(?:[A-Za-z0-9_-]{1,64}\.)?[A-Za-z0-9_-]{1,128}$/;

/**
 * The pipeline that owns a schedule: the token before the `.` of its id; none for a caller's.
 *
 * @example
 * ```ts
 * import { scheduleOwner } from "./store.ts";
 * console.assert(scheduleOwner("orders.sla-1-r1") === "orders");
 * console.assert(scheduleOwner("nightly") === undefined);
 * ```
 */
export function scheduleOwner(id: string): string | undefined {
  const dot = id.indexOf(".");
  return dot > 0 ? id.slice(0, dot) : undefined;
}

function sameDefinition(a: ScheduleEntry, b: ScheduleEntry): boolean {
  return a.subject === b.subject && a.at === b.at && a.cron === b.cron &&
    JSON.stringify(a.payload) === JSON.stringify(b.payload);
}

/** Reads a schedule entry; null when absent or deleted. */
export async function readSchedule(
  kv: KV,
  id: string,
): Promise<{ entry: ScheduleEntry; revision: number } | null> {
  const e = await kv.get(id);
  if (!e || e.operation !== "PUT" || e.length === 0) return null;
  return { entry: e.json<ScheduleEntry>(), revision: e.revision };
}

/**
 * The schedule store over a KV bucket.
 *
 * @example
 * ```ts ignore
 * const store = createScheduleStore(await new Kvm(nc).open(SCHEDULE_BUCKET));
 * await store.create({ subject: "orders.payment_due.o1", payload: event, at: due });
 * ```
 */
export function createScheduleStore(
  kv: KV,
  now: () => Date = () => new Date(),
  opts: { maxCallerCrons?: number } = {},
): ScheduleStore {
  const maxCallerCrons = opts.maxCallerCrons ?? CALLER_CRONS_MAX;
  /** The callers' recurring schedules that are active (callers' ids hold no `.`). */
  const activeCallerCrons = async () => {
    const ids: string[] = [];
    for await (const k of await kv.keys("*")) ids.push(k);
    const found = await Promise.all(ids.map((k) => readSchedule(kv, k)));
    return found.filter((f) => f?.entry.cron !== undefined && f.entry.status === "active").length;
  };
  return {
    async create(def, { caller = false } = {}) {
      const entry = newScheduleEntry(def, now());
      if (caller && entry.cron !== undefined) {
        const gap = shortestCronGap(entry.cron, now());
        if (gap > 0 && gap < CALLER_CRON_MIN_GAP_MS) {
          throw new ValidationError(
            `cron fires every ${gap / 1000} s at times; a caller's schedule may fire at most ` +
              `once a minute`,
            { field: "/cron" },
          );
        }
      }
      let revision: number;
      try {
        revision = await kv.create(entry.id, encoder.encode(JSON.stringify(entry)));
      } catch (err) {
        const existing = await readSchedule(kv, entry.id);
        if (!existing) throw err;
        if (sameDefinition(existing.entry, entry)) return existing.entry;
        // A pipeline's own timer (on a subject no caller may schedule) takes its id from one
        // a caller made first: a caller could otherwise squat the id of a deadline to come
        // (a review's SLA, a wait's timeout) and the pipeline's timer would never be set.
        if (callerMay(existing.entry.subject) && !callerMay(entry.subject)) {
          await kv.update(entry.id, encoder.encode(JSON.stringify(entry)), existing.revision);
          return entry;
        }
        throw new ConflictError(`schedule ${entry.id} exists with another definition`, {
          cause: err,
          field: "/id",
        });
      }
      // Counted once stored, so that callers making schedules at once cannot all pass.
      if (caller && entry.cron !== undefined && await activeCallerCrons() > maxCallerCrons) {
        await kv.delete(entry.id, { previousSeq: revision }).catch(() => {});
        throw new ConflictError(
          `${maxCallerCrons} recurring schedules are active already: cancel one first`,
          { field: "/cron" },
        );
      }
      return entry;
    },
    async get(id) {
      const found = ID.test(id) ? await readSchedule(kv, id) : null;
      if (!found) throw new NotFoundError(`no schedule ${JSON.stringify(id)}`);
      return found.entry;
    },
    async list() {
      const keys: string[] = [];
      for await (const k of await kv.keys()) keys.push(k);
      const found = await Promise.all(keys.map((k) => readSchedule(kv, k)));
      return found.filter((f) => f !== null).map((f) => f.entry)
        .sort((a, b) => (a.next_at ?? "~").localeCompare(b.next_at ?? "~"));
    },
    async cancel(id, opts = {}) {
      const found = ID.test(id) ? await readSchedule(kv, id) : null;
      if (!found) return false;
      if (opts.caller && (scheduleOwner(id) !== undefined || !callerMay(found.entry.subject))) {
        throw new ConflictError(
          `schedule ${id} is a pipeline's own timer (${found.entry.subject}), not a caller's`,
        );
      }
      await kv.delete(id);
      return true;
    },
  };
}

/**
 * Refuses a schedule a caller may not create: its subject must be one of `allowed` (by
 * default the shipped pipelines' schedulable bus inputs; {@link callerSchedulable} adds the
 * running definitions'), never a step's events, a JetStream API, KV or object-store subject,
 * nor a subject nothing running consumes. A {@link ValidationError} naming `/subject`.
 *
 * @example
 * ```ts
 * import { assertCallerSchedulable } from "./store.ts";
 * try {
 *   assertCallerSchedulable("$JS.API.STREAM.CREATE.X");
 * } catch (err) {
 *   console.assert((err as { field: string }).field === "/subject");
 * }
 * ```
 */
export function assertCallerSchedulable(
  subject: string,
  allowed: readonly string[] = callerSchedulable(),
): void {
  if (!subjectAllowed(allowed, subject)) {
    throw new ValidationError(
      `/subject must be one of ${allowed.join(", ")} (got ${
        JSON.stringify(subject).slice(0, 200)
      })`,
      { field: "/subject" },
    );
  }
}
