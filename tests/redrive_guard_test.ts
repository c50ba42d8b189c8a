/**
 * A redrive re-delivers only what a stage consumed: never a forged letter, a system or KV
 * subject, another stage's input, or poison that would fail again. Against a real
 * nats-server and the real pipeline, through the gateway app.
 */
import assert from "node:assert/strict";
import { AckPolicy, jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import type { DeadLetter } from "../src/events.gen.ts";
import { createEvent } from "../src/events.ts";
import { listDeadLetters } from "../src/redrive.ts";
import { STATE_BUCKET } from "../pipelines/feedback/subjects.ts";
import { startTestNats } from "./helpers/nats.ts";
import { definitionsApp, startPipeline } from "./helpers/pipeline.ts";
import { waitFor } from "./helpers/wait.ts";
import {
  controlStage,
  intakeStage,
  itemEntryEvent,
  loadPipelines,
  pipelineTopology,
} from "../src/pipeline/runtime.ts";
import { CONTROL, durableOf, INTAKE, pipelineSubjects } from "../src/pipeline/derive.ts";
import {
  ensureConsumer,
  ensureTopology,
  STAGE_DESCRIPTION,
  stageConsumerConfig,
} from "../src/topology.ts";

const JSON_TYPE = { "content-type": "application/json" };
const TRACE = "0af7651916cd43dd8448eb211c80319c";

function letter(over: Partial<DeadLetter>): DeadLetter {
  return {
    stage: "sentiment",
    code: "handler_failed",
    reason: "forged",
    attempts: 1,
    subject: "feedback.ingested.x",
    stream_seq: 1,
    time: "2026-01-01T00:00:00.000Z",
    payload: JSON.stringify({ text: "hi" }),
    payload_encoding: "utf8",
    ...over,
  };
}

Deno.test("a forged dead letter cannot make a redrive publish to a KV key, the JetStream API or another stage's input", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const js = jetstream(t.nc);
  const { body } = await p.intake.submit({ text: "A fine day" });
  const kv = await new Kvm(t.nc).open(STATE_BUCKET);
  await waitFor(
    async () => (await kv.get(body.id))?.json<{ status: string }>().status === "processed",
    20_000,
    "processed",
  );
  const before = (await kv.get(body.id))!.revision;

  const forged = [
    letter({ subject: `$KV.${STATE_BUCKET}.${body.id}`, payload: '{"status":"owned"}' }),
    letter({
      subject: "$JS.API.STREAM.CREATE.EVIL",
      payload: '{"name":"EVIL","subjects":["evil"]}',
    }),
    letter({ subject: "_INBOX.steal", payload: "{}" }),
    // A real stage and subject, but the letter's bytes are not what the stream holds there.
    letter({ subject: `feedback.ingested.${body.id}`, stream_seq: 1, payload: '{"text":"new"}' }),
    // A subject the named stage does not consume.
    letter({ stage: "sentiment", subject: `feedback.processed.${body.id}` }),
  ];
  const seqs: number[] = [];
  for (const l of forged) {
    seqs.push((await js.publish("deadletter.sentiment.x", JSON.stringify(l))).seq);
  }
  const res = await p.app.request("/deadletters/redrive", {
    method: "POST",
    headers: JSON_TYPE,
    body: JSON.stringify({ ids: seqs }),
  });
  assert.equal(res.status, 422, await res.clone().text());
  assert.match(res.headers.get("content-type") ?? "", /problem\+json/);
  const problem = await res.json();
  assert.equal(problem.field, "/ids");
  for (const seq of seqs) assert.match(problem.detail, new RegExp(`\\b${seq}: `));

  assert.equal((await kv.get(body.id))!.revision, before, "the state key is untouched");
  await assert.rejects(t.jsm.streams.info("EVIL"), "no stream was created");
  const all = await p.app.request("/deadletters/redrive", {
    method: "POST",
    headers: JSON_TYPE,
    body: JSON.stringify({ all: true }),
  });
  assert.equal(all.status, 422, "a redrive of everything refuses them too");
});

