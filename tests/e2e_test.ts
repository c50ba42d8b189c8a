/**
 * End to end: the supervisor of `deno task start` runs nats-server and every service as
 * real processes; items go in over HTTP and over NATS and come out processed.
 */
import assert from "node:assert/strict";
import { Kvm } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/nats-core";
import {
  freePort,
  portFree,
  serverVersion,
  startNatsServer,
  versionAtLeast,
} from "../src/nats_server.ts";
import type { FeedbackState } from "../pipelines/feedback/events.gen.ts";
import { meshTempDir, ONE_PROCESS, removedAtEnd, startMesh, taskArgs } from "./helpers/mesh.ts";
import { readSse } from "./helpers/sse.ts";
import { waitFor } from "./helpers/wait.ts";
import { connectClient } from "./helpers/nats.ts";

/** Features of nats-server 2.10 and later (fsync interval, subject transforms for hubs): not run on 2.9. */
const CURRENT_SERVER = { ignore: !versionAtLeast((await serverVersion()) ?? "0.0.0", "2.10.0") };

const REFERENCE = {
  FB001: ["The new feature is great, but I found a small bug when saving settings.", "positive", [
    "technical_issue",
    "feature_request",
  ], "Product Development Team"],
  FB002: ["I love the new design! Could you add an option for dark mode?", "positive", [
    "general_inquiry",
  ], "General Support"],
  FB003: [
    "This app is so bad, constant issues, fix it!",
    "negative",
    ["general_inquiry"],
    "General Support",
  ],
  FB004: [
    "Just a general inquiry about subscription plans.",
    "neutral",
    ["general_inquiry"],
    "General Support",
  ],
} as const;

/** The keyword analyzers and the reference ruleset: the seed decisions. */
const REFERENCE_RULES = { WEFT_ANALYZERS: "rules", WEFT_RULES: "rules/reference.json" };

function assertReference(s: FeedbackState, id: keyof typeof REFERENCE) {
  const [, sentiment, topics, team] = REFERENCE[id];
  assert.equal(s.status, "processed", id);
  assert.equal(s.sentiment?.label, sentiment, id);
  assert.deepEqual(s.topics?.topics, [...topics], id);
  assert.equal(s.routing?.team, team, id);
}

async function kvState(nc: NatsConnection, id: string): Promise<FeedbackState> {
  const kv = await new Kvm(nc).open("weft_feedback_state");
  return await waitFor(
    async () => {
      const s = (await kv.get(id))?.json<FeedbackState>();
      return s?.status === "processed" ? s : undefined;
    },
    15_000,
    `${id} processed in the state bucket`,
  );
}

const post = (url: string, body: unknown) =>
  fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });

