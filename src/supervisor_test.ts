import assert from "node:assert/strict";
import { loadConfig } from "./config.ts";
import {
  eventsGateway,
  meshPermissions,
  OPERATOR_IDENTITIES,
  processArgs,
  processGroups,
  serviceArgs,
  SERVICES,
} from "./supervisor.ts";

const config = (env: Record<string, string> = {}) =>
  loadConfig({ env: (name) => env[name], args: [] });
const spec = (name: string) => SERVICES.find((s) => s.name === name)!;
const v8 = (args: string[]) => args.find((a) => a.startsWith("--v8-flags="));

Deno.test("services on an item's path run with V8's defaults, background ones optimised for size", () => {
  for (const name of ["gateway", "ingest", "sentiment", "state", "moderation"]) {
    assert.equal(v8(serviceArgs(spec(name), config())), undefined, name);
  }
  for (const name of ["scheduler", "digest", "shadow"]) {
    assert.equal(v8(serviceArgs(spec(name), config())), "--v8-flags=--optimize-for-size", name);
  }
  // Together with a service on the path, the process keeps V8's defaults.
  const together = processArgs([spec("scheduler"), spec("ingest")], config(), ["x.ts"], []);
  assert.equal(v8(together), undefined);
});

Deno.test("WEFT_V8_FLAGS reaches every service process, before the entry module", () => {
  const c = config({ WEFT_V8_FLAGS: "--max-semi-space-size=2" });
  const ingest = serviceArgs(spec("ingest"), c);
  assert.equal(v8(ingest), "--v8-flags=--max-semi-space-size=2");
  assert.ok(ingest.indexOf(v8(ingest)!) < ingest.indexOf(spec("ingest").entry));
  assert.equal(
    v8(serviceArgs(spec("digest"), c)),
    "--v8-flags=--max-semi-space-size=2,--optimize-for-size",
  );
  assert.throws(() => config({ WEFT_V8_FLAGS: "--x; rm -rf /" }), /WEFT_V8_FLAGS/);
});

Deno.test("WEFT_EVENTS_PORT: a second gateway, alone in its process, may listen on its own port only", () => {
  const c = config({ PORT: "8000", WEFT_EVENTS_PORT: "8001" });
  const events = eventsGateway(SERVICES, c.eventsPort);
  const allowNet = (args: string[]) => args.find((a) => a.startsWith("--allow-net="))!;
  assert.match(allowNet(serviceArgs(events, c)), /127\.0\.0\.1:8001/);
  assert.doesNotMatch(allowNet(serviceArgs(events, c)), /:8000\b/);
  assert.match(allowNet(serviceArgs(spec("gateway"), c)), /127\.0\.0\.1:8000/);
  // Even under --together (all): never in the process that takes ingest.
  const groups = processGroups("all", [...SERVICES, events]);
  assert.ok(groups[0]!.includes(spec("gateway")));
  assert.ok(!groups[0]!.includes(events));
  assert.ok(groups.some((g) => g.length === 1 && g[0] === events));
  // One NATS identity for the gateway, however many processes run it.
  const mesh = { services: [...SERVICES, events], operators: OPERATOR_IDENTITIES };
  assert.equal(meshPermissions(mesh).filter((p) => p.name === "gateway").length, 1);
});
