/**
 * Edge sites and the hub that collects their events.
 *
 * An edge site is a whole Weft mesh (its own nats-server, gateway and steps) next to its
 * users. Its nats-server has a JetStream domain of its own (the site's name) and a leafnode
 * connection to the hub. The site publishes and stores its events locally, on the usual
 * `<pipeline>.<type>.<id>` subjects in its own streams, so it goes on ingesting and
 * processing while its link to the hub is down.
 *
 * The hub (`--hub east,west`) has the JetStream domain `hub`, a loopback leafnode listener,
 * and per site a stream `EDGE_<SITE>` that sources the site's pipeline streams, DEADLETTER
 * and DIGEST ({@link SITE_STREAMS}) across domains (`external.api = $JS.<site>.API`), each
 * with a subject transform, e.g. `orders.>` to `site.<site>.orders.>`. Sourcing tracks each of the site's stream sequences, so after an
 * outage the hub resumes where it stopped: every event once, in the site's order. One stream per
 * site, rather than one for all, keeps each site's duplicate window apart: two sites may
 * both accept an item with the same client-chosen id, and its events have the same message
 * ids at both.
 *
 * Least privilege on the link: each site authenticates with an nkey of its own
 * (`leaf-<site>`), whose permissions carry only what sourcing needs. From the hub to the
 * site: consumer create/delete requests on the site's collected streams and flow-control replies;
 * from the site to the hub: the deliveries on the site's own deliver prefix and the replies
 * to those requests. Nothing else crosses: not the sites' pipeline publishes (which the
 * hub's own streams would otherwise store too), not request subjects, not any other
 * JetStream API.
 *
 * @module
 */
import {
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamClient,
  type JetStreamManager,
  type JsMsg,
  type StreamInfo,
  type StreamSource,
  type StreamSourceInfo,
} from "@nats-io/jetstream";
import type { Logger } from "./observability/log.ts";
import { IDENTITY_DIR, type Permissions } from "./identities.ts";
import { NotFoundError } from "./errors.ts";
import type { AnyEvent } from "./schemas.ts";
import { readStream } from "./stream_reader.ts";
import { failureFolds, type LetterReads } from "./failure_letter.ts";
import { messagesOn } from "./runner.ts";
import { lazy } from "./retry.ts";
import { decodeStateEvent, foldLed, startsNoItem, type StateSpec } from "./state_writer.ts";
import { DEADLETTER_STREAM, DIGEST_STREAM } from "./subjects.ts";
import type { PipelineWiring } from "./wiring.ts";
import { SHIPPED_PIPELINES } from "../pipelines/shipped.ts";
import type { NamedStreamConfig } from "./topology.ts";

/** JetStream's error code for a stream that does not exist. */
const STREAM_NOT_FOUND = 10059;

/** The hub's JetStream domain. */
export const HUB_DOMAIN = "hub";

/**
 * The oldest nats-server a hub or an edge site runs on: a hub's per-site streams source with
 * subject transforms (`subject_transforms` on a stream source), new in 2.10. An older server
 * would ignore them and store every site's events under the same subjects.
 */
export const EDGE_MIN_SERVER_VERSION = "2.10.0";

/** The hub's stream holding one site's events, e.g. `EDGE_EAST`. */
export function edgeStream(site: string): string {
  return `EDGE_${site.toUpperCase()}`;
}

/** Where the hub keeps a site's events: `site.<site>.<pipeline>.<type>.<id>`. */
export function siteSubjectPrefix(site: string): string {
  return `site.${site}`;
}

/** A stream of a site the hub collects, and the first token of its subjects. */
export interface SiteStream {
  stream: string;
  root: string;
}

/** The first token of the shipped pipelines' subjects: their names. */
const SHIPPED_ROOTS: readonly string[] = SHIPPED_PIPELINES.map((w) => w.name);

/**
 * The streams of a site that its hub collects, each with the first token of its subjects:
 * the shipped pipelines' events, the dead letters (so the hub sees what failed where) and
 * the digests.
 */
export const SITE_STREAMS: readonly SiteStream[] = [
  ...SHIPPED_PIPELINES.flatMap((w) => w.streams.map((s) => ({ stream: s.name, root: w.name }))),
  { stream: DEADLETTER_STREAM, root: "deadletter" },
  { stream: DIGEST_STREAM, root: "digest" },
];

/**
 * What a hub collects from each site: {@link SITE_STREAMS}, and the streams of the pipeline
 * definitions it runs (`definitions`: each pipeline's stream and name). A site runs the same
 * definitions; a stream it lacks shows as that source's error on `GET /sites`.
 */
export function siteStreams(definitions: readonly SiteStream[] = []): SiteStream[] {
  return [...SITE_STREAMS, ...definitions];
}

/**
 * The hub-side filter of one site's events of a pipeline (by its name, the first token of
 * its subjects), or of one item's there.
 *
 * @example
 * ```ts
 * import { siteEventsFilter } from "./edge.ts";
 * console.assert(siteEventsFilter("east", "o1", "orders") === "site.east.orders.*.o1");
 * console.assert(siteEventsFilter("east", "*", "orders") === "site.east.orders.*.*");
 * ```
 */
export function siteEventsFilter(site: string, itemId: string, pipeline: string): string {
  return `${siteSubjectPrefix(site)}.${pipeline}.*.${itemId}`;
}

/**
 * Splits a hub subject `site.<site>.<pipeline>.<type>.<id>` of a shipped pipeline; null for
 * any other.
 */
export function parseSiteSubject(
  subject: string,
): { site: string; type: string; itemId: string } | null {
  const p = subject.split(".");
  if (
    p.length !== 5 || p[0] !== "site" || !SHIPPED_ROOTS.includes(p[2]!) ||
    !p[1] || !p[3] || !p[4]
  ) {
    return null;
  }
  return { site: p[1], type: `${p[2]}.${p[3]}`, itemId: p[4] };
}

/** The NATS identity (nkey) a site's leafnode connection authenticates as. */
export function leafIdentity(site: string): string {
  return `leaf-${site}`;
}