Deno.test("deno task start runs the mesh: HTTP and NATS submissions reach the reference decisions", async (t) => {
  // The store outlives this mesh (a second start reuses it below); removed at the end.
  const storeDir = await meshTempDir("weft-mesh-");
  await using _store = removedAtEnd(storeDir);
  // Stopped by the last steps; disposed (stopped) too when a step before them fails.
  await using mesh = await startMesh(REFERENCE_RULES, { storeDir, keepStore: true });
  let nc: NatsConnection | undefined;
  try {
    nc = await connectClient(mesh.natsUrl, "e2e", mesh.credentials("ops"));

    await t.step("over HTTP, with the SSE stream read to its end", async () => {
      for (const id of ["FB001", "FB002"] as const) {
        const res = await post(`${mesh.gatewayUrl}/feedback`, { id, text: REFERENCE[id][0] });
        assert.equal(res.status, 202);
        assert.equal((await res.json()).id, id);
      }
      const events = await readSse(await fetch(`${mesh.gatewayUrl}/feedback/FB001/events`));
      assert.deepEqual(events.map((e) => e.event), [
        "feedback.ingested",
        "feedback.sentiment_analyzed",
        "feedback.topics_extracted",
        "feedback.dispatched",
        "feedback.processed",
      ]);
      const traces = new Set(events.map((e) => JSON.parse(e.data).trace_id));
      assert.equal(traces.size, 1, "one trace id across every service");
      const sources = events.map((e) => JSON.parse(e.data).source);
      assert.deepEqual(sources, [
        "weft-gateway",
        "weft-sentiment",
        "weft-topics",
        "weft-dispatch",
        "weft-dispatch",
      ]);
      for (const id of ["FB001", "FB002"] as const) {
        await kvState(nc!, id);
        const res = await fetch(`${mesh.gatewayUrl}/feedback/${id}`);
        assertReference(await res.json(), id);
      }
    });

    await t.step(
      "over NATS: nats pub feedback.submit and nats req weft.feedback.submit",
      async () => {
        nc!.publish("feedback.submit", JSON.stringify({ id: "FB003", text: REFERENCE.FB003[0] }));
        const reply = await nc!.request(
          "weft.feedback.submit",
          JSON.stringify({ id: "FB004", text: REFERENCE.FB004[0] }),
          { timeout: 5_000 },
        );
        assert.equal(reply.json<{ id: string }>().id, "FB004");
        assertReference(await kvState(nc!, "FB003"), "FB003");
        assertReference(await kvState(nc!, "FB004"), "FB004");
        const get = await nc!.request("weft.feedback.get", "FB003", { timeout: 5_000 });
        assertReference(get.json<FeedbackState>(), "FB003");
      },
    );

    await t.step("GET /openapi.json describes each shipped pipeline's routes", async () => {
      const doc = await (await fetch(`${mesh.gatewayUrl}/openapi.json`)).json();
      for (
        const path of ["/feedback", "/feedback/{id}/events", "/content", "/reviews/{id}/claim"]
      ) {
        assert.ok(doc.paths[path], path);
      }
    });

    await t.step("a crashed service is restarted and the mesh carries on", async () => {
      const started = await mesh.waitForLog(
        (l) => l.service === "weft-sentiment" && l.msg === "starting",
        1_000,
        "sentiment's start",
      );
      Deno.kill(started.pid as number, "SIGKILL");
      await mesh.waitForLog(
        (l) =>
          l.msg === "service exited; restarting" && l.service === "weft-supervisor" &&
          l.child === "sentiment",
        10_000,
        "the supervisor to notice",
      );
      const res = await post(`${mesh.gatewayUrl}/feedback`, { id: "AFTER1", text: "great" });
      assert.equal(res.status, 202);
      await res.body?.cancel();
      assert.equal((await kvState(nc!, "AFTER1")).sentiment?.label, "positive");
    });
  } finally {
    await nc?.close();
  }

  await t.step("Ctrl-C drains every service, stops nats-server and exits 0", async () => {
    const status = await mesh.stop("SIGINT");
    assert.equal(status.code, 0);
    assert.ok(mesh.logs.some((l) => l.msg === "stage stopped" && l.stage === "dispatch"));
    assert.ok(mesh.logs.some((l) => l.msg === "stopped" && l.service === "weft-supervisor"));
    await assert.rejects(Deno.connect({ hostname: "127.0.0.1", port: mesh.natsPort }));
  });

  await t.step("a second start on the same store changes nothing and loses nothing", async () => {
    // What it checks is the store: the second start runs its services in one process.
    await using again = await startMesh({ ...REFERENCE_RULES, ...ONE_PROCESS }, {
      storeDir: mesh.storeDir,
      natsPort: mesh.natsPort,
    });
    const res = await fetch(`${again.gatewayUrl}/feedback/FB001`);
    assertReference(await res.json(), "FB001");
    const events = await readSse(await fetch(`${again.gatewayUrl}/feedback/FB001/events`));
    assert.equal(events.length, 5, "no stage ran again");
  });
});

Deno.test("with NATS_URL set, deno task start uses that server, and the default analyzers route sensibly", async () => {
  await using server = await startNatsServer();
  await using mesh = await startMesh({ ...ONE_PROCESS, NATS_URL: server.url });
  assert.ok(mesh.logs.some((l) => l.msg === "using the NATS server in NATS_URL"));
  const cases = {
    R1: [
      "The app crashes with an error every time I open it. Terrible.",
      "Urgent Technical Support",
    ],
    R2: ["Please add an option to export my data as CSV.", "Product Team"],
    R3: ["Why was I charged twice on my last invoice?", "Billing"],
    R4: ["You are all worthless idiots.", "Trust and Safety"],
  } as const;
  for (const [id, [text]] of Object.entries(cases)) {
    const res = await post(`${mesh.gatewayUrl}/feedback`, { id, text });
    assert.equal(res.status, 202);
    await res.body?.cancel();
  }
  const nc = await connectClient(server.url, "e2e");
  try {
    for (const [id, [, team]] of Object.entries(cases)) {
      const s = await kvState(nc, id);
      assert.equal(
        s.routing?.team,
        team,
        `${id}: ${JSON.stringify(s.topics)} ${s.sentiment?.label}`,
      );
      assert.equal(s.sentiment?.analyzer, "embedded:sentiment");
    }
  } finally {
    await nc.close();
  }
});

