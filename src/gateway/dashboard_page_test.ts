import assert from "node:assert/strict";
import { dashboardHtml } from "./dashboard_page.ts";
import { SHIPPED_PIPELINES } from "../../pipelines/shipped.ts";

/** The graphs a served page draws: the JSON the page's script starts from. */
function graphsOf(html: string): unknown {
  const m = html.match(/var PIPELINES = (.*);\n/);
  assert.ok(m, "the page declares its pipelines");
  return JSON.parse(m[1]!);
}

Deno.test("the dashboard draws each hand-wired pipeline's graph from its wiring", () => {
  const graphs = SHIPPED_PIPELINES.flatMap((w) =>
    w.dashboard ? [{ name: w.name, ...w.dashboard }] : []
  );
  assert.deepEqual(graphs.map((g) => g.name), ["feedback", "content"]);
  assert.deepEqual(graphsOf(dashboardHtml(graphs)), JSON.parse(JSON.stringify(graphs)));
  // A pipeline nobody ships gets its graph the same way; none is drawn that is not wired.
  const orders = [{ name: "orders", title: "Orders", stages: [["price", "price"] as const] }];
  assert.deepEqual(graphsOf(dashboardHtml(orders)), JSON.parse(JSON.stringify(orders)));
  assert.ok(!dashboardHtml(orders).includes("Feedback pipeline"));
});

Deno.test("a graph's text cannot end the page's script early", () => {
  const html = dashboardHtml([{ name: "x", title: "</script><img src=x>", stages: [] }]);
  assert.equal(html.match(/<\/script>/g)?.length, 1, "only the page's own closing tag");
  assert.deepEqual(graphsOf(html), [{ name: "x", title: "</script><img src=x>", stages: [] }]);
});

Deno.test("every stage a wiring draws is one of its services' durable consumers", () => {
  for (const w of SHIPPED_PIPELINES) {
    const durables = new Set(
      w.services.flatMap((s) => (s.access.consumes ?? []).map((c) => c.durable)),
    );
    for (const [durable] of w.dashboard?.stages ?? []) {
      assert.ok(durables.has(durable), `${w.name}: ${durable} is no durable of its services`);
    }
  }
});

Deno.test("a pipeline's own panels go in the page: their sections, and their scripts before it starts", () => {
  const panel = {
    html: '<section><h2>Orders</h2><div id="orders"></div></section>',
    script: 'PANELS.push({ start: function () { el("p", null, "orders"); } });',
  };
  const html = dashboardHtml([], [panel]);
  assert.ok(
    html.indexOf(panel.html) > 0 && html.indexOf(panel.html) < html.indexOf("Dead letters"),
  );
  const at = html.indexOf(panel.script);
  assert.ok(at > html.indexOf("var PANELS = [];"), "after the hooks are declared");
  assert.ok(at < html.indexOf("buildGraph();\n"), "before the page starts");
  // Without panels, no pipeline's: the page itself names none.
  const bare = dashboardHtml([]);
  assert.ok(!/feedback|\/reviews/i.test(bare), "the page's own code names no pipeline");
});
