/**
 * The dashboard draws each pipeline run from a definition from that definition: its steps
 * in columns by depth, live figures on the work steps, joins and waits as dashed boxes, an
 * arrow for each of its edges and no other (labelled, a loop's drawn back), every edge listed
 * with its label; an item submitted over HTTP is counted on each step it ran.
 */
import assert from "node:assert/strict";
import { meshTempDir, ONE_PROCESS, removedAtEnd, startMesh } from "./helpers/mesh.ts";
import { waitFor } from "./helpers/wait.ts";
import { dashboardHtml } from "../src/gateway/dashboard_page.ts";
import { definePipeline } from "../mod.ts";
import { type PipelineGraph, pipelineGraph } from "../src/pipeline/derive.ts";
import { SHIPPED_PIPELINES } from "../pipelines/shipped.ts";
import { tickets } from "../pipelines/examples/tickets.ts";
import { documents } from "../pipelines/examples/documents.ts";
import { supportPipeline } from "../pipelines/support/pipeline.ts";

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
    // The graph drawn is the definition's, as the gateway lists it: its edges, no others.
    const listed = await (await fetch(`${mesh.gatewayUrl}/pipelines`)).json();
    const graph = listed.pipelines.find((p: { name: string }) => p.name === "sorting").graph;
    await section.locator("path.edge").first().waitFor({ timeout: 5_000 }).catch(() => {});
    assertDrawsExactly(await drawnIn(page, "sorting"), graph, "sorting");

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
    // Filled in while claimed, then the claim released: the row is drawn again (its claim
    // gone) and keeps what was typed (a full run once saw the tick lost to that redraw).
    await row.locator('input[name="ok"]').check();
    await row.locator('input[name="weight"]').fill("0");
    const released = await fetch(
      `${mesh.gatewayUrl}/pipelines/sorting/claims/${id}?by=carol`,
      { method: "DELETE" },
    );
    assert.equal(released.status, 204);
    await released.body?.cancel();
    await row.locator("[data-claim]").waitFor({ state: "detached", timeout: 20_000 });
    assert.equal(await row.locator('input[name="ok"]').isChecked(), true, "the tick is kept");
    assert.equal(await row.locator('input[name="weight"]').inputValue(), "0", "the value is kept");
    // A value the schema refuses: the problem's detail shows, and the item waits on.
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

/** One definition's drawing as the browser laid it out: its boxes and its arrows. */
interface Drawn {
  /** Every box: its step id (`data-step`), or its durable consumer (`data-stage`). */
  boxes: {
    step: string | null;
    stage: string | null;
    x: number;
    y: number;
    w: number;
    h: number;
  }[];
  /** Every arrow: the steps it joins, its label, where it starts and ends, points along it. */
  arrows: {
    /** The edge's index in the graph's edges. */
    edge: number;
    from: string;
    to: string;
    back: boolean;
    label: string | null;
    start: [number, number];
    end: [number, number];
    along: [number, number][];
  }[];
  /** Arrows drawn as text between two neighbouring boxes: the boxes' step ids or consumers. */
  textArrows: { from: string | null; to: string | null }[];
}

/** What `section[data-pipeline=name]` draws, in page coordinates. */
function drawnIn(page: import("playwright-core").Page, name: string): Promise<Drawn> {
  return page.evaluate((name) => {
    // Runs in the page: its DOM, untyped here.
    // deno-lint-ignore no-explicit-any
    const document = (globalThis as any).document;
    // deno-lint-ignore no-explicit-any
    const all = (root: any, selector: string): any[] => [...root.querySelectorAll(selector)];
    // deno-lint-ignore no-explicit-any
    const idOf = (b: any): string | null =>
      b?.getAttribute("data-step") ?? b?.getAttribute("data-stage") ?? null;
    const section = document.querySelector(`section[data-pipeline="${name}"]`);
    const boxes = all(section, "[data-step], [data-stage]").map((b) => {
      const r = b.getBoundingClientRect();
      return {
        step: b.getAttribute("data-step") as string | null,
        stage: b.getAttribute("data-stage") as string | null,
        x: r.x,
        y: r.y,
        w: r.width,
        h: r.height,
      };
    });
    const arrows = all(section, "path.edge").map((path) => {
      const m = path.getScreenCTM();
      const at = (l: number): [number, number] => {
        const q = path.getPointAtLength(l);
        return [m.a * q.x + m.c * q.y + m.e, m.b * q.x + m.d * q.y + m.f];
      };
      const length: number = path.getTotalLength();
      const along: [number, number][] = [];
      for (let l = 0; l <= length; l += 4) along.push(at(l));
      const edge: string = path.getAttribute("data-edge");
      const text = section.querySelector(`text.edge-label[data-edge="${edge}"]`);
      return {
        edge: Number(edge),
        from: path.getAttribute("data-from") as string,
        to: path.getAttribute("data-to") as string,
        back: path.classList.contains("back") as boolean,
        label: (text?.textContent ?? null) as string | null,
        start: at(0),
        end: at(length),
        along,
      };
    });
    const textArrows = all(section, ".arrow").map((a) => ({
      from: idOf(a.previousElementSibling),
      to: idOf(a.nextElementSibling),
    }));
    return { boxes, arrows, textArrows };
  }, name);
}