/** Runs `deno task start` with a PATH holding only deno and `files`; its exit and output. */
async function startWithPath(
  files: Record<string, string> = {},
  args: string[] = [],
  env: Record<string, string> = {},
) {
  const bin = await Deno.makeTempDir({ prefix: "weft-path-" });
  await Deno.symlink(Deno.execPath(), `${bin}/deno`);
  for (const [name, text] of Object.entries(files)) {
    await Deno.writeTextFile(`${bin}/${name}`, text, { mode: 0o755 });
  }
  const out = await new Deno.Command("deno", {
    args: [...await taskArgs("start"), ...args],
    cwd: new URL("../", import.meta.url),
    env: { PATH: bin, ...env },
    stdout: "piped",
    stderr: "piped",
  }).output();
  await Deno.remove(bin, { recursive: true });
  const dec = new TextDecoder();
  return { code: out.code, text: dec.decode(out.stdout) + dec.decode(out.stderr) };
}

Deno.test("without nats-server on the PATH, deno task start says how to install it", async () => {
  const out = await startWithPath();
  const text = out.text;
  assert.equal(out.code, 1);
  assert.match(text, /nats-server was not found on the PATH/);
  assert.match(text, /apt-get install nats-server/);
});

Deno.test("with a nats-server older than the minimum on the PATH, deno task start says so and how to upgrade", async () => {
  const out = await startWithPath({ "nats-server": "#!/bin/sh\necho 'nats-server: v2.8.4'\n" });
  const text = out.text;
  assert.equal(out.code, 1);
  assert.match(text, /nats-server 2\.8\.4 is older than 2\.9\.0/);
  assert.match(text, /go install github\.com\/nats-io\/nats-server\/v2@v2\.15\.3/);
});

Deno.test("a hub or an edge site on a nats-server older than 2.10 is refused with what to install", async () => {
  // 2.9 has no subject transforms on stream sources: the sites' events would not be kept apart.
  const old = { "nats-server": "#!/bin/sh\necho 'nats-server: v2.9.10'\n" };
  for (
    const args of [["--hub", "east"], ["--leaf", "nats-leaf://127.0.0.1:7422", "--site", "east"]]
  ) {
    const out = await startWithPath(old, args);
    assert.equal(out.code, 1, out.text);
    assert.match(
      out.text,
      /nats-server 2\.9\.10 is older than 2\.10\.0, which a hub and its edge sites need/,
    );
    assert.match(out.text, /go install github\.com\/nats-io\/nats-server\/v2@v2\.15\.3/);
  }
});

