import assert from "node:assert/strict";
import { hostAllowed } from "./host_check.ts";

const names = (listenHost: string, allowed: string[] = []) => {
  const ok = hostAllowed({ listenHost, allowed });
  return (host: string) => ok(new URL(`http://${host}/`));
};

Deno.test("hostAllowed() takes loopback names and addresses, whatever the port", () => {
  const ok = names("127.0.0.1");
  for (
    const h of [
      "localhost",
      "localhost:8000",
      "LOCALHOST.",
      "a.b.localhost:1",
      "127.0.0.1",
      "127.9.8.7:80",
      "[::1]:8000",
      "127.1",
    ]
  ) {
    assert.ok(ok(h), h);
  }
  for (
    const h of [
      "evil.example",
      "localhost.evil.example",
      "127.0.0.1.evil.example",
      "10.0.0.1",
      "[::2]",
      "0.0.0.0",
    ]
  ) {
    assert.ok(!ok(h), h);
  }
});

Deno.test("hostAllowed() takes the address the gateway listens on and the allow-list's entries, a port only when named", () => {
  const ok = names("192.168.1.5", ["weft.example.com", "ops.example.com:8443"]);
  assert.ok(ok("192.168.1.5:8000") && ok("weft.example.com") && ok("weft.example.com:1234"));
  assert.ok(ok("ops.example.com:8443") && !ok("ops.example.com:8000") && !ok("ops.example.com"));
  assert.ok(!ok("192.168.1.6:8000") && !ok("evil.example.com"));
  assert.ok(names("0.0.0.0")("0.0.0.0:8000"), "the wildcard address, as the supervisor prints it");
  assert.ok(names("::")("[::]:8000"));
});
