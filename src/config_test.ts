import assert from "node:assert/strict";
import {
  describeConfig,
  ENV_PERMISSION,
  envNames,
  loadConfig,
  strayArguments,
  unknownFlags,
} from "./config.ts";
import { ConfigError } from "./errors.ts";

const env = (vars: Record<string, string>) => (name: string) => vars[name];

Deno.test("loadConfig() uses defaults when nothing is set", () => {
  const c = loadConfig({ env: env({}), args: [] });
  assert.equal(c.natsUrl, "nats://127.0.0.1:4222");
  assert.equal(c.port, 8000);
  assert.equal(c.maxAttempts, 5);
});

Deno.test("loadConfig() takes env over defaults and flags over env", () => {
  const c = loadConfig({
    env: env({ PORT: "9000", WEFT_LOG_LEVEL: "debug" }),
    args: ["--port", "9100"],
  });
  assert.equal(c.port, 9100);
  assert.equal(c.logLevel, "debug");
});

Deno.test("loadConfig() reports every invalid setting at once", () => {
  assert.throws(
    () => loadConfig({ env: env({ PORT: "http", WEFT_MAX_ATTEMPTS: "0" }), args: [] }),
    (err) =>
      err instanceof ConfigError && err.message.includes("PORT") &&
      err.message.includes("WEFT_MAX_ATTEMPTS"),
  );
});

Deno.test("an invalid setting's error says what a valid value looks like, where it can", () => {
  assert.throws(
    () => loadConfig({ env: env({ WEFT_NATS_SYNC: "soon" }), args: [] }),
    (err) =>
      err instanceof ConfigError &&
      err.message.includes(
        'WEFT_NATS_SYNC: invalid value "soon" (expects always, or a duration such as 500ms',
      ),
  );
  assert.equal(loadConfig({ env: env({ WEFT_NATS_SYNC: "always" }), args: [] }).natsSync, "always");
  assert.equal(loadConfig({ env: env({}), args: [] }).natsSync, "1s", "Weft's default");
});

Deno.test("a bare flag followed by another flag is bare, not given the next flag as its value", () => {
  const config = loadConfig({
    env: () => undefined,
    args: ["--together", "--events-port", "8001"],
  });
  assert.equal(config.together, "all");
  assert.equal(config.eventsPort, 8001);
  const last = loadConfig({ env: () => undefined, args: ["--port", "9000", "--together"] });
  assert.equal(last.together, "all");
  assert.equal(last.port, 9000);
});

Deno.test("unknownFlags() names flags that are no setting's, with the likely one meant", () => {
  assert.deepEqual(unknownFlags(["--together", "--events-port", "8001", "--site=east"]), []);
  assert.deepEqual(unknownFlags(["--event-port", "8001", "--frobnicate"]), [
    "--event-port (did you mean --events-port?)",
    "--frobnicate",
  ]);
  // A program's own flags instead of the settings'.
  assert.deepEqual(unknownFlags(["--count", "3", "--analyzer", "llm"], ["count", "analyzers"]), [
    "--analyzer (did you mean --analyzers?)",
  ]);
});

Deno.test("strayArguments() names arguments that are neither a flag nor a flag's value", () => {
  assert.deepEqual(strayArguments(["--cluster", "3", "--together", "--port=9000"]), []);
  assert.deepEqual(strayArguments(["3"]), ["3"]);
  assert.deepEqual(
    strayArguments(["--port", "9000", "9001", "--together", "--cluster", "3", "x"]),
    [
      "9001",
      "x",
    ],
  );
  // A flag's value is its value, whatever it is: `--together sentiment,topics`.
  assert.deepEqual(strayArguments(["--together", "sentiment,topics"]), []);
});

Deno.test("describeConfig() masks credentials in the NATS URL", () => {
  const c = loadConfig({ env: env({ NATS_URL: "nats://user:secret@127.0.0.1:4222" }), args: [] });
  assert.equal(describeConfig(c).natsUrl, "nats://***@127.0.0.1:4222");
  assert.equal(JSON.stringify(describeConfig(c)).includes("secret"), false);
});

