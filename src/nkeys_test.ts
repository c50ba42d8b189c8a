import assert from "node:assert/strict";
import { nkeys } from "@nats-io/nats-core";
import { userAuthenticator, userKey } from "./nkeys.ts";

Deno.test("userKey() gives the public key and signatures nkeys.js gives for the same seed", () => {
  for (let i = 0; i < 5; i++) {
    const pair = nkeys.createUser();
    const key = userKey(pair.getSeed());
    assert.equal(key.publicKey, pair.getPublicKey());
    const data = crypto.getRandomValues(new Uint8Array(11 + i));
    assert.deepEqual(key.sign(data), pair.sign(data));
    assert.ok(nkeys.fromPublic(key.publicKey).verify(data, key.sign(data)));
  }
});

Deno.test("userAuthenticator() answers a nonce as nats.js's nkeyAuthenticator() does", async () => {
  const { nkeyAuthenticator } = await import("@nats-io/nats-core");
  const seed = nkeys.createUser().getSeed();
  for (const nonce of ["FDbLzKCXqbl1Ipq", undefined]) {
    assert.deepEqual(userAuthenticator(seed)(nonce), nkeyAuthenticator(seed)(nonce));
  }
});

Deno.test("userKey() refuses a seed that is not a user's", () => {
  assert.throws(() => userKey(nkeys.createAccount().getSeed()), /not a user's/);
  assert.throws(() => userKey(new TextEncoder().encode("SUnotaseed")));
});
