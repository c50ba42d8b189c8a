/**
 * The live dashboard in a real headless Chromium (Debian's `chromium` package, driven by
 * playwright-core): an item submitted through the page moves through the stages on the
 * page, its row opens its full event history, and the pipeline graph counts it. A
 * screenshot goes to .artifacts/dashboard.png.
 *
 * Needs `apt-get install chromium` and, beyond the usual test permissions,
 * `--allow-run=/usr/bin/chromium --allow-sys=homedir`.
 */
import assert from "node:assert/strict";
import { SERVICES_IN_ONE_PROCESS, startServices, WHOLE_MESH } from "./helpers/mesh.ts";
import { waitFor } from "./helpers/wait.ts";
import { hashKey } from "../src/gateway/auth.ts";

const CHROMIUM = "/usr/bin/chromium";

async function loadChromium() {
  try {
    await Deno.stat(CHROMIUM);
  } catch {
    throw new Error(
      `${CHROMIUM} is missing: the dashboard test needs Debian's chromium package ` +
        "(apt-get install -y chromium)",
    );
  }
  // playwright-core probes /proc/sys/fs/binfmt_misc/WSLInterop when it loads (is-wsl),
  // a path Deno only lets --allow-all read; this variable makes that probe lazy.
  Deno.env.set("__IS_WSL_TEST__", "1");
  const { chromium } = await import("playwright-core");
  return chromium;
}

