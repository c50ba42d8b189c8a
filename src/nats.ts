/**
 * Connecting to NATS the same way in every service.
 *
 * @module
 */
import { connect } from "@nats-io/transport-node";
import {
  type ConnectionOptions,
  errors,
  type NatsConnection,
  PermissionViolationError,
  type Status,
  type Subscription,
  type SubscriptionOptions,
} from "@nats-io/nats-core";
import { inboxPrefix } from "./identities.ts";
import { userAuthenticator } from "./nkeys.ts";
import { ConfigError, isNatsUnavailable } from "./errors.ts";
import type { Logger } from "./observability/log.ts";

/** Who a connection is and how it checks the server. */
export interface NatsCredentials {
  /** The nkey seed file to authenticate with (see src/identities.ts). */
  nkeySeedFile?: string;
  /** The identity's name: replies to its requests arrive under its own inbox prefix. */
  identity?: string;
  /** A CA certificate (PEM file): the connection then requires TLS and verifies the server. */
  caFile?: string;
  /** A client certificate (PEM file) for servers that verify clients (mutual TLS). */
  certFile?: string;
  /** The private key (PEM file) of `certFile`. */
  keyFile?: string;
}

/** The credentials a service's configuration names (identity seed aside). */
export function tlsCredentials(
  config: { natsCa: string; natsCert: string; natsKey: string },
): Pick<NatsCredentials, "caFile" | "certFile" | "keyFile"> {
  return {
    ...(config.natsCa ? { caFile: config.natsCa } : {}),
    ...(config.natsCert ? { certFile: config.natsCert, keyFile: config.natsKey } : {}),
  };
}

/** How long the supervisor keeps trying a server it started that accepts but does not answer. */
export const FIRST_CONNECT_PATIENCE_MS = 60_000;

/**
 * Connects to the NATS server(s) in `url` (comma-separated), reconnecting forever: a
 * restarted server must not take the mesh down with it.
 *
 * With `patienceMs`, a first connect that times out (the server accepted the socket but did
 * not finish the handshake within `timeoutMs`, nats.js's 20 s by default) is tried again
 * until that long has passed: for a caller that knows the server is up, only busy (the
 * supervisor, on the server it just started). Without it the first timeout rejects: a server
 * that refuses a client's TLS certificate also shows as a timeout, and must fail as soon as
 * it is seen. A refused connection or identity rejects at once either way.
 *
 * @example
 * ```ts ignore
 * const nc = await connectNats("nats://127.0.0.1:4222", "weft-topics", {
 *   nkeySeedFile: "data/identities/topics.nk",
 *   identity: "topics",
 * });
 * ```
 */
