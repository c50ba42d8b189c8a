/**
 * A step follows its `weft_step_versions` entry through entries that are no promotion: a
 * malformed one is logged and skipped (the step keeps what it runs) and later promotions and
 * resets still apply; the shadow control lists such an entry, marked, and resets it. On a
 * real nats-server.
 */
import assert from "node:assert/strict";
import { Kvm } from "@nats-io/kv";
import { followVersion } from "../src/step_versions.ts";
import { createShadowControl } from "../src/shadow/control.ts";
import { STEP_VERSION_BUCKET } from "../src/subjects.ts";
import { createLogger } from "../src/observability/log.ts";
import { startTestNats } from "./helpers/nats.ts";
import { waitFor } from "./helpers/wait.ts";

const version = (rules: string) =>
  JSON.stringify({
    pipeline: "feedback",
    step: "sentiment",
    candidate: { analyzers: "rules", rules },
    promoted_from: "s",
    promoted_at: new Date().toISOString(),
    promoted_by: "test",
  });

Deno.test("a malformed step version is skipped: the step keeps what it runs and later entries apply", async () => {
  await using t = await startTestNats();
  const lines: Record<string, unknown>[] = [];
  const log = createLogger("test", "debug", (l) => lines.push(JSON.parse(l)));
  const kv = await new Kvm(t.nc).open(STEP_VERSION_BUCKET);
  const key = "feedback.sentiment";
  // Bad from the start too: the step starts on its configured version and watches.
  await kv.put(key, "{not json");
  const live = await followVersion(
    { nc: t.nc, log },
    "feedback",
    "sentiment",
    "configured",
    (v) => Promise.resolve(v.candidate.rules!),
  );
  assert.equal(live.current(), "configured");
  await kv.put(key, version("b.json"));
  await waitFor(() => live.current() === "b.json", 10_000, "b applied");
  const invalid = () =>
    lines.filter((l) => l.msg === "invalid step version ignored; keeping the current one").length;
  const before = invalid();
  for (const bad of ["{not json", "[1,2]", JSON.stringify({ pipeline: "feedback" })]) {
    const n = invalid();
    await kv.put(key, bad);
    await waitFor(() => invalid() > n, 10_000, `${bad} logged`);
    assert.equal(live.current(), "b.json", `${bad}: keeps what it runs`);
  }
  assert.equal(invalid(), before + 3);
  await kv.put(key, version("c.json"));
  await waitFor(() => live.current() === "c.json", 10_000, "c applied after the bad entries");
  await kv.delete(key);
  await waitFor(() => live.current() === "configured", 10_000, "the reset applied");
  assert.ok(!lines.some((l) => l.msg === "step version watch ended"));
});

Deno.test("the shadow control lists a malformed step version marked, and resets it", async () => {
  await using t = await startTestNats();
  const kv = await new Kvm(t.nc).open(STEP_VERSION_BUCKET);
  await kv.put("feedback.sentiment", "{not json");
  await kv.put("feedback.topics", version("t.json"));
  const control = createShadowControl(t.nc);
  const { versions } = await control.list();
  assert.equal(versions.length, 2);
  const bad = versions.find((v) => "key" in v && v.key === "feedback.sentiment");
  assert.ok(bad && "invalid" in bad && /not JSON/.test(bad.invalid), JSON.stringify(versions));
  assert.ok(versions.some((v) => "candidate" in v && v.candidate.rules === "t.json"));
  // Exactly `<pipeline>.<step>`: more parts are refused naming the field, nothing reset.
  await kv.put("feedback.topics", version("t2.json"));
  for (const bad of ["feedback.topics.extra.more", "feedback.topics.", "feedback"]) {
    await assert.rejects(control.reset(bad, "test"), (err: { code?: string; field?: string }) => {
      assert.equal(err.code, "invalid_field", bad);
      assert.equal(err.field, "/step", bad);
      return true;
    });
  }
  assert.equal((await kv.get("feedback.topics"))?.operation, "PUT");
  assert.deepEqual(await control.reset("feedback.sentiment", "test"), {
    reset: "feedback.sentiment",
  });
  assert.equal((await kv.get("feedback.sentiment"))?.operation, "DEL");
  // An invalid entry under a key that names no step is listed, and reset, all the same.
  await kv.put("zzz", "[]");
  const listed = (await control.list()).versions;
  assert.ok(listed.some((v) => "key" in v && v.key === "zzz" && "invalid" in v));
  assert.deepEqual(await control.reset("zzz", "test"), { reset: "zzz" });
  assert.equal((await kv.get("zzz"))?.operation, "DEL");
  await kv.put("zz.yy", "[]"); // two parts, but no step's
  assert.deepEqual(await control.reset("zz.yy", "test"), { reset: "zz.yy" });
  // A valid entry is never removed that way: its key must name a step.
  await kv.put("a.b.c", version("x.json"));
  await assert.rejects(control.reset("a.b.c", "test"), /step must be <pipeline>\.<step>/);
});
