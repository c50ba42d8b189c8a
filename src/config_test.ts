import assert from "node:assert/strict";
import { describeConfig, ENV_NAMES, loadConfig } from "./config.ts";
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

Deno.test("describeConfig() masks credentials in the NATS URL", () => {
  const c = loadConfig({ env: env({ NATS_URL: "nats://user:secret@127.0.0.1:4222" }), args: [] });
  assert.equal(describeConfig(c).natsUrl, "nats://***@127.0.0.1:4222");
  assert.equal(JSON.stringify(describeConfig(c)).includes("secret"), false);
});

Deno.test("every deno.json task that runs Weft code allows exactly the env names Weft reads", async () => {
  const deno = JSON.parse(await Deno.readTextFile(new URL("../deno.json", import.meta.url)));
  for (const [name, task] of Object.entries<{ command: string }>(deno.tasks)) {
    const m = task.command.match(/--allow-env=(\S+)/);
    if (!m) continue;
    assert.deepEqual(m[1]!.split(","), [...ENV_NAMES], `task ${name}`);
  }
});
