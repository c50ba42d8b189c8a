/**
 * A scheduler replica: watches the schedule bucket and fires what is due. Any number of
 * replicas may run; each firing happens at most once:
 *
 * 1. the replica that creates the lease key `<id>.<fire time>` in `weft_schedule_leases`
 *    (a KV create: exactly one succeeds) publishes;
 * 2. it publishes with the message id `sched-<id>-<fire time>`, so even a takeover (the
 *    lease holder died before advancing the schedule) is dropped by JetStream's
 *    duplicate window;
 * 3. it advances the schedule with a compare-and-set on its revision.
 *
 * Deadlines live in the bucket, not in memory: a restarted replica reads every schedule
 * from the watch and fires overdue ones at once.
 *
 * @module
 */
import { headers, type NatsConnection } from "@nats-io/nats-core";
import { jetstream } from "@nats-io/jetstream";
import { type KV, Kvm } from "@nats-io/kv";
import type { Logger } from "../observability/log.ts";
import { permissionViolation } from "../nats.ts";
import { publishUnique } from "../runner.ts";
import {
  RUNTIME_ROOTS,
  SCHEDULE_BUCKET,
  SCHEDULE_LEASE_BUCKET,
  subjectAllowed,
} from "../subjects.ts";
import { afterFiring, readSchedule, type ScheduleEntry, scheduleOwner } from "./store.ts";
import { ownedSubjects, schedulableSubjects } from "../wiring.ts";
import { SHIPPED_PIPELINES } from "../../pipelines/shipped.ts";

/** A running scheduler replica. */
export interface Scheduler {
  /** Firings published, firings another replica held, stale leases taken over. */
  readonly stats: { fired: number; lost: number; takeovers: number };
  /** Stops watching and waits for firings in flight. */
  stop(): Promise<void>;
  /** Resolves when the replica stopped. */
  readonly done: Promise<void>;
}

const MAX_TIMER_MS = 2 ** 31 - 1;

/** How often every timer is set again from the bucket, whatever the watch saw. */
const RESYNC_MS = 30_000;
const encoder = new TextEncoder();

/**
 * Whether a timer subject (`<root>._timer.<item>`) is a definition's: never under one of the
 * runtime's own roots (`deadletter._timer.x` would be a dead letter) or a hand-wired pipeline's.
 * True for any other subject.
 */
function definitionTimerRoot(subject: string): boolean {
  const [root, token] = subject.split(".");
  if (token !== "_timer") return true;
  return !RUNTIME_ROOTS.has(root!) && !SHIPPED_PIPELINES.some((w) => w.name === root);
}

/** The lease key of one firing. */
export function leaseKey(id: string, dueMs: number): string {
  return `${id}.${dueMs}`;
}

/**
 * Starts a scheduler replica.
 *
 * @example
 * ```ts ignore
 * const scheduler = await runScheduler({ nc, log, replica: "s1" });
 * await scheduler.stop();
 * ```
 */
