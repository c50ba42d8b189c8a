/**
 * Starting and stopping a real nats-server: the supervisor uses it for `deno task start`,
 * tests and benchmarks for a private server on free ports with a temporary store.
 *
 * @module
 */

/** How to start the server. */
export interface NatsServerOptions {
  /** A configuration file (`-c`); command-line options below override it. */
  configFile?: string;
  /** Client port; a free one when omitted and no configFile is given. */
  port?: number;
  /** HTTP monitoring port. */
  monitorPort?: number;
  /** JetStream store directory; a new temporary one when omitted and no configFile. */
  storeDir?: string;
  /** Binary name or path; `nats-server` on the PATH by default. */
  binary?: string;
  /** Working directory of the server (relative store dirs resolve against it). */
  cwd?: string;
  /** Receives each line the server logs. */
  onLog?: (line: string) => void;
  /** Run in its own session, so a terminal's Ctrl-C reaches only its parent. */
  detached?: boolean;
  /** nats-server writes its pid here (`-P`), relative to `cwd`; see {@link stopLeftover}. */
  pidFile?: string;
  /** Further command-line options (e.g. a cluster node's name, cluster port and routes). */
  extraArgs?: readonly string[];
}

/** A running nats-server. */
export interface NatsServer extends AsyncDisposable {
  /** Client URL, `nats://127.0.0.1:<port>`. */
  readonly url: string;
  /** Client port the server listens on. */
  readonly port: number;
  /** HTTP monitoring port, when one was given. */
  readonly monitorPort?: number;
  /** JetStream store directory; one it created itself is removed on dispose. */
  readonly storeDir?: string;
  /** Process id of the running server. */
  readonly pid: number;
  /** Sends a signal and waits for the process to end. */
  stop(signal?: Deno.Signal): Promise<void>;
  /** Starts it again with the same ports and store (after a stop or kill). */
  restart(): Promise<void>;
  /** Resolves when the process exits. */
  readonly exited: Promise<Deno.CommandStatus>;
}

/** Thrown when nats-server is not installed. */
export class NatsServerMissingError extends Error {
  /** The error for a missing `binary`, with install hints. */
  constructor(binary: string, options?: ErrorOptions) {
    super(
      `${binary} was not found on the PATH. Install it (Debian/Ubuntu: apt-get install ` +
        `nats-server; macOS: brew install nats-server; or a release from ` +
        `https://github.com/nats-io/nats-server/releases), or set NATS_URL to use a running server.`,
      options,
    );
    this.name = "NatsServerMissingError";
  }
}

/**
 * Thrown when nats-server exits before it is ready for clients: `reason` is what it said
 * of why (its `[FTL]` lines, else its last line), `output` its last output.
 */
export class NatsServerExitedError extends Error {
  /** nats-server's own reason, one line. */
  readonly reason: string;
  /** The error for a server that printed `output` and exited. */
  constructor(readonly output: string) {
    super(`nats-server exited before it was ready: ${output || "(no output)"}`);
    this.name = "NatsServerExitedError";
    this.reason = fatalReason(output);
  }
}

/**
 * Why a nats-server that printed `output` stopped, in one line: its `[FTL]` lines (without
 * their pid and time), else its last non-empty line (a configuration error is printed
 * without a level).
 *
 * @example
 * ```ts
 * import { fatalReason } from "./nats_server.ts";
 * const out = "[7] 2026/01/01 10:00:00.000000 [INF] Starting JetStream\n" +
 *   "[7] 2026/01/01 10:00:00.000001 [FTL] Can't start JetStream: storage directory is not a directory";
 * console.assert(fatalReason(out) === "Can't start JetStream: storage directory is not a directory");
 * ```
 */
export function fatalReason(output: string): string {
  const lines = output.split("\n").map((l) => l.trim()).filter(Boolean);
  const fatal = lines.flatMap((l) => {
    const m = /\[FTL\]\s*(.*)$/.exec(l);
    return m ? [m[1]!] : [];
  });
  return (fatal.length > 0 ? fatal.join("; ") : lines.at(-1) ?? "(no output)");
}

