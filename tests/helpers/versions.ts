/**
 * What the definition-versioning tests share (tests/pipeline_versions_test.ts and
 * tests/pipeline_versions_renames_test.ts, two files so that the test runner runs their
 * halves side by side: most of each test is a mesh waiting for an ack wait or a timer).
 *
 * @module
 */
import { waitFor } from "./wait.ts";

/** mod.ts, as a definition file written to a temp dir imports it. */
export const MOD = new URL("../../mod.ts", import.meta.url).href;

/** An item's state over HTTP (`GET /pipelines/<pipeline>/items/<id>`). */
export const itemState = (pipeline: string) => async (base: string, id: string) =>
  await (await fetch(`${base}/pipelines/${pipeline}/items/${id}`)).json();

/** Waits (30 s) for an item's state, read by `state`, to pass `ok`; returns it. */
export const stateWhenOk =
  (state: (base: string, id: string) => Promise<Record<string, unknown>>) =>
  (
    base: string,
    id: string,
    ok: (s: Record<string, unknown>) => boolean,
    what: string,
  ) =>
    waitFor(
      async () => {
        const s = await state(base, id);
        return ok(s) ? s : undefined;
      },
      30_000,
      what,
    );

/** POSTs `body` as JSON; the status and the JSON answer. */
export async function post(base: string, path: string, body: unknown) {
  const res = await fetch(`${base}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  return { status: res.status, body: await res.json() };
}

/** A task handler that holds its item until its service stops. */
export const HOLD = `(_v: unknown, ctx: { signal: AbortSignal }) =>
        new Promise((_, reject) => ctx.signal.addEventListener("abort", () => reject(new Error("stopped"))))`;
