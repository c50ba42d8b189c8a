/**
 * A service of a pipeline definition: `deno run services/pipeline.ts <files...> <service>`,
 * where `<service>` is `<pipeline>-flow` (intake, joins, waits, delays, item state) or
 * `<pipeline>-<step>` (one work step). The supervisor starts one process per service, with
 * read access to the definitions' folders only.
 *
 * @module
 */
import { createLogger } from "../src/observability/log.ts";
import { loadPipelines, pipelineServices } from "../src/pipeline/runtime.ts";
import { runService } from "../src/service.ts";

const ROOT = new URL("../", import.meta.url).pathname;

if (import.meta.main) {
  const args = Deno.args.filter((a) => !a.startsWith("-"));
  const name = args.at(-1);
  const files = args.slice(0, -1);
  const log = createLogger(`weft-${name ?? "pipeline"}`);
  if (!name || files.length === 0) {
    log.error("usage: services/pipeline.ts <definition files...> <service>");
    Deno.exit(2);
  }
  let services;
  try {
    services = pipelineServices(await loadPipelines(files, ROOT));
  } catch (err) {
    log.error("pipeline refused", { err });
    Deno.exit(2);
  }
  const def = services.get(name);
  if (!def) {
    log.error(`no service ${name} in ${files.join(", ")}`, { services: [...services.keys()] });
    Deno.exit(2);
  }
  await runService(def);
}
