/**
 * Live shadow under `deno task start`: a candidate attached to the feedback pipeline's
 * sentiment step (over HTTP, admin only) sees the same items on its own consumer, publishes
 * only on `shadow.>`, and its agreement with production (known in advance here: the
 * reference ruleset against the embedded analyzer) shows in /metrics. The shadow process is
 * killed under load: production's latency stays within noise, no production item fails,
 * and the shadow resumes from its consumer. Then the candidate is promoted (over NATS: the
 * sentiment step runs it from the next item on), rolled back, and another shadow is detached.
 */
import assert from "node:assert/strict";
import { versionAtLeast } from "../src/nats_server.ts";
import { headers, type NatsConnection } from "@nats-io/nats-core";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { hashKey } from "../src/gateway/auth.ts";
import { loadRules } from "../pipelines/feedback/rules.ts";
import { agreementOf } from "../src/ai/agreement.ts";
import { chat, startFakeOpenAI } from "./helpers/openai_server.ts";
import {
  type Mesh,
  meshTempDir,
  ONE_PROCESS,
  removedAtEnd,
  startMesh,
  taskArgs,
} from "./helpers/mesh.ts";
import { deadline, waitFor } from "./helpers/wait.ts";
import { freePort } from "../src/nats_server.ts";
import { SAMPLE_FEEDBACK } from "./helpers/texts.ts";
import { connectClient } from "./helpers/nats.ts";

const ADMIN = "admin-key-for-the-shadow-test";
const INGEST = "ingest-key-for-the-shadow-test";

const TEXTS = SAMPLE_FEEDBACK.slice(0, 12);

/** One metric sample from the Prometheus text: name, labels and value. */
interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

function samples(text: string, name: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split("\n")) {
    const m = /^([a-z_]+)\{(.*)\} (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const labels: Record<string, string> = {};
    for (const l of m[2]!.matchAll(/([a-z_]+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]!] = l[2]!;
    out.push({ name, labels, value: Number(m[3]) });
  }
  return out;
}

async function metricsText(base: string): Promise<string> {
  // Keys are configured in these meshes: a scrape sends one, as Prometheus would.
  const r = await fetch(`${base}/metrics`, { headers: { authorization: `Bearer ${ADMIN}` } });
  assert.equal(r.status, 200);
  return await r.text();
}

function shadowValue(text: string, name: string, want: Record<string, string>): number | undefined {
  return samples(text, name).find((s) => Object.entries(want).every(([k, v]) => s.labels[k] === v))
    ?.value;
}

async function call(base: string, method: string, path: string, key: string, body?: unknown) {
  const r = await fetch(`${base}${path}`, {
    method,
    headers: {
      authorization: `Bearer ${key}`,
      ...(body !== undefined ? { "content-type": "application/json" } : {}),
    },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
}

/** A NATS request with the admin key, as `deno task shadow <verb>` sends it. */
async function request(nc: NatsConnection, verb: string, body: string) {
  const h = headers();
  h.set("Authorization", `Bearer ${ADMIN}`);
  const m = await nc.request(`weft.shadow.${verb}`, body, { timeout: 10_000, headers: h });
  return m.json<Record<string, unknown>>();
}

/** Production's view of every item: when it entered and left the mesh, and its sentiment. */
class Watch {
  readonly ingested = new Map<string, number>();
  readonly processed = new Map<
    string,
    { at: number; sentiment: string; analyzer: string; topics: string[]; team: string }
  >();
  readonly failed = new Set<string>();
  private waiters: { ids: readonly string[]; resolve: () => void }[] = [];
  private error: unknown;

  constructor(nc: NatsConnection) {
    // Through JetStream (an ordered consumer into the ops key's inbox): the ops key may not
    // subscribe to a subject a stream captures.
    void (async () => {
      // One filter, as a string: nats.js then names the consumer in the API subject, the only
      // create form a reader may use.
      const feed = await jetstream(nc).consumers.get("FEEDBACK", {
        filter_subjects: "feedback.*.*",
      });
      for await (const m of await feed.consume()) this.on(m);
    })().catch((err) => {
      // Ends with the connection; anything else fails the waits below with its cause.
      if (!nc.isClosed()) this.error = err;
    });
  }

  private on(m: { subject: string; json<T>(): T }): void {
    const [, type, id] = m.subject.split(".");
    if (type === "ingested") this.ingested.set(id!, performance.now());
    if (type === "failed") this.failed.add(id!);
    if (type === "processed") {
      const d = m.json<{
        data: {
          sentiment: { label: string; analyzer: string };
          topics: { topics: string[] };
          routing: { team: string };
        };
      }>().data;
      this.processed.set(id!, {
        at: performance.now(),
        sentiment: d.sentiment.label,
        analyzer: d.sentiment.analyzer,
        topics: d.topics.topics,
        team: d.routing.team,
      });
    }
    for (const w of [...this.waiters]) {
      if (w.ids.every((i) => this.processed.has(i) || this.failed.has(i))) {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        w.resolve();
      }
    }
  }

  /** Resolves when every one of `ids` is processed or failed. */
  done(ids: readonly string[], ms: number): Promise<void> {
    return deadline(
      new Promise<void>((resolve) => {
        if (ids.every((i) => this.processed.has(i) || this.failed.has(i))) return resolve();
        this.waiters.push({ ids, resolve });
      }),
      ms,
      `${ids.length} items to finish${this.error ? ` (the watch failed: ${this.error})` : ""}`,
    );
  }

  /** End-to-end latencies (ingested to processed, as seen here), ms. */
  latencies(ids: readonly string[]): number[] {
    return ids.map((i) => this.processed.get(i)!.at - this.ingested.get(i)!).sort((a, b) => a - b);
  }
}

const p50 = (sorted: number[]) => sorted[Math.floor(sorted.length * 0.5)]!;
const p99 = (sorted: number[]) =>
  sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * 0.99))]!;