Deno.test("a dead letter whose original would fail validation again is not redriven (genuine ones are: crash_test.ts)", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const js = jetstream(t.nc);
  // A valid event on a subject the sentiment stage consumes, which it fails on for good
  // because its body names another item (subject_mismatch): genuine, but poison.
  const poison = createEvent({
    type: "feedback.ingested",
    itemId: "someone-else",
    traceId: TRACE,
    source: "test",
    data: { text: "hello" },
  });
  await js.publish("feedback.ingested.poisoned", JSON.stringify(poison));
  const letters = await waitFor(
    async () => {
      const ls = await listDeadLetters(js);
      return ls.some((l) => l.letter.subject === "feedback.ingested.poisoned") && ls;
    },
    10_000,
    "the poison's dead letter",
  );
  const poisonSeq = letters.find((l) => l.letter.subject === "feedback.ingested.poisoned")!.seq;
  const res = await p.app.request("/deadletters/redrive", {
    method: "POST",
    headers: JSON_TYPE,
    body: JSON.stringify({ ids: [poisonSeq] }),
  });
  assert.equal(res.status, 422);
  assert.match((await res.json()).detail, /would be dead-lettered again/);
});

Deno.test("POST /deadletters/redrive refuses a body over its limit with 413 before reading it", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const res = await p.app.request("/deadletters/redrive", {
    method: "POST",
    headers: JSON_TYPE,
    body: JSON.stringify({ ids: Array.from({ length: 60_000 }, (_, i) => i + 1) }),
  });
  assert.equal(res.status, 413);
  assert.match(res.headers.get("content-type") ?? "", /problem\+json/);
});

Deno.test("a definition's letter whose original would fail its consumer again is not redriven", async () => {
  await using t = await startTestNats();
  const pipelines = await loadPipelines(
    ["pipelines/examples/tickets.ts"],
    new URL("../", import.meta.url).pathname,
  );
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology(pipelines, t.config.retentionMs));
  const app = await definitionsApp(t, pipelines);
  const js = jetstream(t.nc);
  const def = pipelines[0]!.def;
  // Originals dead-lettered on their first delivery: by the control step, a body that is no
  // event of the flow and one too deep to decode; by the intake, a submission the input
  // schema refuses.
  const originals: [string, string, string][] = [
    ["tickets.triage.it1", '{"garbage":true}', durableOf(def, CONTROL)],
    ["tickets.approved.it1", `${"[".repeat(100)}${"]".repeat(100)}`, durableOf(def, CONTROL)],
    ["tickets.submit", '{"customer":5}', durableOf(def, INTAKE)],
  ];
  // The consumers the control and intake services make when they start.
  for (const stage of [controlStage(pipelines[0]!, t.nc), intakeStage(pipelines[0]!)]) {
    await ensureConsumer(t.jsm, stage.stream, stageConsumerConfig(stage, t.config));
  }
  const ids: number[] = [];
  for (const [subject, payload, stage] of originals) {
    const stored = await js.publish(subject, payload);
    const l = letter({ stage, subject, payload, stream_seq: stored.seq, code: "invalid_event" });
    ids.push((await js.publish(`deadletter.${stage}.it1`, JSON.stringify(l))).seq);
  }
  const res = await app.request("/deadletters/redrive", {
    method: "POST",
    headers: JSON_TYPE,
    body: JSON.stringify({ ids }),
  });
  assert.equal(res.status, 422, await res.clone().text());
  const problem = await res.json();
  for (const seq of ids) {
    assert.match(
      problem.detail,
      new RegExp(`\\b${seq}: the original would be dead-lettered again`),
    );
  }
  const stream = await t.jsm.streams.info(pipelineSubjects(def).stream);
  assert.equal(stream.state.messages, originals.length, "nothing republished");
});

