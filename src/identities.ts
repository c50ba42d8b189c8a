/**
 * Least-privilege NATS identities: what each service may publish and subscribe to, derived
 * from what it consumes and produces, and the nats-server authorization block that
 * enforces it.
 *
 * Each identity is an nkey (an ed25519 key pair): the server's configuration holds only
 * public keys, and each service reads its own seed from a file of mode 0600 that no other
 * service is allowed to read (`--allow-read` names that one file). The supervisor of
 * `deno task start` makes the keys once, under the nats-server's directory
 * (`data/identities/`, ignored by git), and starts nats-server with the block below.
 *
 * What a permission grants, in NATS terms:
 * - a step publishes only its own output event types (and its dead letters and its
 *   pipeline's failure event), and acks and pulls only on its own durable consumer;
 * - reading a stream (the gateway, state writers) means info, direct and stored message
 *   gets and ephemeral consumers, never another service's durable consumer;
 * - a KV bucket is read through its stream, and written with `$KV.<bucket>.>`;
 * - nobody but the `admin` identity (topology: the supervisor, or an operator on purpose)
 *   may create, update, purge or delete a stream or a durable consumer it does not own; an
 *   object store's writers publish chunks and metadata only (no purge);
 * - replies go to a per-identity inbox prefix (`_INBOX_<name>`), so no service can read
 *   another's replies; a service answers only into the requesters' inboxes (no
 *   `allow_responses`, which would let a requester choose where an answer is published).
 *
 * @module
 */
import { nkeys } from "@nats-io/nats-core";
import { userKey } from "./nkeys.ts";

/** Where identities (nkey seeds) live, under nats-server's directory. */
export const IDENTITY_DIR = "data/identities";

/** What a service does on the bus; its NATS permissions follow from it. */
export interface Access {
  /** Subjects it publishes on (JetStream publishes included), e.g. `orders.priced.*`. */
  publishes?: readonly string[];
  /** Request subjects it sends requests to (core NATS, e.g. `weft.*.metrics`). */
  requests?: readonly string[];
  /** Request subjects it answers (subscriptions and queue groups). */
  serves?: readonly string[];
  /** Its own durable consumers: pulls, acks, (re)creates them, and reads their stream's messages. */
  consumes?: readonly { stream: string; durable: string }[];
  /** Streams it reads: info, message gets, ephemeral and ordered consumers. */
  readsStreams?: readonly string[];
  /**
   * Streams on which it makes, works and deletes durable consumers of its own choosing
   * (the shadow service: one per live shadow, named at attach time); never one another
   * service owns.
   */
  managesConsumers?: readonly string[];
  /**
   * Streams whose consumers it may list (the gateway, for each step's backlog on /metrics).
   * Readers of a stream may not: with others' ephemeral consumers' names, they could delete
   * them. Consumer managers may.
   */
  listsConsumers?: readonly string[];
  /**
   * Streams whose durable consumers that no service owns (a retired step's: a pipeline's
   * control service sweeps them) it may list, pull from, ack on and delete; every other
   * service's durable consumer on them stays denied, so it can never take a live step's
   * messages.
   */
  retiresConsumers?: readonly string[];
  /** KV buckets it reads. */
  readsBuckets?: readonly string[];
  /** KV buckets it writes (and reads). */
  writesBuckets?: readonly string[];
  /**
   * Keys of a KV bucket it writes (and the whole bucket it reads): a subject pattern of keys,
   * e.g. `{ bucket: "weft_schedules", keys: "orders.>" }` (the keys `orders.<...>`), or `*`
   * (the keys with no `.`). Another's keys in the bucket it may not write nor delete.
   */
  writesKeys?: readonly { bucket: string; keys: string }[];
  /** Object stores it reads. */
  readsObjects?: readonly string[];
  /**
   * Object stores it writes (and reads): new objects under names of their own, and delete
   * markers; never a purge, so a replaced or deleted object's chunks stay until the admin
   * identity purges them.
   */
  writesObjects?: readonly string[];
  /**
   * Subscribes to these plain subjects (requests it answers go in `serves`). Never a subject a
   * stream captures: every identity that reads a stream may create a push consumer, whose
   * `deliver_subject` the server does not check against its creator's permissions, and a
   * subscriber's interest there makes the server deliver, so the capturing stream stores a
   * copy of another stream (tests/bus_permissions_test.ts).
   */
  subscribes?: readonly string[];
  /**
   * Whether it answers requests: it may publish to the inboxes of the identities that send
   * requests (and to nats.js's default `_INBOX.`), never to a reply subject of a requester's
   * choosing (`allow_responses` stays off). Default true: every service answers `nats micro`
   * and the metrics request. An identity that subscribes widely and serves nothing (ops)
   * does not.
   */
  answers?: boolean;
  /**
   * Whether it answers its own requests too (it may publish to its own inbox): an identity
   * that runs as several processes asking one another, as the gateway and the events gateway
   * of `WEFT_EVENTS_PORT` ask each other for the items each accepted. Default false.
   */
  answersItself?: boolean;
  /**
   * Subjects it may not publish on even where a grant above matches them (a deny wins), e.g.
   * the audit events under the shadow service's `shadow.*.*.*`.
   */
  deniesPublishes?: readonly string[];
  /** Every JetStream API, every subject: the topology owner. */
  admin?: boolean;
}

