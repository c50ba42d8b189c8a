import assert from "node:assert/strict";
import { authorizationBlock, ensureIdentities, inboxPrefix, permissionsFor } from "./identities.ts";
import { meshPermissions, SERVICES } from "./supervisor.ts";
import { subjectMatches } from "./subjects.ts";
import { definePipeline } from "./pipeline/definition.ts";
import { compileFlow } from "./pipeline/flow.ts";
import { pipelineServiceSpecs } from "./pipeline/runtime.ts";

const DURABLES = SERVICES.flatMap((s) => s.access.consumes ?? []);

/** Whether nats-server would allow publishing on `subject` under these permissions. */
function mayPublish(p: ReturnType<typeof permissionsFor>, subject: string): boolean {
  const allowed = p.publish.allow.some((f) => subjectMatches(f, subject));
  const denied = (p.publish.deny ?? []).some((f) => subjectMatches(f, subject));
  return allowed && !denied;
}

const perms = new Map(meshPermissions().map((m) => [m.name, m.permissions]));
const of = (name: string) => perms.get(name)!;

Deno.test("a step may publish its own outputs, its failure event and its dead letters, nothing else", () => {
  const topics = of("topics");
  assert.ok(mayPublish(topics, "feedback.topics_extracted.fb1"));
  assert.ok(mayPublish(topics, "feedback.failed.fb1"));
  assert.ok(mayPublish(topics, "deadletter.topics.fb1"));
  for (
    const s of [
      "feedback.processed.fb1",
      "feedback.ingested.fb1",
      "deadletter.sentiment.fb1",
      "$KV.weft_feedback_state.fb1",
      "content.published.c1",
    ]
  ) assert.ok(!mayPublish(topics, s), s);
});

Deno.test("a stage that fails no item (the feedback digest) may not publish a failure event", () => {
  const digest = of("digest");
  assert.ok(mayPublish(digest, "digest.feedback_counts.fd_1"));
  assert.ok(mayPublish(digest, "deadletter.feedback-digest.feedback"));
  // With it, a letter of its own made any feedback item fail (src/failure_letter.ts).
  assert.ok(!mayPublish(digest, "feedback.failed.fb1"));
});

Deno.test("a step pulls and acks on its own durable only, and touches no stream's configuration", () => {
  const topics = of("topics");
  assert.ok(mayPublish(topics, "$JS.API.CONSUMER.MSG.NEXT.FEEDBACK.topics"));
  assert.ok(mayPublish(topics, "$JS.ACK.FEEDBACK.topics.1.5.5.1700000000.0"));
  assert.ok(!mayPublish(topics, "$JS.API.CONSUMER.MSG.NEXT.FEEDBACK.sentiment"));
  assert.ok(!mayPublish(topics, "$JS.ACK.FEEDBACK.sentiment.1.5.5.1700000000.0"));
  for (const op of ["CREATE", "UPDATE", "DELETE", "PURGE"]) {
    for (const name of SERVICES.map((s) => s.name)) {
      assert.ok(!mayPublish(of(name), `$JS.API.STREAM.${op}.FEEDBACK`), `${name} ${op}`);
    }
  }
});

Deno.test("reading a stream never reaches another service's durable consumer", () => {
  const gateway = of("gateway");
  assert.ok(mayPublish(gateway, "$JS.API.CONSUMER.CREATE.FEEDBACK.ordered_x.feedback.>"));
  assert.ok(
    mayPublish(gateway, "$JS.API.DIRECT.GET.KV_weft_feedback_state.$KV.weft_feedback_state.a"),
  );
  for (const { stream, durable } of DURABLES.filter((d) => d.stream === "FEEDBACK")) {
    assert.ok(!mayPublish(gateway, `$JS.API.CONSUMER.MSG.NEXT.${stream}.${durable}`), durable);
    assert.ok(!mayPublish(gateway, `$JS.API.CONSUMER.DELETE.${stream}.${durable}`), durable);
    assert.ok(!mayPublish(gateway, `$JS.API.CONSUMER.CREATE.${stream}.${durable}.x`), durable);
  }
});

Deno.test("ops reads and submits but writes no bucket; admin may do anything", () => {
  const ops = of("ops");
  assert.ok(mayPublish(ops, "feedback.submit"));
  assert.ok(mayPublish(ops, "weft.feedback.get"));
  assert.ok(mayPublish(ops, "$JS.API.DIRECT.GET.KV_weft_reviews"));
  assert.ok(!mayPublish(ops, "$KV.weft_reviews.c1"));
  assert.ok(!mayPublish(ops, "feedback.processed.fb1"));
  assert.ok(mayPublish(of("admin"), "$JS.API.STREAM.DELETE.FEEDBACK"));
});

Deno.test("replies reach only their identity: each subscribes to its own inbox prefix", () => {
  assert.equal(inboxPrefix("content-state"), "_INBOX_content-state");
  assert.ok(of("topics").subscribe.allow.includes("_INBOX_topics.>"));
  assert.ok(!of("topics").subscribe.allow.some((s) => subjectMatches(s, "_INBOX_gateway.x")));
});

