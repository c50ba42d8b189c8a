/**
 * The shipped pipelines' own settings (each `pipelines/<name>/settings.ts`), loaded by the
 * supervisor so that `deno task start` validates them with the rest before anything starts.
 * Apart from pipelines/shipped.ts: the configuration module reads the wirings, so a wiring must
 * not load settings that register with it.
 *
 * @module
 */
import "./feedback/settings.ts";
import "./moderation/settings.ts";
