/**
 * The dashboard draws each pipeline run from a definition from that definition: its steps
 * in order, live figures on the work steps, joins and waits as dashed boxes, every edge
 * with its label; an item submitted over HTTP is counted on each step it ran.
 */
import assert from "node:assert/strict";
import { meshTempDir, ONE_PROCESS, startMesh } from "./helpers/mesh.ts";

const CHROMIUM = "/usr/bin/chromium";
const MOD = new URL("../mod.ts", import.meta.url).href;

Deno.test("the dashboard draws a definition's graph and counts its items on each step", async () => {
  Deno.env.set("__IS_WSL_TEST__", "1"); // see dashboard_test.ts
  const { chromium } = await import("playwright-core");
  const dir = await meshTempDir("weft-dash-");
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
    check: { kind: "wait", event: "checked", timeoutMs: 60000, onTimeout: "packed", next: "packed" },
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
    assert.deepEqual(errors, []);
  } finally {
    await browser.close();
  }
});
