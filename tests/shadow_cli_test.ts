/**
 * `deno task shadow`'s command line: `--help`, and what it refuses (an unknown flag or
 * command runs nothing; each such run points at a port no server listens on, so one that
 * went on to replay anyway fails to connect instead of reading another test's server); and
 * the feedback replay on a real nats-server whose FEEDBACK stream holds a made history: an
 * LLM candidate's failures are its own, never the embedded analyzers' decisions; and, on a
 * mesh, `report` of an id no shadow has, refused in one line.
 */
import assert from "node:assert/strict";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import {
  meshTempDir,
  ONE_PROCESS,
  quiet,
  removedAtEnd,
  startMesh,
  taskArgs,
} from "./helpers/mesh.ts";
import { connectClient, startTestNats } from "./helpers/nats.ts";
import { chat, startFakeOpenAI } from "./helpers/openai_server.ts";
import { sampled } from "../src/shadow/spec.ts";

/** A loopback port nothing listens on (taken, then let go). */
function closedPort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

async function shadow(
  args: string[],
  env: Record<string, string> = { NATS_URL: `nats://127.0.0.1:${closedPort()}` },
): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command("deno", {
    // --quiet: on a cold Deno cache, Deno's own "Download ..." lines go to stderr; the
    // program's stderr is what is checked.
    args: [...quiet(await taskArgs("shadow")), ...args],
    cwd: new URL("../", import.meta.url),
    env,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = (b: Uint8Array) => new TextDecoder().decode(b);
  return { code: out.code, stdout: text(out.stdout), stderr: text(out.stderr) };
}

Deno.test("deno task shadow --help prints the commands and flags and exits 0", async () => {
  for (const args of [["--help"], ["-h"], ["help"], ["attach", "--help"]]) {
    const r = await shadow(args);
    assert.equal(r.code, 0, `${args.join(" ")}: ${r.stderr}${r.stdout}`);
    for (const word of ["attach", "list", "promote", "detach", "reset", "report"]) {
      assert.match(r.stdout, new RegExp(`deno task shadow ${word}`), args.join(" "));
    }
    for (const flag of ["--analyzers", "--count", "--since", "--definition", "--out"]) {
      assert.ok(r.stdout.includes(flag), `${args.join(" ")}: ${flag}`);
    }
    assert.equal(r.stderr, "");
  }
});

Deno.test("deno task shadow refuses an unknown flag or command in one line, exit 2, naming it", async () => {
  const cases: [string[], RegExp][] = [
    [["--bogus"], /unknown flag: --bogus;/],
    [
      ["--analyzer", "llm", "--count", "20"],
      /unknown flag: --analyzer \(did you mean --analyzers\?\)/,
    ],
    [["--cout", "3"], /unknown flag: --cout \(did you mean --count\?\)/],
    [["frobnicate"], /unknown command: frobnicate/],
    [["--count", "3", "extra"], /unexpected argument: extra/],
    [["report", "calm", "--outt", "x"], /unknown flag: --outt \(did you mean --out\?\)/],
    [
      ["attach", "--id", "a", "--stpe", "sentiment"],
      /unknown flag: --stpe \(did you mean --step\?\)/,
    ],
  ];
  for (const [args, message] of cases) {
    const r = await shadow(args);
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}${r.stdout}`);
    assert.equal(r.stdout, "", args.join(" "));
    const lines = r.stderr.trimEnd().split("\n");
    assert.equal(lines.length, 1, r.stderr);
    assert.match(lines[0]!, /^shadow: /);
    assert.match(lines[0]!, message);
    assert.match(lines[0]!, /deno task shadow --help/);
  }
});

Deno.test("deno task shadow refuses, before any replay runs, a flag without its value, a definition's flag on the feedback replay and an --out it may not write", async () => {
  const cases: [string[], RegExp][] = [
    [["--count"], /--count needs a value/],
    [["--sample"], /--sample needs a value/],
    [["--out"], /--out needs a value/],
    [["--labels"], /--labels needs a value/],
    [["--step", "nope"], /--step and --definition replay a step of a definition's pipeline/],
    [["--pipeline", "feedback", "--step", "topics"], /add --pipeline NAME/],
    [["--definition", "nothing.ts"], /--step and --definition/],
    [
      ["--out", "/tmp/weft-shadow-report"],
      /--out \/tmp\/weft-shadow-report: this task may write only under data\//,
    ],
    [["report", "calm", "--examples", "abc"], /--examples must be a whole number/],
    [["report", "calm", "--out", "/tmp/x"], /may write only under data\//],
  ];
  for (const [args, message] of cases) {
    const r = await shadow(args);
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}${r.stdout}`);
    assert.equal(r.stdout, "", args.join(" "));
    assert.match(r.stderr, message, args.join(" "));
  }
});