/** nats-server permissions of one user. */
export interface Permissions {
  publish: { allow: string[]; deny?: string[] };
  subscribe: { allow: string[]; deny?: string[] };
  allow_responses: boolean;
}

/** The inbox prefix of an identity: replies to its requests arrive under it, and only it may subscribe there. */
export function inboxPrefix(identity: string): string {
  return `_INBOX_${identity.replace(/[^A-Za-z0-9_-]/g, "_")}`;
}

const API = "$JS.API";

/** Read-only JetStream API subjects every identity may use: account and stream listing. */
const COMMON_PUBLISH = [`${API}.INFO`, `${API}.STREAM.NAMES`, `${API}.STREAM.LIST`];

function readStreamSubjects(stream: string): string[] {
  return [
    `${API}.STREAM.INFO.${stream}`,
    `${API}.STREAM.MSG.GET.${stream}`,
    `${API}.DIRECT.GET.${stream}`,
    `${API}.DIRECT.GET.${stream}.>`,
    // Ephemeral and ordered consumers: create, pull, info, delete. Only the form that names
    // the consumer in the subject (`CREATE.<stream>.<name>[.<filter>]`, nats-server 2.9+):
    // the unnamed `CREATE.<stream>` takes the name from the body, where a deny cannot see
    // it, and a body naming a step's durable consumer updates it (its filter, its start),
    // so the step never sees the items published meanwhile. Readers give one filter as a
    // string, which nats.js sends in the named form.
    //
    // Not the listing of the stream's consumers: others' ephemeral consumers (a bucket watch,
    // an SSE feed) have random names, and a reader who cannot learn one cannot delete it or
    // create it again with another filter, which the server would allow (see `listsConsumers`).
    `${API}.CONSUMER.CREATE.${stream}.>`,
    `${API}.CONSUMER.MSG.NEXT.${stream}.>`,
    `${API}.CONSUMER.INFO.${stream}.>`,
    `${API}.CONSUMER.DELETE.${stream}.>`,
  ];
}

/** Working a durable consumer: (re)create it, pull from it, ack on it. */
function durableControl(stream: string, durable: string): string[] {
  return [
    `${API}.CONSUMER.CREATE.${stream}.${durable}`,
    `${API}.CONSUMER.CREATE.${stream}.${durable}.>`,
    `${API}.CONSUMER.DURABLE.CREATE.${stream}.${durable}`,
    `${API}.CONSUMER.MSG.NEXT.${stream}.${durable}`,
    `$JS.ACK.${stream}.${durable}.>`,
  ];
}

/** What the owner of a durable consumer does with it: work it and read its info. */
function durableSubjects(stream: string, durable: string): string[] {
  return [...durableControl(stream, durable), `${API}.CONSUMER.INFO.${stream}.${durable}`];
}

/** What no one but the owner may do to a durable consumer: work it, or delete it. */
function durableDenies(stream: string, durable: string): string[] {
  return [...durableControl(stream, durable), `${API}.CONSUMER.DELETE.${stream}.${durable}`];
}

const kvStream = (bucket: string) => `KV_${bucket}`;
const objStream = (bucket: string) => `OBJ_${bucket}`;

