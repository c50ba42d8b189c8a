import assert from "node:assert/strict";
import { loadConfig } from "./config.ts";
import { ConfigError } from "./errors.ts";
import {
  edgeStreamConfigs,
  hubConf,
  leafPermissions,
  leafRefusalWatcher,
  leafTlsWatcher,
  parseSiteSubject,
  siteConf,
  siteDenyImports,
  siteEventsFilter,
  siteStatus,
  sourcedFrom,
} from "./edge.ts";
import { subjectAllowed } from "./subjects.ts";
import type { StreamInfo, StreamSourceInfo } from "@nats-io/jetstream";
import { createLogger } from "./observability/log.ts";

const BASE =
  `server_name: weft-local\nlisten: 127.0.0.1:4222\njetstream {\n  store_dir: "./d"\n}\n`;

Deno.test("hubConf names the hub, sets domain hub and a loopback leafnode listener it does not advertise", () => {
  const conf = hubConf(BASE, 7422);
  assert.match(conf, /server_name: "weft-hub"/);
  assert.match(conf, /jetstream \{\n {2}domain: "hub"\n {2}store_dir/);
  assert.match(conf, /leafnodes \{\n {2}listen: "127\.0\.0\.1:7422"\n {2}no_advertise: true/);
  assert.doesNotMatch(conf, /weft-local/);
});

Deno.test("siteConf gives the site its own name and domain and a remote with its seed", () => {
  const conf = siteConf(BASE, "east", "nats-leaf://h1:7422,nats-leaf://h2:7422", "SUSEED");
  assert.match(conf, /server_name: "weft-east"/);
  assert.match(conf, /domain: "east"/);
  assert.match(
    conf,
    /urls: \["nats-leaf:\/\/h1:7422", "nats-leaf:\/\/h2:7422"\]\n {6}nkey: "SUSEED"/,
  );
  assert.match(conf, /deny_imports: \[.*"\$JS\.east\.API\.STREAM\.>".*"feedback\.>"/);
});

Deno.test("leafPermissions let a site carry only its own sourcing traffic", () => {
  const p = leafPermissions("east");
  // Site to hub: its own deliveries and API replies; never events or another site's deliveries.
  assert.ok(subjectAllowed(p.publish.allow, "$WEFT.EDGE.east.S.abc"));
  assert.ok(subjectAllowed(p.publish.allow, "$JSC.R.xyz"));
  for (
    const s of ["feedback.ingested.x", "$WEFT.EDGE.west.S.abc", "weft.feedback.get", "$JS.API.INFO"]
  ) {
    assert.ok(!subjectAllowed(p.publish.allow, s), s);
  }
  // Hub to site: consumer create/delete on the streams it collects, flow control; nothing else.
  for (const stream of ["FEEDBACK", "CONTENT", "DEADLETTER", "DIGEST"]) {
    assert.ok(
      subjectAllowed(p.subscribe.allow, `$JS.east.API.CONSUMER.CREATE.${stream}.c.x.>`),
      stream,
    );
    assert.ok(subjectAllowed(p.subscribe.allow, `$JS.FC.${stream}.c.x`), stream);
  }
  for (
    const s of [
      "$JS.east.API.STREAM.DELETE.FEEDBACK",
      "$JS.east.API.CONSUMER.CREATE.KV_weft_feedback_state.c",
      "$JS.east.API.CONSUMER.CREATE.SHADOW.c",
      "$JS.west.API.CONSUMER.CREATE.FEEDBACK.c",
      "feedback.submit",
    ]
  ) assert.ok(!subjectAllowed(p.subscribe.allow, s), s);
});

Deno.test("siteDenyImports keeps the hub to consumer create/delete on the site's JetStream, and out of its subjects", () => {
  const deny = siteDenyImports("east");
  for (
    const s of [
      "$JS.east.API.STREAM.DELETE.FEEDBACK",
      "$JS.east.API.STREAM.PURGE.FEEDBACK",
      "$JS.east.API.$KV.weft_feedback_state.x",
      "$JS.east.API.DIRECT.GET.FEEDBACK",
      "$JS.API.STREAM.INFO.FEEDBACK",
      "feedback.ingested.x",
      "weft.feedback.submit",
      "$KV.weft_feedback_state.x",
      "tickets._timer.x",
    ]
  ) assert.ok(subjectAllowed(deny, s), s);
  for (
    const s of [
      "$JS.east.API.CONSUMER.CREATE.FEEDBACK.c.feedback.>",
      "$JS.east.API.CONSUMER.DELETE.FEEDBACK.c",
      "$JS.FC.FEEDBACK.c.x",
    ]
  ) assert.ok(!subjectAllowed(deny, s), s);
});

Deno.test("siteDenyImports refuses every consumer request on the site's own durables, and none on the consumers the hub's sourcing makes", () => {
  const deny = siteDenyImports("east", [{ stream: "FEEDBACK", durable: "sentiment" }]);
  for (
    const s of [
      "$JS.east.API.CONSUMER.DELETE.FEEDBACK.sentiment",
      "$JS.east.API.CONSUMER.CREATE.FEEDBACK.sentiment",
      "$JS.east.API.CONSUMER.CREATE.FEEDBACK.sentiment.feedback.nothing.*",
      "$JS.east.API.CONSUMER.MSG.NEXT.FEEDBACK.sentiment",
      "$JS.east.API.CONSUMER.PAUSE.FEEDBACK.sentiment",
    ]
  ) assert.ok(subjectAllowed(deny, s), s);
  for (
    const s of [
      "$JS.east.API.CONSUMER.CREATE.FEEDBACK.Xk3v9q.feedback.>",
      "$JS.east.API.CONSUMER.DELETE.FEEDBACK.Xk3v9q",
      "$JS.east.API.CONSUMER.DELETE.CONTENT.sentiment",
    ]
  ) assert.ok(!subjectAllowed(deny, s), s);
});

Deno.test("edgeStreamConfigs: one stream per site, no subjects, sourcing its FEEDBACK, CONTENT, DEADLETTER and DIGEST onto site.<name>.>", () => {
  const [east] = edgeStreamConfigs(["east"], {
    name: "FEEDBACK",
    subjects: ["feedback.>"],
    max_bytes: 5,
    duplicate_window: 120_000_000_000,
  });
  assert.equal(east!.name, "EDGE_EAST");
  assert.equal(east!.subjects, undefined);
  assert.equal(east!.max_bytes, 5);
  assert.equal(east!.duplicate_window, 0, "sourcing delivers once: no de-duplication");
  assert.deepEqual(
    east!.sources,
    [
      ["FEEDBACK", "feedback"],
      ["CONTENT", "content"],
      ["DEADLETTER", "deadletter"],
      ["DIGEST", "digest"],
    ].map((
      [name, root],
    ) => ({
      name,
      subject_transforms: [{ src: `${root}.>`, dest: `site.east.${root}.>` }],
      external: { api: "$JS.east.API", deliver: "$WEFT.EDGE.east" },
    })),
  );
  assert.equal(siteEventsFilter("east", "fb1", "feedback"), "site.east.feedback.*.fb1");
  assert.equal(siteEventsFilter("east", "c1", "content"), "site.east.content.*.c1");
  assert.deepEqual(parseSiteSubject("site.east.feedback.processed.fb1"), {
    site: "east",
    type: "feedback.processed",
    itemId: "fb1",
  });
  assert.deepEqual(parseSiteSubject("site.east.content.published.c1"), {
    site: "east",
    type: "content.published",
    itemId: "c1",
  });
  assert.equal(parseSiteSubject("feedback.processed.fb1"), null);
  assert.equal(parseSiteSubject("site.east.deadletter.moderation.c1"), null);
});

Deno.test("loadConfig takes --leaf with --site, --hub with site names, and refuses mixes", () => {
  const load = (args: string[]) => loadConfig({ env: () => undefined, args });
  const site = load(["--leaf", "nats-leaf://127.0.0.1:7422", "--site", "east"]);
  assert.equal(site.leaf, "nats-leaf://127.0.0.1:7422");
  assert.equal(site.site, "east");
  assert.deepEqual(load(["--hub", "east,west"]).hub, ["east", "west"]);
  for (
    const bad of [
      ["--leaf", "nats-leaf://127.0.0.1:7422"], // no --site
      ["--site", "east"], // no --leaf
      ["--hub", "east", "--leaf", "nats-leaf://127.0.0.1:7422", "--site", "west"],
      ["--hub"], // sites must be named
      ["--hub", "East"],
      ["--hub", "hub"],
      ["--hub", "east,east"],
      ["--leaf", "http://127.0.0.1:7422", "--site", "east"],
      ["--leaf", "nats-leaf://127.0.0.1:7422", "--site", "east", "--cluster", "3"],
    ]
  ) assert.throws(() => load(bad), ConfigError, bad.join(" "));
});

Deno.test("leafnode TLS: the hub's listener presents its certificate and, with a CA, asks sites for theirs; a site checks the hub", () => {
  const hub = hubConf(BASE, 7422, {
    host: "0.0.0.0",
    tls: { cert: "/c/hub.pem", key: "/c/hub.key", ca: "/c/ca.pem" },
  });
  assert.match(hub, /listen: "0\.0\.0\.0:7422"/);
  assert.match(
    hub,
    /tls \{ cert_file: "\/c\/hub\.pem", key_file: "\/c\/hub\.key", ca_file: "\/c\/ca\.pem", verify: true, timeout: 5 \}/,
  );
  assert.doesNotMatch(hubConf(BASE, 7422), /tls/);
  const site = siteConf(BASE, "east", "nats-leaf://h:7422", "SUSEED", { ca: "/c/ca.pem" });
  assert.match(site, /nkey: "SUSEED"\n {6}tls \{ ca_file: "\/c\/ca\.pem", timeout: 5 \}/);
  assert.doesNotMatch(siteConf(BASE, "east", "nats-leaf://h:7422", "S"), /tls \{/);
  // tls:// URLs alone turn TLS on (the system's roots check the hub).
  assert.match(siteConf(BASE, "east", "tls://h:7422", "S"), /tls \{ timeout: 5 \}/);
});

Deno.test("loadConfig: a hub's leafnode listener off loopback needs a certificate; cert and key go together", () => {
  const load = (env: Record<string, string>) =>
    loadConfig({ env: (n) => env[n], args: ["--hub", "east"] });
  assert.throws(() => load({ WEFT_LEAF_HOST: "0.0.0.0" }), ConfigError);
  assert.throws(() => load({ WEFT_LEAF_TLS_CERT: "c.pem" }), ConfigError);
  const ok = load({ WEFT_LEAF_HOST: "0.0.0.0", WEFT_LEAF_TLS_CERT: "c", WEFT_LEAF_TLS_KEY: "k" });
  assert.equal(ok.leafHost, "0.0.0.0");
});

Deno.test("leafRefusalWatcher says a hub's refusal of the site's link once, with what to do, then at most once a minute with a count", () => {
  const lines: Record<string, unknown>[] = [];
  const log = createLogger("supervisor", "info", (l) => lines.push(JSON.parse(l)));
  let now = 0;
  const refused = leafRefusalWatcher(log, "west", { now: () => now });
  // As nats-server 2.15.3 logs it, once a second while the hub refuses the site.
  const line = "[29422] 2026/12/06 18:44:33.503765 [ERR] 127.0.0.1:19011 - lid:5 - " +
    "Leafnode Error 'Authorization Violation'";
  for (let s = 0; s < 150; s++, now += 1_000) assert.equal(refused(line), true);
  assert.equal(refused("[INF] Leafnode connection created for account: $G"), false);
  assert.equal(refused("[ERR] ... Publish Violation ..."), false, "not an authorization failure");
  assert.equal(lines.length, 3, "at 0 s, 60 s and 120 s");
  assert.deepEqual(lines.map((l) => l.refused), [1, 60, 60]);
  for (const l of lines) {
    assert.equal(l.level, "warn");
    assert.match(String(l.msg), /refuses this site's link \(authorization failed\)/);
    assert.match(String(l.msg), /no longer lists site west .*leaf-west\.nk/);
    assert.doesNotMatch(String(l.msg), /permission/);
  }
});

Deno.test("sourcedFrom reads the origin stream and sequence of every header form nats-server writes, the origin stream's identity where it is written, and nothing else", () => {
  // 2.10 and later (seen on 2.15.3, with the identity), 2.9 (seen on 2.9.10), and before 2.9
  // (the ack reply).
  assert.deepEqual(
    sourcedFrom(
      "FEEDBACK:1OzlGG68 12310 feedback.> site.east.feedback.> feedback.ingested.a y6slQuBT",
    ),
    { stream: "FEEDBACK", seq: 12310, life: "y6slQuBT" },
  );
  assert.deepEqual(
    sourcedFrom("FEEDBACK:1OzlGG68 3 feedback.> site.east.feedback.> feedback.ingested.a"),
    { stream: "FEEDBACK", seq: 3 },
  );
  assert.deepEqual(sourcedFrom("DIGEST:1OzlGG68 2"), { stream: "DIGEST", seq: 2 });
  assert.deepEqual(sourcedFrom("$JS.ACK.FEEDBACK.c1.1.42.7.1700000000.0"), {
    stream: "FEEDBACK",
    seq: 42,
  });
  for (const bad of [undefined, "", "FEEDBACK", "FEEDBACK x", "FEEDBACK 0", "$JS.ACK.F.c.1"]) {
    assert.equal(sourcedFrom(bad), undefined, String(bad));
  }
});

Deno.test("leafTlsWatcher says a failed leafnode TLS handshake once, naming the link, the x509 reason and what to check, then at most once a minute with a count", () => {
  const lines: Record<string, unknown>[] = [];
  const log = createLogger("supervisor", "info", (l) => lines.push(JSON.parse(l)));
  let now = 0;
  const tls = leafTlsWatcher(log, "east", { now: () => now });
  // As nats-server 2.15.3 logs it at a site whose WEFT_LEAF_TLS_CA did not sign the hub's
  // certificate, once a second.
  const line = "[4703] 2026/12/06 21:14:41.927106 [ERR] 127.0.0.1:23442 - lid:5 - TLS leafnode " +
    "handshake error: tls: failed to verify certificate: x509: certificate signed by unknown " +
    "authority (CN=127.0.0.1 SHA-256: c26b9318c03902ef59d4eb65e58e947562b7ef67b3aba125d1d1f5f1169)";
  for (let s = 0; s < 130; s++, now += 1_000) assert.equal(tls(line), true);
  assert.equal(tls("[INF] 127.0.0.1:23442 - lid:5 - Leafnode connection closed"), false);
  assert.equal(tls("[ERR] ... Leafnode Error 'Authorization Violation'"), false);
  assert.equal(lines.length, 3, "at 0 s, 60 s and 120 s");
  assert.deepEqual(lines.map((l) => l.failed), [1, 60, 60]);
  for (const l of lines) {
    assert.equal(l.level, "warn");
    assert.equal(l.peer, "127.0.0.1:23442");
    assert.equal(
      l.reason,
      "tls: failed to verify certificate: x509: certificate signed by unknown authority",
    );
    assert.match(
      String(l.msg),
      /^this site's link to the hub \(127\.0\.0\.1:23442\) fails its TLS/,
    );
    assert.match(
      String(l.msg),
      /x509: certificate signed by unknown authority; .*WEFT_LEAF_TLS_CA/,
    );
    assert.doesNotMatch(String(l.msg), /key/);
  }
  // At a hub: a site it refuses over TLS, with what that site must check.
  const hubLines: Record<string, unknown>[] = [];
  const hubTls = leafTlsWatcher(
    createLogger("supervisor", "info", (l) => hubLines.push(JSON.parse(l))),
    undefined,
  );
  assert.equal(
    hubTls(
      "[6910] 2026/12/06 21:15:10.250603 [ERR] 127.0.0.1:48020 - lid:5 - TLS leafnode " +
        "handshake error: tls: client didn't provide a certificate",
    ),
    true,
  );
  assert.match(
    String(hubLines[0]!.msg),
    /^a site's leafnode connection \(from 127\.0\.0\.1:48020\) fails its TLS handshake: tls: client didn't provide a certificate; .*WEFT_LEAF_TLS_CERT/,
  );
});

Deno.test("siteStatus: a link is down only after 10 s with nothing heard from the site, since its last contact; a source restarted on a link that is up is said as such", () => {
  const now = Date.parse("2026-12-06T12:00:00Z");
  const source = (name: string, activeMs: number): StreamSourceInfo =>
    ({ name, lag: 0, active: activeMs < 0 ? -1 : activeMs * 1e6 }) as StreamSourceInfo;
  // EDGE_EAST's info as nats-server reports it: no event stored, the sources' activity.
  const info = (...sources: StreamSourceInfo[]) =>
    ({
      config: { name: "EDGE_EAST" },
      state: { messages: 0, last_seq: 0, last_ts: "0001-01-01T00:00:00Z" },
      sources,
    }) as unknown as StreamInfo;
  const counts = { deadLetters: 0, items: {} };
  // A clustered hub's node was killed: the new leader restarted the sources, one of which has
  // heard from the site 4 ms ago. The link is up: no "link down since", the lag unknown.
  const restarted = siteStatus(
    "east",
    info(source("FEEDBACK", 4), source("DIGEST", -1)),
    counts,
    new Map(),
    now,
  );
  assert.equal(restarted.last_seen_ms, 4);
  assert.equal(restarted.lag, null);
  assert.doesNotMatch(restarted.error ?? "", /link down/);
  assert.match(restarted.error ?? "", /^DIGEST: source \(re\)started and not heard from since/);
  // Every source restarted, the site heard from 3 s ago (as the gateway tracked it): up still.
  const contacts = new Map([["east", now - 3_000]]);
  const all = siteStatus("east", info(source("FEEDBACK", -1)), counts, contacts, now);
  assert.equal(all.last_seen_ms, 3_000);
  assert.doesNotMatch(all.error ?? "", /link down/);
  // Caught between a restart's two stream updates (its sources removed, then added again): a
  // site heard from 3 s ago is restarting, not down (a full run's /sites said "link down" for
  // that moment, then not, while the link was up).
  const between = siteStatus("east", info(), counts, new Map(contacts), now);
  assert.equal(between.last_seen_ms, 3_000);
  assert.equal(between.lag, null);
  assert.doesNotMatch(between.error ?? "", /link down/);
  assert.match(between.error ?? "", /^every source \(re\)starting and not heard from since/);
  // ...and after 10 s with nothing heard, down all the same.
  const gone = siteStatus("east", info(), counts, new Map(contacts), now + 12_000);
  assert.match(gone.error ?? "", /^link down since /);
  // 15 s later, still nothing: down since that contact, and last_seen_ms counts from it.
  const later = now + 12_000;
  const down = siteStatus("east", info(source("FEEDBACK", -1)), counts, contacts, later);
  assert.equal(down.last_seen_ms, 15_000);
  assert.equal(down.lag, null);
  assert.equal(
    down.error,
    `link down since ${new Date(now - 3_000).toISOString()}: nothing heard from the site since; ` +
      "its events wait there and arrive, in order, once the link is back",
  );
  // Linked and heard from: no error, the lag reported, last_seen_ms from the freshest source.
  const up = siteStatus(
    "east",
    info(source("FEEDBACK", 300), source("DIGEST", 900)),
    counts,
    new Map(),
    later,
  );
  assert.equal(up.error, undefined);
  assert.equal(up.lag, 0);
  assert.equal(up.last_seen_ms, 300);
  // Never heard from: the hint.
  const never = siteStatus("east", info(source("FEEDBACK", -1)), counts, new Map(), now);
  assert.equal(never.last_seen_ms, null);
  assert.match(never.error ?? "", /^not heard from yet: .*leaf-east\.nk.*TLS/);
});