/**
 * Where a mesh keeps site `site`'s leafnode key: under the identities directory of its
 * nats-server's directory `natsDir` (`WEFT_NATS_DIR`, relative to the repository root unless
 * absolute; empty: the repository root), as `deno task start` writes it at a hub and reads it
 * at the site.
 *
 * @example
 * ```ts
 * import { leafKeyFile } from "./edge.ts";
 * console.assert(leafKeyFile("east") === "data/identities/leaf-east.nk");
 * console.assert(leafKeyFile("east", "data/hub/") === "data/hub/data/identities/leaf-east.nk");
 * ```
 */
export function leafKeyFile(site: string, natsDir = ""): string {
  const dir = natsDir ? `${natsDir.replace(/\/+$/, "")}/${IDENTITY_DIR}` : IDENTITY_DIR;
  return `${dir}/${leafIdentity(site)}.nk`;
}

/**
 * The prefix of the subjects a site delivers its events to the hub on. Outside `weft.>`
 * and `$JS.>`, so no other identity of the hub (admin apart) may publish there.
 */
export function edgeDeliverPrefix(site: string): string {
  return `$WEFT.EDGE.${site}`;
}

/** The JetStream API prefix of a site's domain, as seen from the hub. */
export function siteApi(site: string): string {
  return `$JS.${site}.API`;
}

/**
 * The permissions of site `site`'s leafnode connection, as the hub enforces them. On a
 * leafnode connection `publish` is what the site may send to the hub, `subscribe` what the
 * hub sends to the site.
 */
export function leafPermissions(
  site: string,
  definitions: readonly SiteStream[] = [],
): Permissions {
  const api = siteApi(site);
  return {
    publish: {
      allow: [
        `${edgeDeliverPrefix(site)}.>`,
        // Replies to the hub's consumer-create requests (nats-server's internal inbox).
        "$JSC.R.>",
      ],
    },
    subscribe: {
      allow: siteStreams(definitions).flatMap(({ stream }) => [
        `${api}.CONSUMER.CREATE.${stream}.>`,
        `${api}.CONSUMER.DELETE.${stream}.>`,
        `$JS.FC.${stream}.>`,
      ]),
    },
    allow_responses: false,
  };
}

/** The sources of site `site`'s events in its hub stream: one per collected stream. */
export function siteSources(site: string, definitions: readonly SiteStream[] = []): StreamSource[] {
  // (Field order as the server echoes it, so an unchanged start finds nothing to update.)
  return siteStreams(definitions).map(({ stream, root }) =>
    ({
      name: stream,
      subject_transforms: [{ src: `${root}.>`, dest: `${siteSubjectPrefix(site)}.${root}.>` }],
      external: { api: siteApi(site), deliver: edgeDeliverPrefix(site) },
    }) as StreamSource
  );
}

/**
 * The hub's per-site streams, from an event stream's configuration (its limits and
 * replicas): no subjects of their own, a source per collected stream of the site, and no
 * duplicate window. Sourcing delivers each of the site's messages once (it tracks the site's
 * stream sequences), and the copies keep their `Nats-Msg-Id`: two messages the site stored
 * under one id minutes apart (past its own window, as it may) can reach the hub within one
 * window after an outage, and a window would drop the second. (nats-server leaves a stream
 * with sources and a window of 0 without de-duplication; it takes its 2-minute default only
 * for a stream with neither sources nor a mirror.)
 */
export function edgeStreamConfigs(
  sites: readonly string[],
  events: NamedStreamConfig,
  definitions: readonly SiteStream[] = [],
): NamedStreamConfig[] {
  // (Its own subjects and its direct gets are the event stream's, not a hub's.)
  const { subjects: _subjects, allow_direct: _direct, ...limits } = events;
  return sites.map((site) => ({
    ...limits,
    name: edgeStream(site),
    description: `Weft edge site ${site}: its events and dead letters, on site.${site}.>`,
    sources: siteSources(site, definitions),
    duplicate_window: 0,
  }));
}

/**
 * Names the server `weft-<domain>` and adds `domain` to the configuration's
 * `jetstream { }` block. (Servers joined by leafnodes must not share a name.)
 */
