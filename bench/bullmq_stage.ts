/**
 * One stage of the BullMQ + Redis comparison pipeline of `deno task bench`: a BullMQ
 * Worker on queue `FROM` whose processor does what a bare stage does, forward the job's
 * data unchanged, here by adding a job to queue `TO`; the last stage (`TO` = `done`)
 * publishes the item's id on the Redis channel `bench.done` instead, where the bench
 * listens. Jobs are removed once completed (`removeOnComplete`), as a long-running
 * deployment would; a failed job is retried up to 5 attempts, as Weft's steps are.
 *
 * Prints `ready` on stdout once the worker is connected; stops on SIGTERM.
 *
 * Usage: `deno run --allow-net=127.0.0.1:PORT --allow-env bench/bullmq_stage.ts PORT FROM TO CONCURRENCY`
 * (`--allow-env`: ioredis's `debug` dependency lists the environment).
 *
 * @module
 */
import { Queue, Worker } from "bullmq";
import { Redis } from "ioredis";

/** What each job of the comparison pipeline is added with. */
export const JOB_OPTIONS = { removeOnComplete: true, attempts: 5 } as const;

/** The Redis channel the last stage publishes each finished item's id on. */
export const DONE_CHANNEL = "bench.done";

if (import.meta.main) {
  const [port, from, to, concurrency] = Deno.args;
  if (!port || !from || !to || !concurrency) {
    throw new Error("usage: bullmq_stage.ts PORT FROM TO CONCURRENCY");
  }
  const connection = new Redis({
    host: "127.0.0.1",
    port: Number(port),
    maxRetriesPerRequest: null,
  });
  const next = to === "done"
    ? undefined
    : new Queue(to, { connection, defaultJobOptions: JOB_OPTIONS });
  const worker = new Worker(from, async (job) => {
    if (next) await next.add("item", job.data);
    else await connection.publish(DONE_CHANNEL, (job.data as { id: string }).id);
  }, { connection, concurrency: Number(concurrency) });
  worker.on("error", (err) => Deno.stderr.writeSync(new TextEncoder().encode(`${err}\n`)));
  await worker.waitUntilReady();
  Deno.stdout.writeSync(new TextEncoder().encode("ready\n"));
  const stop = async () => {
    await worker.close();
    await next?.close();
    connection.disconnect();
    Deno.exit(0);
  };
  Deno.addSignalListener("SIGTERM", stop);
  Deno.addSignalListener("SIGINT", stop);
}