Deno.test("a letter of a step renamed since is redriven to the step that consumes its subject now, never to a consumer Weft did not make", async () => {
  await using t = await startTestNats();
  const pipelines = await loadPipelines(
    ["pipelines/examples/tickets.ts"],
    new URL("../", import.meta.url).pathname,
  );
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology(pipelines, t.config.retentionMs));
  const app = await definitionsApp(t, pipelines);
  const js = jetstream(t.nc);
  const stream = pipelineSubjects(pipelines[0]!.def).stream;
  // The step was `classify` when the item failed there; its consumer went with the rename.
  const entry = itemEntryEvent(pipelines[0]!, "it2", { customer: "c", text: "t" }, {
    source: "test",
    traceId: TRACE,
  });
  const stored = await js.publish("tickets.submitted.it2", JSON.stringify(entry));
  const payload = JSON.stringify(entry);
  const l = letter({ stage: "tickets-classify", subject: "tickets.submitted.it2", payload });
  l.stream_seq = stored.seq;
  const id = (await js.publish("deadletter.tickets-classify.it2", JSON.stringify(l))).seq;
  const redrive = () =>
    app.request("/deadletters/redrive", {
      method: "POST",
      headers: JSON_TYPE,
      body: JSON.stringify({ ids: [id] }),
    });
  // Only an operator's own consumer reads the subject: not a step, so nothing is redriven.
  await t.jsm.consumers.add(stream, {
    durable_name: "tickets-audit",
    filter_subject: "tickets.>",
    ack_policy: AckPolicy.Explicit,
  });
  const refused = await redrive();
  assert.equal(refused.status, 422, await refused.clone().text());
  assert.match(
    (await refused.json()).detail,
    /has no consumer on TICKETS, and no step of the running topology consumes tickets\.submitted\.it2/,
  );
  // The step under its new name, as its service makes its consumer.
  await ensureConsumer(t.jsm, stream, {
    durable_name: "tickets-triage",
    description: `${STAGE_DESCRIPTION}tickets-triage`,
    filter_subject: "tickets.submitted.*",
    ack_policy: AckPolicy.Explicit,
  });
  const res = await redrive();
  assert.equal(res.status, 200, await res.clone().text());
  assert.deepEqual((await res.json()).redriven.map((r: { seq: number }) => r.seq), [id]);
  const again = await t.jsm.streams.getMessage(stream, { last_by_subj: "tickets.submitted.it2" });
  assert.ok(again && again.seq > stored.seq, "the original stored again, for the step to take");
});

Deno.test("a letter whose subject names no valid item is not redriven: every consumer would refuse it again at once", async () => {
  await using t = await startTestNats();
  const pipelines = await loadPipelines(
    ["pipelines/examples/tickets.ts"],
    new URL("../", import.meta.url).pathname,
  );
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology(pipelines, t.config.retentionMs));
  const app = await definitionsApp(t, pipelines);
  const js = jetstream(t.nc);
  const def = pipelines[0]!.def;
  for (const stage of [controlStage(pipelines[0]!, t.nc)]) {
    await ensureConsumer(t.jsm, stage.stream, stageConsumerConfig(stage, t.config));
  }
  const ids: number[] = [];
  for (const item of ["é", "L".repeat(65)]) {
    const subject = `tickets.approved.${item}`;
    const payload = '{"approve":true}';
    const stored = await js.publish(subject, payload);
    const l = letter({
      stage: durableOf(def, CONTROL),
      subject,
      payload,
      stream_seq: stored.seq,
      code: "invalid_event",
    });
    ids.push(
      (await js.publish(`deadletter.${durableOf(def, CONTROL)}.unknown`, JSON.stringify(l))).seq,
    );
  }
  const res = await app.request("/deadletters/redrive", {
    method: "POST",
    headers: JSON_TYPE,
    body: JSON.stringify({ all: true }),
  });
  assert.equal(res.status, 422, await res.clone().text());
  const detail = (await res.json()).detail;
  for (const seq of ids) {
    assert.match(
      detail,
      new RegExp(`\\b${seq}: the original would be dead-lettered again: invalid item id`),
    );
  }
});