/**
 * The permissions of `identity` from its `access`. `durables` lists every service's
 * durable consumers: reading a stream never reaches one of another service's.
 *
 * @example
 * ```ts
 * import { permissionsFor } from "./identities.ts";
 * const p = permissionsFor("price", {
 *   consumes: [{ stream: "ORDERS", durable: "price" }],
 *   publishes: ["orders.priced.*"],
 * }, []);
 * console.assert(p.publish.allow.includes("orders.priced.*"));
 * console.assert(!p.publish.allow.some((s) => s.startsWith("$JS.API.STREAM.DELETE")));
 * ```
 */
export function permissionsFor(
  identity: string,
  access: Access,
  durables: readonly { stream: string; durable: string }[],
  identities: readonly string[] = [],
  requesters: readonly string[] = [],
): Permissions {
  if (access.admin) {
    return { publish: { allow: [">"] }, subscribe: { allow: [">"] }, allow_responses: true };
  }
  const pub = new Set<string>(COMMON_PUBLISH);
  const sub = new Set<string>([`${inboxPrefix(identity)}.>`]);
  const read = new Set<string>(access.readsStreams ?? []);
  for (const s of access.publishes ?? []) pub.add(s);
  for (const s of access.requests ?? []) pub.add(s);
  for (const s of access.serves ?? []) sub.add(s);
  for (const s of access.subscribes ?? []) sub.add(s);
  // Every service registers with the NATS services protocol (`nats micro`).
  sub.add("$SRV.>");
  const own = new Set<string>();
  for (const { stream, durable } of access.consumes ?? []) {
    own.add(`${stream}/${durable}`);
    for (const s of durableSubjects(stream, durable)) pub.add(s);
    pub.add(`${API}.STREAM.INFO.${stream}`);
    pub.add(`${API}.STREAM.MSG.GET.${stream}`);
    pub.add(`${API}.DIRECT.GET.${stream}`);
    pub.add(`${API}.DIRECT.GET.${stream}.>`);
  }
  for (const b of [...access.readsBuckets ?? [], ...access.writesBuckets ?? []]) {
    read.add(kvStream(b));
  }
  for (const b of access.writesBuckets ?? []) pub.add(`$KV.${b}.>`);
  for (const { bucket, keys } of access.writesKeys ?? []) {
    read.add(kvStream(bucket));
    pub.add(`$KV.${bucket}.${keys}`);
  }
  for (const b of [...access.readsObjects ?? [], ...access.writesObjects ?? []]) {
    read.add(objStream(b));
  }
  // Writing an object store is publishing its chunks and its metadata, never purging its
  // stream: a purge request's filter is in its body, which a permission cannot see, so the
  // right to purge old chunks (nats.js purges them when an object is replaced or deleted) was
  // the right to erase every object at once. Writers store each object once, under a name
  // of its own, and replace none.
  for (const b of access.writesObjects ?? []) pub.add(`$O.${b}.>`);
  for (const stream of read) for (const s of readStreamSubjects(stream)) pub.add(s);
  for (const stream of access.listsConsumers ?? []) {
    pub.add(`${API}.CONSUMER.LIST.${stream}`);
    pub.add(`${API}.CONSUMER.NAMES.${stream}`);
  }
  const manages = new Set(access.managesConsumers ?? []);
  for (const stream of manages) {
    for (const s of durableSubjects(stream, "*")) pub.add(s);
    pub.add(`${API}.CONSUMER.DELETE.${stream}.*`);
    pub.add(`${API}.CONSUMER.LIST.${stream}`);
    pub.add(`${API}.CONSUMER.NAMES.${stream}`);
    pub.add(`${API}.STREAM.INFO.${stream}`);
  }
  const retires = new Set(access.retiresConsumers ?? []);
  for (const stream of retires) {
    pub.add(`${API}.CONSUMER.LIST.${stream}`);
    pub.add(`${API}.CONSUMER.NAMES.${stream}`);
    pub.add(`${API}.CONSUMER.INFO.${stream}.*`);
    pub.add(`${API}.CONSUMER.MSG.NEXT.${stream}.*`);
    pub.add(`${API}.CONSUMER.DELETE.${stream}.*`);
    pub.add(`$JS.ACK.${stream}.*.>`);
    pub.add(`${API}.STREAM.INFO.${stream}`);
  }
  const deny = new Set<string>(access.deniesPublishes ?? []);
  for (const { stream, durable } of durables) {
    if (
      (read.has(stream) || manages.has(stream) || retires.has(stream)) &&
      !own.has(`${stream}/${durable}`)
    ) {
      for (const s of durableDenies(stream, durable)) deny.add(s);
    }
  }
  // Another identity's inbox is never readable: deliveries of its consumers arrive there,
  // and a reader of their reply subjects could ack (or terminate) them in its place.
  const subDeny = new Set<string>();
  for (const other of identities) {
    if (other !== identity) subDeny.add(`${inboxPrefix(other)}.>`);
  }
  // Replies go only to the inboxes of those who send requests: `allow_responses` would let a
  // requester name any reply subject (`$KV.<bucket>.<key>`, another step's event subject), and
  // every service's answer to a `nats micro` ping would be published there for it.
  if (access.answers ?? true) {
    pub.add("_INBOX.>"); // clients with nats.js's default prefix, e.g. the nats CLI
    for (const r of requesters) {
      if (r !== identity || access.answersItself) pub.add(`${inboxPrefix(r)}.>`);
    }
  }
  // Flow control of the push consumers nats.js watches buckets with (replies to the server).
  for (
    const stream of new Set([
      ...read,
      ...manages,
      ...retires,
      ...[...own].map((o) => o.split("/")[0]!),
    ])
  ) {
    pub.add(`$JS.FC.${stream}.>`);
  }
  return {
    publish: { allow: [...pub], ...(deny.size ? { deny: [...deny] } : {}) },
    subscribe: { allow: [...sub], ...(subDeny.size ? { deny: [...subDeny] } : {}) },
    allow_responses: false,
  };
}