Deno.test("keys are made once and kept; the authorization block names public keys only", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const first = await ensureIdentities(`${dir}/ids`, ["a", "b"]);
    const again = await ensureIdentities(`${dir}/ids`, ["a", "b"]);
    assert.deepEqual(again, first, "a restart changes no key");
    assert.equal((await Deno.stat(first[0]!.seedFile)).mode! & 0o777, 0o600);
    const block = authorizationBlock(
      first.map((identity) => ({ identity, permissions: permissionsFor(identity.name, {}, []) })),
    );
    assert.ok(block.includes(first[0]!.publicKey));
    assert.doesNotMatch(block, /"SU/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the shadow service publishes only shadow decisions and works only consumers no service owns", () => {
  const shadow = of("shadow");
  assert.ok(mayPublish(shadow, "shadow.feedback.sentiment.fb1"));
  for (
    const s of [
      "feedback.sentiment_analyzed.fb1",
      "feedback.failed.fb1",
      "deadletter.shadow.fb1",
      "shadow._audit.promoted.feedback.sentiment",
      // Four tokens match shadow.*.*.*: refused all the same, as an audit event's prefix.
      "shadow._audit.x.y",
      "$KV.weft_shadows.x",
      "$KV.weft_step_versions.feedback.sentiment",
    ]
  ) assert.ok(!mayPublish(shadow, s), s);
  // Its own consumers, named at attach time.
  for (
    const s of [
      "$JS.API.CONSUMER.CREATE.FEEDBACK.shadow_r1",
      "$JS.API.CONSUMER.CREATE.FEEDBACK.shadow_r1.feedback.ingested.*",
      "$JS.API.CONSUMER.MSG.NEXT.FEEDBACK.shadow_r1",
      "$JS.API.CONSUMER.DELETE.FEEDBACK.shadow_r1",
      "$JS.ACK.FEEDBACK.shadow_r1.1.5.5.1700000000.0",
    ]
  ) assert.ok(mayPublish(shadow, s), s);
  // Never a step's.
  for (const durable of ["sentiment", "topics", "dispatch", "ingest", "state"]) {
    for (
      const s of [
        `$JS.API.CONSUMER.CREATE.FEEDBACK.${durable}`,
        `$JS.API.CONSUMER.MSG.NEXT.FEEDBACK.${durable}`,
        `$JS.API.CONSUMER.DELETE.FEEDBACK.${durable}`,
        `$JS.ACK.FEEDBACK.${durable}.1.5.5.1700000000.0`,
      ]
    ) assert.ok(!mayPublish(shadow, s), s);
  }
  for (const op of ["CREATE", "UPDATE", "DELETE", "PURGE"]) {
    assert.ok(!mayPublish(shadow, `$JS.API.STREAM.${op}.FEEDBACK`), op);
  }
  assert.ok(!mayPublish(shadow, "$JS.API.CONSUMER.CREATE.CONTENT.shadow_r1"));
});

Deno.test("a pipeline's control service works and deletes only consumers no running step owns", () => {
  const def = definePipeline({
    name: "orders",
    input: { schema: { type: "object" } },
    start: "price",
    steps: {
      price: { kind: "task", output: { type: "object" }, handle: (v) => v, next: "approve" },
      approve: {
        kind: "wait",
        event: "approved",
        timeoutMs: 60_000,
        onTimeout: "done",
        next: "done",
      },
      done: { kind: "end", outcome: "done" },
    },
  });
  const specs = pipelineServiceSpecs([{ file: "/p/orders.ts", def, flow: compileFlow(def) }], "/p");
  const durables = specs.flatMap((s) => s.access.consumes ?? []);
  const control = permissionsFor("orders-flow", specs[0]!.access, durables);
  // A retired step's consumer (`orders-ship`, which this definition lacks): listed, drained
  // and deleted.
  for (
    const s of [
      "$JS.API.CONSUMER.LIST.ORDERS",
      "$JS.API.CONSUMER.INFO.ORDERS.orders-ship",
      "$JS.API.CONSUMER.MSG.NEXT.ORDERS.orders-ship",
      "$JS.ACK.ORDERS.orders-ship.1.5.5.1700000000.0",
      "$JS.API.CONSUMER.DELETE.ORDERS.orders-ship",
      "orders.done.o1", // the end a redriven completion leads to
      // An event of its pipeline stored again, as it was, for the steps a changed
      // definition sends it to (a hand-over).
      "orders.price.o1",
    ]
  ) assert.ok(mayPublish(control, s), s);
  // A running step's: never.
  for (
    const s of [
      "$JS.API.CONSUMER.MSG.NEXT.ORDERS.orders-price",
      "$JS.ACK.ORDERS.orders-price.1.5.5.1700000000.0",
      "$JS.API.CONSUMER.DELETE.ORDERS.orders-price",
      "$JS.API.CONSUMER.CREATE.ORDERS.orders-price",
      "$JS.API.CONSUMER.MSG.NEXT.FEEDBACK.sentiment",
      "$JS.API.CONSUMER.DELETE.FEEDBACK.sentiment",
      "shipping.price.o1", // another pipeline's events
    ]
  ) assert.ok(!mayPublish(control, s), s);
});