Deno.test("the dashboard shows a submitted item moving through the stages and opens its history", async () => {
  const chromium = await loadChromium();
  // Topics fails on this phrase (a testing aid), so an item can be dead-lettered for real.
  await using mesh = await startServices({
    ...WHOLE_MESH,
    ...SERVICES_IN_ONE_PROCESS,
    env: { WEFT_FAIL_ON: "explode-on-purpose", WEFT_FAIL_STAGE: "topics", WEFT_MAX_ATTEMPTS: "2" },
  });
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
    const errors: string[] = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    const notFound: string[] = [];
    page.on("response", (r) => {
      if (r.status() === 404) notFound.push(r.url());
    });
    await page.goto(`${mesh.gatewayUrl}/dashboard`);
    await page.locator("#conn.live").waitFor({ timeout: 10_000 });
    const paint = await page.evaluate(() =>
      performance.getEntriesByName("first-contentful-paint")[0]?.startTime ?? -1
    );

    await page.fill("#text", "Love the new search, but the export button is broken");
    await page.click("#submit button");
    const body = page.locator("body[data-last-submitted]");
    await body.waitFor({ state: "attached", timeout: 10_000 });
    const id = (await body.getAttribute("data-last-submitted"))!;
    const step = page.locator(`tr[data-item="${id}"] td.step`);
    await step.filter({ hasText: "processed" }).waitFor({ timeout: 20_000 });

    // The graph counts it on every stage (metrics frames arrive once a second).
    for (const stage of ["sentiment", "topics", "dispatch"]) {
      await page.locator(`[data-stage="${stage}"] dd.processed`).filter({ hasText: /^1$/ })
        .waitFor({ timeout: 10_000 });
    }
    await page.locator("#done").filter({ hasText: /^1$/ }).waitFor({ timeout: 10_000 });
    // An HTTP submission counts on the ingest box too; end-to-end percentiles show.
    await page.locator('[data-stage="ingest"] dd.processed').filter({ hasText: /^1$/ })
      .waitFor({ timeout: 10_000 });
    await page.locator("#e2e").filter({ hasText: / ms$/ }).waitFor({ timeout: 10_000 });

    // The row shows the item's sentiment, topics and team; the filter hides what does not match.
    const itemRow = page.locator(`tr[data-item="${id}"]`);
    assert.notEqual((await itemRow.locator("td.team").textContent())?.trim(), "");
    assert.notEqual((await itemRow.locator("td.sentiment").textContent())?.trim(), "");
    await page.fill("#filter", "no-such-team-or-text");
    await itemRow.waitFor({ state: "hidden", timeout: 5_000 });
    await page.fill("#filter", (await itemRow.locator("td.team").textContent())!.slice(0, 6));
    await itemRow.waitFor({ state: "visible", timeout: 5_000 });
    await page.fill("#filter", "");

    // Its row opens the full history, ingested to processed.
    await page.click(`tr[data-item="${id}"]`);
    await page.locator("#history .ev", { hasText: "feedback.processed" }).waitFor({
      timeout: 10_000,
    });
    const history = await page.locator("#history .ev b").allTextContents();
    assert.deepEqual(history, [
      "feedback.ingested",
      "feedback.sentiment_analyzed",
      "feedback.topics_extracted",
      "feedback.dispatched",
      "feedback.processed",
    ]);
    // Each event reads as a sentence; the raw JSON is one click away.
    assert.match((await page.locator("#history .ev .sum").allTextContents()).join("\n"), /team: /);

    // Panels whose routes this gateway lacks say so instead of failing.
    const dl = await page.locator("#dl").textContent();
    assert.ok(dl && dl.length > 0 && !dl.includes("Loading"), `dead-letter panel: ${dl}`);
    const reviews = await page.locator("#reviews").textContent();
    assert.ok(reviews && !reviews.includes("Loading"), `review panel: ${reviews}`);
    assert.deepEqual(errors, []);

    // A flagged upload waits in the review queue; a reviewer approves it on the page.
    const upload = await fetch(`${mesh.gatewayUrl}/content`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ text: "You idiot, this is the most pathetic service ever." }),
    });
    assert.equal(upload.status, 202);
    const { id: contentId } = await upload.json();
    await page.fill("#reviewer", "dashboard-reviewer");
    const row = page.locator(`tr[data-review="${contentId}"]`);
    await row.waitFor({ timeout: 15_000 });
    assert.match((await row.textContent()) ?? "", /insult: "idiot"/);
    await row.locator("button", { hasText: "approve" }).click();
    await row.waitFor({ state: "detached", timeout: 15_000 });
    const content = await waitFor(
      async () => {
        const c = await (await fetch(`${mesh.gatewayUrl}/content/${contentId}`)).json();
        return c.status === "published" ? c : undefined;
      },
      15_000,
      "the approved content to be published",
    );
    assert.equal(content.review?.reviewer, "dashboard-reviewer");
    // The moderation pipeline's graph counts the item at each step it took.
    for (const stage of ["moderation", "review-queue", "storage-decided"]) {
      await page.locator(`[data-stage="${stage}"] dd.processed`).filter({ hasText: /^1$/ })
        .waitFor({ timeout: 10_000 });
    }
    // Its state writer folded its events (uploaded, moderated, review requested, ...).
    await page.locator(`[data-stage="content-state"] dd.processed`).filter({ hasText: /^[1-9]/ })
      .waitFor({ timeout: 10_000 });

    // An item a stage gave up on is dead-lettered; the dead-letter panel lists it with its
    // reason, and its Redrive button re-submits it (the fault is still on, so it fails again).
    const failing = await fetch(`${mesh.gatewayUrl}/feedback`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ id: "doomed1", text: "this will explode-on-purpose" }),
    });
    assert.equal(failing.status, 202, await failing.text());
    const letter = page.locator("#dl tr[data-letter]", { hasText: "doomed1" }).first();
    await letter.waitFor({ timeout: 15_000 });
    assert.match((await letter.textContent()) ?? "", /handler_failed/);
    const seq = Number(await letter.getAttribute("data-letter"));
    await letter.locator("button", { hasText: "Redrive" }).click();
    const redriven = await waitFor(
      async () => {
        const list = await (await fetch(`${mesh.gatewayUrl}/deadletters`)).json();
        const entry = list.items.find((e: { seq: number }) => e.seq === seq);
        return entry?.redrives === 1 ? entry : undefined;
      },
      15_000,
      "the dead letter to be redriven",
    );
    assert.equal(redriven.letter.item_id, "doomed1");
    // The redriven item fails again: two letters, of which one waits for redrive.
    await waitFor(
      async () => {
        const list = await (await fetch(`${mesh.gatewayUrl}/deadletters`)).json();
        return list.items.filter((e: { letter: { item_id: string } }) =>
              e.letter.item_id === "doomed1"
            ).length === 2 || undefined;
      },
      20_000,
      "the second dead letter",
    );
    await page.locator("#dlcount").filter({ hasText: /^1$/ }).waitFor({ timeout: 10_000 });

    // A live shadow on the sentiment step shows in its panel with its agreement and kappa.
    const shadow = await fetch(`${mesh.gatewayUrl}/shadows`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        id: "dash",
        step: "sentiment",
        candidate: { analyzers: "rules", rules: "rules/reference.json" },
      }),
    });
    assert.equal(shadow.status, 201, await shadow.text());
    await mesh.waitForLog((l) => l.msg === "shadow started" && l.shadow === "dash", 20_000);
    const shadowed = await fetch(`${mesh.gatewayUrl}/feedback`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ text: "I love the new dashboard, great work" }),
    });
    assert.equal(shadowed.status, 202);
    await shadowed.body?.cancel();
    const shadowRow = page.locator('#shadows tr[data-shadow="dash"]');
    await shadowRow.locator("td:nth-child(6)").filter({ hasText: /^1$/ }).waitFor({
      timeout: 20_000,
    });
    assert.match(
      (await shadowRow.textContent()) ?? "",
      /feedback\.sentiment.*rules:rules\/reference\.json.*running.*sentiment (100\.0|0\.0)% \(/,
    );
    assert.deepEqual(notFound, [], "no request of the page was answered 404 (favicon included)");

    await Deno.mkdir(".artifacts", { recursive: true });
    const shot = `${Deno.cwd()}/.artifacts/dashboard.png`;
    await page.screenshot({ path: shot, fullPage: true });
    // deno-lint-ignore no-console
    console.log(`dashboard screenshot: ${shot} (first contentful paint ${paint.toFixed(0)} ms)`);
  } finally {
    await browser.close();
  }
});