/**
 * Offers `n` items at `rate` per second (paced by a timer: this is the load, nothing waits
 * on it), calling `during(i)` after the i-th is sent; resolves with their ids.
 */
async function load(
  mesh: Mesh,
  prefix: string,
  n: number,
  rate: number,
  during: (i: number) => Promise<void> | void = () => {},
): Promise<string[]> {
  const ids: string[] = [];
  const sends: Promise<void>[] = [];
  const start = performance.now();
  for (let i = 0; i < n; i++) {
    const wait = start + (i * 1000) / rate - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    const id = `${prefix}${i}`;
    ids.push(id);
    sends.push(
      call(mesh.gatewayUrl, "POST", "/feedback", INGEST, { id, text: TEXTS[i % TEXTS.length] })
        .then((r) => assert.equal(r.status, 202, JSON.stringify(r.body))),
    );
    await during(i);
  }
  await Promise.all(sends);
  return ids;
}

Deno.test("a live shadow compares a candidate with production, survives being killed under load, and is promoted or detached with one command", async (t) => {
  // Production in one process, the shadow host in its own (as always): it is killed below.
  await using mesh = await startMesh({
    ...ONE_PROCESS,
    WEFT_API_KEYS: JSON.stringify([
      { sha256: hashKey(ADMIN), role: "admin", name: "lead" },
      { sha256: hashKey(INGEST), role: "ingest", name: "intake" },
    ]),
  });
  const base = mesh.gatewayUrl;
  // Ready: every service answers, not only the gateway. No shadow is attached yet, so the
  // shadow service is not running: it starts with the first (below).
  const ready = await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
  assert.equal(ready.services, 12);
  assert.ok(!mesh.logs.some((l) => l.service === "weft-shadow"), "no shadow service yet");
  const nc = await connectClient(mesh.natsUrl, "test-ops", mesh.credentials("ops"));
  const reference = await loadRules("rules/reference.json");
  try {
    const watch = new Watch(nc);
    const jsm = await jetstreamManager(nc);
    const figures: Record<string, number> = {};

    // A warm-up (compiled code, caches, connections), then production alone: the baseline.
    const warmup = await load(mesh, "W", 40, 20);
    await watch.done(warmup, 60_000);
    const baseline = [...warmup, ...await load(mesh, "B", 120, 20)];
    await watch.done(baseline, 60_000);
    figures.p99_ms_without_shadow = p99(watch.latencies(baseline.slice(warmup.length)));
    figures.p50_ms_without_shadow = p50(watch.latencies(baseline.slice(warmup.length)));

    await t.step("attaching needs an admin key; a shadow is attached over HTTP", async () => {
      const spec = {
        id: "ref",
        step: "sentiment",
        candidate: { analyzers: "rules", rules: "rules/reference.json" },
        limits: { rps: 100, concurrency: 8 },
      };
      assert.equal((await call(base, "POST", "/shadows", INGEST, spec)).status, 403);
      const bad = await call(base, "POST", "/shadows", ADMIN, { ...spec, step: "nope" });
      assert.equal(bad.status, 422);
      assert.equal(bad.body.field, "/step");
      const attached = await call(base, "POST", "/shadows", ADMIN, spec);
      assert.equal(attached.status, 201, JSON.stringify(attached.body));
      assert.equal(attached.body.attached_by, "lead");
      assert.equal((await call(base, "POST", "/shadows", ADMIN, spec)).status, 409);
      // Bad requests are 4xx problems, over HTTP and NATS alike.
      const raw = (body: string, type = "application/json") =>
        fetch(`${base}/shadows`, {
          method: "POST",
          headers: { authorization: `Bearer ${ADMIN}`, "content-type": type },
          body,
        }).then(async (r) => (await r.body?.cancel(), r.status));
      assert.equal(await raw("{not json"), 400);
      assert.equal(await raw("[]"), 422);
      assert.equal(await raw("{}", "text/plain"), 415);
      assert.equal(await raw(JSON.stringify({ ...spec, pad: "x".repeat(20_000) })), 413);
      assert.equal((await call(base, "POST", "/shadows/nope/promote", ADMIN)).status, 404);
      const garbage = await request(nc, "attach", "{not json");
      // As over HTTP (and on the other request subjects): a body that is not JSON is a 400.
      assert.equal((garbage.error as { status: number }).status, 400);
      assert.equal((garbage.error as { code: string }).code, "malformed_json");
      // One that cannot start (its ruleset is missing) is refused, naming why.
      const brokenSpec = {
        id: "broken",
        step: "topics",
        candidate: { analyzers: "rules", rules: "rules/missing.json" },
      };
      const broken = await call(base, "POST", "/shadows", ADMIN, brokenSpec);
      assert.equal(broken.status, 422, JSON.stringify(broken.body));
      assert.equal(broken.body.field, "/candidate");
      assert.match(broken.body.detail, /cannot run: .*rules\/missing\.json/);
      // Should one be attached all the same (its ruleset removed since), it is reported and
      // harms nothing: written to the bucket as an attach does.
      const admin = await connectClient(mesh.natsUrl, "test-admin", mesh.credentials("admin"));
      try {
        await (await new Kvm(admin).open("weft_shadows")).create(
          "broken",
          JSON.stringify({ ...brokenSpec, attached_by: "lead" }),
        );
      } finally {
        await admin.close();
      }
      // And one over NATS, on dispatch, as `deno task shadow attach` sends it.
      const routed = await request(
        nc,
        "attach",
        JSON.stringify({
          id: "route2",
          step: "dispatch",
          candidate: { analyzers: "embedded", rules: "rules/reference.json" },
        }),
      );
      assert.equal(routed.id, "route2", JSON.stringify(routed));
      await mesh.waitForLog(
        (l) => l.msg === "a live shadow is attached: starting the shadow service",
        10_000,
        "the supervisor to start the shadow service",
      );
      await mesh.waitForLog((l) => l.msg === "shadow started" && l.shadow === "ref", 20_000, "ref");
      await mesh.waitForLog(
        (l) => l.msg === "shadow started" && l.shadow === "route2",
        20_000,
        "route2",
      );
      await mesh.waitForLog(
        (l) => l.msg === "shadow did not start" && l.shadow === "broken",
        20_000,
        "broken reported",
      );
      const listed = await call(base, "GET", "/shadows", ADMIN);
      assert.deepEqual(listed.body.shadows.map((s: { id: string }) => s.id), [
        "broken",
        "ref",
        "route2",
      ]);
    });

    let phaseA: string[] = [];
    let phaseB: string[] = [];
    await t.step(
      "the shadow's agreement with production is in /metrics, as computed here",
      async () => {
        phaseA = await load(mesh, "A", 120, 20);
        await watch.done(phaseA, 60_000);
        figures.p99_ms_with_shadow = p99(watch.latencies(phaseA));
        figures.p50_ms_with_shadow = p50(watch.latencies(phaseA));
        const text = await waitFor(
          async () => {
            const text = await metricsText(base);
            const compared = shadowValue(text, "weft_shadow_items_total", {
              shadow: "ref",
              outcome: "compared",
            });
            return compared === phaseA.length ? text : undefined;
          },
          60_000,
          "the shadow to compare every item",
        );
        const production = phaseA.map((id) => watch.processed.get(id)!.sentiment);
        const candidate = phaseA.map((id, i) => {
          assert.match(watch.processed.get(id)!.analyzer, /^embedded/);
          return (reference.sentiment!.analyze(TEXTS[i % TEXTS.length]!) as { label: string })
            .label;
        });
        const want = agreementOf(production, candidate);
        assert.ok(want.agreement > 0 && want.agreement < 1, "the two disagree on some items");
        const labels = { shadow: "ref", field: "sentiment" };
        const agreement = shadowValue(text, "weft_shadow_agreement_ratio", labels)!;
        assert.ok(Math.abs(agreement - want.agreement) < 1e-9, `${agreement} vs ${want.agreement}`);
        const kappa = shadowValue(text, "weft_shadow_kappa", labels)!;
        assert.ok(Math.abs(kappa - want.kappa) < 1e-9, `${kappa} vs ${want.kappa}`);
        // The confusion matrix, cell by cell.
        for (const [p, row] of Object.entries(want.confusion)) {
          for (const [c, n] of Object.entries(row)) {
            assert.equal(
              shadowValue(text, "weft_shadow_compared_total", {
                ...labels,
                production: p,
                candidate: c,
              }),
              n,
              `${p} -> ${c}`,
            );
          }
        }
        assert.equal(shadowValue(text, "weft_shadow_up", { shadow: "broken" }), 0);
        assert.equal(shadowValue(text, "weft_shadow_up", { shadow: "ref" }), 1);
        figures.agreement_sentiment = Math.round(agreement * 1000) / 1000;
        figures.kappa_sentiment = Math.round(kappa * 1000) / 1000;
        // The dispatch shadow (same routing table here) agrees on every team.
        const teams = await waitFor(
          async () => {
            const t = await metricsText(base);
            return shadowValue(t, "weft_shadow_items_total", {
                shadow: "route2",
                outcome: "compared",
              }) === phaseA.length
              ? t
              : undefined;
          },
          60_000,
          "route2 to compare every item",
        );
        const routed = agreementOf(
          phaseA.map((id) => watch.processed.get(id)!.team),
          phaseA.map((id) => {
            const p = watch.processed.get(id)!;
            return reference.route(p.sentiment as "positive", p.topics).team;
          }),
        );
        const teamAgreement = shadowValue(teams, "weft_shadow_agreement_ratio", {
          shadow: "route2",
          field: "team",
        })!;
        assert.ok(Math.abs(teamAgreement - routed.agreement) < 1e-9, `${teamAgreement}`);
        figures.agreement_team = Math.round(teamAgreement * 1000) / 1000;
        // The shadow's decisions are on shadow.>, one per item; production's stream has
        // exactly production's five events per item.
        const info = await jsm.streams.info("SHADOW", {
          subjects_filter: "shadow.feedback.sentiment.*",
        });
        assert.equal(Object.keys(info.state.subjects ?? {}).length, phaseA.length);
        const fb = await jsm.streams.info("FEEDBACK");
        assert.equal(fb.state.messages, 5 * (baseline.length + phaseA.length));
      },
    );

    await t.step(
      "killing the shadow under load leaves production's latency within noise",
      async () => {
        const status = await nc.request("weft.shadow.status", undefined, { timeout: 5000 });
        const pid = status.json<{ pid: number }>().pid;
        assert.ok(pid > 0);
        let killed = false;
        phaseB = await load(mesh, "K", 120, 20, (i) => {
          if (i === 10) {
            Deno.kill(pid, "SIGKILL");
            killed = true;
          }
        });
        assert.ok(killed);
        await watch.done(phaseB, 60_000);
        assert.equal(watch.failed.size, 0, "no production item failed");
        figures.p99_ms_shadow_killed = p99(watch.latencies(phaseB));
        figures.p50_ms_shadow_killed = p50(watch.latencies(phaseB));
        // Generous: a 2-core machine also restarts the shadow process meanwhile.
        const bound = Math.max(4 * figures.p99_ms_with_shadow!, figures.p99_ms_with_shadow! + 1000);
        assert.ok(
          figures.p99_ms_shadow_killed <= bound,
          `p99 ${figures.p99_ms_shadow_killed} ms with the shadow killed, bound ${bound} ms`,
        );
        // The supervisor restarts it; from its consumer it decides every item it missed.
        await waitFor(
          async () => {
            const subjects = Object.keys(
              (await jsm.streams.info("SHADOW", { subjects_filter: "shadow.feedback.sentiment.*" }))
                .state.subjects ?? {},
            );
            return phaseB.every((id) => subjects.includes(`shadow.feedback.sentiment.${id}`)) ||
              undefined;
          },
          90_000,
          "the restarted shadow to decide every item of the load",
        );
        const fb = await jsm.streams.info("FEEDBACK");
        assert.equal(fb.state.messages, 5 * (baseline.length + phaseA.length + phaseB.length));
      },
    );

    await t.step(
      "deno task shadow report prints the live agreement and the disagreements",
      async () => {
        const out = await new Deno.Command("deno", {
          args: [...await taskArgs("shadow"), "report", "ref", "--out", `${mesh.storeDir}/live`],
          cwd: new URL("../", import.meta.url),
          env: { NATS_URL: mesh.natsUrl, WEFT_NATS_NKEY: mesh.credentials("ops").nkeySeedFile! },
          stdout: "piped",
          stderr: "piped",
        }).output();
        const printed = new TextDecoder().decode(out.stdout);
        assert.ok(out.success, new TextDecoder().decode(out.stderr) + printed);
        assert.match(
          printed,
          /live shadow ref: rules:rules\/reference\.json on feedback\.sentiment/,
        );
        // A shadow that did not start: its report says why, not only "0 items".
        const broken = await new Deno.Command("deno", {
          args: [...await taskArgs("shadow"), "report", "broken"],
          cwd: new URL("../", import.meta.url),
          env: { NATS_URL: mesh.natsUrl, WEFT_NATS_NKEY: mesh.credentials("ops").nkeySeedFile! },
          stdout: "piped",
          stderr: "piped",
        }).output();
        assert.equal(broken.code, 1);
        assert.match(new TextDecoder().decode(broken.stderr), /shadow broken: not running: \S/);
        // Reading the decisions left no consumer on SHADOW (nats.js keeps an ordered
        // consumer it only stopped for 5 minutes); the shadow service's restore neither.
        const admin = await connectClient(mesh.natsUrl, "test-admin", mesh.credentials("admin"));
        try {
          const left: string[] = [];
          for await (const c of (await jetstreamManager(admin)).consumers.list("SHADOW")) {
            left.push(c.name);
          }
          assert.deepEqual(left, []);
        } finally {
          await admin.close();
        }
        const report = JSON.parse(await Deno.readTextFile(`${mesh.storeDir}/live.json`));
        const ids = [...phaseA, ...phaseB];
        assert.equal(report.items, ids.length, "each item's decision once");
        const want = agreementOf(
          ids.map((id) => watch.processed.get(id)!.sentiment),
          ids.map((id) =>
            (reference.sentiment!.analyze(TEXTS[Number(id.slice(1)) % TEXTS.length]!) as {
              label: string;
            }).label
          ),
        );
        assert.ok(Math.abs(report.fields.sentiment.agreement - want.agreement) < 1e-9);
        assert.deepEqual(report.fields.sentiment.confusion, want.confusion);
        assert.equal(report.disagreements.length, 10);
        for (const d of report.disagreements) {
          assert.notEqual(d.production, d.candidate);
          assert.ok(TEXTS.includes(d.text), d.text);
        }
      },
    );

    await t.step(
      "promote is one request: the sentiment step runs the candidate from then on",
      async () => {
        const version = await request(nc, "promote", "ref");
        assert.equal(version.promoted_from, "ref", JSON.stringify(version));
        assert.deepEqual(version.candidate, { analyzers: "rules", rules: "rules/reference.json" });
        assert.equal(version.promoted_by, "lead");
        await mesh.waitForLog(
          (l) => l.msg === "promoted step version applied" && l.step === "feedback.sentiment",
          20_000,
          "the sentiment step to apply the promotion",
        );
        const ids = await load(mesh, "P", 12, 20);
        await watch.done(ids, 30_000);
        ids.forEach((id, i) => {
          const p = watch.processed.get(id)!;
          assert.equal(p.analyzer, "rules");
          assert.equal(
            p.sentiment,
            (reference.sentiment!.analyze(TEXTS[i]!) as { label: string }).label,
          );
        });
        // Recorded: the bucket (with history) and an audit event; the shadow is gone.
        const kv = await new Kvm(nc).open("weft_step_versions");
        assert.equal(
          (await kv.get("feedback.sentiment"))?.json<{ promoted_from: string }>()
            .promoted_from,
          "ref",
        );
        const audit = await jsm.streams.info("SHADOW", { subjects_filter: "shadow._audit.>" });
        assert.ok(audit.state.subjects?.["shadow._audit.promoted.feedback.sentiment"]);
        await waitFor(
          () => jsm.consumers.info("FEEDBACK", "shadow_ref").then(() => false, () => true),
          20_000,
          "the promoted shadow's consumer deleted",
        );
      },
    );

    await t.step("detach is one request: the consumer and the metrics go", async () => {
      assert.equal((await call(base, "DELETE", "/shadows/route2", INGEST)).status, 403);
      const r = await call(base, "DELETE", "/shadows/route2", ADMIN);
      assert.equal(r.status, 200, JSON.stringify(r.body));
      assert.equal((await call(base, "DELETE", "/shadows/route2", ADMIN)).status, 404);
      // One command: `deno task shadow detach`, with the ops key and an admin API key.
      const cli = await new Deno.Command("deno", {
        args: [...await taskArgs("shadow"), "detach", "broken"],
        cwd: new URL("../", import.meta.url),
        env: {
          NATS_URL: mesh.natsUrl,
          WEFT_NATS_NKEY: mesh.credentials("ops").nkeySeedFile!,
          WEFT_API_KEY: ADMIN,
        },
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert.ok(cli.success, new TextDecoder().decode(cli.stderr));
      assert.deepEqual(JSON.parse(new TextDecoder().decode(cli.stdout)), { detached: "broken" });
      await waitFor(
        () => jsm.consumers.info("FEEDBACK", "shadow_route2").then(() => false, () => true),
        20_000,
        "the detached shadow's consumer deleted",
      );
      await waitFor(
        async () => !/shadow="(route2|broken|ref)"/.test(await metricsText(base)),
        20_000,
        "the detached shadows' series gone",
      );
      const listed = await call(base, "GET", "/shadows", ADMIN);
      assert.deepEqual(listed.body.shadows, []);
      assert.equal(listed.body.versions.length, 1);
    });

    await t.step("reset is one request: the step runs its configured version again", async () => {
      const r = await call(base, "DELETE", "/shadows/versions/feedback.sentiment", ADMIN);
      assert.equal(r.status, 200, JSON.stringify(r.body));
      assert.equal(r.body.was.promoted_from, "ref");
      await mesh.waitForLog(
        (l) => l.msg === "step version reset to the configured one",
        20_000,
        "the sentiment step to reset",
      );
      const ids = await load(mesh, "R", 12, 20);
      await watch.done(ids, 30_000);
      for (const id of ids) assert.match(watch.processed.get(id)!.analyzer, /^embedded/);
      assert.deepEqual((await call(base, "GET", "/shadows", ADMIN)).body.versions, []);
      const audit = await jsm.streams.info("SHADOW", { subjects_filter: "shadow._audit.>" });
      assert.deepEqual(Object.keys(audit.state.subjects ?? {}).sort(), [
        "shadow._audit.attached.feedback.dispatch",
        "shadow._audit.attached.feedback.sentiment",
        // (broken, on topics, was written to the bucket, not attached: no audit event.)
        "shadow._audit.detached.feedback.dispatch",
        "shadow._audit.detached.feedback.topics",
        "shadow._audit.promoted.feedback.sentiment",
        "shadow._audit.reset.feedback.sentiment",
      ]);
    });

    await t.step("the shadow identity may publish only shadow decisions", async () => {
      assert.deepEqual(
        mesh.logs.filter((l) => l.msg === "nats permission violation"),
        [],
        "no refused permission so far",
      );
      const sc = await connectClient(mesh.natsUrl, "test-as-shadow", mesh.credentials("shadow"));
      try {
        const js = jetstream(sc);
        await js.publish("shadow.feedback.sentiment.OWN", "{}");
        for (
          const subject of [
            "feedback.sentiment_analyzed.victim",
            "feedback.failed.victim",
            "shadow._audit.promoted.feedback.sentiment",
          ]
        ) {
          await assert.rejects(js.publish(subject, "{}"), /permission/i, subject);
        }
        const sjsm = await jetstreamManager(sc);
        await assert.rejects(sjsm.consumers.delete("FEEDBACK", "sentiment"), /permission/i);
        // Its info is readable (it reads the stream), but a pull is refused: the server
        // drops the request (the client sees no heartbeat) and logs the violation.
        await assert.rejects(
          (async () => (await js.consumers.get("FEEDBACK", "sentiment")).next({ expires: 1000 }))(),
        );
        await mesh.waitForLog(
          (l) =>
            l.msg === "nats permission violation" &&
            String(l.line).includes("CONSUMER.MSG.NEXT.FEEDBACK.sentiment"),
          10_000,
          "the refused pull logged",
        );
        await assert.rejects(
          (async () => (await new Kvm(sc).open("weft_step_versions")).get("feedback.sentiment"))(),
          /permission/i,
        );
      } finally {
        await sc.close();
      }
    });

    // The figures, for the record (docs/SHADOW.md).
    Deno.stdout.writeSync(
      new TextEncoder().encode(`LIVE-SHADOW-FIGURES ${JSON.stringify(figures)}\n`),
    );
  } finally {
    await nc.close();
  }
});

Deno.test("a live shadow follows a definition's step with another version of the definition; a WEFT_SHADOW shadow runs; an LLM candidate stops at its own budget", async () => {
  const dir = await meshTempDir("weft-shadow-def-");
  await using _dir = removedAtEnd(dir);
  const mod = new URL("../mod.ts", import.meta.url).href;
  // Production calls a text long from 20 characters; the candidate version from 30.
  const definition = (min: number, output = `{ type: "object" }`) =>
    `import { definePipeline } from "${mod}";
export const tickets = definePipeline({
  name: "tickets",
  input: { schema: { type: "object", required: ["text"] } },
  start: "size",
  steps: {
    size: {
      kind: "task",
      output: ${output},
      handle: (i: { text: string }) => ({ size: i.text.length >= ${min} ? "long" : "short" }),
      next: "done",
    },
    done: { kind: "end", outcome: "done" },
  },
});
`;
  // A stand-in LLM for an LLM candidate with its own (tiny) budget.
  const llm = startFakeOpenAI(() =>
    chat({ label: "neutral", score: 0 }, { prompt_tokens: 100, completion_tokens: 0 })
  );
  await using _llm = { [Symbol.asyncDispose]: () => llm.close() };
  await Deno.writeTextFile(`${dir}/tickets.ts`, definition(20));
  await Deno.writeTextFile(`${dir}/tickets_v2.ts`, definition(30));
  // A version whose step changes its output schema: not a drop-in for the running step.
  await Deno.writeTextFile(
    `${dir}/tickets_v3.ts`,
    definition(30, `{ type: "object", required: ["size"] }`),
  );
  await using mesh = await startMesh(
    {
      ...ONE_PROCESS,
      WEFT_PIPELINES: `${dir}/tickets.ts`,
      WEFT_LLM_BASE_URL: llm.baseUrl,
      WEFT_LLM_MODEL: "candidate-model",
      WEFT_LLM_API_KEY: "test-key",
      WEFT_LLM_PRICE_IN_PER_1K: "0.001",
      // And one attached by configuration, on a feedback step.
      WEFT_SHADOW: JSON.stringify({
        id: "cfg",
        step: "sentiment",
        candidate: { analyzers: "rules", rules: "rules/reference.json" },
      }),
    },
    { storeDir: `${dir}/nats` },
  );
  const starting = await mesh.waitForLog((l) => l.msg === "starting services", 30_000, "start");
  assert.ok(
    (starting.processes as string[]).includes("shadow"),
    "with WEFT_SHADOW the shadow service starts with the rest",
  );
  await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "the mesh to be ready");
  const base = mesh.gatewayUrl;
  const spec = {
    id: "size2",
    pipeline: "tickets",
    step: "size",
    candidate: { definition: `${dir}/tickets_v2.ts` },
    limits: { rps: 100, concurrency: 8 },
  };
  const post = (body: unknown) => call(base, "POST", "/shadows", "none", body);
  // Only a running definition's work step, with a candidate beside it.
  assert.equal((await post({ ...spec, step: "done" })).status, 422);
  assert.equal((await post({ ...spec, pipeline: "nosuch" })).status, 422);
  assert.equal(
    (await post({ ...spec, candidate: { definition: "pipelines/elsewhere.ts" } })).status,
    422,
  );
  const attached = await post(spec);
  assert.equal(attached.status, 201, JSON.stringify(attached.body));
  await mesh.waitForLog((l) => l.msg === "shadow started" && l.shadow === "size2", 20_000, "size2");

  const texts = Array.from({ length: 40 }, (_, i) => "x".repeat(5 + i));
  for (const text of texts) {
    const r = await call(base, "POST", "/pipelines/tickets/items", "none", { text });
    assert.equal(r.status, 202, JSON.stringify(r.body));
  }
  const text = await waitFor(
    async () => {
      const t = await metricsText(base);
      return shadowValue(t, "weft_shadow_items_total", { shadow: "size2", outcome: "compared" }) ===
          texts.length
        ? t
        : undefined;
    },
    60_000,
    "the shadow to compare every item",
  );
  const want = agreementOf(
    texts.map((t) => (t.length >= 20 ? "long" : "short")),
    texts.map((t) => (t.length >= 30 ? "long" : "short")),
  );
  for (const field of ["size", "result"]) {
    assert.equal(
      shadowValue(text, "weft_shadow_agreement_ratio", { shadow: "size2", field }),
      want.agreement,
      field,
    );
  }
  assert.equal(
    shadowValue(text, "weft_shadow_compared_total", {
      shadow: "size2",
      field: "size",
      production: "long",
      candidate: "short",
    }),
    10,
  );
  // A candidate that changes the step's contract cannot take its place: 409, deploy it instead.
  const v3 = await post({
    ...spec,
    id: "size3",
    candidate: { definition: `${dir}/tickets_v3.ts` },
  });
  assert.equal(v3.status, 201, JSON.stringify(v3.body));
  const refused = await call(base, "POST", "/shadows/size3/promote", "none");
  assert.equal(refused.status, 409);
  assert.match(refused.body.detail, /output schema/);
  assert.equal((await call(base, "DELETE", "/shadows/size3", "none")).status, 200);
  // Promoting v2: production's step runs the candidate's version from then on (a text of 25
  // characters is now short), recorded; the shadow goes.
  const sizeOf = async (text: string) => {
    const r = await call(base, "POST", "/pipelines/tickets/items", "none", { text });
    assert.equal(r.status, 202, JSON.stringify(r.body));
    const state = await waitFor(
      async () => {
        const s = await call(base, "GET", `/pipelines/tickets/items/${r.body.id}`, "none");
        return s.body.outcome ? s.body : undefined;
      },
      20_000,
      `${r.body.id} done`,
    );
    return state.results.size.size as string;
  };
  const promoted = await call(base, "POST", "/shadows/size2/promote", "none");
  assert.equal(promoted.status, 200, JSON.stringify(promoted.body));
  assert.equal(promoted.body.candidate.definition, `${dir}/tickets_v2.ts`);
  await mesh.waitForLog(
    (l) => l.msg === "promoted step version applied" && l.step === "tickets.size",
    20_000,
    "the size step to run the promoted version",
  );
  assert.equal(await sizeOf("y".repeat(25)), "short");
  assert.equal((await call(base, "GET", "/shadows", "none")).body.versions.length, 1);
  // Reset: the configured version again.
  const reset = await call(base, "DELETE", "/shadows/versions/tickets.size", "none");
  assert.equal(reset.status, 200, JSON.stringify(reset.body));
  await mesh.waitForLog(
    (l) => l.msg === "step version reset to the configured one" && l.step === "tickets.size",
    20_000,
    "the size step to reset",
  );
  assert.equal(await sizeOf("z".repeat(25)), "long");

  // The shadow of WEFT_SHADOW runs, is listed as configured, and is detached only there.
  await mesh.waitForLog((l) => l.msg === "shadow started" && l.shadow === "cfg", 20_000, "cfg");
  const listed = await call(base, "GET", "/shadows", "none");
  assert.deepEqual(
    listed.body.shadows.map((s: { id: string; source: string }) => [s.id, s.source]),
    [["cfg", "config"]],
  );
  assert.equal((await call(base, "DELETE", "/shadows/cfg", "none")).status, 409);
  const fb = await call(base, "POST", "/feedback", "none", { text: "Thanks, lovely support" });
  assert.equal(fb.status, 202);
  await waitFor(
    async () =>
      shadowValue(await metricsText(base), "weft_shadow_items_total", {
          shadow: "cfg",
          outcome: "compared",
        }) === 1 || undefined,
    30_000,
    "the configured shadow to compare the item",
  );

  // An LLM candidate (prompt v2) spends its own budget, then decides nothing more: no
  // fallback to another analyzer, nothing asked of production.
  const budgeted = await call(base, "POST", "/shadows", "none", {
    id: "llm1",
    step: "sentiment",
    candidate: { analyzers: "llm", prompt: "v2" },
    // One at a time: the budget is checked before each call, so calls already in flight
    // (up to the concurrency) may all pass it.
    limits: { budgetUsd: 0.00005, concurrency: 1 },
  });
  assert.equal(budgeted.status, 201, JSON.stringify(budgeted.body));
  await mesh.waitForLog((l) => l.msg === "shadow started" && l.shadow === "llm1", 20_000, "llm1");
  const distinct = ["Great app", "Slow pages today", "Refund me now", "Add a dark mode"];
  const fbIds: string[] = [];
  for (const text of distinct) {
    const r = await call(base, "POST", "/feedback", "none", { text });
    assert.equal(r.status, 202);
    fbIds.push(r.body.id);
  }
  const spent = await waitFor(
    async () => {
      const t = await metricsText(base);
      const v = (outcome: string) =>
        shadowValue(t, "weft_shadow_items_total", { shadow: "llm1", outcome }) ?? 0;
      return v("compared") + v("over_budget") === distinct.length ? t : undefined;
    },
    30_000,
    "the LLM shadow to see every item",
  );
  assert.equal(
    shadowValue(spent, "weft_shadow_items_total", { shadow: "llm1", outcome: "compared" }),
    1,
  );
  assert.equal(
    shadowValue(spent, "weft_shadow_items_total", { shadow: "llm1", outcome: "over_budget" }),
    3,
  );
  assert.ok(
    (shadowValue(spent, "weft_shadow_llm_cost_usd_total", { shadow: "llm1" }) ?? 0) > 0,
  );
  assert.equal(llm.requests.length, 1, "one call, then the budget is spent");
  // Production decided every item with its own analyzer.
  for (const id of fbIds) {
    const state = await waitFor(
      async () => {
        const s = await (await fetch(`${base}/feedback/${id}`)).json();
        return s.status === "processed" ? s : undefined;
      },
      20_000,
      `${id} processed`,
    );
    assert.match(state.sentiment.analyzer, /^embedded/);
  }
  assert.match(llm.requests[0]!.body.messages[0]!.content, /A question or a feature request/);
  // Killed and started again, the shadow goes on from its counters and spent budget:
  // before, a restart gave it its whole budget again (one more call per restart), and its
  // over_budget, failed and skipped counts and LLM spend started from zero.
  const shadowPid = async () => {
    const out = await new Deno.Command("ps", {
      args: ["-o", "pid=,args=", "--ppid", String(mesh.child.pid)],
    }).output();
    const line = new TextDecoder().decode(out.stdout).split("\n")
      .find((l) => l.includes("services/shadow.ts"));
    return line ? Number(line.trim().split(/\s+/, 1)[0]) : undefined;
  };
  const before = await shadowPid();
  assert.ok(before, "the shadow service runs");
  const startedBefore = mesh.logs.filter((l) => l.msg === "shadow started" && l.shadow === "llm1")
    .length;
  Deno.kill(before!, "SIGKILL");
  await waitFor(
    () =>
      mesh.logs.filter((l) => l.msg === "shadow started" && l.shadow === "llm1").length >
        startedBefore,
    30_000,
    "llm1 started again",
  );
  for (const text of ["Crashes at login", "Love the new look"]) {
    assert.equal((await call(base, "POST", "/feedback", "none", { text })).status, 202);
  }
  const after = await waitFor(
    async () => {
      const t = await metricsText(base);
      const v = (outcome: string) =>
        shadowValue(t, "weft_shadow_items_total", { shadow: "llm1", outcome }) ?? 0;
      if (v("compared") + v("over_budget") === distinct.length + 2) return t;
      throw new Error(
        ["decided", "compared", "over_budget", "failed", "skipped"].map((o) => `${o} ${v(o)}`)
          .join(", "),
      );
    },
    30_000,
    "the restarted shadow to count both new items",
  );
  assert.equal(llm.requests.length, 1, "no call past the budget after the restart");
  assert.equal(
    shadowValue(after, "weft_shadow_items_total", { shadow: "llm1", outcome: "over_budget" }),
    5,
  );
  assert.ok((shadowValue(after, "weft_shadow_llm_cost_usd_total", { shadow: "llm1" }) ?? 0) > 0);
  assert.equal((await call(base, "DELETE", "/shadows/llm1", "none")).status, 200);
  const nc = await connectClient(mesh.natsUrl, "test-ops", mesh.credentials("ops"));
  try {
    const jsm = await jetstreamManager(nc);
    await waitFor(
      () => jsm.consumers.info("TICKETS", "shadow_size2").then(() => false, () => true),
      20_000,
      "the detached shadow's consumer deleted",
    );
    // Production's stream holds production's events only: entry, the step, the end (of the
    // 40 items and the two sized while promoted and after the reset).
    assert.equal((await jsm.streams.info("TICKETS")).state.messages, 3 * (texts.length + 2));
  } finally {
    await nc.close();
  }
  assert.deepEqual(mesh.logs.filter((l) => l.msg === "nats permission violation"), []);
});

Deno.test("one shadow service hosts every attached shadow, also after a restart of the mesh", async () => {
  const storeDir = await meshTempDir("weft-shadow-host-");
  await using _store = removedAtEnd(storeDir);
  const ports = { natsPort: freePort(), port: freePort() };
  /** The shadow service's processes under the supervisor `mesh` runs. */
  const shadowServices = async (mesh: Mesh) => {
    const out = await new Deno.Command("ps", {
      args: ["-o", "args=", "--ppid", String(mesh.child.pid)],
    }).output();
    return new TextDecoder().decode(out.stdout).split("\n")
      .filter((l) => l.includes("services/shadow.ts")).length;
  };
  const started = (mesh: Mesh, n: number) =>
    waitFor(
      () =>
        mesh.logs.filter((l) => l.service === "weft-shadow" && l.msg === "shadow started")
          .length >= n,
      60_000,
      `${n} shadows started`,
    );
  const ids = ["s1", "s2", "s3"];
  {
    await using mesh = await startMesh(ONE_PROCESS, { storeDir, ...ports, keepStore: true });
    for (const id of ids) {
      const attached = await call(mesh.gatewayUrl, "POST", "/shadows", "", {
        id,
        step: "sentiment",
        candidate: { analyzers: "rules", rules: "rules/reference.json" },
      });
      assert.equal(attached.status, 201, JSON.stringify(attached.body));
    }
    await started(mesh, ids.length);
    assert.equal(await shadowServices(mesh), 1);
  }
  // Started again, the supervisor finds the three in the bucket at once: one service still.
  // (Before: one per entry, each with its own rate limit and budget for every shadow.)
  await using mesh = await startMesh(ONE_PROCESS, { storeDir, ...ports });
  await started(mesh, ids.length);
  assert.equal(await shadowServices(mesh), 1);
  assert.equal(
    mesh.logs.filter((l) => l.service === "weft-shadow" && l.msg === "shadow started").length,
    ids.length,
  );
});

Deno.test("a definition step's shadow counts only the step's inputs; attach refuses a candidate that cannot run; promote needs one that compared items", async () => {
  const dir = await meshTempDir("weft-shadow-inputs-");
  await using _dir = removedAtEnd(dir);
  const mod = new URL("../mod.ts", import.meta.url).href;
  // `size` follows two steps, so its consumer's filter is every event of the pipeline
  // (`sizes.*.*`): the router's and prep's events, entries, ends, its own.
  const definition = (min: number) =>
    `import { definePipeline } from "${mod}";
export const sizes = definePipeline({
  name: "sizes",
  input: { schema: { type: "object", required: ["text"] } },
  start: "pick",
  steps: {
    pick: {
      kind: "router",
      route: (i: { text: string }) => (i.text.length % 2 ? "direct" : "via"),
      routes: { direct: "size", via: "prep" },
    },
    prep: {
      kind: "task",
      output: { type: "object" },
      handle: (i: { text: string }) => ({ text: i.text }),
      next: "size",
    },
    size: {
      kind: "task",
      output: { type: "object" },
      handle: (i: { text: string }) => ({ size: i.text.length >= ${min} ? "long" : "short" }),
      next: "done",
    },
    done: { kind: "end", outcome: "done" },
  },
});
`;
  await Deno.writeTextFile(`${dir}/sizes.ts`, definition(20));
  await Deno.writeTextFile(`${dir}/sizes_v2.ts`, definition(30));
  await Deno.writeTextFile(`${dir}/broken.ts`, "export const sizes = definePipeline({");
  await using mesh = await startMesh(
    { ...ONE_PROCESS, WEFT_PIPELINES: `${dir}/sizes.ts` },
    { storeDir: `${dir}/nats` },
  );
  await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "the mesh to be ready");
  const base = mesh.gatewayUrl;
  const spec = { id: "size2", pipeline: "sizes", step: "size" };
  const post = (definition: string) =>
    call(base, "POST", "/shadows", "none", { ...spec, candidate: { definition } });

  // Refused at once, naming the field, instead of a shadow that never starts.
  for (const bad of [`${dir}/missing.ts`, `${dir}/broken.ts`, "pipelines/support/pipeline.ts"]) {
    const r = await post(bad);
    assert.equal(r.status, 422, `${bad}: ${JSON.stringify(r.body)}`);
    assert.equal(r.body.field, "/candidate/definition", bad);
  }
  const attached = await post(`${dir}/sizes_v2.ts`);
  assert.equal(attached.status, 201, JSON.stringify(attached.body));
  await mesh.waitForLog((l) => l.msg === "shadow started" && l.shadow === "size2", 20_000, "size2");
  const early = await call(base, "POST", "/shadows/size2/promote", "none");
  assert.equal(early.status, 409, JSON.stringify(early.body));
  assert.match(early.body.detail, /compared no item/);

  const texts = Array.from({ length: 20 }, (_, i) => "x".repeat(10 + i));
  for (const text of texts) {
    const r = await call(base, "POST", "/pipelines/sizes/items", "none", { text });
    assert.equal(r.status, 202, JSON.stringify(r.body));
  }
  const text = await waitFor(
    async () => {
      const t = await metricsText(base);
      const compared = shadowValue(t, "weft_shadow_items_total", {
        shadow: "size2",
        outcome: "compared",
      });
      return compared === texts.length ? t : undefined;
    },
    60_000,
    "the shadow to compare every item",
  );
  const count = (outcome: string) =>
    shadowValue(text, "weft_shadow_items_total", { shadow: "size2", outcome }) ?? 0;
  // Before: every other event on the filter was counted "skipped" (sampled out), and took a
  // token of the shadow's rate limit.
  assert.equal(count("skipped"), 0);
  assert.equal(count("decided"), texts.length);
  assert.equal(count("failed"), 0);
  const promoted = await call(base, "POST", "/shadows/size2/promote", "none");
  assert.equal(promoted.status, 200, JSON.stringify(promoted.body));
  // Production's `size` consumer filters on its two inputs, not on every event of the
  // pipeline (nats-server 2.10+): before, it was delivered every event and decoded each.
  const admin = await connectClient(mesh.natsUrl, "test-admin", mesh.credentials("admin"));
  try {
    if (!versionAtLeast(admin.info?.version ?? "0.0.0", "2.10.0")) return;
    const ci = await (await jetstreamManager(admin)).consumers.info("SIZES", "sizes-size");
    assert.deepEqual(ci.config.filter_subjects, ["sizes.pick.*", "sizes.prep.*"]);
    assert.equal(ci.config.filter_subject, undefined);
    // 20 router events and 10 prep events; all 100 of the pipeline's events before.
    assert.ok(ci.delivered.consumer_seq < 60, JSON.stringify(ci.delivered));
  } finally {
    await admin.close();
  }
});
