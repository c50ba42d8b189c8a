/**
 * `deno task bench`'s command line: `--help` prints the flags and exits 0; an unknown flag,
 * a stray argument or a bad value is one line naming it, exit 2, and starts nothing.
 */
import assert from "node:assert/strict";
import { quiet, taskArgs } from "../tests/helpers/mesh.ts";

async function bench(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command("deno", {
    // --quiet: on a cold Deno cache, Deno's own "Download ..." lines go to stderr; the
    // program's stderr is what is checked.
    args: [...quiet(await taskArgs("bench")), ...args],
    cwd: new URL("../", import.meta.url),
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = (b: Uint8Array) => new TextDecoder().decode(b);
  return { code: out.code, stdout: text(out.stdout), stderr: text(out.stderr) };
}

Deno.test("deno task bench --help prints its flags and ports and exits 0", async () => {
  for (const args of [["--help"], ["-h"], ["--quick", "--help"]]) {
    const r = await bench(args);
    assert.equal(r.code, 0, `${args.join(" ")}: ${r.stderr}${r.stdout}`);
    for (const flag of ["--items", "--rate", "--quick", "--only", "--json", "--sync", "--prof"]) {
      assert.ok(r.stdout.includes(flag), `${args.join(" ")}: ${flag}`);
    }
    assert.match(r.stdout, /20000-32000/);
    assert.equal(r.stderr, "");
  }
});

Deno.test("deno task bench refuses an unknown flag or a bad value in one line, exit 2", async () => {
  const cases: [string[], RegExp][] = [
    [["--frobnicate"], /^bench: unknown flag: --frobnicate; `deno task bench --help`/],
    [["--ratee", "300"], /unknown flag: --ratee \(did you mean --rate\?\)/],
    [["-x"], /unknown flag: -x;/],
    [["--quick", "3"], /unexpected argument: 3;/],
    [["--only", "nope"], /--only takes a list of bare, weft/],
    [["--rate"], /^bench: Option '--rate <value>' argument missing; `deno task bench --help`/],
    [["--quick=yes"], /^bench: Option '--quick' does not take an argument;/],
    [["--items=0.5"], /^bench: --items must be a positive whole number/],
    [["--rounds", "2.5"], /^bench: --rounds must be a positive whole number/],
  ];
  for (const [args, message] of cases) {
    const r = await bench(args);
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    assert.match(r.stderr, message, args.join(" "));
    assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
    assert.equal(r.stdout, "");
  }
});