/**
 * Checks that `drawn` shows exactly `graph`'s edges: one arrow per edge (the input's aside),
 * each from its step's box to its target's, labelled as the edge is, a loop's drawn back; no
 * other arrow between its steps' boxes; no box over another, and no arrow across a box it
 * does not join. Boxes of the pipeline's other services (a hand-wired pipeline's intake, its
 * state writer) are left aside.
 */
function assertDrawsExactly(all: Drawn, graph: PipelineGraph, name: string) {
  const steps = graph.nodes.filter((n) => n.id !== "$input").map((n) => n.id);
  const stepOf = new Map(graph.nodes.flatMap((n) => n.durable ? [[n.durable, n.id]] : []));
  const step = (id: string | null) =>
    id === null ? undefined : steps.find((s) => s === id) ??
      stepOf.get(id);
  const boxes = all.boxes.flatMap((b) => {
    const id = step(b.step) ?? step(b.stage);
    return id ? [{ ...b, step: id }] : [];
  });
  const drawn = { ...all, boxes };
  assert.deepEqual(boxes.map((b) => b.step).sort(), [...steps].sort(), `${name}: boxes`);
  const key = (e: { from: string; to: string }) => `${e.from} -> ${e.to}`;
  const edges = graph.edges.flatMap((e, k) => e.from === "$input" ? [] : [{ ...e, k }]);
  // Every arrow between two of its steps' boxes, however drawn.
  const texts = all.textArrows.flatMap((a) => {
    const from = step(a.from), to = step(a.to);
    return from && to ? [{ from, to }] : [];
  });
  assert.deepEqual(
    [...drawn.arrows, ...texts].map(key).sort(),
    edges.map(key).sort(),
    `${name}: the arrows are the definition's edges`,
  );
  assert.deepEqual(drawn.arrows.map((a) => a.edge).sort((a, b) => a - b), edges.map((e) => e.k));
  const box = new Map(drawn.boxes.map((b) => [b.step, b]));
  /** On the box's border (within 2 px), not inside it nor away from it. */
  const onBorder = ([x, y]: [number, number], b: Drawn["boxes"][number]) =>
    x >= b.x - 2 && x <= b.x + b.w + 2 && y >= b.y - 2 && y <= b.y + b.h + 2 &&
    Math.min(
        Math.abs(x - b.x),
        Math.abs(x - b.x - b.w),
        Math.abs(y - b.y),
        Math.abs(y - b.y - b.h),
      ) <=
      2;
  const inside = ([x, y]: [number, number], b: Drawn["boxes"][number]) =>
    x > b.x + 1 && x < b.x + b.w - 1 && y > b.y + 1 && y < b.y + b.h - 1;
  for (const e of edges) {
    const a = drawn.arrows.find((d) => d.edge === e.k)!;
    const what = `${name}: ${key(e)}${e.label ? ` (${e.label})` : ""}`;
    assert.equal(key(a), key(e), what);
    assert.ok(onBorder(a.start, box.get(e.from)!), `${what} starts on ${e.from}'s box`);
    assert.ok(onBorder(a.end, box.get(e.to)!), `${what} ends on ${e.to}'s box`);
    const label = e.label || e.loop
      ? [e.label, e.loop ? `≤${e.loop}×` : undefined].filter(Boolean).join(" ")
      : null;
    assert.equal(a.label, label, `${what}'s label`);
    assert.equal(a.back, e.loop !== undefined, `${what} is drawn back only when a loop`);
    for (const b of drawn.boxes) {
      if (b.step === e.from || b.step === e.to) continue;
      assert.ok(!a.along.some((p) => inside(p, b)), `${what} does not cross ${b.step}'s box`);
    }
  }
  for (const a of drawn.boxes) {
    for (const b of drawn.boxes) {
      if (a === b) continue;
      const apart = a.x + a.w <= b.x || b.x + b.w <= a.x || a.y + a.h <= b.y || b.y + b.h <= a.y;
      assert.ok(apart, `${name}: ${a.step}'s box and ${b.step}'s do not overlap`);
    }
  }
}

