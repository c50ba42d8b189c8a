/**
 * What a key holder can do to the bus beyond its role, probed with the mesh's own identities
 * against the authenticated nats-server `deno task start` runs: each step is a hole found by
 * probing with the real nats CLI, and shows it closed while the role's work still runs.
 */
import assert from "node:assert/strict";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { Objm } from "@nats-io/obj";
import type { NatsConnection } from "@nats-io/nats-core";
import { type Mesh, ONE_PROCESS, startMesh } from "./helpers/mesh.ts";
import { connectClient } from "./helpers/nats.ts";
import { meshPermissions, meshServices, withEdgeSites } from "../src/supervisor.ts";
import { streamConfigs } from "../src/topology.ts";
import { loadConfig } from "../src/config.ts";
import { loadPipelines } from "../src/pipeline/runtime.ts";
import { pipelineSubjects } from "../src/pipeline/derive.ts";

/** Runs the nats CLI (natscli) as `identity`, its replies under that identity's inbox prefix. */
async function natsCli(mesh: Mesh, identity: string, ...args: string[]) {
  const out = await new Deno.Command("nats", {
    args: [
      "--server",
      mesh.natsUrl,
      "--nkey",
      mesh.credentials(identity).nkeySeedFile!,
      "--inbox-prefix",
      `_INBOX_${identity}`,
      "--timeout",
      "10s",
      ...args,
    ],
    stdin: "null",
  }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  return { ok: out.success, text };
}

/** Whether a core subscription to `subject` is refused (the server closes it at once). */
async function subscribeRefused(nc: NatsConnection, subject: string): Promise<boolean> {
  const sub = nc.subscribe(subject);
  // Answered in order: once the flush's PONG is back, a refusal has arrived before it.
  await nc.flush();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const closed = await Promise.race([
    sub.closed,
    new Promise((resolve) => timer = setTimeout(() => resolve("still open"), 5_000)),
  ]);
  clearTimeout(timer);
  sub.unsubscribe();
  return /permission/i.test(String(closed));
}

/** Whether NATS subject patterns `a` and `b` match a subject in common. */
function overlap(a: string, b: string): boolean {
  const x = a.split(".");
  const y = b.split(".");
  for (let i = 0;; i++) {
    const p = x[i];
    const q = y[i];
    if (p === ">" || q === ">") return p !== undefined && q !== undefined;
    if (p === undefined || q === undefined) return p === q;
    if (p !== "*" && q !== "*" && p !== q) return false;
  }
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

/** Uploads `bytes` as a PNG through the gateway: the item's id. */
async function upload(mesh: Mesh, bytes: Uint8Array<ArrayBuffer>): Promise<string> {
  const res = await fetch(`${mesh.gatewayUrl}/content`, {
    method: "POST",
    headers: { "content-type": "image/png" },
    body: bytes,
  });
  const body = await res.json();
  assert.equal(res.status, 202, JSON.stringify(body));
  return body.id;
}

/** The status of GET /content/<id>/object (its body read). */
async function objectStatus(mesh: Mesh, id: string): Promise<number> {
  const res = await fetch(`${mesh.gatewayUrl}/content/${id}/object`);
  await res.body?.cancel();
  return res.status;
}

Deno.test("a key holder cannot reach past its role on the bus", async (t) => {
  await using mesh = await startMesh({ ...ONE_PROCESS, WEFT_REVIEW_SLA_MS: "600000" });

  await t.step(
    "the gateway's key cannot purge the object store; uploads still store and serve",
    async () => {
      // Found by probing: the gateway could purge OBJ_<bucket> (it was granted the purge to
      // replace objects), and a purge's filter is in its body, out of a permission's reach:
      // `nats req '$JS.API.STREAM.PURGE.OBJ_weft_content_objects' ''` erased every upload.
      const png = new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10, 1, 2, 3]);
      const first = await upload(mesh, png);
      assert.equal(await objectStatus(mesh, first), 200);
      await as(mesh, "gateway", async (nc) => {
        const jsm = await jetstreamManager(nc);
        await assert.rejects(jsm.streams.purge("OBJ_weft_content_objects"), /permission/i);
        await assert.rejects(
          jsm.streams.purge("OBJ_weft_content_objects", { filter: "$O.weft_content_objects.C.>" }),
          /permission/i,
        );
      });
      assert.equal(await objectStatus(mesh, first), 200, "the upload's object is still there");
      const second = await upload(mesh, png);
      assert.equal(await objectStatus(mesh, second), 200);
      // What the key can still do: write an object's delete marker (its metadata subject is
      // the key's to write); the object then reads as gone, and its chunks stay in the stream.
      const chunks = async () =>
        await as(
          mesh,
          "admin",
          async (nc) =>
            (await (await jetstreamManager(nc)).streams.info("OBJ_weft_content_objects")).state
              .messages,
        );
      const held = await chunks();
      await as(mesh, "gateway", async (nc) => {
        const objects = await new Objm(nc).open("weft_content_objects");
        await assert.rejects(objects.delete(second), /permission/i, "its chunks' purge");
      });
      assert.equal(await objectStatus(mesh, second), 404, "marked deleted");
      assert.equal(await chunks(), held, "its metadata replaced by the marker, no chunk removed");
      const refused = mesh.logs.filter((l) =>
        l.msg === "nats permission violation" && !/STREAM\.PURGE/.test(JSON.stringify(l))
      );
      assert.deepEqual(refused, [], "an upload needs nothing it was refused");
    },
  );

  await t.step(
    "the ops key publishes only the digest request a pipeline serves, and DIGEST takes no large message",
    async () => {
      // Found by probing: `nats pub digest.request.junkN` with 1 MB bodies, 66 times, filled
      // DIGEST (read by no one, kept 7 days), and the hourly digest request was refused from
      // then on ("maximum bytes exceeded").
      await as(mesh, "ops", async (nc) => {
        const js = jetstream(nc);
        await assert.rejects(js.publish("digest.request.junk1", "{}"), /permission/i);
        // Under the server's max_payload (1 MB), over the stream's own limit.
        await assert.rejects(
          js.publish("digest.request.feedback", new Uint8Array(128 * 1024)),
          /message size exceeds maximum allowed/i,
          "a 128 KiB body on the served subject",
        );
        const ack = await js.publish("digest.request.feedback", JSON.stringify({}));
        assert.equal(ack.stream, "DIGEST", "a real request is still taken");
      });
      const digest = await as(
        mesh,
        "admin",
        async (nc) => await (await jetstreamManager(nc)).streams.info("DIGEST"),
      );
      assert.ok(digest.config.max_msg_size > 0 && digest.config.max_msg_size <= 64 * 1024);
      assert.ok(
        digest.config.max_bytes / digest.config.max_msg_size >= 1024,
        "a flood needs a thousand messages or more",
      );
    },
  );

  await t.step(
    "the ops key cannot copy one stream into another through a push consumer; it watches through JetStream",
    async () => {
      // Found by probing with the nats CLI: ops subscribed to `deadletter.x.copy` (it could,
      // to watch), then made a push consumer on FEEDBACK delivering there; DEADLETTER stored
      // every delivery: forged dead letters, listed by GET /deadletters.
      const submitted = await fetch(`${mesh.gatewayUrl}/feedback`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ text: "Please add a dark mode option" }),
      });
      assert.equal(submitted.status, 202);
      const { id } = await submitted.json();
      const letters = async () =>
        await as(
          mesh,
          "admin",
          async (nc) =>
            (await (await jetstreamManager(nc)).streams.info("DEADLETTER")).state.messages,
        );
      const before = await letters();
      // The probe's order: ops subscribes where DEADLETTER captures, then makes the consumer.
      const ops = await connectClient(mesh.natsUrl, "test-ops", mesh.credentials("ops"));
      try {
        const interest = ops.subscribe("deadletter.x.copy");
        await ops.flush();
        const add = await natsCli(
          mesh,
          "ops",
          "consumer",
          "add",
          "FEEDBACK",
          "copy2",
          "--target",
          "deadletter.x.copy",
          "--deliver",
          "all",
          "--ack",
          "none",
          "--defaults",
        );
        assert.ok(add.ok, add.text);
        const copy = await as(
          mesh,
          "admin",
          async (nc) => await (await jetstreamManager(nc)).consumers.info("FEEDBACK", "copy2"),
        );
        assert.ok(!copy.push_bound, "no interest on its deliver subject");
        assert.equal(copy.delivered.consumer_seq, 0, "nothing delivered");
        assert.equal(await letters(), before, "no copy stored in DEADLETTER");
        assert.match(String(await interest.closed), /permission/i, "the subscription refused");
        for (const subject of ["feedback.>", "content.>", "_INBOX.>"]) {
          assert.ok(await subscribeRefused(ops, subject), `ops subscribing to ${subject}`);
        }
      } finally {
        await ops.close();
      }
      await as(mesh, "admin", async (nc) => {
        await (await jetstreamManager(nc)).consumers.delete("FEEDBACK", "copy2");
      });

      // Watching the documented way: `nats sub --stream`, an ordered consumer into its inbox.
      const watch = await natsCli(
        mesh,
        "ops",
        "sub",
        "--stream",
        "FEEDBACK",
        `feedback.*.${id}`,
        "--all",
        "--count",
        "1",
      );
      assert.ok(watch.ok, watch.text);
      assert.match(watch.text, new RegExp(`feedback\\.ingested\\.${id}`));
      const reply = await natsCli(mesh, "ops", "req", "weft.feedback.get", id, "--raw");
      assert.ok(reply.ok, reply.text);
      assert.match(reply.text, new RegExp(id));
    },
  );
});

