/**
 * What a key holder can do to the bus beyond its role, probed with the mesh's own identities
 * against the authenticated nats-server `deno task start` runs: each step is a hole found by
 * probing with the real nats CLI, and shows it closed while the role's work still runs.
 */
import assert from "node:assert/strict";
import { jetstreamManager } from "@nats-io/jetstream";
import { Objm } from "@nats-io/obj";
import type { NatsConnection } from "@nats-io/nats-core";
import { type Mesh, ONE_PROCESS, startMesh } from "./helpers/mesh.ts";
import { connectClient } from "./helpers/nats.ts";

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
