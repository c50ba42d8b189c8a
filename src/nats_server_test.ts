import assert from "node:assert/strict";
import {
  MIN_SERVER_VERSION,
  parseServerVersion,
  tooOldMessage,
  versionAtLeast,
} from "./nats_server.ts";

Deno.test("versionAtLeast() compares nats-server versions numerically against the minimum", () => {
  assert.equal(versionAtLeast("2.9.10"), true);
  assert.equal(versionAtLeast("v2.15.3"), true);
  assert.equal(versionAtLeast("2.10.0", "2.9.22"), true, "10 > 9, not as text");
  assert.equal(versionAtLeast("2.8.4"), false);
  assert.equal(versionAtLeast("nonsense"), false);
  assert.deepEqual(parseServerVersion("nats-server: v2.15.3"), [2, 15, 3]);
  assert.equal(MIN_SERVER_VERSION, "2.9.0");
});

Deno.test("tooOldMessage() says what is installed, what is needed and how to get it", () => {
  const m = tooOldMessage("2.8.4");
  assert.match(m, /2\.8\.4 is older than 2\.9\.0/);
  assert.match(m, /go install github\.com\/nats-io\/nats-server\/v2@v2\.15\.3/);
});