Deno.test("WEFT_NATS_SYNC on a nats-server older than 2.10, or with NATS_URL, is refused with what to do", async () => {
  const out = await startWithPath(
    { "nats-server": "#!/bin/sh\necho 'nats-server: v2.9.10'\n" },
    [],
    { WEFT_NATS_SYNC: "1s" },
  );
  assert.equal(out.code, 1, out.text);
  assert.match(
    out.text,
    /nats-server 2\.9\.10 is older than 2\.10\.0, which WEFT_NATS_SYNC=1s needs/,
  );
  assert.match(out.text, /unset it to keep the server's default/);
  const remote = await startWithPath({}, [], {
    WEFT_NATS_SYNC: "1s",
    NATS_URL: "nats://127.0.0.1:1",
  });
  assert.equal(remote.code, 2, remote.text);
  assert.match(remote.text, /WEFT_NATS_SYNC configures the nats-server this start runs/);
});

Deno.test(
  "on a nats-server older than 2.10, deno task start keeps the server's fsync interval and says what it costs",
  CURRENT_SERVER,
  async () => {
    // The real server behind a nats-server that says it is 2.9.10 when asked its version.
    const real = new TextDecoder().decode(
      (await new Deno.Command("sh", { args: ["-c", "command -v nats-server"] }).output()).stdout,
    ).trim();
    const bin = await Deno.makeTempDir({ prefix: "weft-path-" });
    try {
      await Deno.writeTextFile(
        `${bin}/nats-server`,
        `#!/bin/sh\nif [ "$1" = "--version" ]; then echo 'nats-server: v2.9.10'; exit 0; fi\n` +
          `exec '${real}' "$@"\n`,
        { mode: 0o755 },
      );
      await using mesh = await startMesh({
        ...ONE_PROCESS,
        PATH: `${bin}:${Deno.env.get("PATH")}`,
      });
      const warned = await mesh.waitForLog(
        (l) => String(l.msg).includes("fsyncs its store only every 2 minutes"),
        5_000,
        "the fsync warning",
      );
      assert.equal(warned.level, "warn");
      const varz = await (await fetch(`http://127.0.0.1:${mesh.natsMonitorPort}/varz`)).json();
      assert.ok(!varz.jetstream.config.sync_always, "not synced on every write");
      assert.equal(varz.jetstream.config.sync_interval, 120e9, "the server's own 2 minutes");
    } finally {
      await Deno.remove(bin, { recursive: true });
    }
  },
);

Deno.test("WEFT_NATS_DIR outside the repository's data/ is refused with one clear line, not a permission stack", async () => {
  const outside = await Deno.makeTempDir({ prefix: "weft-outside-" });
  try {
    const out = await new Deno.Command("deno", {
      args: await taskArgs("start"),
      cwd: new URL("../", import.meta.url),
      env: { PORT: String(freePort()), WEFT_NATS_PORT: String(freePort()), WEFT_NATS_DIR: outside },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const dec = new TextDecoder();
    const text = dec.decode(out.stdout) + dec.decode(out.stderr);
    assert.equal(out.code, 1, text);
    assert.match(text, /WEFT_NATS_DIR \S+ is outside what deno task start may write/);
    assert.doesNotMatch(text, /NotCapable|Uncaught/);
  } finally {
    await Deno.remove(outside, { recursive: true });
  }
});

Deno.test("a WEFT_NATS_CONF that sets its own sync_interval keeps it", CURRENT_SERVER, async () => {
  const dir = await meshTempDir("weft-conf-");
  try {
    const conf = `${dir}/own.conf`;
    await Deno.writeTextFile(
      conf,
      `max_payload: 1MB\njetstream {\n  store_dir: "./data/jetstream"\n  sync_interval: 10s\n}\n`,
    );
    await using mesh = await startMesh({ ...ONE_PROCESS, WEFT_NATS_CONF: conf });
    await mesh.waitForLog(
      (l) => l.msg === "nats-server keeps the sync_interval of its configuration",
      5_000,
      "the conf's own interval kept",
    );
    const varz = await (await fetch(`http://127.0.0.1:${mesh.natsMonitorPort}/varz`)).json();
    assert.equal(varz.jetstream.config.sync_interval, 10e9);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("with WEFT_EVENTS_PORT a second gateway process serves event streams on its own port", async () => {
  const eventsPort = freePort();
  await using mesh = await startMesh({ ...ONE_PROCESS, WEFT_EVENTS_PORT: String(eventsPort) });
  const ready = await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
  const events = `http://127.0.0.1:${eventsPort}`;
  assert.equal(ready.events, events);
  // The dashboard (an event stream's client) is named on the events gateway, and served there.
  assert.equal(ready.dashboard, `${events}/dashboard`);
  const page = await fetch(String(ready.dashboard));
  assert.equal(page.status, 200);
  await page.body?.cancel();
  // Its own process, even with every other service in one.
  const started = await mesh.waitForLog((l) => l.msg === "starting services", 1_000, "start");
  assert.equal((started.processes as string[]).filter((p) => p === "gateway").length, 1);
  const gateways = new Set(
    mesh.logs.filter((l) => l.msg === "starting" && l.service === "weft-gateway").map((l) => l.pid),
  );
  assert.equal(gateways.size, 2, "two gateway processes");

  const res = await post(`${mesh.gatewayUrl}/feedback`, { text: "Export keeps failing, annoying" });
  assert.equal(res.status, 202);
  const { id } = await res.json();
  // The item's stream, read to its end from the events gateway: every event, in order.
  const frames = await readSse(await fetch(`${events}/feedback/${id}/events`));
  assert.deepEqual(frames.map((e) => e.event), [
    "feedback.ingested",
    "feedback.sentiment_analyzed",
    "feedback.topics_extracted",
    "feedback.dispatched",
    "feedback.processed",
  ]);
});

Deno.test("with WEFT_EVENTS_PORT each gateway's /metrics and dashboard count the items both gateways accepted", async () => {
  const eventsPort = freePort();
  await using mesh = await startMesh({ ...ONE_PROCESS, WEFT_EVENTS_PORT: String(eventsPort) });
  await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
  const events = `http://127.0.0.1:${eventsPort}`;
  // Both gateways take items: three on PORT, two on the events port (the same routes).
  for (const [url, n] of [[mesh.gatewayUrl, 3], [events, 2]] as const) {
    for (let i = 0; i < n; i++) {
      const res = await post(`${url}/feedback`, { text: `Counted once ${url} ${i}` });
      assert.equal(res.status, 202, await res.clone().text());
      await res.body?.cancel();
    }
  }
  const accepted = async (url: string) => {
    const text = await (await fetch(`${url}/metrics`)).text();
    const line = /^weft_items_accepted_total\{pipeline="feedback"\} (\d+)$/m.exec(text);
    return line ? Number(line[1]) : 0;
  };
  for (const url of [mesh.gatewayUrl, events]) {
    await waitFor(
      async () => (await accepted(url)) === 5,
      20_000,
      `${url}/metrics counting the 5 items (last read ${await accepted(url)})`,
    );
  }
  // The dashboard (named on the events port) counts them at its intake box: its ingest stage.
  const ingest = async () => {
    const frames = await readSse(await fetch(`${events}/dashboard/stream`), {
      stopAfter: (e) => e.event === "metrics",
      timeoutMs: 10_000,
    });
    const snapshot = JSON.parse(frames.find((e) => e.event === "metrics")!.data);
    return snapshot.stages.ingest.processed as number;
  };
  await waitFor(async () => (await ingest()) === 5, 20_000, "the dashboard's intake at 5");
});

Deno.test("a gateway process killed starts its own counts again from 0; the other gateway keeps counting what it accepted", async () => {
  const eventsPort = freePort();
  await using mesh = await startMesh({ ...ONE_PROCESS, WEFT_EVENTS_PORT: String(eventsPort) });
  await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
  const events = `http://127.0.0.1:${eventsPort}`;
  for (const [url, n] of [[mesh.gatewayUrl, 3], [events, 2]] as const) {
    for (let i = 0; i < n; i++) {
      const res = await post(`${url}/feedback`, { text: `Counted before a kill ${url} ${i}` });
      assert.equal(res.status, 202, await res.clone().text());
      await res.body?.cancel();
    }
  }
  const accepted = async (url: string) => {
    const res = await fetch(`${url}/metrics`).catch(() => undefined);
    if (!res) return -1;
    const text = await res.text();
    const line = /^weft_items_accepted_total\{pipeline="feedback"\} (\d+)$/m.exec(text);
    return line ? Number(line[1]) : 0;
  };
  await waitFor(async () => (await accepted(events)) === 5, 20_000, "the events gateway at 5");
  // The process of PORT's gateway: the supervisor's child allowed to listen on PORT (alone, or
  // with every other service but the events gateway).
  const port = new URL(mesh.gatewayUrl).port;
  const ps = await new Deno.Command("ps", {
    args: ["-o", "pid=,args=", "--ppid", String(mesh.child.pid)],
  }).output();
  const pid = Number(
    new TextDecoder().decode(ps.stdout).split("\n")
      .find((l) => new RegExp(`--allow-net=\\S*127\\.0\\.0\\.1:${port}(?!\\d)`).test(l))
      ?.trim().split(/\s+/, 1)[0],
  );
  assert.ok(pid > 0, new TextDecoder().decode(ps.stdout));
  Deno.kill(pid, "SIGKILL");
  await mesh.waitForLog(
    (l) => l.msg === "service exited; restarting" && l.signal === "SIGKILL",
    30_000,
    "the supervisor restarting it",
  );
  // PORT's gateway counts from 0 again (plus the events gateway's 2): a counter reset, as any
  // Prometheus target's own series have when its process restarts.
  await waitFor(async () => (await accepted(mesh.gatewayUrl)) === 2, 60_000, "PORT at 2 again");
  // The events gateway keeps the dead one's last answer (3) with its own (2), past the 15 s an
  // answer is kept before it is retired into the total.
  const until = Date.now() + 17_000;
  while (Date.now() < until) {
    assert.equal(await accepted(events), 5, "the events gateway's count never falls");
    await new Promise((r) => setTimeout(r, 1_000));
  }
});

Deno.test("with the gateway's port taken, deno task start says which port and what to do, and starts nothing", async () => {
  const held = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (held.addr as Deno.NetAddr).port;
  const natsPort = freePort();
  try {
    const out = await new Deno.Command("deno", {
      args: await taskArgs("start"),
      cwd: new URL("../", import.meta.url),
      env: { PORT: String(port), WEFT_NATS_PORT: String(natsPort) },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const dec = new TextDecoder();
    const text = dec.decode(out.stdout) + dec.decode(out.stderr);
    assert.equal(out.code, 1);
    assert.match(text, new RegExp(`port ${port} \\(the gateway's, PORT\\) is taken`));
    assert.equal(text.trim().split("\n").length, 1, "one line, no stack trace");
    assert.ok(portFree(natsPort), "no nats-server was started");
  } finally {
    held.close();
  }
});

Deno.test(
  "deno task start says it is ready once, after every service answers and the gateway listens; WEFT_NATS_SYNC sets the server's fsync",
  CURRENT_SERVER,
  async () => {
    await using mesh = await startMesh({ WEFT_NATS_SYNC: "always" });
    const ready = await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
    assert.equal(
      ready.services,
      12,
      "every service but the live shadows' host, which waits for one",
    );
    assert.equal(ready.nats_sync, "always");
    const varz = await (await fetch(`http://127.0.0.1:${mesh.natsMonitorPort}/varz`)).json();
    assert.equal(varz.jetstream.config.sync_always, true, "every write synced before its ack");
    const at = (pred: (l: Record<string, unknown>) => boolean) => mesh.logs.findIndex(pred);
    assert.ok(at((l) => l.msg === "gateway listening") < at((l) => l.msg === "weft is ready"));
    assert.equal(mesh.logs.filter((l) => l.msg === "weft is ready").length, 1);
    // The printed command works as given: the ops key reads replies on its own inbox only.
    assert.match(
      String(ready.nats_cli),
      /nats context save weft .*--nkey .*ops\.nk --inbox-prefix _INBOX_ops --select$/,
    );
    // The configuration is a debug detail, not a wall of JSON on the first screen.
    assert.ok(!mesh.logs.some((l) => "config" in l), "no configuration printed at info");
  },
);

Deno.test("when the streams' limits pass the server's store, deno task start says which setting to change, at once", async () => {
  const storeDir = await meshTempDir("weft-mesh-");
  const natsPort = freePort();
  try {
    const started = Date.now();
    const out = await new Deno.Command("deno", {
      args: await taskArgs("start"),
      cwd: new URL("../", import.meta.url),
      env: {
        PORT: String(freePort()),
        WEFT_NATS_PORT: String(natsPort),
        WEFT_NATS_MONITOR_PORT: String(freePort()),
        WEFT_NATS_DIR: storeDir,
        // More than nats.conf's max_file_store (8GB) for one stream: what six definitions'
        // streams of 1 GiB each and the shipped ones' reserve together.
        WEFT_STREAM_MAX_BYTES: String(9 * 1024 ** 3),
      },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 1);
    // Naming the stream it could not make (README), not only the server's reason.
    assert.match(text, /stream [A-Z0-9_]+ could not be made: insufficient storage resources/);
    assert.match(
      text,
      /lower WEFT_STREAM_MAX_BYTES (\(or WEFT_OBJECT_STORE_MAX_BYTES.*\) )?or raise max_file_store/,
    );
    // Not retried as if JetStream were still starting (that takes the whole start timeout).
    assert.ok(Date.now() - started < 25_000, `${Date.now() - started} ms`);
    assert.ok(portFree(natsPort), "nats-server stopped with it");
  } finally {
    await Deno.remove(storeDir, { recursive: true }).catch(() => {});
  }
});

Deno.test("with nats-server's monitoring port taken, deno task start says which port, not an empty failure", async () => {
  const held = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (held.addr as Deno.NetAddr).port;
  try {
    const out = await new Deno.Command("deno", {
      args: await taskArgs("start"),
      cwd: new URL("../", import.meta.url),
      env: {
        PORT: String(freePort()),
        WEFT_NATS_PORT: String(freePort()),
        WEFT_NATS_MONITOR_PORT: String(port),
      },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 1);
    assert.match(text, new RegExp(`port ${port} \\(nats-server monitoring\\) is taken`));
  } finally {
    held.close();
  }
});