/** True when nothing listens on loopback `port` right now. */
export function portFree(port: number): boolean {
  try {
    Deno.listen({ hostname: "127.0.0.1", port }).close();
    return true;
  } catch (err) {
    if (err instanceof Deno.errors.AddrInUse) return false;
    throw err;
  }
}

/**
 * Stops a nats-server that an earlier start left running (its supervisor was killed) when
 * it still holds `port`: asks it to shut down cleanly through its own pid file
 * (`nats-server --signal term=<pidFile>`, so no process is signalled blindly), then waits
 * up to `waitMs` for the port to be free. Resolves true when the port is free.
 */
export async function stopLeftover(opts: {
  port: number;
  pidFile: string;
  cwd?: string;
  binary?: string;
  waitMs?: number;
}): Promise<boolean> {
  if (portFree(opts.port)) return true;
  try {
    await new Deno.Command(opts.binary ?? "nats-server", {
      args: ["--signal", `term=${opts.pidFile}`],
      cwd: opts.cwd,
      stdin: "null",
      stdout: "null",
      stderr: "null",
    }).output();
  } catch { /* no such binary, no pid file: the port check below says what remains */ }
  const until = Date.now() + (opts.waitMs ?? 15_000);
  while (Date.now() < until) {
    if (portFree(opts.port)) return true;
    await new Promise((r) => setTimeout(r, 100));
  }
  return false;
}

/**
 * The oldest nats-server Weft supports: 2.9 brought what Weft relies on (KV and object
 * stores, direct and next-by-subject message gets, ordered consumers on the consumer
 * create API, expected-last-subject-sequence publishes). Tested with 2.9.10 (Debian 12) and
 * {@link RECOMMENDED_SERVER_VERSION} (the version `.ci/run` installs with `go install`).
 */
export const MIN_SERVER_VERSION = "2.9.0";

/**
 * The nats-server release Weft is tested with and recommends: what `.ci/run` installs with
 * `go install` (it reads this line) and what a too-old server's message tells users to
 * install. Pinned here and nowhere else.
 */
export const RECOMMENDED_SERVER_VERSION = "2.15.3";

/**
 * Parses `nats-server --version` output (or a bare version) into numbers; null when it
 * names no version.
 *
 * @example
 * ```ts
 * import { parseServerVersion } from "./nats_server.ts";
 * console.assert(parseServerVersion("nats-server: v2.15.3")?.join(".") === "2.15.3");
 * ```
 */
export function parseServerVersion(text: string): [number, number, number] | null {
  const m = /v?(\d+)\.(\d+)\.(\d+)/.exec(text);
  return m ? [Number(m[1]), Number(m[2]), Number(m[3])] : null;
}

/** True when version `v` is at least `min` (both as `x.y.z`, with or without a leading v). */
export function versionAtLeast(v: string, min: string = MIN_SERVER_VERSION): boolean {
  const a = parseServerVersion(v);
  const b = parseServerVersion(min);
  if (!a || !b) return false;
  for (let i = 0; i < 3; i++) if (a[i] !== b[i]) return a[i]! > b[i]!;
  return true;
}

/** What `binary --version` prints, or null when it cannot be run. */
export async function serverVersion(binary = "nats-server"): Promise<string | null> {
  try {
    const out = await new Deno.Command(binary, { args: ["--version"], stdin: "null" }).output();
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    const v = parseServerVersion(text);
    return v ? v.join(".") : null;
  } catch {
    return null;
  }
}

/**
 * What to tell a user whose nats-server is `version`, older than `min` (by default
 * {@link MIN_SERVER_VERSION}); `needs` says what needs `min` when it is not Weft as a whole.
 */