function withDomain(conf: string, domain: string): string {
  const name = `server_name: ${JSON.stringify(`weft-${domain}`)}`;
  const named = /server_name:\s*\S+/.test(conf)
    ? conf.replace(/server_name:\s*\S+/, name)
    : `${name}\n${conf}`;
  if (!/jetstream\s*\{/.test(named)) {
    return `${named}\njetstream {\n  domain: ${JSON.stringify(domain)}\n}\n`;
  }
  return named.replace(/jetstream\s*\{/, `jetstream {\n  domain: ${JSON.stringify(domain)}`);
}

/** Leafnode TLS files (PEM): a certificate and its key, and the CA of the other end. */
export interface LeafTls {
  cert?: string;
  key?: string;
  ca?: string;
}

/** The `tls { }` block of `tls`; `verify` asks the other end for a certificate. */
function tlsBlock(tls: LeafTls, verify: boolean): string {
  const fields = [
    ...(tls.cert ? [`cert_file: ${JSON.stringify(tls.cert)}`] : []),
    ...(tls.key ? [`key_file: ${JSON.stringify(tls.key)}`] : []),
    ...(tls.ca ? [`ca_file: ${JSON.stringify(tls.ca)}`] : []),
    ...(verify ? ["verify: true"] : []),
    "timeout: 5",
  ];
  return `tls { ${fields.join(", ")} }`;
}

/**
 * A hub's server configuration: `conf` with the hub's domain and a leafnode listener on
 * `host` (loopback by default) and `leafPort`, with TLS when given a certificate (and,
 * with a CA, mutual TLS: every site presents a certificate that CA signed). (The sites'
 * users, with {@link leafPermissions}, go in the authorization block: with no
 * `authorization` of its own, the leafnode listener authenticates against it.)
 */
export function hubConf(
  conf: string,
  leafPort: number,
  opts: { host?: string; tls?: LeafTls } = {},
): string {
  const host = opts.host ?? "127.0.0.1";
  const tls = opts.tls?.cert
    ? `  ${tlsBlock(opts.tls, Boolean(opts.tls.ca))}
`
    : "";
  // Not advertised: a site connects only to the URLs it was given (`--leaf`), so a link
  // cut between them stays cut, and a site behind NAT is never sent an address it cannot use.
  return `${withDomain(conf, HUB_DOMAIN)}\n# Edge sites connect here (src/edge.ts).\n` +
    `leafnodes {\n  listen: "${host}:${leafPort}"\n  no_advertise: true\n${tls}}\n`;
}

/** A durable consumer of a site's own services: its stream and name. */
export interface SiteDurable {
  stream: string;
  durable: string;
}

/**
 * What a site refuses from the hub over its link, whatever the hub's configuration says
 * (the hub enforces {@link leafPermissions}; this holds even against a hub configured
 * otherwise): any JetStream API of the site's but consumer create/delete (no stream
 * changes, KV or direct reads), and every subject the site's mesh uses, so no event,
 * request or bucket write can be injected from the hub. Nor any consumer API naming one of
 * `durables` (the site's own services' consumers, e.g. `ORDERS`/`price`): the hub may not
 * delete one (its service would re-create it and re-run the stream's whole history), update
 * it (e.g. its filter), pause it or pull from it. The hub's sourcing creates and deletes
 * consumers of names the site's server makes, which these never match.
 */
export function siteDenyImports(site: string, durables: readonly SiteDurable[] = []): string[] {
  const api = siteApi(site);
  const ownConsumers = durables.flatMap(({ stream, durable }) => [
    // CREATE (update), DELETE, INFO, PAUSE, UNPIN...
    `${api}.CONSUMER.*.${stream}.${durable}`,
    // CREATE with a filter subject.
    `${api}.CONSUMER.*.${stream}.${durable}.>`,
    // MSG.NEXT (a pull), LEADER.STEPDOWN.
    `${api}.CONSUMER.*.*.${stream}.${durable}`,
  ]);
  return [
    ...["STREAM", "ACCOUNT", "META", "SERVER", "DIRECT", "$KV", "$OBJ"].map((a) => `${api}.${a}.>`),
    `${api}.INFO`,
    `${api}.CONSUMER.DURABLE.>`,
    ...new Set(ownConsumers),
    "$JS.API.>",
    "$JS.ACK.>",
    "$KV.>",
    "$O.>",
    "$SRV.>",
    "weft.>",
    ...SHIPPED_ROOTS.map((root) => `${root}.>`),
    "digest.>",
    "deadletter.>",
    "*._timer.*",
  ];
}

/** How often a site says again that the hub refuses its link, ms. */
const LEAF_REFUSED_LOG_EVERY_MS = 60_000;

/**
 * A watcher of nats-server log lines that says the first line `pick` describes (its
 * `say(description, count)` logged as a warning), then at most one a `everyMs` with how many
 * came since: true for a line it handled, false for any other.
 */
function throttledWatcher<T>(
  pick: (line: string) => T | undefined,
  say: (what: T, line: string, since: number) => void,
  opts: { now?: () => number; everyMs?: number },
): (line: string) => boolean {
  const now = opts.now ?? Date.now;
  const everyMs = opts.everyMs ?? LEAF_REFUSED_LOG_EVERY_MS;
  let loggedAt: number | undefined;
  let since = 0;
  return (line) => {
    const what = pick(line);
    if (what === undefined) return false;
    since++;
    const t = now();
    if (loggedAt !== undefined && t - loggedAt < everyMs) return true;
    say(what, line, since);
    loggedAt = t;
    since = 0;
    return true;
  };
}

/**
 * Watches a site's nats-server log lines for the hub refusing its link: `Leafnode Error
 * 'Authorization Violation'`, which the server meets again at each attempt, every second.
 * The first is logged as a warning saying what to do, the next at most once per `everyMs`
 * (a minute) with how many came since. Returns true for such a line (handled), false for
 * any other.
 *
 * @example
 * ```ts ignore
 * const refused = leafRefusalWatcher(log, "west");
 * const onLog = (line: string) => refused(line) || otherwise(line);
 * ```
 */
export function leafRefusalWatcher(
  log: Logger,
  site: string,
  opts: { now?: () => number; everyMs?: number; keyFile?: string } = {},
): (line: string) => boolean {
  const mine = opts.keyFile ? ` (${opts.keyFile})` : "";
  return throttledWatcher(
    (line) => /Leafnode Error 'Authorization Violation'/i.test(line) || undefined,
    (_, line, refused) =>
      log.warn(
        `the hub refuses this site's link (authorization failed): the hub no longer lists site ` +
          `${site} (its --hub), or this site's leafnode key${mine} is not the one the hub has ` +
          `for it (${hubKeyHint(site)}); its events wait here until the link is accepted. The ` +
          `server tries again every second; said again at most once a minute`,
        { site, refused, line },
      ),
    opts,
  );
}

/** Where a site's key is at its hub, as a site (which does not know the hub's directory) says it. */
function hubKeyHint(site: string): string {
  return `${leafIdentity(site)}.nk in the hub's ${IDENTITY_DIR}/, under its WEFT_NATS_DIR if set`;
}

/**
 * A leafnode TLS handshake failure in a nats-server log line: the other end's address and
 * the reason (without the certificate's fingerprint), e.g. from
 * `[ERR] 127.0.0.1:7422 - lid:5 - TLS leafnode handshake error: tls: failed to verify
 * certificate: x509: certificate signed by unknown authority (CN=127.0.0.1 SHA-256: ...)`.
 */
function leafTlsFailure(line: string): { peer: string; reason: string } | undefined {
  const m = /\s(\S+) - lid:\d+ - TLS leafnode handshake error: (.*)$/i.exec(line);
  if (!m) return undefined;
  return { peer: m[1]!, reason: m[2]!.replace(/\s*\(CN=.*\)\s*$/, "").trim() };
}

/** What a site whose link fails its TLS handshake for `reason` should check. */
function siteTlsCheck(reason: string): string {
  if (/unknown authority|certificate signed by/i.test(reason)) {
    return "this site does not trust the hub's certificate: WEFT_LEAF_TLS_CA here must be the " +
      "CA that signed the hub's WEFT_LEAF_TLS_CERT (without it, the system's roots must)";
  }
  if (/valid for|doesn't contain any IP SANs|not valid for any names/i.test(reason)) {
    return "the hub's certificate does not name the host this site dials: the --leaf URL's " +
      "host must be one of the certificate's names or addresses";
  }
  if (/expired|not yet valid/i.test(reason)) {
    return "a certificate is out of its validity period: renew it";
  }
  return "WEFT_LEAF_TLS_CA here must have signed the hub's certificate, and this site's " +
    "WEFT_LEAF_TLS_CERT/_KEY must be signed by the hub's WEFT_LEAF_TLS_CA";
}

/**
 * Watches a site's (or, with `site` undefined, a hub's) nats-server log lines for leafnode
 * TLS handshake failures (`TLS leafnode handshake error: ...`), which the server meets again
 * at each attempt, every second, and logs at its own level only: the first is logged as a
 * warning naming the link, the reason (e.g. `x509: certificate signed by unknown
 * authority`) and what to check, the next at most once per `everyMs` (a minute) with how many
 * came since. Returns true for such a line (handled), false for any other.
 *
 * @example
 * ```ts ignore
 * const tls = leafTlsWatcher(log, "west");
 * const onLog = (line: string) => tls(line) || otherwise(line);
 * ```
 */
export function leafTlsWatcher(
  log: Logger,
  site: string | undefined,
  opts: { now?: () => number; everyMs?: number } = {},
): (line: string) => boolean {
  return throttledWatcher(leafTlsFailure, ({ peer, reason }, line, failed) => {
    const msg = site !== undefined
      ? `this site's link to the hub (${peer}) fails its TLS handshake: ${reason}; ` +
        `${siteTlsCheck(reason)}. Its events wait here until the link is up. The server tries ` +
        `again every second; said again at most once a minute`
      : `a site's leafnode connection (from ${peer}) fails its TLS handshake: ${reason}; ` +
        `the site's WEFT_LEAF_TLS_CERT/_KEY must be signed by this hub's WEFT_LEAF_TLS_CA, and ` +
        `its WEFT_LEAF_TLS_CA must have signed this hub's certificate. Said again at most ` +
        `once a minute`;
    log.warn(msg, { ...(site !== undefined ? { site } : {}), peer, reason, failed, line });
  }, opts);
}

/**
 * A site's server configuration: `conf` with the site's domain and a leafnode remote to
 * the hub at `urls`, authenticating with the nkey `seed` (when the hub has one for it),
 * refusing {@link siteDenyImports} from the hub (any request on `durables`, the durable
 * consumers of the site's services, among them); over TLS when `tls` names a CA to check
 * the hub against or a client certificate, or the URLs are `tls://`.
 */
export function siteConf(
  conf: string,
  site: string,
  urls: string,
  seed?: string,
  tls?: LeafTls,
  durables: readonly SiteDurable[] = [],
): string {
  const list = (xs: string[]) => `[${xs.map((x) => JSON.stringify(x)).join(", ")}]`;
  const urlList = urls.split(",").map((u) => u.trim());
  // TLS with a CA or client certificate given, or `tls://` URLs (then the system's roots).
  const useTls = Boolean(tls?.ca || tls?.cert) || urlList.some((u) => u.startsWith("tls://"));
  return `${withDomain(conf, site)}\n# The link to the hub (src/edge.ts).\nleafnodes {\n` +
    `  remotes: [\n    {\n      urls: ${list(urlList)}\n` +
    (seed ? `      nkey: ${JSON.stringify(seed)}\n` : "") +
    (useTls ? `      ${tlsBlock(tls ?? {}, false)}\n` : "") +
    `      deny_imports: ${list(siteDenyImports(site, durables))}\n    }\n  ]\n}\n`;
}

/**
 * How a site's events reach the hub right now, and how many items of each shipped pipeline
 * the hub has seen start there (under its wiring's `statusField`).
 */
export interface SiteStatus {
  site: string;
  stream: string;
  /** Events the hub holds from the site (dead letters included). */
  events: number;
  /** Items of each shipped pipeline the hub has seen start there, by status field. */
  [statusField: string]: number | string | null | undefined;
  /** The site's dead letters the hub holds. */
  dead_letters: number;
  /**
   * Events the site holds that the hub has not yet received, as last reported; null while the
   * link is down (the site's count cannot be known then, and is not 0), or while a source has
   * not been heard from since it was (re)started.
   */
  lag: number | null;
  /**
   * Since the hub last heard from the site, ms: since the last message or heartbeat of any
   * of its sources, as the gateway tracks it across restarts of the sources (which forget it),
   * or, for a gateway started during an outage, since the last event the hub stored from it.
   * Null only for a site never heard from.
   */
  last_seen_ms: number | null;
  /**
   * Why the site's events may not be arriving: its link down since a time (nothing heard for
   * more than 10 s), never heard from (with what to check), a source's error (e.g. a stream
   * the site lacks), or sources not heard from since their restart on a link that is up.
   */
  error?: string;
}

/** How many subjects, and messages on them, the stream holds under `filter`. */
async function countUnder(
  jsm: JetStreamManager,
  stream: string,
  filter: string,
): Promise<{ subjects: number; messages: number }> {
  const info = await jsm.streams.info(stream, { subjects_filter: filter });
  const counts = Object.values(info.state.subjects ?? {}) as number[];
  return { subjects: counts.length, messages: counts.reduce((a, b) => a + b, 0) };
}

/** Restarts of a silent site's source before the hub warns (about 30 s at the defaults). */
const NEVER_HEARD_WARN_AFTER = 3;

/**
 * Silence after which a site's link counts as down: its sources have a message or a
 * heartbeat every second, and the hub's watch restarts one silent for 8 s.
 */
const LINK_DOWN_AFTER_MS = 10_000;

/**
 * When each site was last heard from (ms since the epoch), by site: kept by whoever reads the
 * sites' streams again and again (the source watch; a hub's gateway, with
 * {@link trackSiteContacts}), since a source restarted after an outage forgets it (its
 * `active` starts again at -1).
 */
export type SiteContacts = Map<string, number>;

/** What a site's stream says of its link, with what `contacts` remembers of it. */
interface SiteLink {
  /** The sources of the site's streams (not those of a stream it lacks). */
  linked: StreamSourceInfo[];
  /** When the site was last heard from, ms since the epoch; undefined: never. */
  heardAt?: number;
  /**
   * The link is down: nothing heard from the site (by any source: they share its one link)
   * for longer than {@link LINK_DOWN_AFTER_MS}, or never.
   */
  down: boolean;
  /** A source silent longer than that, or not heard from since it was (re)started. */
  quiet: boolean;
  /** Sources not heard from since they were (re)started (their lag is unknown). */
  unheard: StreamSourceInfo[];
  /** No source at all: removed, or between the two updates of a restart (lag unknown). */
  restarting: boolean;
}

/**
 * Reads a site's link from its stream's `info`, and updates `contacts` with it. The site was
 * heard from at the latest of: its sources' last message or heartbeat, the last contact
 * remembered, and the last event the stream holds from it (a hub restarted during an outage
 * remembers nothing else).
 */
function siteLink(site: string, info: StreamInfo, contacts: SiteContacts, now: number): SiteLink {
  // (A stream the site does not have, e.g. a definition it does not run, says nothing of the
  // link: it is an error of its own.)
  const linked = (info.sources ?? []).filter((s) => s.error?.err_code !== STREAM_NOT_FOUND);
  const actives = linked.map((s) => s.active ?? -1);
  const heard = actives.filter((a) => a >= 0);
  const lastEvent = info.state.last_seq > 0 ? Date.parse(info.state.last_ts) : NaN;
  const candidates = [
    ...(heard.length > 0 ? [now - Math.min(...heard) / 1e6] : []),
    ...(contacts.has(site) ? [contacts.get(site)!] : []),
    ...(Number.isFinite(lastEvent) ? [lastEvent] : []),
  ];
  const heardAt = candidates.length > 0 ? Math.max(...candidates) : undefined;
  if (heardAt !== undefined) contacts.set(site, heardAt);
  // (No source at all is also a restart caught between its two stream updates, watchSources:
  // a site heard from a moment ago is not down for it, its lag unknown.)
  const down = heardAt === undefined || now - heardAt > LINK_DOWN_AFTER_MS;
  const quiet = linked.length === 0 || heard.length < actives.length ||
    Math.max(...heard) / 1e6 > LINK_DOWN_AFTER_MS;
  const unheard = linked.filter((s) => (s.active ?? -1) < 0);
  return { linked, heardAt, down, quiet, unheard, restarting: linked.length === 0 };
}

/** A running {@link trackSiteContacts}. */
export interface SiteContactTracker {
  /** When each site was last heard from, kept up to date. */
  readonly contacts: SiteContacts;
  /** Stops tracking (after the read in progress). */
  stop(): Promise<void>;
}

/**
 * Keeps `contacts` up to date for a hub's gateway: every `everyMs` (2 s; the sources have a
 * message or heartbeat every second, and the source watch restarts one silent for 8 s) reads
 * each site's stream and notes when the site was last heard from, so the contact survives
 * the restart of a source (which forgets it) whether or not anyone asked for `/sites`
 * meanwhile. A failed read is skipped (`onError`).
 *
 * @example
 * ```ts ignore
 * const tracker = trackSiteContacts(jsm, ["east", "west"]);
 * const sites = await siteStatuses(jsm, ["east", "west"], tracker.contacts);
 * await tracker.stop();
 * ```
 */
export function trackSiteContacts(
  jsm: JetStreamManager,
  sites: readonly string[],
  opts: { everyMs?: number; onError?: (site: string, err: unknown) => void } = {},
): SiteContactTracker {
  const everyMs = opts.everyMs ?? 2_000;
  const contacts: SiteContacts = new Map();
  let stopped = false;
  let timer: ReturnType<typeof setTimeout> | undefined;
  let wake: () => void = () => {};
  const loop = (async () => {
    while (!stopped) {
      for (const site of sites) {
        if (stopped) break;
        try {
          siteLink(site, await jsm.streams.info(edgeStream(site)), contacts, Date.now());
        } catch (err) {
          opts.onError?.(site, err);
        }
      }
      await new Promise<void>((r) => {
        wake = r;
        timer = setTimeout(r, everyMs);
      });
    }
  })();
  return {
    contacts,
    async stop() {
      stopped = true;
      clearTimeout(timer);
      wake();
      await loop;
    },
  };
}

/**
 * Why a site never heard from may be silent: what to check, naming the key this hub made for
 * it where this hub keeps it (its nats-server's directory `natsDir`, {@link leafKeyFile}).
 */
function neverHeardHint(site: string, natsDir: string): string {
  return `is the site running, linked to this hub (--leaf), and with the leafnode key this ` +
    `hub made for it (${leafKeyFile(site, natsDir)})? Over leafnode TLS, do both ` +
    `ends trust each other's certificate (the site's WEFT_LEAF_TLS_CA signed the hub's, the ` +
    `hub's signed the site's)? The site's log, or this hub's, says which fails`;
}

/** The error of a site whose link is down, heard from last at `heardAt`. */
function linkDownError(heardAt: number): string {
  return `link down since ${new Date(heardAt).toISOString()}: nothing heard from the site ` +
    `since; its events wait there and arrive, in order, once the link is back`;
}

/** What a site's status needs besides its stream's info: its counts at the hub. */
export interface SiteCounts {
  /** The site's dead letters the hub holds. */
  deadLetters: number;
  /** Items of each shipped pipeline the hub has seen start there, by status field. */
  items: Record<string, number>;
}

/**
 * A site's status from its hub stream's `info` and `counts` at `now`, with `contacts` (kept
 * between calls, and updated here) remembering when it was last heard from across restarts
 * of its sources. `last_seen_ms` always counts from that contact, and `error` says the link
 * is down (since that contact) only when nothing has been heard from the site for more than
 * 10 s: a source restarted on a link that is up (another source heard from it a moment ago)
 * is said as such, its lag unknown, not as a link down.
 */
export function siteStatus(
  site: string,
  info: StreamInfo,
  counts: SiteCounts,
  contacts: SiteContacts,
  now: number,
  natsDir = "",
): SiteStatus {
  const { linked, heardAt, down, unheard, restarting } = siteLink(site, info, contacts, now);
  // Named by its stream: a definition the hub runs and the site does not is "ORDERS: stream
  // not found" (the rest of the site's events still arrive).
  const failing = (info.sources ?? []).find((s) => s.error);
  // A site known to the hub whose link is down says since when; one never heard from, with
  // no error to say why, is not running or not linked, or linked with another site's key
  // (its link is up, and nothing of it arrives), or its TLS handshake fails.
  const error = down && heardAt !== undefined
    ? linkDownError(heardAt)
    : failing
    ? `${failing.name}: ${failing.error!.description}`
    : heardAt === undefined
    ? `not heard from yet: ${neverHeardHint(site, natsDir)}`
    : unheard.length > 0 || restarting
    ? `${
      restarting
        ? "every source (re)starting"
        : `${unheard.map((s) => s.name).join(", ")}: source (re)started`
    } and not heard from since, its lag unknown until it is (the site was last heard from ` +
      `${Math.max(0, Math.round(now - heardAt))} ms ago; its link counts as down after 10 s)`
    : undefined;
  return {
    site,
    stream: edgeStream(site),
    events: info.state.messages,
    ...counts.items,
    dead_letters: counts.deadLetters,
    lag: down || restarting || unheard.length > 0
      ? null
      : linked.reduce((n, s) => n + (s.lag ?? 0), 0),
    last_seen_ms: heardAt === undefined ? null : Math.max(0, Math.round(now - heardAt)),
    ...(error ? { error } : {}),
  };
}

/**
 * Each site's status from its hub stream ({@link siteStatus}). `contacts` (one per reader,
 * kept between calls; a gateway's {@link trackSiteContacts}) remembers when each site was
 * last heard from across restarts of its sources; `natsDir` is the hub's nats-server
 * directory (`WEFT_NATS_DIR`), where its sites' keys are.
 */
export async function siteStatuses(
  jsm: JetStreamManager,
  sites: readonly string[],
  contacts: SiteContacts = new Map(),
  natsDir = "",
): Promise<SiteStatus[]> {
  return await Promise.all(sites.map(async (site) => {
    const stream = edgeStream(site);
    const prefix = siteSubjectPrefix(site);
    const counted = SHIPPED_PIPELINES.flatMap((w) => w.items ? [w.items] : []);
    const [info, dead, ...items] = await Promise.all([
      jsm.streams.info(stream),
      countUnder(jsm, stream, `${prefix}.deadletter.>`),
      ...counted.map((i) => countUnder(jsm, stream, `${prefix}.${i.entryType}.*`)),
    ]);
    return siteStatus(
      site,
      info,
      {
        deadLetters: dead.messages,
        items: Object.fromEntries(counted.map((c, i) => [c.statusField, items[i]!.subjects])),
      },
      contacts,
      Date.now(),
      natsDir,
    );
  }));
}

/** The header nats-server puts on a sourced copy, naming the origin stream and sequence. */
const STREAM_SOURCE_HEADER = "Nats-Stream-Source";

/**
 * The origin of a sourced copy from its `Nats-Stream-Source` header: the stream it was copied
 * from (with, for a source in another domain, `:<hash>` of its API prefix), its sequence
 * there, and, where the header says it, the identity of that stream (`life`: a stream made
 * again, e.g. at a site whose store was reset, has a new one, and numbers from 1 again).
 * nats-server 2.10 and later write `<stream>[:<hash>] <seq> <filter> <dest> <subject>
 * [<identity>]` (2.15.3 with the identity), 2.9 `<stream>[:<hash>] <seq>`, and servers
 * before 2.9 the origin's ack reply
 * (`$JS.ACK.<stream>.<consumer>.<delivered>.<seq>.<cseq>.<time>.<pending>`). Undefined for
 * no header or one of no such form.
 *
 * @example
 * ```ts
 * import { sourcedFrom } from "./edge.ts";
 * const h = "ORDERS:1OzlGG68 12310 orders.> site.east.orders.> orders.placed.o1 y6slQuBT";
 * console.assert(sourcedFrom(h)?.seq === 12310 && sourcedFrom(h)?.stream === "ORDERS");
 * console.assert(sourcedFrom(h)?.life === "y6slQuBT");
 * console.assert(sourcedFrom("ORDERS 7")?.seq === 7 && sourcedFrom("ORDERS 7")?.life === undefined);
 * console.assert(sourcedFrom(undefined) === undefined);
 * ```
 */
export function sourcedFrom(
  header: string | undefined,
): { stream: string; seq: number; life?: string } | undefined {
  if (!header) return undefined;
  let stream: string | undefined;
  let seq: string | undefined;
  let life: string | undefined;
  if (header.startsWith("$JS.ACK.")) {
    const t = header.split(".");
    if (t.length !== 9) return undefined;
    [stream, seq] = [t[2], t[5]];
  } else {
    const tokens = header.trim().split(/\s+/);
    [stream, seq] = [tokens[0]?.split(":")[0], tokens[1]];
    life = tokens[5];
  }
  if (!stream || !seq || !/^[1-9][0-9]{0,15}$/.test(seq)) return undefined;
  return { stream, seq: Number(seq), ...(life ? { life } : {}) };
}

/**
 * The life the hub now sources `pipeline`'s events of `site` from: the identity of the site's
 * stream (see {@link sourcedFrom}) in the latest copy the hub holds under
 * `site.<site>.<pipeline>.>`. A site whose store was reset has new streams, which the hub
 * sources again from their first message; its copies of the earlier life stay in the hub's
 * stream, before them. Undefined when the hub holds none, or its copies carry no identity.
 */
async function currentLife(
  js: JetStreamClient,
  site: string,
  pipeline: string,
): Promise<string | undefined> {
  const jsm = await js.jetstreamManager(false);
  try {
    const m = await jsm.streams.getMessage(edgeStream(site), {
      last_by_subj: `${siteSubjectPrefix(site)}.${pipeline}.>`,
    });
    return sourcedFrom(m?.header?.get(STREAM_SOURCE_HEADER))?.life;
  } catch (err) {
    if (err instanceof JetStreamApiError && err.code === JetStreamApiCodes.NoMessageFound) {
      return undefined;
    }
    throw err;
  }
}

/** Whether hub message `m`, a copy of a site's event, is of life `life` (any, if either is unknown). */
function ofLife(m: JsMsg, life: string | undefined): boolean {
  const its = sourcedFrom(m.headers?.get(STREAM_SOURCE_HEADER))?.life;
  return life === undefined || its === undefined || its === life;
}

/**
 * Where item `id` of `pipeline` from `site` starts in the hub's stream: the hub sequence of
 * its first event of the site stream's current life ({@link currentLife}); null when the hub
 * holds none of that life (the item is of an earlier life only, or unknown). What the hub
 * holds of an item before a reset of its site is not the site's item any more.
 */
export async function siteItemStart(
  js: JetStreamClient,
  site: string,
  id: string,
  pipeline: string,
): Promise<number | null> {
  const life = await currentLife(js, site, pipeline);
  const filter = siteEventsFilter(site, id, pipeline);
  for await (const m of readStream(js, edgeStream(site), { filter })) {
    if (ofLife(m, life)) return m.seq;
  }
  return null;
}

/**
 * An edge item of a shipped pipeline (`wiring`), folded from its events on the hub as its
 * state writer folds them (see {@link siteItem}), with the site it ran at. Throws
 * NotFoundError when the hub has none.
 */
export async function siteWiredItem(
  js: JetStreamClient,
  site: string,
  wiring: PipelineWiring,
  id: string,
): Promise<Record<string, unknown> & { site: string }> {
  const items = wiring.items;
  if (!items) throw new NotFoundError(`pipeline ${wiring.name} has no items`);
  return await siteItem<Record<string, unknown>>(
    js,
    site,
    wiring.name,
    items.state,
    items.what,
    id,
  );
}

/**
 * Item `id` of `pipeline` from `site`, folded from its events on the hub (in the hub's order)
 * exactly as the site's state writer of `spec` folds them: each through
 * {@link decodeStateEvent} under the subject it has at the site, so what the site refused
 * (not JSON, not a valid event, about another item than its subject's, a time that is no
 * time) is skipped here too, and the hub shows the state the site does, each event's `seq`
 * its sequence in the site's stream ({@link sourcedFrom}), not the hub's. Only events of the
 * life of the site's stream the hub now sources count ({@link siteItemStart}): after a reset
 * of the site's store, an id used again is the new item, and one of the earlier life only is
 * none. With its site; throws NotFoundError (naming it `what`) when the hub has none the
 * site would fold.
 */
export async function siteItem<S>(
  js: JetStreamClient,
  site: string,
  pipeline: string,
  spec: StateSpec<S>,
  what: string,
  id: string,
): Promise<S & { site: string }> {
  let state: S | undefined;
  // (A read of nothing ends at once: the consumer's creation says none is pending.)
  const filter = siteEventsFilter(site, id, pipeline);
  const prefix = `${siteSubjectPrefix(site)}.`;
  let entered = false;
  // Only the life of the site's stream the hub now sources: an item of a site whose store was
  // reset is the new stream's, not the earlier one's under the same id.
  const life = await currentLife(js, site, pipeline);
  // Failures fold only with their runner's letter, read from the hub's copies of the site's
  // dead letters, as the site's writer folds them (src/failure_letter.ts).
  const letters = siteLetters(await js.jetstreamManager(false), site, life);
  for await (const m of readStream(js, edgeStream(site), { filter })) {
    if (!ofLife(m, life)) continue;
    // The subject it has at the site.
    const subject = m.subject.slice(prefix.length);
    let event: AnyEvent;
    entered ||= spec.entrySubject?.(id) === subject;
    try {
      event = decodeStateEvent(spec, m.data, subject, m.time.getTime(), m.headers);
    } catch {
      continue; // the site dead-letters it and folds nothing
    }
    // Nor does it fold an item's events before its entry (one that never entered).
    if (state === undefined && startsNoItem(spec, event) && !entered) continue;
    // Folded with the event's sequence in the site's stream, as the site folds it: the hub's
    // own sequence counts the site's other streams' messages too (its digests, dead letters).
    // (A message not sourced, which no site stream at a hub holds, keeps the hub's.)
    const origin = sourcedFrom(m.headers?.get(STREAM_SOURCE_HEADER));
    const seq = origin?.seq ?? m.seq;
    // Nor a failure no runner's letter vouches for, nor one the site's writer refused itself.
    if (
      spec.failedType !== undefined && event.type === spec.failedType &&
      !await failureFolds(
        letters,
        spec.failedType,
        spec.durable,
        event,
        subject,
        seq,
        spec.stageInputs,
      )
    ) continue;
    // Nor an event the item's history does not lead to (the site dead-letters it).
    state = foldLed(spec, state, event, seq);
  }
  if (state === undefined) {
    throw new NotFoundError(`no ${what} ${id} from site ${site}`, { field: "id" });
  }
  return { ...state, site };
}

/**
 * Where a hub reads the letters of `site`'s failures of `pipeline`'s items: its copies of the
 * site's dead letters and events, of the life of the site's stream it now sources, looked up
 * at the first failure asked about (an item's event stream with none reads nothing for it).
 */
export function siteLetterReads(
  js: JetStreamClient,
  site: string,
  pipeline: string,
): LetterReads {
  const reads = lazy(async () =>
    siteLetters(await js.jetstreamManager(false), site, await currentLife(js, site, pipeline))
  );
  return {
    letters: async function* (subject) {
      yield* (await reads()).letters(subject);
    },
    holds: async (subject, seq) => await (await reads()).holds(subject, seq),
  };
}

/**
 * A hub's copies of `site`'s dead letters and events (under `site.<site>.`), read as
 * {@link LetterReads}: a message is at a site sequence when its copy was sourced from there (a
 * copy not sourced keeps the hub's), of the site stream's life `life` when given.
 */
function siteLetters(
  jsm: JetStreamManager,
  site: string,
  life: string | undefined,
): LetterReads {
  const stream = edgeStream(site);
  const prefix = `${siteSubjectPrefix(site)}.`;
  return {
    letters: (subject) => messagesOn(jsm, stream, prefix + subject),
    async holds(subject, seq) {
      for await (const m of messagesOn(jsm, stream, prefix + subject)) {
        const origin = sourcedFrom(m.header?.get(STREAM_SOURCE_HEADER));
        const ofItsLife = life === undefined || origin?.life === undefined ||
          origin.life === life;
        if ((origin?.seq ?? m.seq) === seq && ofItsLife) return true;
      }
      return false;
    },
  };
}

/**
 * The latest `limit` events of pipeline `root` (its name) of each site on the hub (oldest
 * first per site), each with its site and hub stream sequence: what the dashboard lists.
 */
export async function recentSiteEvents(
  js: JetStreamClient,
  jsm: JetStreamManager,
  sites: readonly string[],
  limit: number,
  root: string,
): Promise<{ site: string; seq: number; event: unknown }[]> {
  const out: { site: string; seq: number; event: unknown }[] = [];
  for (const site of sites) {
    const { state } = await jsm.streams.info(edgeStream(site));
    if (state.messages === 0) continue;
    const startSeq = Math.max(state.first_seq, state.last_seq - limit + 1);
    const filter = `${siteSubjectPrefix(site)}.${root}.>`;
    for await (const m of readStream(js, edgeStream(site), { startSeq, filter })) {
      if (m.seq > state.last_seq) break;
      try {
        out.push({ site, seq: m.seq, event: m.json() });
      } catch { /* not JSON: skip */ }
    }
  }
  return out;
}

/** A running {@link watchSources}. */
export interface SourceWatch {
  /** Source restarts made so far, per site. */
  readonly restarts: Record<string, number>;
  /** Stops watching (after the check in progress). */
  stop(): Promise<void>;
}

/**
 * Keeps each site's source going on the hub. nats-server notices a stalled source after
 * 10 s, but its new consumer request then crosses a link that may still be down, waits 30 s
 * for an answer, and retries with a backoff growing to 2 minutes: a site back after an
 * outage could wait that long before the hub resumes. Every `checkMs` this reads each
 * site's stream; a source with no message or heartbeat (1 s apart) for `stalledMs` is
 * restarted, at most once per `restartMs`: removed and added again in two stream updates.
 * The server then resumes it after the last event the stream holds from the site (as on
 * every start), so nothing is stored twice or skipped.
 */
export function watchSources(
  jsm: JetStreamManager,
  sites: readonly string[],
  opts: {
    log: Logger;
    checkMs?: number;
    stalledMs?: number;
    restartMs?: number;
    /** The hub's nats-server directory (`WEFT_NATS_DIR`), where its sites' keys are. */
    natsDir?: string;
  },
): SourceWatch {
  const checkMs = opts.checkMs ?? 2_000;
  const stalledMs = opts.stalledMs ?? 8_000;
  const restartMs = opts.restartMs ?? 10_000;
  const restarts: Record<string, number> = Object.fromEntries(sites.map((s) => [s, 0]));
  /** Consecutive restarts of a site's source that brought nothing, by site. */
  const silentRestarts: Record<string, number> = {};
  const contacts: SiteContacts = new Map();
  const lastRestart = new Map<string, number>();
  let stopped = false;
  let timer: ReturnType<typeof setTimeout> | undefined;
  let wake: () => void = () => {};
  const check = async (site: string) => {
    const name = edgeStream(site);
    const info = await jsm.streams.info(name);
    // (Restarts that bring nothing count while any source stays quiet, before the 10 s
    // after which the link counts as down.)
    const { linked, heardAt, quiet: down } = siteLink(site, info, contacts, Date.now());
    // The site's sources share its one link: the one in error, never heard from, or
    // silent longest speaks for all.
    const source = linked.find((s) => s.error || (s.active ?? -1) < 0) ??
      linked.toSorted((a, b) => (b.active ?? 0) - (a.active ?? 0))[0];
    const active = source?.active ?? -1;
    const stalled = active < 0 || active / 1e6 > stalledMs || source?.error !== undefined;
    if (!down && silentRestarts[site]) {
      opts.log.info("edge site heard from again", {
        site,
        stream: name,
        restarts: silentRestarts[site],
      });
      silentRestarts[site] = 0;
    }
    if (!stalled || Date.now() - (lastRestart.get(site) ?? 0) < restartMs) return;
    lastRestart.set(site, Date.now());
    // (The client merges an update into the stream's configuration, and a stream without
    // sources gets the server's 2-minute duplicate window: the second update sets it back to
    // none, which the server leaves out of the configuration it returns.)
    const config = { ...info.config, duplicate_window: info.config.duplicate_window ?? 0 };
    await jsm.streams.update(name, { ...config, sources: [] });
    await jsm.streams.update(name, config);
    restarts[site] = (restarts[site] ?? 0) + 1;
    opts.log.info("edge source restarted", {
      site,
      stream: name,
      silent_ms: heardAt === undefined ? null : Math.max(0, Date.now() - heardAt),
      error: source?.error?.description,
    });
    // Silent, restart after restart: said once, as a warning. A site heard from before has
    // its link down (its events wait at the site); one never heard from, with no error to
    // say why, may be linked with another site's key (its link is up and sends nothing here).
    silentRestarts[site] = down ? (silentRestarts[site] ?? 0) + 1 : 0;
    if (silentRestarts[site] !== NEVER_HEARD_WARN_AFTER) return;
    if (heardAt !== undefined) {
      opts.log.warn(`site ${site}: ${linkDownError(heardAt)}`, {
        site,
        stream: name,
        restarts: NEVER_HEARD_WARN_AFTER,
      });
    } else if (!source?.error) {
      opts.log.warn(
        `site ${site}: never heard from after ${NEVER_HEARD_WARN_AFTER} restarts of its ` +
          `source: ${neverHeardHint(site, opts.natsDir ?? "")}`,
        { site, stream: name },
      );
    }
  };
  const loop = (async () => {
    while (!stopped) {
      for (const site of sites) {
        if (stopped) break;
        await check(site).catch((err) =>
          opts.log.warn("edge source check failed", { site, err: String(err) })
        );
      }
      await new Promise<void>((r) => {
        wake = r;
        timer = setTimeout(r, checkMs);
      });
    }
  })();
  return {
    restarts,
    async stop() {
      stopped = true;
      clearTimeout(timer);
      wake();
      await loop;
    },
  };
}
