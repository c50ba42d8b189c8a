/**
 * `deno task rebuild-state`: rebuilds every item's state from the FEEDBACK stream alone
 * and compares it with the state bucket (exit 1 on any difference). With `--write`, puts
 * the rebuilt states into the bucket (stop the state service first, or it may race).
 * Prints one JSON line of figures.
 *
 * @module
 */
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { loadConfig } from "../src/config.ts";
import type { FeedbackState } from "../src/events.gen.ts";
import { connectNats, tlsCredentials } from "../src/nats.ts";
import { compareStates, rebuildStates } from "../src/rebuild.ts";
import { readStream } from "../src/stream_reader.ts";
import { STATE_BUCKET } from "../src/subjects.ts";

if (import.meta.main) {
  const write = Deno.args.includes("--write");
  const config = loadConfig({ args: Deno.args.filter((a) => a !== "--write") });
  // Under `deno task start`, NATS wants an identity: the ops key reads, the admin key
  // (--write) also writes the bucket (WEFT_NATS_NKEY=data/identities/admin.nk).
  const nc = await connectNats(config.natsUrl, "weft-rebuild-state", {
    nkeySeedFile: config.natsNkey || undefined,
    ...tlsCredentials(config),
  });
  const js = jetstream(nc);
  const started = performance.now();
  const { states, events, skipped } = await rebuildStates(js);
  const live = new Map<string, FeedbackState>();
  for await (const m of readStream(js, `KV_${STATE_BUCKET}`)) {
    const id = m.subject.slice(`$KV.${STATE_BUCKET}.`.length);
    if (m.data.length === 0) live.delete(id);
    else live.set(id, m.json<FeedbackState>());
  }
  const diff = compareStates(states, live);
  let written = 0;
  if (write) {
    const kv = await new Kvm(nc).open(STATE_BUCKET);
    for (const id of [...diff.different, ...diff.missingLive]) {
      await kv.put(id, JSON.stringify(states.get(id)));
      written++;
    }
  }
  const report = {
    items: states.size,
    events,
    skipped_invalid: skipped,
    equal: diff.equal,
    different: diff.different.length,
    missing_in_bucket: diff.missingLive.length,
    only_in_bucket: diff.missingRebuilt.length,
    written,
    ms: Math.round(performance.now() - started),
  };
  Deno.stdout.writeSync(new TextEncoder().encode(JSON.stringify(report) + "\n"));
  await nc.close();
  const clean = diff.different.length + diff.missingLive.length === 0;
  Deno.exit(clean || write ? 0 : 1);
}