Deno.test("the dashboard draws exactly a definition's edges: branches, a join and a loop", async () => {
  Deno.env.set("__IS_WSL_TEST__", "1"); // see dashboard_test.ts
  const { chromium } = await import("playwright-core");
  const obj = { type: "object" } as const;
  const task = (next: string | string[]) => ({
    kind: "task" as const,
    output: obj,
    handle: () => ({}),
    next,
  });
  // Breadth first, prep's neighbours in the old drawing were "left" and "right", then "both",
  // "expired"...: a row of boxes with an arrow between each two, edges that are not there.
  const parcels = definePipeline({
    name: "parcels",
    input: { schema: obj },
    start: "prep",
    steps: {
      prep: task(["left", "right"]),
      left: task("both"),
      right: task("both"),
      both: {
        kind: "join",
        after: ["left", "right"],
        deadlineMs: 60_000,
        onDeadline: "expired",
        next: "check",
      },
      check: {
        kind: "router",
        route: () => "ok" as const,
        routes: { ok: "done", again: "prep", skip: "late", hold: "hold" },
      },
      late: { kind: "delay", ms: 1000, next: "done" },
      // Two edges between the same two steps: two arrows.
      hold: { kind: "wait", event: "held", timeoutMs: 60_000, onTimeout: "done", next: "done" },
      expired: { kind: "end", outcome: "expired" },
      done: { kind: "end", outcome: "done" },
    },
    loops: [{ from: "check", to: "prep", maxIterations: 3 }],
  });
  const defined = [parcels, tickets, documents, supportPipeline];
  const wired = SHIPPED_PIPELINES.flatMap((w) =>
    w.dashboard ? [{ name: w.name, ...w.dashboard }] : []
  );
  const page404 = () => new Response("not found", { status: 404 });
  await using server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (req) => {
    const path = new URL(req.url).pathname;
    if (path === "/dashboard") {
      return new Response(dashboardHtml(wired), { headers: { "content-type": "text/html" } });
    }
    if (path === "/pipelines") {
      return Response.json({
        pipelines: defined.map((d) => ({
          name: d.name,
          definition: d.hash,
          graph: pipelineGraph(d),
          waits: [],
        })),
      });
    }
    return page404();
  });
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
    const errors: string[] = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(`http://127.0.0.1:${server.addr.port}/dashboard`);
    for (const d of defined) {
      await page.locator(`section[data-pipeline="${d.name}"]`).waitFor({ timeout: 15_000 });
    }
    // Arrows are drawn once the boxes are laid out (the checks below say what is missing).
    await page.locator('section[data-pipeline="parcels"] path.edge').first()
      .waitFor({ timeout: 5_000 }).catch(() => {});
    for (const d of defined) {
      assertDrawsExactly(await drawnIn(page, d.name), pipelineGraph(d), d.name);
    }
    // The hand-wired pipelines' definitions too, between their own services' boxes.
    for (const w of wired) assertDrawsExactly(await drawnIn(page, w.name), w.graph!, w.name);
    // A narrower window lays the boxes out again: the arrows follow them.
    await page.setViewportSize({ width: 900, height: 1000 });
    await page.waitForTimeout(300);
    assertDrawsExactly(await drawnIn(page, "parcels"), pipelineGraph(parcels), "parcels (narrow)");
    await Deno.mkdir(".artifacts", { recursive: true });
    await page.setViewportSize({ width: 1400, height: 1000 });
    await page.screenshot({ path: `${Deno.cwd()}/.artifacts/pipeline_graphs.png`, fullPage: true });
    assert.deepEqual(errors, []);
  } finally {
    await browser.close();
  }
});