/** Production's history: `feedback.dispatched` events, as the dispatch stage publishes them. */
async function dispatched(
  nc: Parameters<typeof jetstream>[0],
  texts: readonly string[],
): Promise<void> {
  const js = jetstream(nc);
  for (const [i, text] of texts.entries()) {
    await js.publish(
      `feedback.dispatched.R${i}`,
      JSON.stringify({
        id: `e${i}`,
        type: "feedback.dispatched",
        item_id: `R${i}`,
        time: new Date().toISOString(),
        data: {
          text,
          sentiment: { label: "neutral", score: 0 },
          topics: { topics: ["general"] },
          routing: { team: "Support" },
        },
      }),
    );
  }
}

const TEXTS = [
  "the app is broken again",
  "charged twice this month",
  "love the new design",
  "broken login page",
  "please add dark mode",
  "refund took a week",
];

Deno.test("a replay's LLM candidate never falls back: the items it fails on are counted, and all failing stops it in one line", async () => {
  await using t = await startTestNats();
  await dispatched(t.nc, TEXTS);
  // The endpoint refuses the items about something broken (a 400 is not retried).
  const llm = startFakeOpenAI((req) => {
    const text = req.body.messages.at(-1)!.content;
    if (/broken/.test(text)) return { kind: "error", status: 400, message: "refused" };
    if (/sentiment/i.test(req.body.messages[0]!.content)) {
      return chat({ label: "negative", score: -0.5 });
    }
    return chat({ topics: ["billing"], evidence: { billing: ["charged"] } });
  });
  try {
    const env = {
      NATS_URL: t.server.url,
      WEFT_ANALYZERS: "llm",
      WEFT_LLM_BASE_URL: llm.baseUrl,
      WEFT_LLM_API_KEY: "test-key",
      WEFT_LLM_MODEL: "m",
    };
    // Under data/, where `deno task shadow` may write.
    const dir = await meshTempDir("weft-shadow-cli-");
    await using _dir = removedAtEnd(dir);
    const out = `${dir}/report`;
    {
      const r = await shadow(["--out", out], env);
      assert.equal(r.code, 0, r.stderr + r.stdout);
      assert.match(r.stdout, /on 4 items/);
      assert.match(r.stdout, /candidate failed on 2 of 6 items, not compared; first: http_error/);
      const report = JSON.parse(await Deno.readTextFile(`${out}.json`));
      assert.equal(report.items, 4);
      assert.equal(report.failed, 2);
      assert.equal(report.overBudget, 0);
      // Every compared decision is the LLM's: negative, where production said neutral.
      assert.equal(report.fields.sentiment.agreement, 0);
    }

    // No endpoint at all: every item fails, and the replay says so instead of a report.
    const down = await shadow(["--count", "2"], {
      ...env,
      WEFT_LLM_BASE_URL: `http://127.0.0.1:${closedPort()}/v1`,
      WEFT_LLM_TIMEOUT_MS: "2000",
    });
    assert.equal(down.code, 1, down.stderr + down.stdout);
    assert.equal(down.stdout, "");
    const lines = down.stderr.trimEnd().split("\n");
    assert.equal(lines.length, 1, down.stderr);
    assert.match(lines[0]!, /^shadow: the candidate failed on every one of the 2 items \(first: /);
  } finally {
    await llm.close();
  }
});

Deno.test("a feedback replay leaves no consumer on FEEDBACK, whether it reads everything, stops at --count or finds nothing", async () => {
  await using t = await startTestNats();
  await dispatched(t.nc, TEXTS);
  const env = { NATS_URL: t.server.url, WEFT_ANALYZERS: "embedded" };
  for (
    const args of [[], ["--count", "2"], [
      "--since",
      new Date(Date.now() + 3_600_000).toISOString(),
    ]]
  ) {
    const r = await shadow(args, env);
    const empty = args[0] === "--since";
    assert.equal(r.code, empty ? 1 : 0, r.stderr + r.stdout);
    if (empty) {
      // Nothing in range is said so, not reported as 0% agreement.
      assert.match(r.stderr, /no feedback items in the range given/);
      assert.equal(r.stdout, "");
    }
    // The replay has exited: what it created and did not delete is still listed.
    const left = await Array.fromAsync(await t.jsm.consumers.list("FEEDBACK"));
    assert.deepEqual(left.map((c) => c.name), [], `after: deno task shadow ${args.join(" ")}`);
  }
});

Deno.test("a feedback replay passes over what is no decision on feedback.dispatched.*, and samples the same items each time", async () => {
  await using t = await startTestNats();
  await dispatched(t.nc, TEXTS);
  const js = jetstream(t.nc);
  await js.publish("feedback.dispatched.JUNK1", "{not json");
  await js.publish("feedback.dispatched.JUNK2", JSON.stringify({ item_id: "JUNK2", data: {} }));
  const env = { NATS_URL: t.server.url, WEFT_ANALYZERS: "embedded" };
  const all = await shadow([], env);
  assert.equal(all.code, 0, all.stderr + all.stdout);
  assert.match(all.stdout, / on 6 items/);
  const once = await shadow(["--sample", "0.5"], env);
  const again = await shadow(["--sample", "0.5"], env);
  assert.equal(once.code, 0, once.stderr + once.stdout);
  const itemsOf = (out: string) => / on (\d+) items/.exec(out)?.[1];
  assert.equal(itemsOf(once.stdout), itemsOf(again.stdout), "the same sample both times");
  const expected = TEXTS.filter((_, i) => sampled(`R${i}`, 0.5)).length;
  assert.equal(itemsOf(once.stdout), String(expected), "the items whose ids are sampled");
});

Deno.test("deno task shadow report of an id no shadow has says so in one line, exit 2; an attached shadow that decided nothing yet is reported", async () => {
  await using mesh = await startMesh(ONE_PROCESS);
  await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
  const env = { NATS_URL: mesh.natsUrl, WEFT_NATS_NKEY: mesh.credentials("ops").nkeySeedFile! };
  for (const id of ["nosuch", "Not a shadow id"]) {
    const r = await shadow(["report", id], env);
    assert.equal(r.code, 2, r.stderr + r.stdout);
    assert.equal(r.stdout, "", "no empty report");
    const lines = r.stderr.trimEnd().split("\n");
    assert.equal(lines.length, 1, r.stderr);
    assert.equal(
      lines[0],
      `shadow: no shadow ${JSON.stringify(id)}: nothing attached under that id, and no ` +
        "decision recorded under it (deno task shadow list names the attached ones)",
    );
  }
  // One attached (its bucket entry, as an attach writes it) that has decided nothing yet: its
  // empty report, and why it has nothing (it does not run yet, or cannot).
  const admin = await connectClient(mesh.natsUrl, "test-admin", mesh.credentials("admin"));
  try {
    await (await new Kvm(admin).open("weft_shadows")).create(
      "quiet",
      JSON.stringify({
        id: "quiet",
        step: "topics",
        candidate: { analyzers: "rules", rules: "rules/missing.json" },
        attached_by: "lead",
      }),
    );
  } finally {
    await admin.close();
  }
  const quiet = await shadow(["report", "quiet"], env);
  assert.equal(quiet.code, 1, quiet.stderr + quiet.stdout);
  assert.match(quiet.stdout, /live shadow quiet/);
  assert.match(quiet.stderr, /^shadow quiet: (not running|no shadow service answered)/m);
  assert.doesNotMatch(quiet.stderr, /no shadow "quiet"/);
});

Deno.test("deno task shadow report of a running shadow whose candidate failed on every item says so on stderr, naming its candidate and step", async () => {
  // The model answers no sentiment at all: every decision fails after its repair.
  const llm = startFakeOpenAI(() => chat({ nope: 1 }));
  try {
    await using mesh = await startMesh({
      ...ONE_PROCESS,
      WEFT_LLM_BASE_URL: llm.baseUrl,
      WEFT_LLM_MODEL: "m",
      WEFT_LLM_API_KEY: "test-key",
      WEFT_SHADOW: JSON.stringify({
        id: "broken",
        step: "sentiment",
        candidate: { analyzers: "llm" },
      }),
    });
    await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
    await mesh.waitForLog(
      (l) => l.msg === "shadow started" && l.shadow === "broken",
      30_000,
      "the shadow to start",
    );
    const posted = await fetch(`${mesh.gatewayUrl}/feedback`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ text: "The export crashes every time" }),
    });
    assert.equal(posted.status, 202, await posted.text());
    await mesh.waitForLog(
      (l) => l.msg === "shadow decision failed" && l.shadow === "broken",
      60_000,
      "the candidate to fail on the item",
    );
    const env = { NATS_URL: mesh.natsUrl, WEFT_NATS_NKEY: mesh.credentials("ops").nkeySeedFile! };
    const r = await shadow(["report", "broken"], env);
    assert.equal(r.code, 1, r.stderr + r.stdout);
    // Its empty report names what it runs, as one with decisions does.
    assert.match(r.stdout, /^== live shadow broken: llm:m\S* on feedback\.sentiment, 0 items/m);
    assert.match(
      r.stderr,
      /^shadow broken: running, but its candidate decided none of the 1 items it took \(1 failed, 0 over its budget\)/m,
    );
  } finally {
    await llm.close();
  }
});