Deno.test("a letter of an event for an item that had not entered is not redriven until the item has", async () => {
  // Found by probing: each redrive of such a letter stored the event again, which its step
  // dead-lettered again as not_found, so `{"all": true}` never ran out of letters.
  await using t = await startTestNats();
  const pipelines = await loadPipelines(
    ["pipelines/examples/tickets.ts"],
    new URL("../", import.meta.url).pathname,
  );
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology(pipelines, t.config.retentionMs));
  const app = await definitionsApp(t, pipelines);
  const js = jetstream(t.nc);
  const p = pipelines[0]!;
  const control = controlStage(p, t.nc);
  await ensureConsumer(t.jsm, control.stream, stageConsumerConfig(control, t.config));
  const subject = "tickets.approved.ghost1";
  const payload = JSON.stringify({ approved: true });
  const stored = await js.publish(subject, payload);
  const l = letter({
    stage: durableOf(p.def, CONTROL),
    subject,
    payload,
    item_id: "ghost1",
    stream_seq: stored.seq,
    code: "not_found",
  });
  const seq = (await js.publish(`deadletter.${l.stage}.ghost1`, JSON.stringify(l))).seq;
  const redrive = (body: unknown) =>
    app.request("/deadletters/redrive", {
      method: "POST",
      headers: JSON_TYPE,
      body: JSON.stringify(body),
    });
  for (const body of [{ ids: [seq] }, { all: true }]) {
    const res = await redrive(body);
    assert.equal(res.status, 422, await res.clone().text());
    assert.match(
      (await res.json()).detail,
      /its item has not entered \(nothing is stored on tickets\.submitted\.ghost1\)/,
    );
  }
  assert.equal((await t.jsm.streams.info("TICKETS")).state.messages, 1, "nothing republished");
  // Once the item has entered, the letter goes.
  const entry = itemEntryEvent(p, "ghost1", { customer: "c", text: "hi" }, {
    source: "test",
    traceId: TRACE,
  });
  await js.publish(`tickets.submitted.ghost1`, JSON.stringify(entry));
  const res = await redrive({ ids: [seq] });
  assert.equal(res.status, 200, await res.clone().text());
  assert.deepEqual((await res.json()).redriven.map((r: { seq: number }) => r.seq), [seq]);
});

Deno.test("a bus submission dead-lettered for bytes its consumer cannot read as written (invalid UTF-8, 1e400, an integer past 2^53) is not redriven rewritten", async () => {
  await using t = await startTestNats();
  await using p = await startPipeline(t);
  const js = jetstream(t.nc);
  // Id-less, so a redrive adds the item id it was dead-lettered under; it must not re-encode
  // the rest of the body on the way (replacement characters, null, a rounded number).
  const originals = [
    new Uint8Array([...new TextEncoder().encode('{"text":"bad '), 0xff, 0xfe, 0x22, 0x7d]),
    new TextEncoder().encode('{"text":"huge","metadata":{"x":1e400}}'),
    new TextEncoder().encode('{"text":"long","metadata":{"x":123456789012345678901234567890}}'),
  ];
  for (const body of originals) await js.publish("feedback.submit", body);
  const letters = await waitFor(
    async () => {
      const ls = (await listDeadLetters(js)).filter((l) => l.letter.subject === "feedback.submit");
      return ls.length === originals.length && ls;
    },
    20_000,
    "the three submissions' dead letters",
  );
  const res = await p.app.request("/deadletters/redrive", {
    method: "POST",
    headers: JSON_TYPE,
    body: JSON.stringify({ ids: letters.map((l) => l.seq) }),
  });
  const answer = await res.clone().text();
  assert.equal(res.status, 422, answer);
  assert.match(res.headers.get("content-type") ?? "", /problem\+json/);
  const problem = await res.json();
  assert.equal(problem.field, "/ids");
  for (const l of letters) {
    assert.match(
      problem.detail,
      new RegExp(`\\b${l.seq}: the original would be dead-lettered again`),
    );
  }
  assert.match(problem.detail, /not valid UTF-8/);
  assert.match(problem.detail, /1e400 cannot be kept as written/);
  assert.match(problem.detail, /123456789012345678901234567890 cannot be kept as written/);
  // Nothing was published for any of them: no item entered.
  for (const l of letters) {
    const info = await t.jsm.streams.info("FEEDBACK", {
      subjects_filter: `feedback.ingested.${l.letter.item_id}`,
    });
    assert.equal(Object.keys(info.state.subjects ?? {}).length, 0, `${l.letter.item_id} entered`);
  }
});