Deno.test("every deno.json task that runs a service allows the env names Weft reads and no others", async () => {
  const deno = JSON.parse(await Deno.readTextFile(new URL("../deno.json", import.meta.url)));
  assert.equal(ENV_PERMISSION, "NATS_URL,PORT,WEFT_*");
  assert.ok(
    envNames().every((n) =>
      ENV_PERMISSION.split(",").some((p) =>
        p === n || (p.endsWith("*") && n.startsWith(p.slice(0, -1)))
      )
    ),
  );
  for (const [name, task] of Object.entries<{ command: string }>(deno.tasks)) {
    const m = task.command.match(/--allow-env=(\S+)/);
    if (m && !task.command.includes("deno test") && !task.command.includes("bench/")) {
      // The supervisor also reads OTEL_DENO, to name each service's telemetry.
      const expected: string = name === "start" ? `${ENV_PERMISSION},OTEL_DENO` : ENV_PERMISSION;
      assert.equal(m[1], expected, `task ${name}`);
    }
  }
});

Deno.test("a pipeline's settings register with the configuration, under WEFT_ only", async (t) => {
  const { registerSettings, settingParsers } = await import("./config.ts");
  await t.step("read and validated like the runtime's", () => {
    registerSettings([{
      key: "port" as never,
      env: "WEFT_ORDERS_PORT_TWIN",
      default: 1 as never,
      parse: settingParsers.int(1) as never,
    }]);
    // A key registered twice keeps the first: the runtime's `port` is still read from PORT.
    assert.equal(loadConfig({ env: (n) => ({ PORT: "9000" })[n], args: [] }).port, 9000);
    assert.ok(!envNames().includes("WEFT_ORDERS_PORT_TWIN"));
  });
  await t.step("an env name outside WEFT_ is refused (services may read only WEFT_*)", () => {
    assert.throws(
      () =>
        registerSettings([{
          key: "ordersTimeout" as never,
          env: "ORDERS_TIMEOUT",
          default: 1 as never,
          parse: settingParsers.int(1) as never,
        }]),
      /ORDERS_TIMEOUT must start with WEFT_/,
    );
  });
});

Deno.test("an invalid WEFT_SHADOW is refused naming its bad field, as the HTTP attach does", () => {
  const refused = (raw: string) => {
    try {
      loadConfig({ env: (n) => (n === "WEFT_SHADOW" ? raw : undefined), args: [] });
    } catch (err) {
      assert.ok(err instanceof ConfigError, String(err));
      return err.message;
    }
    assert.fail(`${raw} was taken`);
  };
  assert.match(
    refused('{"id":"a","step":"ingest","candidate":{"analyzers":"rules"}}'),
    /WEFT_SHADOW: \/step: step must be one of /,
  );
  assert.match(
    refused(
      '[{"id":"a","step":"sentiment","candidate":{"analyzers":"rules"},"limits":{"rps":0}}]',
    ),
    /WEFT_SHADOW: \/0\/limits\/rps: /,
  );
  assert.match(refused("{not json"), /WEFT_SHADOW: not JSON: /);
});