Deno.test("deno task shadow's live commands against a mesh with API keys say where the key goes when none, or no known one, is given", async () => {
  const key = "shadow-cli-admin-key";
  const hex = (b: ArrayBuffer) =>
    [...new Uint8Array(b)].map((x) => x.toString(16).padStart(2, "0")).join("");
  const sha256 = hex(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(key)));
  await using mesh = await startMesh({
    ...ONE_PROCESS,
    WEFT_API_KEYS: JSON.stringify([{ sha256, role: "admin", name: "lead" }]),
  });
  await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
  const env = { NATS_URL: mesh.natsUrl, WEFT_NATS_NKEY: mesh.credentials("ops").nkeySeedFile! };
  const none = await shadow(["list"], env);
  assert.equal(none.code, 1, none.stderr + none.stdout);
  assert.match(none.stderr, /"status": 401/);
  assert.match(
    none.stderr,
    /^shadow: the mesh has API keys \(WEFT_API_KEYS\): give an admin key in WEFT_API_KEY or --key KEY$/m,
  );
  const wrong = await shadow(["list", "--key", "not-a-key"], env);
  assert.equal(wrong.code, 1, wrong.stderr + wrong.stdout);
  assert.match(
    wrong.stderr,
    /^shadow: the key in --key or WEFT_API_KEY is none of the mesh's API keys/m,
  );
  const right = await shadow(["list"], { ...env, WEFT_API_KEY: key });
  assert.equal(right.code, 0, right.stderr + right.stdout);
  assert.doesNotMatch(right.stderr, /API keys/);
  assert.deepEqual(JSON.parse(right.stdout).shadows, []);
});
