/**
 * `deno task shadow`'s command line: `--help`, and what it refuses (an unknown flag or
 * command runs nothing). Each run points at a port no server listens on, so one that went on
 * to replay anyway fails to connect instead of reading another test's server.
 */
import assert from "node:assert/strict";
import { taskArgs } from "./helpers/mesh.ts";

/** A loopback port nothing listens on (taken, then let go). */
function closedPort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

async function shadow(
  args: string[],
): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command("deno", {
    args: [...await taskArgs("shadow"), ...args],
    cwd: new URL("../", import.meta.url),
    env: { NATS_URL: `nats://127.0.0.1:${closedPort()}` },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = (b: Uint8Array) => new TextDecoder().decode(b);
  return { code: out.code, stdout: text(out.stdout), stderr: text(out.stderr) };
}

Deno.test("deno task shadow --help prints the commands and flags and exits 0", async () => {
  for (const args of [["--help"], ["-h"], ["help"], ["attach", "--help"]]) {
    const r = await shadow(args);
    assert.equal(r.code, 0, `${args.join(" ")}: ${r.stderr}${r.stdout}`);
    for (const word of ["attach", "list", "promote", "detach", "reset", "report"]) {
      assert.match(r.stdout, new RegExp(`deno task shadow ${word}`), args.join(" "));
    }
    for (const flag of ["--analyzers", "--count", "--since", "--definition", "--out"]) {
      assert.ok(r.stdout.includes(flag), `${args.join(" ")}: ${flag}`);
    }
    assert.equal(r.stderr, "");
  }
});

Deno.test("deno task shadow refuses an unknown flag or command in one line, exit 2, naming it", async () => {
  const cases: [string[], RegExp][] = [
    [["--bogus"], /unknown flag: --bogus;/],
    [
      ["--analyzer", "llm", "--count", "20"],
      /unknown flag: --analyzer \(did you mean --analyzers\?\)/,
    ],
    [["--cout", "3"], /unknown flag: --cout \(did you mean --count\?\)/],
    [["frobnicate"], /unknown command: frobnicate/],
    [["--count", "3", "extra"], /unexpected argument: extra/],
    [["report", "calm", "--outt", "x"], /unknown flag: --outt \(did you mean --out\?\)/],
    [
      ["attach", "--id", "a", "--stpe", "sentiment"],
      /unknown flag: --stpe \(did you mean --step\?\)/,
    ],
  ];
  for (const [args, message] of cases) {
    const r = await shadow(args);
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}${r.stdout}`);
    assert.equal(r.stdout, "", args.join(" "));
    const lines = r.stderr.trimEnd().split("\n");
    assert.equal(lines.length, 1, r.stderr);
    assert.match(lines[0]!, /^shadow: /);
    assert.match(lines[0]!, message);
    assert.match(lines[0]!, /deno task shadow --help/);
  }
});