Deno.test("with API keys configured, the dashboard asks for one, then shows the live data and an item's history", async () => {
  const chromium = await loadChromium();
  const key = "dashboard-key-0123456789";
  await using mesh = await startServices({
    ...WHOLE_MESH,
    ...SERVICES_IN_ONE_PROCESS,
    env: { WEFT_API_KEYS: JSON.stringify([{ sha256: hashKey(key), role: "admin", name: "ops" }]) },
  });
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
    const errors: string[] = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(`${mesh.gatewayUrl}/dashboard`);
    // Without a key: said plainly, not a blank page.
    await page.locator("#conn", { hasText: "needs an API key" }).waitFor({ timeout: 10_000 });
    await page.locator("#items tr.hint", { hasText: "Enter an API key" }).waitFor({
      timeout: 10_000,
    });
    const res = await fetch(`${mesh.gatewayUrl}/feedback`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${key}` },
      body: JSON.stringify({ text: "The export is broken again" }),
    });
    assert.equal(res.status, 202);
    const { id } = await res.json();

    await page.fill("#apikey", key);
    await page.locator("#apikey").dispatchEvent("change");
    await page.locator("#conn.live").waitFor({ timeout: 10_000 });
    const row = page.locator(`tr[data-item="${id}"]`);
    await row.locator("td.step", { hasText: "processed" }).waitFor({ timeout: 30_000 });
    await row.click();
    await page.locator("#history .ev", { hasText: "feedback.processed" }).waitFor({
      timeout: 10_000,
    });
    assert.equal(await page.locator("#history .ev").count(), 5, "the whole history, with the key");
    assert.deepEqual(errors, []);
  } finally {
    await browser.close();
  }
});