export function tooOldMessage(
  version: string,
  min: string = MIN_SERVER_VERSION,
  needs = "the oldest Weft supports",
): string {
  return `nats-server ${version} is older than ${min}, ${needs}. ` +
    `Install a current release: \`go install ` +
    `github.com/nats-io/nats-server/v2@v${RECOMMENDED_SERVER_VERSION}\` ` +
    `(then put $(go env GOPATH)/bin first on the PATH), \`brew install nats-server\`, or a ` +
    `release binary from https://github.com/nats-io/nats-server/releases; or set NATS_URL to ` +
    `a newer server.`;
}

/**
 * The first nats-server release that takes `sync_interval` in its JetStream block (2.9
 * refuses the field): how often the file store is fsynced, or `always` for every write.
 */
export const SYNC_INTERVAL_SERVER = "2.10.0";

/**
 * A `sync_interval` value nats-server takes: `always`, or a Go duration of whole units
 * (`500ms`, `1s`, `2m`, `1h`). Undefined when `raw` is neither.
 *
 * @example
 * ```ts
 * import { parseSyncInterval } from "./nats_server.ts";
 * console.assert(parseSyncInterval("1s") === "1s");
 * console.assert(parseSyncInterval("soon") === undefined);
 * ```
 */
export function parseSyncInterval(raw: string): string | undefined {
  const v = raw.trim();
  return v === "always" || /^[1-9]\d*(ms|s|m|h)$/.test(v) ? v : undefined;
}

/** A line that sets `sync_interval` (not a comment that mentions it). */
const SETS_SYNC = /^(\s*)sync_interval\s*[:=]?\s*\S+[ \t]*$/m;

/**
 * The `sync_interval` a server configuration sets itself, or undefined.
 *
 * @example
 * ```ts
 * import { syncIntervalOf } from "./nats_server.ts";
 * console.assert(syncIntervalOf("jetstream {\n  sync_interval: 10s\n}") === "10s");
 * ```
 */
export function syncIntervalOf(conf: string): string | undefined {
  return SETS_SYNC.exec(conf)?.[0].split(/[:=\s]+/).filter(Boolean)[1];
}

/**
 * The server configuration `conf` with `sync_interval: interval` in its JetStream block:
 * a `sync_interval` already there is replaced, a block without one gains it, and a
 * configuration with no JetStream block gets one.
 *
 * @example
 * ```ts
 * import { withSyncInterval } from "./nats_server.ts";
 * const conf = withSyncInterval('jetstream {\n  store_dir: "./data"\n}\n', "always");
 * console.assert(conf.includes("sync_interval: always"));
 * ```
 */