export async function connectNats(
  url: string,
  name: string,
  credentials: NatsCredentials = {},
  options: { timeoutMs?: number; patienceMs?: number } = {},
): Promise<NatsConnection> {
  const opts: ConnectionOptions = {
    servers: url.split(",").map((s) => s.trim()),
    name,
    maxReconnectAttempts: -1,
    reconnectTimeWait: 500,
    waitOnFirstConnect: false,
    // How long the first connect may take before it rejects (nats.js's default is 20 s).
    ...(options.timeoutMs ? { timeout: options.timeoutMs } : {}),
  };
  if (credentials.nkeySeedFile) {
    const file = credentials.nkeySeedFile;
    const seed = (await Deno.readTextFile(file).catch((err: Error) => {
      // Missing, or where the task may not read (a stack trace said only "NotCapable").
      throw new ConfigError(
        `WEFT_NATS_NKEY: cannot read the key file ${file} (${err.name}: ${err.message}); ` +
          (err.name === "NotCapable"
            // A mesh started with WEFT_NATS_DIR keeps its keys under it, where the service
            // tasks' --allow-read does not reach.
            ? "a service task reads keys only from data/identities/: a mesh started with " +
              "WEFT_NATS_DIR=<dir> keeps them in <dir>/data/identities/, so copy the key into " +
              "data/identities/ (mode 0600) and point WEFT_NATS_NKEY there"
            : "deno task start makes the keys in data/identities/ (under WEFT_NATS_DIR when " +
              "set), the one folder the service tasks may read keys from"),
        { cause: err },
      );
    })).trim();
    try {
      opts.authenticator = userAuthenticator(new TextEncoder().encode(seed));
    } catch (err) {
      // A file that holds something else (an account's seed, a public key, a truncated copy).
      throw new ConfigError(
        `WEFT_NATS_NKEY: the key file ${file} holds no user nkey seed (SU...): ${
          err instanceof Error ? err.message : String(err)
        }; deno task start makes one per service in data/identities/ (under WEFT_NATS_DIR when set)`,
        { cause: err },
      );
    }
  }
  const identity = credentials.identity ?? identityOfSeedFile(credentials.nkeySeedFile);
  if (identity) opts.inboxPrefix = inboxPrefix(identity);
  const { caFile, certFile, keyFile } = credentials;
  if (caFile || certFile) {
    opts.tls = {
      ...(caFile ? { caFile } : {}),
      ...(certFile ? { certFile, keyFile } : {}),
    };
  }
  absorbLateSocketResets();
  const giveUpAt = Date.now() + (options.patienceMs ?? 0);
  for (;;) {
    try {
      return answersOnlyInboxes(await connect(opts));
    } catch (err) {
      if (err instanceof errors.AuthorizationError && !credentials.nkeySeedFile) {
        // A command-line tool run against `deno task start`'s server without a key.
        throw new ConfigError(
          `NATS at ${url} wants an identity (${err.message}): set WEFT_NATS_NKEY to a key ` +
            `file, e.g. WEFT_NATS_NKEY=data/identities/ops.nk (reads, submits, requests) or ` +
            `data/identities/admin.nk (changes)`,
          { cause: err },
        );
      }
      if (!(err instanceof errors.TimeoutError) || Date.now() >= giveUpAt) throw err;
    }
  }
}

/**
 * The identity a key made by `deno task start` belongs to, from its file
 * (`.../identities/<name>.nk`): a tool run with `WEFT_NATS_NKEY=data/identities/ops.nk` gets
 * its replies under `_INBOX_ops`, the only inbox that key may read. Another file: none.
 *
 * @example
 * ```ts
 * import { identityOfSeedFile } from "./nats.ts";
 * console.assert(identityOfSeedFile("data/identities/ops.nk") === "ops");
 * console.assert(identityOfSeedFile("keys/mine.nk") === undefined);
 * ```
 */
export function identityOfSeedFile(file: string | undefined): string | undefined {
  return file ? /(?:^|\/)identities\/([^/]+)\.nk$/.exec(file)?.[1] : undefined;
}

/** An inbox: nats.js's default `_INBOX.` or an identity's `_INBOX_<name>.`. */
const INBOX = /^_INBOX[._]/;

/**
 * Makes every request a service serves on `nc` (its subscriptions outside inboxes: `weft.*`,
 * `$SRV.*`) go unanswered when its reply subject is no inbox. A reply is an ordinary
 * publish, so a requester naming `$KV.<bucket>.<key>` or a step's event subject as reply
 * would have the service write there whatever its own permissions allow (a `nats micro`
 * ping from the ops key replaced an item's state). Subscriptions on inboxes (replies to this
 * connection's requests, JetStream deliveries with their ack subjects) are left alone.
 */
function answersOnlyInboxes(nc: NatsConnection): NatsConnection {
  const subscribe = nc.subscribe.bind(nc);
  nc.subscribe = (subject: string, opts?: SubscriptionOptions): Subscription => {
    const callback = opts?.callback;
    if (INBOX.test(subject) || !callback) return subscribe(subject, opts);
    return subscribe(subject, {
      ...opts,
      callback: (err, msg) => {
        if (msg?.reply && !INBOX.test(msg.reply)) return;
        callback(err, msg);
      },
    });
  };
  return nc;
}

let absorbing = false;