/** An identity's key pair as stored: the public key in the server config, the seed in its file. */
export interface Identity {
  name: string;
  /** The public user nkey (`U...`). */
  publicKey: string;
  /** Path of the seed file (mode 0600). */
  seedFile: string;
}

/**
 * Makes (or reuses) an nkey for each name under `dir`: `<dir>/<name>.nk`, mode 0600, the
 * directory 0700. Existing seeds are kept, so a restart changes no key.
 */
export async function ensureIdentities(dir: string, names: readonly string[]): Promise<Identity[]> {
  await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
  await Deno.chmod(dir, 0o700);
  const out: Identity[] = [];
  for (const name of names) {
    const seedFile = `${dir}/${name}.nk`;
    let seed: Uint8Array;
    try {
      seed = new TextEncoder().encode((await Deno.readTextFile(seedFile)).trim());
    } catch (err) {
      if (!(err instanceof Deno.errors.NotFound)) throw err;
      seed = nkeys.createUser().getSeed();
      await Deno.writeTextFile(seedFile, new TextDecoder().decode(seed) + "\n", {
        mode: 0o600,
        createNew: true,
      });
    }
    await Deno.chmod(seedFile, 0o600);
    out.push({ name, publicKey: userKey(seed).publicKey, seedFile });
  }
  return out;
}

/**
 * The nats-server `authorization` block for `identities`, each with its permissions.
 * Connections without a known key are refused.
 */
export function authorizationBlock(
  users: readonly {
    identity: Identity;
    permissions: Permissions;
    /** Only these kinds of connection may use it (e.g. `["LEAFNODE"]` for an edge site's link). */
    connectionTypes?: readonly string[];
  }[],
): string {
  const q = (s: string) => JSON.stringify(s);
  const list = (xs: readonly string[]) => `[${xs.map(q).join(", ")}]`;
  const rule = (r: { allow: string[]; deny?: string[] }) =>
    `{ allow: ${list(r.allow)}${r.deny ? `, deny: ${list(r.deny)}` : ""} }`;
  const lines = users.map(({ identity, permissions: p, connectionTypes }) =>
    `    # ${identity.name}\n    { nkey: ${q(identity.publicKey)}, ` +
    (connectionTypes ? `allowed_connection_types: ${list(connectionTypes)}, ` : "") +
    `permissions: {\n` +
    `      publish: ${rule(p.publish)}\n      subscribe: ${rule(p.subscribe)}\n` +
    `      allow_responses: ${p.allow_responses}\n    } }`
  );
  return `authorization {\n  users: [\n${lines.join("\n")}\n  ]\n}\n`;
}