export async function runScheduler(opts: {
  nc: NatsConnection;
  log: Logger;
  /** Names this replica on its leases. */
  replica: string;
  /** A lease older than this whose schedule was not advanced is taken over, ms. */
  takeoverMs?: number;
  now?: () => Date;
  /**
   * What it fires on at all; by default the shipped pipelines' ({@link schedulableSubjects})
   * and every definition's bus input, `<name>.submit` (its NATS identity may publish only the
   * running definitions').
   */
  schedulable?: readonly string[];
  /**
   * What a pipeline's own schedules (ids `<owner>.<id>`) fire on; by default a shipped
   * pipeline's timers and bus inputs ({@link ownedSubjects}), or a definition's timers.
   */
  ownSubjects?: (owner: string) => readonly string[];
}): Promise<Scheduler> {
  const { nc, replica } = opts;
  const schedulable = opts.schedulable ?? [...schedulableSubjects(SHIPPED_PIPELINES), "*.submit"];
  const ownSubjects = opts.ownSubjects ??
    ((owner: string) => ownedSubjects(SHIPPED_PIPELINES, owner));
  const log = opts.log.with({ stage: "scheduler" });
  const now = opts.now ?? (() => new Date());
  const takeoverMs = opts.takeoverMs ?? 30_000;
  const retryMs = 1000;
  const js = jetstream(nc);
  const kvm = new Kvm(nc);
  const schedules: KV = await kvm.open(SCHEDULE_BUCKET);
  const leases: KV = await kvm.open(SCHEDULE_LEASE_BUCKET);
  // The pipelines' schedules under ids they no longer use: removed, or they would fire beside
  // their successors (only the scheduler may write ids without an owner's prefix but callers').
  for (const { id, subject } of SHIPPED_PIPELINES.flatMap((w) => w.retiredSchedules ?? [])) {
    const old = await readSchedule(schedules, id).catch(() => null);
    if (old?.entry.subject !== subject) continue;
    await schedules.delete(id, { previousSeq: old.revision }).catch(() => {});
    log.info("retired schedule removed", { schedule: id });
  }
  const timers = new Map<string, { due: string; timer: ReturnType<typeof setTimeout> }>();
  /**
   * Firings this replica's key may not publish (a definition's timer after its file left the
   * list of pipelines the mesh runs), by schedule id: due time. Held until the schedule
   * changes or a start whose key may publish them (one running the pipeline again) fires
   * them, instead of a refused try every second for ever.
   */
  const held = new Map<string, string>();
  const stats = { fired: 0, lost: 0, takeovers: 0 };
  const inFlight = new Set<Promise<void>>();
  let stopped = false;

  function clear(id: string) {
    const t = timers.get(id);
    if (t) clearTimeout(t.timer);
    timers.delete(id);
  }

  function arm(id: string, due: string, delayOverride?: number) {
    clear(id);
    if (stopped) return;
    const delay = delayOverride ?? Math.max(0, Date.parse(due) - now().getTime());
    const timer = setTimeout(() => {
      timers.delete(id);
      if (Date.parse(due) > now().getTime()) return arm(id, due); // long delays are clamped
      const p = fire(id, due).catch(async (err) => {
        const refused = permissionViolation(err);
        if (refused) {
          // Trying again cannot help: this key's permissions are the running pipelines'.
          held.set(id, due);
          await leases.delete(leaseKey(id, Date.parse(due))).catch(() => {});
          log.warn("schedule held: its subject is no running pipeline's to publish", {
            schedule: id,
            subject: refused.subject,
            due,
            hint: "it fires when a start runs its pipeline again (pipelines/run.json, " +
              "WEFT_PIPELINES); cancel it otherwise",
          });
          return;
        }
        // NATS unavailable or the like: try again shortly unless the schedule changed.
        log.error("firing failed; retrying", { schedule: id, err });
        if (!timers.has(id)) arm(id, due, retryMs);
      }).finally(() => inFlight.delete(p));
      inFlight.add(p);
    }, Math.min(delay, MAX_TIMER_MS));
    timers.set(id, { due, timer });
  }

  async function publish(entry: ScheduleEntry, dueMs: number) {
    const h = headers();
    h.set("Weft-Schedule-Id", entry.id);
    h.set("Weft-Fire-Time", new Date(dueMs).toISOString());
    // Once per firing (a replica's retry is dropped as a duplicate), and never dropped for a
    // message someone else published under its id first.
    h.set("Nats-Msg-Id", `sched-${entry.id}-${dueMs}`);
    await publishUnique(js, entry.subject, encoder.encode(JSON.stringify(entry.payload)), h);
  }

  /** Moves the schedule past `due` (compare-and-set); false if someone else did. */
  async function advance(id: string, due: string): Promise<void> {
    for (let attempt = 0; attempt < 10; attempt++) {
      const current = await readSchedule(schedules, id);
      if (!current || current.entry.next_at !== due) return;
      const next = afterFiring(current.entry, new Date(due), now());
      try {
        await schedules.update(id, encoder.encode(JSON.stringify(next)), current.revision);
        return;
      } catch {
        // lost a race with another replica or a cancel: read again
      }
    }
  }

  async function fire(id: string, due: string): Promise<void> {
    const current = await readSchedule(schedules, id);
    if (!current || current.entry.status !== "active" || current.entry.next_at !== due) return;
    const owner = scheduleOwner(id);
    const subject = current.entry.subject;
    if (
      !subjectAllowed(owner === undefined ? schedulable : ownSubjects(owner), subject) ||
      !definitionTimerRoot(subject)
    ) {
      // Only a schedule written straight into the bucket can get here (e.g. by one
      // pipeline's service under its own key, for another's subject): never publish it.
      log.error("schedule refused: its subject is not schedulable", {
        schedule: id,
        subject: current.entry.subject.slice(0, 200),
      });
      return;
    }
    const dueMs = Date.parse(due);
    const key = leaseKey(id, dueMs);
    try {
      await leases.create(
        key,
        encoder.encode(JSON.stringify({ replica, at: now().toISOString() })),
      );
    } catch {
      // Another replica holds this firing. If it died before advancing the schedule, take
      // over after takeoverMs: the publish's message id makes a second publish a no-op.
      const lease = await leases.get(key);
      const age = lease ? now().getTime() - lease.created.getTime() : Infinity;
      if (age < takeoverMs) {
        stats.lost++;
        arm(id, due, takeoverMs - age + 50);
        return;
      }
      stats.takeovers++;
      log.warn("taking over a stale lease", { schedule: id, due });
    }
    await publish(current.entry, dueMs);
    stats.fired++;
    log.info("fired", { schedule: id, subject: current.entry.subject, due });
    await advance(id, due);
  }

  /**
   * Arms or clears `key`'s timer from what the bucket holds under it, never from what a watch
   * delivered: any reader able to create a push consumer can have the server deliver another
   * stream's message onto the watch's inbox (a forged `cancelled` entry cancelled a timer).
   */
  async function follow(key: string) {
    const found = await readSchedule(schedules, key).catch(() => null);
    const entry = found?.entry;
    if (!entry || entry.id !== key) return (held.delete(key), clear(key));
    if (entry.status !== "active" || !entry.next_at) return (held.delete(key), clear(key));
    if (held.get(key) === entry.next_at) return; // refused by this key's permissions
    held.delete(key);
    if (timers.get(key)?.due !== entry.next_at) arm(key, entry.next_at);
  }

  const watch = await schedules.watch();
  const done = (async () => {
    for await (const e of watch) await follow(e.key);
  })();
  // Every timer again from the bucket now and then: a watch whose consumer another reader
  // deleted, or whose position a forged delivery moved past the bucket's, sees nothing new
  // until nats.js recreates it.
  const resync = setInterval(() => {
    void (async () => {
      const keys = new Set<string>();
      for await (const k of await schedules.keys()) keys.add(k);
      for (const k of keys) await follow(k);
      for (const id of timers.keys()) if (!keys.has(id)) clear(id);
    })().catch((err) => log.warn("schedule resync failed", { err: String(err) }));
  }, RESYNC_MS);

  log.info("scheduler started", { replica, takeover_ms: takeoverMs });
  return {
    stats,
    done,
    async stop() {
      stopped = true;
      clearInterval(resync);
      for (const id of [...timers.keys()]) clear(id);
      watch.stop();
      await done.catch(() => {});
      await Promise.all(inFlight);
      log.info("scheduler stopped", stats);
    },
  };
}
