/**
 * The dashboard draws each pipeline run from a definition from that definition: its steps
 * in order, live figures on the work steps, joins and waits as dashed boxes, every edge
 * with its label; an item submitted over HTTP is counted on each step it ran.
 */
import assert from "node:assert/strict";
import { meshTempDir, ONE_PROCESS, removedAtEnd, startMesh } from "./helpers/mesh.ts";
import { waitFor } from "./helpers/wait.ts";

const CHROMIUM = "/usr/bin/chromium";
const MOD = new URL("../mod.ts", import.meta.url).href;

Deno.test("the dashboard draws a definition's graph and counts its items on each step", async () => {
  Deno.env.set("__IS_WSL_TEST__", "1"); // see dashboard_test.ts
  const { chromium } = await import("playwright-core");
  const dir = await meshTempDir("weft-dash-");
  await using _dir = removedAtEnd(dir);
  await Deno.writeTextFile(
    `${dir}/sorting.ts`,
    `import { definePipeline } from "${MOD}";
const obj = { type: "object" } as const;
export const sorting = definePipeline({
  name: "sorting",
  input: { schema: { type: "object", required: ["n"] } },
  start: "weigh",
  steps: {
    weigh: { kind: "task", output: obj, handle: (i: { n: number }) => ({ n: i.n }), next: "size" },
    size: {
      kind: "router",
      route: (w: { n: number }) => (w.n > 10 ? "big" : "small"),
      routes: { big: "check", small: "packed" },
    },
    check: {
      kind: "wait",
      event: "checked",
      schema: {
        type: "object",
        required: ["ok", "weight"],
        properties: { ok: { type: "boolean" }, weight: { type: "number", minimum: 1 } },
      },
      timeoutMs: 600000,
      onTimeout: "packed",
      next: "packed",
    },
    packed: { kind: "end", outcome: "packed" },
  },
});
`,
  );
  await using mesh = await startMesh({ ...ONE_PROCESS, WEFT_PIPELINES: `${dir}/sorting.ts` }, {
    storeDir: `${dir}/nats`,
  });
  await mesh.waitForLog((l) => l.msg === "weft is ready", 60_000, "ready");
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
    const errors: string[] = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(`${mesh.gatewayUrl}/dashboard`);
    const section = page.locator('section[data-pipeline="sorting"]');
    await section.waitFor({ timeout: 15_000 });
    assert.match(
      (await section.locator("h2").textContent())!,
      /sorting pipeline definition [0-9a-f]{16}/,
    );
    // Work steps carry figures; the wait and the end are dashed boxes.
    for (const stage of ["sorting-weigh", "sorting-size"]) {
      await section.locator(`[data-stage="${stage}"] dd.processed`).waitFor({ timeout: 5_000 });
    }
    assert.equal(await section.locator('.ctl[data-step="check"]').count(), 1);
    assert.equal(await section.locator('.ctl[data-step="packed"]').count(), 1);
    const edges = (await section.locator(".edges").textContent())!;
    assert.match(edges, /size → check \(big\)/);
    assert.match(edges, /check → packed \(onTimeout\)/);

    const res = await fetch(`${mesh.gatewayUrl}/pipelines/sorting/items`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ n: 3 }),
    });
    assert.equal(res.status, 202);
    await res.body?.cancel();
    for (const stage of ["sorting-weigh", "sorting-size"]) {
      await section.locator(`[data-stage="${stage}"] dd.processed`).filter({ hasText: /^1$/ })
        .waitFor({ timeout: 15_000 });
    }

    // Nothing waits yet (an empty control bucket reads as an empty list).
    await section.locator("[data-waiting]").filter({ hasText: "Nothing waits for a decision." })
      .waitFor({ timeout: 10_000 });
    // A big item waits at `check`: the page lists it with a form drawn from the wait's schema.
    const big = await fetch(`${mesh.gatewayUrl}/pipelines/sorting/items`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ n: 30 }),
    });
    assert.equal(big.status, 202);
    const id = (await big.json()).id as string;
    const row = section.locator(`[data-waiting-item="${id}"]`);
    await row.waitFor({ timeout: 20_000 });
    const waiting = await (await fetch(`${mesh.gatewayUrl}/pipelines/sorting/waiting`)).json();
    assert.deepEqual(
      waiting.items.map((i: { id: string; step: string; event: string; input: unknown }) => [
        i.id,
        i.step,
        i.event,
        i.input,
      ]),
      [[id, "check", "sorting.checked", { n: 30 }]],
    );
    // A reviewer's claim shows on its row; released, the item is anyone's again.
    const claim = await fetch(`${mesh.gatewayUrl}/pipelines/sorting/claims/${id}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ by: "carol" }),
    });
    assert.equal(claim.status, 200, await claim.text());
    await row.locator('[data-claim="carol"]').filter({ hasText: /claimed by carol/ })
      .waitFor({ timeout: 20_000 });
    const released = await fetch(
      `${mesh.gatewayUrl}/pipelines/sorting/claims/${id}?by=carol`,
      { method: "DELETE" },
    );
    assert.equal(released.status, 204);
    await released.body?.cancel();
    // A value the schema refuses: the problem's detail shows, and the item waits on.
    await row.locator('input[name="ok"]').check();
    await row.locator('input[name="weight"]').fill("0");
    await row.locator("button").click();
    await row.locator("span.muted").filter({ hasText: /weight must be >= 1/ })
      .waitFor({ timeout: 10_000 });
    await row.locator('input[name="weight"]').fill("5");
    await row.locator("button").click();
    await row.locator("span.muted").filter({ hasText: /^sent$/ }).waitFor({ timeout: 10_000 });
    const done = await waitFor(
      async () => {
        const r = await fetch(`${mesh.gatewayUrl}/pipelines/sorting/items/${id}`);
        const state = await r.json();
        return state.outcome ? state : undefined;
      },
      20_000,
      `${id}'s outcome`,
    );
    assert.equal(done.outcome, "packed");
    assert.deepEqual(done.results.check, { ok: true, weight: 5 });
    await row.waitFor({ state: "detached", timeout: 20_000 });
    assert.deepEqual(errors, []);
    // Listing what waits stays within the gateway's identity.
    assert.deepEqual(mesh.logs.filter((l) => l.msg === "nats permission violation"), []);
  } finally {
    await browser.close();
  }
});