Deno.test("an invalid edge or cluster setting says what is wrong with it, and not that its partner is missing", () => {
  const refusal = (vars: Record<string, string>) => {
    try {
      loadConfig({ env: env(vars), args: [] });
    } catch (err) {
      assert.ok(err instanceof ConfigError);
      return err.message;
    }
    assert.fail(`${JSON.stringify(vars)} was accepted`);
  };
  // Both set: the scheme is what is wrong, and a valid value is shown.
  const scheme = refusal({ WEFT_LEAF: "http://127.0.0.1:14620", WEFT_SITE: "east" });
  assert.match(
    scheme,
    /WEFT_LEAF: invalid value "http:\/\/127\.0\.0\.1:14620" \(expects .*nats-leaf:\/\/host:port/,
  );
  assert.doesNotMatch(scheme, /go together/);
  const site = refusal({ WEFT_LEAF: "nats-leaf://127.0.0.1:14620", WEFT_SITE: "Bad" });
  assert.match(site, /WEFT_SITE: invalid value "Bad" \(expects a site name: lower-case letters/);
  assert.doesNotMatch(site, /go together/);
  // A partner really missing is still said.
  assert.match(
    refusal({ WEFT_SITE: "east" }),
    /--leaf \(WEFT_LEAF\) and --site \(WEFT_SITE\) go together/,
  );
  assert.match(refusal({ WEFT_HUB: "hub" }), /WEFT_HUB: invalid value "hub": "hub" is reserved/);
  assert.match(refusal({ WEFT_HUB: "east,hub" }), /"hub" is reserved/);
  assert.match(
    refusal({ WEFT_CLUSTER: "6" }),
    /WEFT_CLUSTER: invalid value "6" \(expects .*from 1 to 5\)/,
  );
  // Every integer setting says its range.
  assert.match(
    refusal({ PORT: "http" }),
    /PORT: invalid value "http" \(expects an integer from 0 to 65535\)/,
  );
  assert.match(
    refusal({ WEFT_DRAIN_MS: "-1" }),
    /WEFT_DRAIN_MS: invalid value "-1" \(expects an integer, at least 0\)/,
  );
  // An invalid hub beside a leaf is its own problem, not a crash.
  assert.match(
    refusal({ WEFT_LEAF: "nats-leaf://h:1", WEFT_SITE: "s", WEFT_HUB: "Bad" }),
    /WEFT_HUB: invalid value "Bad" \(expects site names/,
  );
});

Deno.test("a duplicate window longer than streams keep messages is refused naming both settings, not left to fail the start", () => {
  // Found by probing: WEFT_RETENTION_MS=60000 (its documented minimum) was taken, and
  // deno task start then stopped with nats-server's "duplicates window can not be larger
  // then max age", naming neither setting (the window defaults to 120000).
  assert.throws(
    () => loadConfig({ env: env({ WEFT_RETENTION_MS: "60000" }), args: [] }),
    (err) =>
      err instanceof ConfigError &&
      err.message.includes("WEFT_DUPLICATE_WINDOW_MS 120000 is longer than streams keep") &&
      err.message.includes("WEFT_RETENTION_MS 60000") &&
      err.message.includes("lower it to 60000 or less"),
  );
  assert.throws(
    () => loadConfig({ env: env({ WEFT_DUPLICATE_WINDOW_MS: String(25 * 3600_000) }), args: [] }),
    (err) => err instanceof ConfigError && err.message.includes("a day at most"),
  );
  const c = loadConfig({
    env: env({ WEFT_RETENTION_MS: "60000", WEFT_DUPLICATE_WINDOW_MS: "30000" }),
    args: [],
  });
  assert.equal(c.retentionMs, 60_000);
  assert.equal(c.duplicateWindowMs, 30_000);
  // A retention refused on its own is said once, as itself.
  assert.throws(
    () => loadConfig({ env: env({ WEFT_RETENTION_MS: "5" }), args: [] }),
    (err) => err instanceof ConfigError && !err.message.includes("WEFT_DUPLICATE_WINDOW_MS"),
  );
});

Deno.test("loadConfig() takes WEFT_ALLOWED_HOSTS as host or host:port entries, normalised, and refuses anything else naming it", () => {
  const load = (v: string) =>
    loadConfig({ env: (k) => (k === "WEFT_ALLOWED_HOSTS" ? v : undefined), args: [] });
  assert.deepEqual(load(" Weft.Example.com, 192.168.1.20:8000 ,[::1]:9000").allowedHosts, [
    "weft.example.com",
    "192.168.1.20:8000",
    "[::1]:9000",
  ]);
  assert.deepEqual(load("").allowedHosts, []);
  for (
    const bad of [
      "http://weft.test",
      "weft.test/x",
      "*.weft.test",
      "weft.test:0",
      "user@weft.test",
      ",",
      "::1",
    ]
  ) {
    assert.throws(
      () => load(bad),
      (err: unknown) =>
        err instanceof ConfigError && /WEFT_ALLOWED_HOSTS: invalid value/.test(err.message),
      bad,
    );
  }
});
