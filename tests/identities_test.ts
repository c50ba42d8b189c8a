/**
 * Least-privilege NATS identities under `deno task start`: every service connects with
 * its own nkey and may do only what it consumes and produces. Both pipelines run end to
 * end without one refused permission, while a step's identity cannot publish another
 * step's event, read a bucket it does not own, pull from another step's consumer or delete
 * a stream; the ops identity (the nats CLI) reads everything and changes nothing; and a
 * connection without a key is refused.
 */
import assert from "node:assert/strict";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { headers, type NatsConnection } from "@nats-io/nats-core";
import { GENERATED_CONF, IDENTITY_DIR, SERVICES } from "../src/supervisor.ts";
import { has, waitForEvents } from "./helpers/content_events.ts";
import { type Mesh, rebuildStateTask, startMesh } from "./helpers/mesh.ts";
import { waitFor } from "./helpers/wait.ts";
import { compareStates, rebuildStates } from "../src/rebuild.ts";
import { FEEDBACK_STATE_SPEC } from "../pipelines/feedback/state.ts";
import { connectClient } from "./helpers/nats.ts";

const TOXIC = "You idiot, this is the most pathetic service ever.";

async function post(base: string, path: string, body: unknown) {
  const res = await fetch(`${base}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

function violations(mesh: Mesh): unknown[] {
  return mesh.logs.filter((l) => l.msg === "nats permission violation");
}

/** Connects as `identity` and runs `fn`, closing the connection after. */
async function as<T>(mesh: Mesh, identity: string, fn: (nc: NatsConnection) => Promise<T>) {
  const nc = await connectClient(mesh.natsUrl, `test-as-${identity}`, mesh.credentials(identity));
  try {
    return await fn(nc);
  } finally {
    await nc.close();
  }
}

/** Each feedback state the bucket holds otherwise than a rebuild from the stream, both ways. */
async function stateDisagreement(nc: NatsConnection): Promise<string> {
  const js = jetstream(nc);
  const { states } = await rebuildStates(js, FEEDBACK_STATE_SPEC);
  const kv = await new Kvm(nc).open("weft_feedback_state");
  const live = new Map<string, unknown>();
  for await (const k of await kv.keys()) live.set(k, (await kv.get(k))?.json());
  const diff = compareStates(states, live as Map<string, never>);
  return JSON.stringify(
    [...diff.different, ...diff.missingLive].map((id) => ({
      id,
      rebuilt: states.get(id),
      stored: live.get(id),
    })),
  );
}

Deno.test("each service runs as its own NATS identity with only the permissions it needs", async (t) => {
  await using mesh = await startMesh({
    WEFT_REVIEW_SLA_MS: "600000",
    // Items whose text has "crash" fail in topics: dead letters for the redrive below.
    WEFT_FAIL_ON: "crash",
    WEFT_FAIL_STAGE: "topics",
    WEFT_MAX_ATTEMPTS: "2",
    WEFT_RETRY_BASE_MS: "50",
  });
  const base = mesh.gatewayUrl;

  await t.step(
    "keys are files of mode 0600 in a 0700 directory; the server's config holds no seed",
    async () => {
      const dir = `${mesh.storeDir}/${IDENTITY_DIR}`;
      assert.equal((await Deno.stat(dir)).mode! & 0o777, 0o700);
      for (const name of [...SERVICES.map((s) => s.name), "admin", "ops"]) {
        const file = `${dir}/${name}.nk`;
        assert.equal((await Deno.stat(file)).mode! & 0o777, 0o600, file);
        assert.match(await Deno.readTextFile(file), /^SU[A-Z2-7]{56}\n$/, "a user seed");
      }
      const conf = await Deno.readTextFile(`${mesh.storeDir}/${GENERATED_CONF}`);
      assert.match(conf, /authorization/);
      assert.doesNotMatch(conf, /SU[A-Z2-7]{56}/, "only public keys");
    },
  );

  await t.step(
    "both pipelines, schedules and a redrive run without one refused permission",
    async () => {
      await as(mesh, "ops", async (nc) => {
        const fb = await post(base, "/feedback", { text: "The app freezes when I save, fix it" });
        assert.equal(fb.status, 202);
        const flagged = await post(base, "/content", { text: TOXIC });
        const safe = await post(base, "/content", { text: "A lovely lamp, thanks." });
        assert.equal(flagged.status, 202);
        await waitForEvents(nc, safe.body.id, has("content.published"));
        await waitForEvents(nc, flagged.body.id, has("content.review_requested"));
        const decided = await post(base, `/reviews/${flagged.body.id}/decision`, {
          decision: "reject",
          reason: "abusive",
          reviewer: "carol",
        });
        assert.equal(decided.status, 200);
        await waitForEvents(nc, flagged.body.id, has("content.archived"));
        const binary = await fetch(`${base}/content`, {
          method: "POST",
          headers: { "content-type": "image/png" },
          body: new Uint8Array([137, 80, 78, 71, 1, 2, 3]),
        });
        assert.equal(binary.status, 202, await binary.text());

        const scheduled = await post(base, "/schedules", {
          id: "soon",
          subject: "feedback.submit",
          payload: { id: "SCHED1", text: "scheduled hello" },
          at: new Date(Date.now() + 200).toISOString(),
        });
        assert.equal(scheduled.status, 201, JSON.stringify(scheduled.body));
        const state = await new Kvm(nc).open("weft_feedback_state");
        await waitFor(
          async () =>
            (await state.get(fb.body.id))?.json<{ status: string }>().status === "processed",
          15_000,
          "feedback processed",
        );
        await waitFor(
          async () =>
            (await state.get("SCHED1"))?.json<{ status: string }>().status === "processed",
          15_000,
          "the scheduled item processed",
        );

        // A bad submission on the bus is dead-lettered by ingest; an item failing in topics
        // is dead-lettered there, then redriven by the gateway onto topics' input.
        nc.publish("feedback.submit", JSON.stringify({ id: "BAD1", text: 42 }));
        const failing = await post(base, "/feedback", { id: "CRASH1", text: "it will crash" });
        assert.equal(failing.status, 202);
        for (const stage of ["ingest", "topics"]) {
          await waitFor(
            async () => {
              const r = await fetch(`${base}/deadletters?stage=${stage}`);
              const b = await r.json();
              return b.items?.length ? b.items : undefined;
            },
            15_000,
            `a dead letter of ${stage}`,
          );
        }
        const letters = (await (await fetch(`${base}/deadletters?stage=topics`)).json()).items;
        const redrive = await post(base, "/deadletters/redrive", { ids: [letters[0].seq] });
        assert.equal(redrive.status, 200, JSON.stringify(redrive.body));
        assert.equal(redrive.body.redriven.length, 1);

        const metrics = await fetch(`${base}/metrics`);
        assert.equal(metrics.status, 200);
        assert.match(await metrics.text(), /weft_stage_processed_total\{stage="sentiment"/);
      });
      assert.deepEqual(violations(mesh), [], "no refused permission in the server's log");
    },
  );

  await t.step(
    "a step cannot publish another step's event type, nor forge an item's entry",
    async () => {
      await as(mesh, "sentiment", async (nc) => {
        const js = jetstream(nc);
        await js.publish("feedback.sentiment_analyzed.OWN", "{}"); // its own type: allowed
        for (
          const subject of [
            "feedback.processed.victim",
            "feedback.ingested.victim",
            "content.published.x",
          ]
        ) {
          await assert.rejects(js.publish(subject, "{}"), /permission/i, subject);
        }
      });
    },
  );

  await t.step(
    "a step cannot read a bucket it does not own, nor pull from another step's consumer",
    async () => {
      await as(mesh, "sentiment", async (nc) => {
        await assert.rejects(
          (async () => (await new Kvm(nc).open("weft_reviews")).get("x"))(),
          /permission/i,
        );
        const js = jetstream(nc);
        await assert.rejects(
          (async () => (await js.consumers.get("FEEDBACK", "topics")).next({ expires: 1000 }))(),
          /permission/i,
        );
      });
    },
  );

  await t.step(
    "no reader can rewrite a step's consumer, read another identity's deliveries, or see others' requests",
    async () => {
      const config = async () =>
        await as(
          mesh,
          "admin",
          async (nc) =>
            (await (await jetstreamManager(nc)).consumers.info("FEEDBACK", "sentiment")).config,
        );
      const before = await config();
      for (const identity of ["ops", "gateway"]) {
        await as(mesh, identity, async (nc) => {
          // The unnamed create takes the consumer's name from its body: naming a step's
          // durable consumer there would update it, and the step would miss every item
          // published while its filter pointed elsewhere.
          const hijack = { ...before, filter_subject: "feedback.nothing.*" };
          await assert.rejects(
            nc.request(
              "$JS.API.CONSUMER.CREATE.FEEDBACK",
              JSON.stringify({ stream_name: "FEEDBACK", config: hijack }),
              { timeout: 5_000 },
            ),
            /permission/i,
            identity,
          );
        });
      }
      assert.equal((await config()).filter_subject, before.filter_subject);
      await as(mesh, "ops", async (nc) => {
        // A step's deliveries arrive in its inbox, with the subject that acks them as their
        // reply; requests to the gateway carry the callers' API keys.
        // Nor a bucket's subjects: a subscriber there is what a reader's push consumer needs
        // to have the server deliver into the bucket.
        for (
          const subject of [
            "_INBOX_topics.>",
            "weft.>",
            "$JS.API.CONSUMER.MSG.NEXT.>",
            "$KV.weft_feedback_state.>",
          ]
        ) {
          // Refused: the server closes the subscription with a permission error at once.
          const sub = nc.subscribe(subject);
          let timer: ReturnType<typeof setTimeout> | undefined;
          const closed = await Promise.race([
            sub.closed,
            new Promise((resolve) => timer = setTimeout(() => resolve("still open"), 10_000)),
          ]);
          clearTimeout(timer);
          sub.unsubscribe();
          assert.match(String(closed), /permission/i, subject);
        }
      });
    },
  );

  await t.step("a request cannot choose where a service's answer is published", async () => {
    // Found adversarially: a `nats micro` ping or status request from the ops key with the
    // reply subject `$KV.weft_feedback_state.<id>` had every service write its answer there
    // (allow_responses), replacing the item's state.
    // The state service may write that bucket: its answer must still not go there.
    await as(mesh, "ops", async (nc) => {
      nc.publish("weft.state.status", "", { reply: "$KV.weft_feedback_state.reflected" });
      nc.publish("$SRV.INFO.weft-state", "", { reply: "$KV.weft_feedback_state.reflected" });
      // Answered in order on one connection: once this answer is in, the ones above were handled.
      await nc.request("weft.state.status", "", { timeout: 10_000 });
      await nc.request("$SRV.INFO.weft-state", "", { timeout: 10_000 });
    });
    await as(mesh, "admin", async (nc) => {
      const kv = await new Kvm(nc).open("weft_feedback_state");
      assert.equal(await kv.get("reflected"), null, "no answer written into the state bucket");
    });
  });

  await t.step(
    "a writer of one key of a shared bucket cannot erase the others (no rollups)",
    async () => {
      // Found adversarially: `KV-Operation: PURGE` with `Nats-Rollup: all` on one key the digest
      // service may write erased every timer in the schedule bucket.
      const keys = async () =>
        await as(mesh, "admin", async (nc) => {
          const out: string[] = [];
          for await (const k of await (await new Kvm(nc).open("weft_schedules")).keys()) {
            out.push(k);
          }
          return out.sort();
        });
      const before = await waitFor(
        async () => {
          const k = await keys();
          return k.includes("feedback.digest") && k;
        },
        15_000,
        "the digest's schedule",
      );
      await as(mesh, "digest", async (nc) => {
        const h = headers();
        h.set("KV-Operation", "PURGE");
        h.set("Nats-Rollup", "all");
        await assert.rejects(
          jetstream(nc).publish("$KV.weft_schedules.feedback.digest", "", { headers: h }),
          /rollup/i,
        );
      });
      assert.deepEqual(await keys(), before);
    },
  );

  await t.step(
    "a service writes only its own pipeline's schedules, and those fire only on its subjects",
    async () => {
      // Found adversarially: with the digest's key, a schedule written into the bucket for
      // `content.sla_expired.<id>` decided a flagged item with no review (and deleting
      // `sla-1-<id>` would have kept it from ever escalating).
      const now = new Date().toISOString();
      const forged = (id: string) =>
        JSON.stringify({
          id,
          subject: "content.sla_expired.victim",
          payload: { level: 2 },
          at: now,
          status: "active",
          next_at: now,
          created_at: now,
          fired: 0,
        });
      await as(mesh, "digest", async (nc) => {
        const js = jetstream(nc);
        for (const key of ["content.sla-2-victim", "sla-2-victim", "feedback-digest"]) {
          await assert.rejects(js.publish(`$KV.weft_schedules.${key}`, forged(key)), /permission/i);
        }
        // Under its own name it may write, but the scheduler fires it only on its subjects.
        await (await new Kvm(nc).open("weft_schedules")).put(
          "feedback.evil",
          forged("feedback.evil"),
        );
      });
      await mesh.waitForLog(
        (l) =>
          l.msg === "schedule refused: its subject is not schedulable" &&
          l.schedule === "feedback.evil",
        15_000,
        "the scheduler's refusal",
      );
    },
  );

  await t.step(
    "a command-line tool run without a key is told which to use, in one line",
    async () => {
      const { code, output } = await rebuildStateTask({
        NATS_URL: mesh.natsUrl,
        WEFT_NATS_NKEY: "",
      });
      assert.equal(code, 2, output);
      assert.match(output, /^rebuild-state: NATS at \S+ wants an identity/);
      assert.match(output, /WEFT_NATS_NKEY=data\/identities\/ops\.nk/);
      assert.doesNotMatch(output, /\n\s+at /, "no stack trace");
    },
  );

  await t.step(
    "rebuild-state --write with the ops key is told to use the admin key, in one line, not a stack trace",
    async () => {
      const admin = {
        NATS_URL: mesh.natsUrl,
        WEFT_NATS_NKEY: mesh.credentials("admin").nkeySeedFile!,
      };
      // First the bucket agrees with the stream: the item redriven above may still be failing
      // again on a loaded machine, its state not yet written (a loaded run rebuilt it too).
      // A fresh-clone run under load once found them apart for over a minute: the failure
      // names each state that differs, as rebuilt and as stored.
      await waitFor(
        async () => {
          const { figures } = await rebuildStateTask(admin);
          return (figures.different === 0 && figures.missing_in_bucket === 0) || undefined;
        },
        60_000,
        "the state bucket agreeing with the stream",
      ).catch(async (err) => {
        throw new Error(`${err.message}: ${await as(mesh, "admin", stateDisagreement)}`);
      });
      // A state the stream does not support (set with the admin key): --write would put the
      // rebuilt one, which the ops key may not.
      const id = await as(mesh, "admin", async (nc) => {
        const kv = await new Kvm(nc).open("weft_feedback_state");
        let first = "";
        for await (const k of await kv.keys()) {
          first ||= k;
        }
        await kv.put(first, JSON.stringify({ id: first, status: "accepted" }));
        return first;
      });
      const { code, output } = await rebuildStateTask(
        {
          NATS_URL: mesh.natsUrl,
          WEFT_NATS_NKEY: mesh.credentials("ops").nkeySeedFile!,
        },
        undefined,
        ["--write"],
      );
      assert.equal(code, 2, output);
      assert.match(output, /^rebuild-state: --write: this key may not write weft_feedback_state/m);
      assert.match(output, /WEFT_NATS_NKEY=data\/identities\/admin\.nk/);
      assert.doesNotMatch(output, /\n\s+at /, "no stack trace");
      // The admin key writes it back (a fresh-clone run once had it write two: the failure
      // names what differed just before, as rebuilt and as stored).
      const before = await as(mesh, "admin", stateDisagreement);
      const fixed = await rebuildStateTask(admin, undefined, ["--write"]);
      assert.equal(fixed.code, 0, fixed.output);
      assert.equal(fixed.figures.written, 1, `${id}: ${fixed.output}; before: ${before}`);
    },
  );

  await t.step(
    "no service, nor the ops identity, can delete or purge a stream or a step's consumer",
    async () => {
      for (const identity of ["sentiment", "gateway", "state", "ops"]) {
        await as(mesh, identity, async (nc) => {
          const jsm = await jetstreamManager(nc);
          await assert.rejects(jsm.streams.delete("FEEDBACK"), /permission/i, identity);
          await assert.rejects(jsm.streams.purge("FEEDBACK"), /permission/i, identity);
          await assert.rejects(
            jsm.consumers.delete("FEEDBACK", "sentiment"),
            /permission/i,
            identity,
          );
        });
      }
      await as(mesh, "ops", async (nc) => {
        const jsm = await jetstreamManager(nc);
        assert.ok((await jsm.streams.info("FEEDBACK")).state.messages > 0, "ops reads streams");
        await assert.rejects(
          jetstream(nc).publish("feedback.processed.victim", "{}"),
          /permission/i,
          "ops submits, never forges a step's event",
        );
        await assert.rejects(
          (async () => (await new Kvm(nc).open("weft_feedback_state")).put("victim", "{}"))(),
          /permission/i,
          "ops never writes a bucket",
        );
      });
    },
  );

  await t.step(
    "ops cannot learn the names of others' ephemeral consumers, so cannot delete or rewrite them",
    async () => {
      // The scheduler watches its bucket with an ephemeral consumer of a random name;
      // deleting it (or re-creating it with another filter) stalls every timer.
      const ephemerals = () =>
        as(mesh, "admin", async (nc) => {
          const names: string[] = [];
          const jsm = await jetstreamManager(nc);
          for await (const c of jsm.consumers.list("KV_weft_schedules")) {
            if (!c.config.durable_name) names.push(c.name);
          }
          return names;
        });
      const [watch] = await waitFor(
        async () => {
          const names = await ephemerals();
          return names.length > 0 && names;
        },
        10_000,
        "the scheduler's bucket watch",
      );
      await as(mesh, "ops", async (nc) => {
        const jsm = await jetstreamManager(nc);
        for (const stream of ["KV_weft_schedules", "FEEDBACK", "KV_weft_feedback_state"]) {
          await assert.rejects(
            (async () => {
              for await (const _ of jsm.consumers.list(stream)) { /* names */ }
            })(),
            /permission/i,
            `listing ${stream}'s consumers`,
          );
        }
        // What ops needs day to day still works: a step's backlog by its name.
        const info = await jsm.consumers.info("FEEDBACK", "sentiment");
        assert.equal(info.name, "sentiment");
      });
      assert.ok((await ephemerals()).includes(watch!), "the scheduler's watch is still there");
    },
  );

  await t.step(
    "the nats CLI with the ops key reads and submits; removing a stream is refused",
    async () => {
      const nats = async (...args: string[]) => {
        const out = await new Deno.Command("nats", {
          args: [
            "--server",
            mesh.natsUrl,
            "--nkey",
            mesh.credentials("ops").nkeySeedFile!,
            "--inbox-prefix",
            "_INBOX_ops",
            ...args,
          ],
          stdin: "null",
        }).output();
        const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
        return { ok: out.success, text };
      };
      const reply = await nats(
        "req",
        "weft.feedback.submit",
        '{"id":"CLI1","text":"hello from the CLI"}',
      );
      assert.ok(reply.ok, reply.text);
      assert.match(reply.text, /CLI1/);
      const get = await nats("kv", "get", "weft_feedback_state", "SCHED1", "--raw");
      assert.ok(get.ok, get.text);
      assert.match(get.text, /"status":"processed"/);
      const rm = await nats("stream", "rm", "FEEDBACK", "-f");
      assert.ok(!rm.ok, rm.text);
      assert.match(rm.text, /permission/i);
      const info = await nats("stream", "info", "FEEDBACK", "--json");
      assert.ok(info.ok, "the stream is still there");
    },
  );

  await t.step(
    "a connection without a key is refused",
    async () => {
      await assert.rejects(
        connectClient(mesh.natsUrl, "anonymous"),
        /authorization|auth/i,
      );
    },
  );
});