/**
 * nats.js's Node transport removes a socket's listeners before destroying it (a refused
 * connection, a close). Under Deno a read still pending on that socket may then fail, and
 * the error is emitted with no listener left, which would end the process as an uncaught
 * error: a wrong key, a server closing a connection, or a server refusing the client's
 * certificate (a TLS alert such as `received fatal alert: CertificateRequired` or
 * `UnknownCA`, sent after the handshake already failed) killed the service instead of
 * being reported through the connect's rejection or the connection's status. Those late
 * errors carry nothing: the connection they belonged to is already closed and reported.
 * Only they are absorbed: socket errors with code ECONNRESET or EPIPE, and TLS alerts
 * received from the peer; anything else stays uncaught.
 */
function absorbLateSocketResets(): void {
  if (absorbing) return;
  absorbing = true;
  globalThis.addEventListener("error", (event) => {
    if (isLateSocketError(event.error)) event.preventDefault();
  });
}

/** Whether `err` is one of the late socket errors {@link absorbLateSocketResets} absorbs. */
export function isLateSocketError(err: unknown): boolean {
  const { code, message } = (err ?? {}) as { code?: unknown; message?: unknown };
  if (code === "ECONNRESET" || code === "EPIPE") return true;
  return typeof message === "string" && /^received fatal alert: \w+$/.test(message);
}

/** Whether a connection is up right now, kept from its status events. */
export interface ConnectionHealth {
  /** False from a disconnect until the next reconnect, and after close. */
  readonly up: boolean;
  /** Stops watching. */
  stop(): void;
}

/**
 * Watches `nc`'s status, so a request can be refused at once (503) while the server is
 * unreachable instead of waiting out a publish timeout.
 *
 * @example
 * ```ts ignore
 * const health = watchConnection(nc);
 * if (!health.up) throw new WeftError(ErrorCode.Unavailable, "NATS is unreachable");
 * ```
 */
export function watchConnection(nc: NatsConnection): ConnectionHealth {
  let up = !nc.isClosed();
  // nats.js returns a stoppable queued iterator, typed only as AsyncIterable.
  const statuses = nc.status() as AsyncIterable<Status> & { stop?: () => void };
  (async () => {
    for await (const s of statuses) {
      if (s.type === "disconnect" || s.type === "close") up = false;
      else if (s.type === "reconnect") up = true;
    }
  })().catch(() => {});
  nc.closed().then(() => (up = false));
  return {
    get up() {
      return up && !nc.isClosed();
    },
    stop: () => statuses.stop?.(),
  };
}

/**
 * Runs `fn`, and again a second later while it fails because NATS is briefly unavailable (a
 * JetStream request timed out on a busy server, found no responder, or met a stream without
 * a leader: see `isNatsUnavailable`), for up to `patienceMs`; each retry is logged. Any other
 * error, or one after the patience, is thrown. For start-up work that would otherwise end
 * the process (and a restart would only do it again).
 *
 * @example
 * ```ts ignore
 * import { whileUnavailable } from "./nats.ts";
 * await whileUnavailable("set up the topology", () => ensureTopology(nc, jsm, config), {
 *   patienceMs: 30_000,
 *   log,
 * });
 * ```
 */
export async function whileUnavailable<T>(
  what: string,
  fn: () => Promise<T>,
  opts: { patienceMs: number; log: Logger; retryDelayMs?: number },
): Promise<T> {
  const giveUpAt = Date.now() + opts.patienceMs;
  for (let attempt = 1;; attempt++) {
    try {
      return await fn();
    } catch (err) {
      if (!isNatsUnavailable(err) || Date.now() >= giveUpAt) throw err;
      opts.log.warn("NATS is not answering yet; trying again", {
        what,
        attempt,
        err: String(err),
      });
      await new Promise((r) => setTimeout(r, opts.retryDelayMs ?? 1000));
    }
  }
}

/**
 * The permission violation behind `err` (a request's or a JetStream publish's error carries
 * it as its cause), or undefined.
 *
 * @example
 * ```ts
 * import { permissionViolation } from "./nats.ts";
 * console.assert(permissionViolation(new Error("other")) === undefined);
 * ```
 */
export function permissionViolation(err: unknown): PermissionViolationError | undefined {
  for (let e = err; e instanceof Error; e = e.cause) {
    if (e instanceof PermissionViolationError) return e;
  }
  return undefined;
}