Deno.test("an upload the object store has no room for is refused with 507 under the mesh's identities", async () => {
  // The store's own limit is the backstop behind intake's high-water mark: an upload larger
  // than the room left fails part way. nats.js then purges the chunks it stored, which the
  // gateway's key may not (a purge could erase every object): the refusal still says full.
  await using mesh = await startMesh({ ...ONE_PROCESS, WEFT_OBJECT_STORE_MAX_BYTES: "1048576" });
  const res = await fetch(`${mesh.gatewayUrl}/content`, {
    method: "POST",
    headers: { "content-type": "image/png" },
    body: new Uint8Array(1536 * 1024).fill(9),
  });
  const body = await res.json();
  assert.equal(res.status, 507, JSON.stringify(body));
  assert.equal(res.headers.get("content-type"), "application/problem+json");
  assert.equal(body.code, "insufficient_storage");
  assert.match(body.detail, /OBJ_weft_content_objects is full/);
  const held = await as(
    mesh,
    "admin",
    async (nc) =>
      (await (await jetstreamManager(nc)).streams.info("OBJ_weft_content_objects")).state.bytes,
  );
  assert.ok(held > 0, "the chunks stored before the refusal stay (only admin may purge)");
});

Deno.test("no identity but admin may subscribe to a subject a stream captures", async () => {
  // A subscriber's interest is what makes the server deliver a push consumer's messages onto
  // its deliver_subject, which any reader of a stream may name (the server does not check it
  // against the creator's permissions): the stream capturing that subject then stores a copy.
  const loaded = await loadPipelines(["pipelines/support/pipeline.ts"]);
  const mesh = withEdgeSites(meshServices(loaded), ["east"]);
  const captured = [
    ...streamConfigs(loadConfig({ env: () => undefined, args: [] })).flatMap((s) =>
      s.subjects ?? []
    ),
    ...loaded.flatMap((p) => pipelineSubjects(p.def).streamSubjects),
    "$KV.>",
    "$O.>",
  ];
  const found: string[] = [];
  for (const { name, permissions } of meshPermissions(mesh)) {
    if (name === "admin") continue;
    for (const s of permissions.subscribe.allow) {
      for (const c of captured) if (overlap(s, c)) found.push(`${name}: ${s} (${c})`);
    }
  }
  assert.deepEqual(found, []);
});