Deno.test("a definition's bus submission whose entry event is past max_payload is not redriven: it would only fail its item again", async () => {
  // Found by probing: a 1 MB `nats pub tickets.submit` is dead-lettered `payload_too_large`
  // (its entry event carries the input twice), and each redrive of the letter was accepted,
  // failed the item again and made another letter.
  await using t = await startTestNats();
  const pipelines = await loadPipelines(
    ["pipelines/examples/tickets.ts"],
    new URL("../", import.meta.url).pathname,
  );
  await ensureTopology(t.nc, t.jsm, t.config, pipelineTopology(pipelines, t.config.retentionMs));
  const app = await definitionsApp(t, pipelines);
  const js = jetstream(t.nc);
  const def = pipelines[0]!.def;
  const stage = intakeStage(pipelines[0]!);
  await ensureConsumer(t.jsm, stage.stream, stageConsumerConfig(stage, t.config));
  const maxPayload = t.nc.info!.max_payload;
  const submit = async (text: string) => {
    const payload = JSON.stringify({ customer: "c", text });
    const stored = await js.publish("tickets.submit", payload);
    const l = letter({
      stage: durableOf(def, INTAKE),
      subject: "tickets.submit",
      payload,
      stream_seq: stored.seq,
      code: "payload_too_large",
      item_id: `tickets-${stored.seq}`,
    });
    return (await js.publish(`deadletter.${l.stage}.${l.item_id}`, JSON.stringify(l))).seq;
  };
  // Fits on its own, not twice over in its entry event.
  const tooLarge = await submit("a".repeat(Math.ceil(maxPayload * 0.6)));
  const res = await app.request("/deadletters/redrive", {
    method: "POST",
    headers: JSON_TYPE,
    body: JSON.stringify({ ids: [tooLarge] }),
  });
  assert.equal(res.status, 422, await res.clone().text());
  assert.match(res.headers.get("content-type") ?? "", /problem\+json/);
  const problem = await res.json();
  assert.equal(problem.field, "/ids");
  assert.match(
    problem.detail,
    new RegExp(`\\b${tooLarge}: the original would be dead-lettered again: .*max_payload`),
  );
  const before = (await t.jsm.streams.info(pipelineSubjects(def).stream)).state.messages;
  // One whose entry event fits is redriven as before.
  const fits = await submit("a".repeat(Math.floor(maxPayload * 0.3)));
  const ok = await app.request("/deadletters/redrive", {
    method: "POST",
    headers: JSON_TYPE,
    body: JSON.stringify({ ids: [fits] }),
  });
  assert.equal(ok.status, 200, await ok.clone().text());
  assert.equal((await ok.json()).redriven.length, 1);
  const after = (await t.jsm.streams.info(pipelineSubjects(def).stream)).state.messages;
  assert.equal(after, before + 2, "the second original and its redrive, nothing for the first");
});