export function withSyncInterval(conf: string, interval: string): string {
  const line = `sync_interval: ${interval}`;
  if (SETS_SYNC.test(conf)) {
    return conf.replace(SETS_SYNC, (_, indent: string) => `${indent}${line}`);
  }
  if (/^\s*jetstream\s*[:=]?\s*\{/m.test(conf)) {
    return conf.replace(/^(\s*jetstream\s*[:=]?\s*\{)/m, `$1\n  ${line}`);
  }
  return `${conf.replace(/\n?$/, "\n")}jetstream {\n  ${line}\n}\n`;
}

/** Ports {@link freePort} handed out in this process: never the same one twice. */
const handedOut = new Set<number>();

/**
 * A TCP port free on loopback right now, picked at random below the kernel's ephemeral
 * range (32768 and up on Linux by default). A port the kernel picks itself (port 0) lies in
 * that range, where any outgoing connection of any process may take it before the caller
 * binds it: under a loaded test run a nats-server then failed with "address already in use".
 */
export function freePort(): number {
  for (let attempt = 0; attempt < 200; attempt++) {
    const port = 20_000 + Math.floor(Math.random() * 12_000);
    if (handedOut.has(port) || !portFree(port)) continue;
    handedOut.add(port);
    return port;
  }
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = l.addr as Deno.NetAddr;
  l.close();
  return port;
}

/**
 * Starts nats-server with JetStream and resolves once it is ready for clients.
 *
 * @example
 * ```ts ignore
 * await using server = await startNatsServer();
 * const nc = await connect({ servers: server.url });
 * ```
 */
export async function startNatsServer(opts: NatsServerOptions = {}): Promise<NatsServer> {
  const binary = opts.binary ?? "nats-server";
  let port = opts.port ?? (opts.configFile ? undefined : freePort());
  const storeDir = opts.storeDir ??
    (opts.configFile ? undefined : await Deno.makeTempDir({ prefix: "weft-nats-" }));
  const ownsStore = opts.storeDir === undefined && storeDir !== undefined;
  const args = ["-js"];
  if (opts.configFile) args.push("-c", opts.configFile);
  if (port !== undefined) args.push("-a", "127.0.0.1", "-p", String(port));
  if (opts.monitorPort !== undefined) args.push("-m", String(opts.monitorPort));
  if (storeDir !== undefined) args.push("-sd", storeDir);
  if (opts.pidFile !== undefined) args.push("-P", opts.pidFile);
  args.push(...opts.extraArgs ?? []);

  let child: Deno.ChildProcess;
  let exited!: Promise<Deno.CommandStatus>;
  let actualPort = port ?? 4222;

  const spawn = async () => {
    try {
      child = new Deno.Command(binary, {
        args,
        cwd: opts.cwd,
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
        detached: opts.detached ?? false,
      }).spawn();
    } catch (err) {
      if (err instanceof Deno.errors.NotFound) {
        throw new NatsServerMissingError(binary, { cause: err });
      }
      throw err;
    }
    exited = child.status;
    // Configuration errors are printed on stdout; the log goes to stderr.
    let stdout = "";
    (async () => {
      for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
        stdout = (stdout + chunk).slice(-4000);
      }
    })().catch(() => {});
    const lines = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    /** The log's last lines: why it stopped, when it stops before it is ready. */
    const tail: string[] = [];
    const ready = (async () => {
      while (true) {
        const { value, done } = await lines.read();
        if (done) {
          await exited;
          const why = [stdout, ...tail, buffer].join("\n").trim().slice(-2000);
          throw new NatsServerExitedError(why);
        }
        buffer += value;
        let nl: number;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, nl);
          buffer = buffer.slice(nl + 1);
          tail.push(line);
          if (tail.length > 5) tail.shift();
          opts.onLog?.(line);
          const m = line.match(/Listening for client connections on [^\s]*:(\d+)/);
          if (m) actualPort = Number(m[1]);
          if (line.includes("Server is ready")) return;
        }
      }
    })();
    await ready;
    // Keep draining the log so the server never blocks on a full pipe.
    (async () => {
      while (true) {
        const { value, done } = await lines.read();
        if (done) return;
        if (opts.onLog) value.split("\n").filter(Boolean).forEach(opts.onLog);
      }
    })().catch(() => {});
  };
  for (let attempt = 1;; attempt++) {
    try {
      await spawn();
      break;
    } catch (err) {
      // A port this call picked was free, not held: another process (a test file running
      // beside this one) may bind it first. Pick another, a few times.
      const picked = opts.port === undefined && port !== undefined;
      if (!picked || attempt >= 3 || !/address already in use/i.test(String(err))) throw err;
      port = freePort();
      args[args.indexOf("-p") + 1] = String(port);
      actualPort = port;
    }
  }

  const server: NatsServer = {
    get url() {
      return `nats://127.0.0.1:${actualPort}`;
    },
    get port() {
      return actualPort;
    },
    monitorPort: opts.monitorPort,
    storeDir,
    get pid() {
      return child.pid;
    },
    get exited() {
      return exited;
    },
    async stop(signal: Deno.Signal = "SIGTERM") {
      try {
        child.kill(signal);
      } catch { /* already gone */ }
      await exited;
    },
    async restart() {
      await spawn();
    },
    async [Symbol.asyncDispose]() {
      await server.stop();
      if (ownsStore) await Deno.remove(storeDir!, { recursive: true }).catch(() => {});
    },
  };
  return server;
}
