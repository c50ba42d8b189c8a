/**
 * NATS nkeys (Ed25519 user keys) with the curve done by Deno's native Ed25519
 * (`node:crypto`), nkeys.js's codec for the text forms. nkeys.js does the curve in
 * JavaScript (tweetnacl): measured here on a cold start, 27 ms a signature and 10 ms a public
 * key, so a supervisor deriving twenty identities' public keys spent 0.2-0.4 s of CPU on it at
 * every start, and every service connection one signature; native, each takes 0.04-0.4 ms.
 * The seeds, public keys and signatures are the same bytes nkeys.js makes (tested).
 *
 * @module
 */
import { createPrivateKey, createPublicKey, type KeyObject, sign } from "node:crypto";
import { Buffer } from "node:buffer";
import { type Auth, nkeys } from "@nats-io/nats-core";
// The codec (base32 with its role prefix and CRC-16) is not re-exported by nats-core.
import { Codec } from "@nats-io/nkeys/lib/codec.js";

/** An Ed25519 private key's PKCS #8 (DER) wrapping, before its 32-byte seed (RFC 8410). */
const PKCS8_ED25519 = Buffer.from("302e020100300506032b657004220420", "hex");

/** A user nkey from its seed: its public key (`U...`) and a signer. */
export interface UserKey {
  /** The public user nkey (`U...`), as nats-server's configuration names it. */
  readonly publicKey: string;
  /** Ed25519 signature of `data` (64 bytes). */
  sign(data: Uint8Array): Uint8Array;
}

/**
 * The user key of an nkey seed (`SU...`, as in a `.nk` file). Refuses a seed that is not a
 * user's, as nats-server would refuse its connection.
 *
 * @example
 * ```ts
 * import { nkeys } from "@nats-io/nats-core";
 * import { userKey } from "./nkeys.ts";
 * const seed = nkeys.createUser().getSeed();
 * console.assert(userKey(seed).publicKey.startsWith("U"));
 * ```
 */
export function userKey(seed: Uint8Array): UserKey {
  const { prefix, buf } = Codec.decodeSeed(seed);
  if (prefix !== nkeys.Prefix.User) throw new Error("an nkey seed that is not a user's (SU...)");
  const der = new Uint8Array(PKCS8_ED25519.length + buf.length);
  der.set(PKCS8_ED25519);
  der.set(buf, PKCS8_ED25519.length);
  const key: KeyObject = createPrivateKey({ key: Buffer.from(der), format: "der", type: "pkcs8" });
  const spki = createPublicKey(key).export({ format: "der", type: "spki" });
  // The raw public key is the SubjectPublicKeyInfo's last 32 bytes.
  const raw = new Uint8Array(spki.buffer, spki.byteOffset + spki.length - 32, 32);
  const publicKey = new TextDecoder().decode(Codec.encode(nkeys.Prefix.User, raw));
  return {
    publicKey,
    sign: (data) => new Uint8Array(sign(null, data, key)),
  };
}

/**
 * A nats.js authenticator for `seed`, what `nkeyAuthenticator(seed)` answers (the public key,
 * the server's nonce signed), natively: the key is decoded once, not at each connect.
 *
 * @example
 * ```ts ignore
 * import { connect } from "@nats-io/transport-deno";
 * const nc = await connect({ authenticator: userAuthenticator(seed) });
 * ```
 */
export function userAuthenticator(seed: Uint8Array): (nonce?: string) => Auth {
  const key = userKey(seed);
  return (nonce) => ({
    nkey: key.publicKey,
    sig: nonce ? nkeys.encode(key.sign(new TextEncoder().encode(nonce))) : "",
  });
}
