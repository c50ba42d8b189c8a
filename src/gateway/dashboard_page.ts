/**
 * The live dashboard: one self-contained HTML page (inline CSS and vanilla JS, no build
 * step, nothing fetched from elsewhere) served by the gateway at `GET /dashboard`. Kept in
 * a module rather than a file so the gateway needs no read permission.
 *
 * It draws each hand-wired pipeline (its wiring's `dashboard` graph, {@link dashboardHtml}) and
 * each definition's (its steps in columns by depth, an SVG arrow for each of its edges and no
 * other, labelled with its route, `onTimeout` or `onDeadline`, a loop's running back under the
 * boxes with its bound) with per-stage throughput, handler latency, backlog and errors from
 * `/dashboard/stream`; shows dead letters waiting for redrive (`GET /deadletters?pending=true`,
 * redrive with `POST /deadletters/redrive {"ids":[seq]}`) when the gateway has those routes,
 * and says so when it does not; the items waiting on a definition's `wait` step; each
 * hand-wired pipeline's own panels ({@link DashboardPanel}, from its gateway part); and the
 * live shadows (candidate step
 * versions beside production, src/shadow/live.ts) with their agreement per field and
 * Cohen's kappa, from the same metrics stream. All data is written with textContent.
 *
 * @module
 */

import type { WiredGraph } from "../wiring.ts";

/**
 * A hand-wired pipeline's own panel (its gateway part's): sections of HTML placed before the
 * dead letters, and a script run in the page's, after its helpers (`el`, `fmt`, `api`,
 * `postJson`, `readSse`, `setOptional`, `reviewerInput`). The script registers its hooks with
 * `PANELS.push({ start, onKey, tick })`: `start()` once, `onKey()` when the API key changes,
 * `tick()` every 3 s. Write data with textContent only.
 */
export interface DashboardPanel {
  /** `<section>` elements. */
  html: string;
  /** Vanilla JS (no modules). */
  script: string;
}

/**
 * The dashboard page drawing `graphs` (each hand-wired pipeline's, by name) and `panels`,
 * written once when the gateway starts.
 *
 * @example
 * ```ts
 * import { dashboardHtml } from "./dashboard_page.ts";
 * const html = dashboardHtml([{ name: "orders", title: "Orders", stages: [["price", "price"]] }]);
 * console.assert(html.includes('"title":"Orders"'));
 * ```
 */
export function dashboardHtml(
  graphs: readonly (WiredGraph & { name: string })[],
  panels: readonly DashboardPanel[] = [],
): string {
  // JSON inside a script: no "</script>" (or any "<") can end it early.
  const json = JSON.stringify(graphs).replace(/</g, "\\u003c");
  return DASHBOARD_HTML.replace("/*WIRED_GRAPHS*/[]", () => json)
    .replace("<!--PANELS-->", () => panels.map((p) => p.html).join(""))
    .replace("/*PANEL_SCRIPTS*/", () => panels.map((p) => p.script).join("\n"));
}

/** The dashboard page, before the hand-wired pipelines' graphs are filled in. */
const DASHBOARD_HTML: string = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Weft dashboard</title>
<link rel="icon" href="data:,">
<style>
:root { --bg:#0f1419; --panel:#171d24; --line:#2a3440; --text:#dde3ea; --dim:#8a96a3;
  --ok:#3fb950; --warn:#d29922; --bad:#f85149; --accent:#58a6ff; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 system-ui, sans-serif; background:var(--bg); color:var(--text); }
header { display:flex; gap:1.5rem; align-items:center; padding:.7rem 1.2rem; border-bottom:1px solid var(--line); }
header h1 { font-size:1.1rem; margin:0; }
header .kpi { color:var(--dim); } header .kpi b { color:var(--text); }
header .creds { margin-left:auto; display:flex; gap:.4rem; } header .creds input { width:11rem; }
#conn.live { color:var(--ok); } #conn.down { color:var(--bad); }
main { display:grid; grid-template-columns: 1fr 1fr; gap:1rem; padding:1rem 1.2rem; }
section { background:var(--panel); border:1px solid var(--line); border-radius:8px; padding:.8rem 1rem; min-width:0; }
section.wide { grid-column: 1 / -1; }
h2 { font-size:.95rem; margin:0 0 .6rem; color:var(--dim); text-transform:uppercase; letter-spacing:.04em; }
.graph { display:flex; align-items:center; gap:0; overflow-x:auto; }
.stage { flex:1 1 0; min-width:130px; border:1px solid var(--line); border-radius:6px; padding:.5rem .6rem; background:#1d252e; }
.stage h3 { margin:0 0 .3rem; font-size:.95rem; }
.stage dl { display:grid; grid-template-columns:auto 1fr; gap:.1rem .5rem; margin:0; font-size:.8rem; }
.stage dt { color:var(--dim); } .stage dd { margin:0; text-align:right; font-variant-numeric:tabular-nums; }
.stage.err { border-color:var(--bad); } .stage.busy { border-color:var(--warn); }
.arrow { align-self:center; color:var(--dim); padding:0 .35rem; font-size:1.2rem; }
table { width:100%; border-collapse:collapse; font-size:.82rem; table-layout:fixed; }
th, td { text-align:left; padding:.3rem .4rem; border-bottom:1px solid var(--line); white-space:nowrap; overflow:hidden; text-overflow:ellipsis; }
#items-table th:nth-child(1) { width:16%; } #items-table th:nth-child(2) { width:26%; }
#items-table th:nth-child(3) { width:10%; } #items-table th:nth-child(4) { width:16%; }
#items-table th:nth-child(5) { width:13%; } #items-table th:nth-child(6) { width:9%; }
#items-table th:nth-child(7) { width:10%; }
th { color:var(--dim); font-weight:normal; }
tbody tr.item { cursor:pointer; } tbody tr.item:hover, tbody tr.sel { background:#223040; }
.st-processed { color:var(--ok); } .st-failed { color:var(--bad); } .st-pending { color:var(--warn); }
form { display:flex; gap:.5rem; margin-bottom:.6rem; }
input[type=text] { flex:1; background:#0c1116; color:var(--text); border:1px solid var(--line); border-radius:4px; padding:.35rem .5rem; }
button { background:#238636; color:#fff; border:0; border-radius:4px; padding:.35rem .7rem; cursor:pointer; }
button.secondary { background:#30363d; } button.danger { background:#8e1519; }
#history { font:12px/1.35 ui-monospace, monospace; max-height:22rem; overflow:auto; }
#history .ev { border-left:3px solid var(--accent); padding:.2rem .5rem; margin:.3rem 0; }
#history pre { margin:.2rem 0 0; white-space:pre-wrap; color:var(--dim); }
.muted { color:var(--dim); }
.stage.ctl { flex:0 0 auto; min-width:90px; background:transparent; border-style:dashed; }
.stage.ctl h3 { margin:0; }
.edges { margin-top:.4rem; font-size:.8rem; }
.dag { position:relative; flex:1 0 auto; }
.dag-cols { position:relative; display:flex; align-items:stretch; gap:72px; }
.dag-col { display:flex; flex-direction:column; justify-content:center; gap:14px; flex:1 1 0; min-width:140px; }
.dag-col.ctl-col { flex:0 0 auto; min-width:90px; }
.dag-col > * { flex:0 0 auto; min-width:0; }
.dag-via { height:10px; }
.dag-edges { position:absolute; left:0; top:0; pointer-events:none; overflow:visible; }
.dag-edges .edge { fill:none; stroke:var(--dim); stroke-width:1.4; }
.dag-edges .edge.back { stroke-dasharray:5 3; }
.dag-edges .edge-head { fill:var(--dim); }
.dag-edges .edge-label { fill:var(--text); font-size:11px; text-anchor:middle; dominant-baseline:central; paint-order:stroke; stroke:var(--panel); stroke-width:4px; stroke-linejoin:round; }
.wide-group { display:contents; }
#history .sum { color:var(--text); margin:.15rem 0 0; white-space:normal; }
#history details summary { color:var(--dim); cursor:pointer; font-size:.75rem; }
.filter { width:100%; margin:0 0 .5rem; }
.charts { display:grid; grid-template-columns:repeat(3, 1fr); gap:1rem; }
.chart h3 { margin:0 0 .2rem; font-size:.8rem; color:var(--dim); font-weight:normal; }
#shadows td.agree { font-variant-numeric:tabular-nums; }
.waiting td:nth-child(1) { width:20%; } .waiting td:nth-child(2) { width:8%; }
.waiting td:nth-child(3) { width:22%; } .waiting td:nth-child(4) { width:10%; }
.waiting td.decide { width:40%; white-space:normal; overflow:visible; }
.waiting label { margin-right:.6rem; }
#shadows th:nth-child(1) { width:12%; } #shadows th:nth-child(2) { width:13%; }
#shadows th:nth-child(3) { width:15%; } #shadows th:nth-child(4) { width:8%; }
#shadows th:nth-child(5), #shadows th:nth-child(6) { width:8%; }
#shadows th:nth-child(7) { width:21%; } #shadows th:nth-child(8) { width:15%; }
#shadows .bar { display:inline-block; height:.55rem; background:var(--ok); border-radius:2px; margin-right:.35rem; vertical-align:middle; }
#shadows .low { background:var(--warn); }
.chart canvas { width:100%; height:90px; background:#0c1116; border:1px solid var(--line); border-radius:4px; }
</style>
</head>
<body>
<header>
  <h1>Weft</h1>
  <span id="conn" class="down">connecting</span>
  <span class="kpi">end-to-end p50 / p99, last minute <b id="e2e">–</b></span>
  <span class="kpi">items done <b id="done">0</b></span>
  <span class="kpi">dead letters <b id="dlcount">0</b></span>
  <span class="kpi">SSE clients <b id="sse">0</b></span>
  <span class="creds"><input id="apikey" type="password" placeholder="API key (when required)" autocomplete="off">
    <input id="reviewer" type="text" placeholder="reviewer name" autocomplete="off"></span>
</header>
<main>
  <div id="wired" class="wide-group"></div>
  <section class="wide">
    <h2>Last five minutes</h2>
    <div class="charts">
      <div class="chart"><h3>items done per second</h3><canvas id="chart-rate" width="400" height="90"></canvas></div>
      <div class="chart"><h3>end-to-end p99 (ms)</h3><canvas id="chart-p99" width="400" height="90"></canvas></div>
      <div class="chart"><h3>backlog (messages)</h3><canvas id="chart-backlog" width="400" height="90"></canvas></div>
    </div>
  </section>
  <section class="wide">
    <h2>Live shadows</h2>
    <div id="shadows" class="muted">No live shadow attached (attach one: <code>deno task shadow attach</code>, see docs/SHADOW.md).</div>
  </section>
  <div id="defined" class="wide-group"></div>
<!--PANELS-->
  <section>
    <h2>Dead letters</h2>
    <div id="dl" class="muted">Loading…</div>
  </section>
</main>
<script>
"use strict";
// Each hand-wired pipeline's graph (its wiring's dashboard: title, and its stages as durable
// consumer names, as the metrics label them, in flow order), filled in when the page is served.
var PIPELINES = /*WIRED_GRAPHS*/[];
// Each panel's hooks: start() once, onKey() when the API key changes, tick() every 3 s.
var PANELS = [];
var STAGES = [];
PIPELINES.forEach(function (p) { p.stages.forEach(function (s) { STAGES.push(s[0]); }); });
var prev = null;
function el(tag, attrs, text) {
  var e = document.createElement(tag);
  if (attrs) for (var k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(n, digits) { return Number.isFinite(n) ? n.toFixed(digits) : "–"; }

function buildGraph() {
  var holder = document.getElementById("wired");
  PIPELINES.forEach(function (pipeline) {
    var section = el("section", { class: "wide", "data-pipeline": pipeline.name });
    section.appendChild(el("h2", null, pipeline.title));
    var g = el("div", { class: "graph" });
    section.appendChild(g);
    holder.appendChild(section);
    // With its definition's graph: its steps (waits and ends too) drawn as the definition's
    // edges join them, where its first step's box would be, and its edges listed below; its
    // other boxes (intake, state writer) around them.
    var steps = {};
    if (pipeline.graph) {
      pipeline.graph.nodes.forEach(function (n) { if (n.durable) steps[n.durable] = true; });
    }
    var drawn = false, i = 0;
    pipeline.stages.forEach(function (stage) {
      if (!steps[stage[0]]) { buildStage(g, stage[0], stage[1], i++); return; }
      if (drawn) return;
      drawn = true;
      if (i++ > 0) g.appendChild(el("span", { class: "arrow" }, "→"));
      drawGraph(g, pipeline.graph, function (n) { return n.label; });
    });
    if (pipeline.graph) section.appendChild(edgeList(pipeline.graph));
  });
}

// Draws a definition's graph into g as its edges are: its steps in columns by depth (the
// longest path to them from its start, loops aside), a work step (its durable consumer) with
// live figures, a join, wait, delay or end as a dashed box; and each edge of the definition,
// and no other, as an SVG arrow from its step's box to its target's (data-edge: its index in
// graph.edges), labelled with its route, onTimeout or onDeadline and a loop's bound. An edge
// spanning columns passes through a gap kept for it in each column between; a loop's edge (or
// any edge closing a cycle) runs back under the boxes. The arrows are drawn again whenever
// the boxes move (a resize, a box growing).
var SVG_NS = "http://www.w3.org/2000/svg";
var DAG_COUNT = 0;
function drawGraph(g, graph, labelOf) {
  var lay = layoutGraph(graph);
  var dag = el("div", { class: "dag", "data-dag": String(DAG_COUNT++) });
  var svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("class", "dag-edges");
  svg.setAttribute("aria-hidden", "true");
  dag.appendChild(svg);
  var cols = el("div", { class: "dag-cols" });
  dag.appendChild(cols);
  lay.columns.forEach(function (column) {
    var col = el("div", { class: "dag-col" });
    var work = false;
    column.forEach(function (slot) {
      if (slot.via) { col.appendChild(el("div", { class: "dag-via", "data-via": slot.via })); return; }
      var n = slot.node;
      if (n.durable) {
        work = true;
        buildStage(col, n.durable, labelOf(n), 0, n.id);
        if (STAGES.indexOf(n.durable) < 0) STAGES.push(n.durable);
      } else {
        var box = el("div", { class: "stage ctl", "data-step": n.id });
        box.appendChild(el("h3", null, n.label));
        box.appendChild(el("span", { class: "muted" }, n.kind));
        col.appendChild(box);
      }
    });
    if (!work) col.classList.add("ctl-col");
    cols.appendChild(col);
  });
  // Room for the loops' lanes under the boxes and their climbs beside the outer columns.
  if (lay.backs > 0) {
    dag.style.paddingBottom = (LANE * (lay.backs + 1)) + "px";
    dag.style.paddingLeft = dag.style.paddingRight = (LANE + GAP_STEP * lay.backs) + "px";
  }
  dag.weftLayout = lay;
  g.appendChild(dag);
  if (typeof ResizeObserver === "function") {
    var ro = new ResizeObserver(function () { routeEdges(dag); });
    ro.observe(dag);
    dag.querySelectorAll("[data-step]").forEach(function (b) { ro.observe(b); });
    dag.weftObserver = ro;
  } else {
    window.addEventListener("resize", function () { routeEdges(dag); });
  }
  routeEdges(dag);
  return dag;
}
var LANE = 14, GAP_STEP = 6;

// A definition's graph in columns: its edges (the input's aside) with back set on a loop's
// edge and on any other that closes a cycle, the columns (slots top to bottom: a step's node,
// or where a long edge passes, via), and how many edges run back.
function layoutGraph(graph) {
  var nodes = {}, ids = [], start = null, edges = [];
  graph.nodes.forEach(function (n) { if (n.id !== "$input") { nodes[n.id] = n; ids.push(n.id); } });
  graph.edges.forEach(function (e, k) {
    if (e.from === "$input") { start = e.to; return; }
    if (!nodes[e.from] || !nodes[e.to]) return;
    edges.push({ k: k, from: e.from, to: e.to, label: e.label, loop: e.loop, back: !!e.loop });
  });
  var out = {};
  ids.forEach(function (id) { out[id] = []; });
  edges.forEach(function (e) { out[e.from].push(e); });
  var state = {};
  function visit(id) {
    state[id] = 1;
    out[id].forEach(function (e) {
      if (e.back) return;
      if (state[e.to] === 1) e.back = true;
      else if (!state[e.to]) visit(e.to);
    });
    state[id] = 2;
  }
  var roots = (start && nodes[start] ? [start] : []).concat(ids);
  roots.forEach(function (id) { if (!state[id]) visit(id); });
  // Depth: the longest path over the forward edges (a join after all of its branches).
  var depth = {}, indeg = {}, rank = {}, order = 0;
  ids.forEach(function (id) { depth[id] = 0; indeg[id] = 0; });
  edges.forEach(function (e) { if (!e.back) indeg[e.to]++; });
  var queue = roots.filter(function (id, j) { return indeg[id] === 0 && roots.indexOf(id) === j; });
  while (queue.length) {
    var id = queue.shift();
    rank[id] = order++;
    out[id].forEach(function (e) {
      if (e.back) return;
      depth[e.to] = Math.max(depth[e.to], depth[id] + 1);
      if (--indeg[e.to] === 0) queue.push(e.to);
    });
  }
  var columns = [], slots = {};
  ids.slice().sort(function (a, b) { return rank[a] - rank[b]; }).forEach(function (id) {
    var s = { node: nodes[id], pred: [], succ: [], back: false, pos: rank[id] };
    slots[id] = s;
    (columns[depth[id]] = columns[depth[id]] || []).push(s);
  });
  for (var c = 0; c < columns.length; c++) columns[c] = columns[c] || [];
  edges.forEach(function (e) {
    if (e.back) { slots[e.from].back = slots[e.to].back = true; return; }
    e.via = [];
    var prev = slots[e.from];
    for (var d = depth[e.from] + 1; d < depth[e.to]; d++) {
      var v = { via: e.k + ":" + d, pred: [prev], succ: [], back: false, pos: prev.pos };
      prev.succ.push(v);
      e.via.push(v.via);
      columns[d].push(v);
      prev = v;
    }
    prev.succ.push(slots[e.to]);
    slots[e.to].pred.push(prev);
  });
  // Order each column by where its slots' neighbours stand (down, then up, twice), a step with
  // a loop lower on a tie.
  function place(col) { col.forEach(function (s, j) { s.pos = (j + 0.5) / col.length; }); }
  function sortBy(col, side) {
    col.forEach(function (s, j) {
      var near = s[side];
      s.key = near.length
        ? near.reduce(function (n, t) { return n + t.pos; }, 0) / near.length
        : s.pos;
      s.j = j;
    });
    col.sort(function (a, b) {
      return (a.key - b.key) || ((a.back ? 1 : 0) - (b.back ? 1 : 0)) || (a.j - b.j);
    });
    place(col);
  }
  columns.forEach(function (col) { col.sort(function (a, b) { return a.pos - b.pos; }); place(col); });
  for (var round = 0; round < 2; round++) {
    for (c = 1; c < columns.length; c++) sortBy(columns[c], "pred");
    for (c = columns.length - 2; c >= 0; c--) sortBy(columns[c], "succ");
  }
  return {
    edges: edges,
    columns: columns,
    backs: edges.filter(function (e) { return e.back; }).length,
  };
}

// Draws a graph's arrows between its boxes where they stand now.
function routeEdges(dag) {
  var lay = dag.weftLayout, svg = dag.firstChild;
  if (!dag.isConnected || !lay) return;
  var base = dag.getBoundingClientRect();
  function box(e) {
    var r = e.getBoundingClientRect();
    return { x: r.left - base.left, y: r.top - base.top, w: r.width, h: r.height, cy: r.top - base.top + r.height / 2 };
  }
  var boxes = {}, vias = {};
  dag.querySelectorAll("[data-step]").forEach(function (b) { boxes[b.getAttribute("data-step")] = box(b); });
  dag.querySelectorAll("[data-via]").forEach(function (v) { vias[v.getAttribute("data-via")] = box(v); });
  var cols = box(dag.querySelector(".dag-cols"));
  var bottom = cols.y + cols.h;
  svg.setAttribute("width", String(base.width));
  svg.setAttribute("height", String(base.height));
  svg.textContent = "";
  var marker = "weft-arrow-" + dag.getAttribute("data-dag");
  var defs = svg.appendChild(document.createElementNS(SVG_NS, "defs"));
  var m = defs.appendChild(svgEl("marker", { id: marker, viewBox: "0 0 10 10", refX: "10", refY: "5",
    markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" }));
  m.appendChild(svgEl("path", { d: "M0,0 L10,5 L0,10 z", class: "edge-head" }));
  // Each box's ports: its outgoing edges spread down its right side, its incoming ones down its
  // left, in the order of the boxes they come from or go to (edges running back last).
  var outs = {}, ins = {};
  lay.edges.forEach(function (e) {
    var next = e.back ? null : (e.via.length ? vias[e.via[0]] : boxes[e.to]);
    var prev = e.back ? null : (e.via.length ? vias[e.via[e.via.length - 1]] : boxes[e.from]);
    (outs[e.from] = outs[e.from] || []).push({ e: e, y: next ? next.cy : Infinity });
    (ins[e.to] = ins[e.to] || []).push({ e: e, y: prev ? prev.cy : Infinity });
  });
  var portOut = {}, portIn = {};
  function ports(list, into) {
    Object.keys(list).forEach(function (id) {
      var b = boxes[id], l = list[id].slice().sort(function (p, q) { return (p.y - q.y) || (p.e.k - q.e.k); });
      l.forEach(function (p, j) { into[p.e.k] = b.y + b.h * (j + 1) / (l.length + 1); });
    });
  }
  ports(outs, portOut);
  ports(ins, portIn);
  var lane = 0;
  lay.edges.forEach(function (e) {
    var a = boxes[e.from], b = boxes[e.to];
    if (!a || !b) return;
    var d, mid, text = [e.label, e.loop ? "≤" + e.loop + "×" : ""].filter(Boolean).join(" ");
    if (e.back) {
      // Out of its step's right side, down beside it to a lane under the boxes, back along it,
      // up beside its target and into its left side.
      var y = bottom + LANE * (lane + 1), xa = a.x + a.w + LANE / 2 + GAP_STEP * lane,
        xb = b.x - LANE / 2 - GAP_STEP * lane;
      lane++;
      d = rounded([[a.x + a.w, portOut[e.k]], [xa, portOut[e.k]], [xa, y], [xb, y], [xb, portIn[e.k]], [b.x, portIn[e.k]]]);
      mid = [(xa + xb) / 2, y];
    } else {
      var pts = [[a.x + a.w, portOut[e.k]]];
      e.via.forEach(function (k) { var v = vias[k]; pts.push([v.x, v.cy], [v.x + v.w, v.cy]); });
      pts.push([b.x, portIn[e.k]]);
      d = "M" + pts[0][0] + "," + pts[0][1];
      for (var j = 1; j < pts.length; j++) {
        var p = pts[j - 1], q = pts[j];
        if (j % 2 === 0) { d += " L" + q[0] + "," + q[1]; continue; }
        var cx = (p[0] + q[0]) / 2;
        d += " C" + cx + "," + p[1] + " " + cx + "," + q[1] + " " + q[0] + "," + q[1];
      }
      mid = [(pts[0][0] + pts[1][0]) / 2, (pts[0][1] + pts[1][1]) / 2];
    }
    svg.appendChild(svgEl("path", { d: d, class: "edge" + (e.back ? " back" : ""),
      "data-edge": String(e.k), "data-from": e.from, "data-to": e.to, "marker-end": "url(#" + marker + ")" }));
    if (text) {
      svg.appendChild(svgEl("text", { x: String(mid[0]), y: String(mid[1]), class: "edge-label",
        "data-edge": String(e.k), "data-from": e.from, "data-to": e.to }, text));
    }
  });
}
function svgEl(tag, attrs, text) {
  var e = document.createElementNS(SVG_NS, tag);
  for (var k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
// A path through points, its corners rounded.
function rounded(pts) {
  var d = "M" + pts[0][0] + "," + pts[0][1];
  for (var j = 1; j < pts.length - 1; j++) {
    var p = pts[j - 1], c = pts[j], n = pts[j + 1];
    var r = Math.min(6, Math.hypot(c[0] - p[0], c[1] - p[1]) / 2, Math.hypot(n[0] - c[0], n[1] - c[1]) / 2);
    var a = toward(c, p, r), b = toward(c, n, r);
    d += " L" + a[0] + "," + a[1] + " Q" + c[0] + "," + c[1] + " " + b[0] + "," + b[1];
  }
  var last = pts[pts.length - 1];
  return d + " L" + last[0] + "," + last[1];
}
function toward(from, to, r) {
  var len = Math.hypot(to[0] - from[0], to[1] - from[1]) || 1;
  return [from[0] + (to[0] - from[0]) * r / len, from[1] + (to[1] - from[1]) * r / len];
}

// Every edge of a definition's graph, with its label and a loop's bound.
function edgeList(graph) {
  return el("div", { class: "edges muted" }, graph.edges
    .filter(function (e) { return e.from !== "$input"; })
    .map(function (e) {
      return e.from + " → " + e.to + (e.label ? " (" + e.label + ")" : "") +
        (e.loop ? " ≤" + e.loop + "×" : "");
    }).join(" · "));
}

function buildStage(g, name, title, i, step) {
    if (i > 0) g.appendChild(el("span", { class: "arrow" }, /state/.test(name) ? "⇢" : "→"));
    var box = el("div", { class: "stage", "data-stage": name });
    if (step) box.setAttribute("data-step", step);
    box.appendChild(el("h3", null, title));
    var dl = el("dl");
    [["throughput", "rate", "/s"], ["latency", "latency", "ms"], ["processed", "processed", ""],
     ["backlog", "backlog", ""], ["in flight", "inflight", ""], ["retried", "retried", ""],
     ["errors", "errors", ""], ["dead-lettered", "dead", ""]].forEach(function (f) {
      dl.appendChild(el("dt", null, f[0] + (f[2] ? " (" + f[2] + ")" : "")));
      dl.appendChild(el("dd", { class: f[1] }, "0"));
    });
    box.appendChild(dl);
    g.appendChild(box);
}

function onMetrics(snap) {
  var t = Date.parse(snap.time);
  STAGES.forEach(function (name) {
    var s = snap.stages[name] || { processed: 0, failed: 0, retried: 0, deadLettered: 0,
      handlerSeconds: 0, handlerCount: 0, pending: 0, ackPending: 0 };
    var p = prev && prev.snap.stages[name];
    var dt = prev ? (t - prev.t) / 1000 : 0;
    var rate = p && dt > 0 ? (s.processed - p.processed) / dt : 0;
    var dc = p ? s.handlerCount - p.handlerCount : 0;
    var lat = dc > 0 ? (s.handlerSeconds - p.handlerSeconds) / dc
      : (s.handlerCount > 0 ? s.handlerSeconds / s.handlerCount : NaN);
    var box = document.querySelector('[data-stage="' + name + '"]');
    box.querySelector(".rate").textContent = fmt(rate, 1);
    box.querySelector(".latency").textContent = fmt(lat * 1000, 2);
    box.querySelector(".processed").textContent = String(s.processed);
    box.querySelector(".backlog").textContent = String(s.pending);
    box.querySelector(".inflight").textContent = String(s.ackPending);
    box.querySelector(".retried").textContent = String(s.retried);
    box.querySelector(".errors").textContent = String(s.failed);
    box.querySelector(".dead").textContent = String(s.deadLettered);
    box.classList.toggle("err", p ? s.failed > p.failed : false);
    box.classList.toggle("busy", s.pending > 0);
  });
  document.getElementById("sse").textContent = String(snap.sseClients);
  document.getElementById("dlcount").textContent = String(snap.deadLetters);
  document.getElementById("done").textContent = String(snap.endToEnd.count);
  snaps.push({ t: t, count: snap.endToEnd.count, buckets: snap.endToEnd.buckets || [],
    backlog: STAGES.reduce(function (n, name) { return n + ((snap.stages[name] || {}).pending || 0); }, 0) });
  while (snaps.length > 0 && t - snaps[0].t > 300000) snaps.shift();
  var minute = windowFrom(t - 60000);
  var p50 = quantile(minute, 0.5), p99 = quantile(minute, 0.99);
  document.getElementById("e2e").textContent = Number.isFinite(p50)
    ? fmt(p50 * 1000, 0) + " / " + fmt(p99 * 1000, 0) + " ms" : "–";
  drawCharts();
  renderShadows(snap.shadows || {});
  prev = { t: t, snap: snap };
}

/** The live shadows: one row each, agreement and kappa per compared field. */
function renderShadows(shadows) {
  var box = document.getElementById("shadows");
  var ids = Object.keys(shadows).sort();
  if (ids.length === 0) { if (!box.classList.contains("muted")) { box.className = "muted"; box.textContent = "No live shadow attached (attach one: deno task shadow attach, see docs/SHADOW.md)."; } return; }
  box.className = ""; box.textContent = "";
  var t = el("table"); var head = el("tr");
  ["Shadow", "Step", "Candidate", "State", "Decided", "Compared", "Agreement (kappa)", "Failed / budget / unmatched"].forEach(function (h) { head.appendChild(el("th", null, h)); });
  t.appendChild(el("thead")).appendChild(head);
  var tb = el("tbody");
  ids.forEach(function (id) {
    var s = shadows[id], n = s.items || {};
    var tr = el("tr", { "data-shadow": id });
    tr.append(el("td", null, id), el("td", null, s.pipeline + "." + s.step), el("td", { title: s.candidate }, s.candidate),
      el("td", { class: s.up ? "st-processed" : "st-failed" }, s.up ? "running" : "down"),
      el("td", null, String(n.decided || 0)), el("td", null, String(n.compared || 0)));
    var agree = el("td", { class: "agree" });
    Object.keys(s.fields).sort().forEach(function (f) {
      var a = s.fields[f].agreement, line = el("div", { "data-field": f });
      line.appendChild(el("span", { class: "bar" + (a < 0.8 ? " low" : ""), style: "width:" + Math.round(a * 60) + "px" }));
      line.appendChild(document.createTextNode(f + " " + fmt(a * 100, 1) + "% (" + fmt(s.fields[f].kappa, 2) + ")"));
      agree.appendChild(line);
    });
    tr.appendChild(agree);
    tr.appendChild(el("td", null, (n.failed || 0) + " / " + (n.over_budget || 0) + " / " + (n.unmatched || 0)));
    tb.appendChild(tr);
  });
  t.appendChild(tb); box.appendChild(t);
}

// Snapshots of the last five minutes: items done, end-to-end histogram, backlog.
var snaps = [];
/** The end-to-end histogram's counts since the snapshot at or after since (cumulative by bucket). */
function windowFrom(since) {
  var last = snaps[snaps.length - 1];
  var first = snaps.find(function (h) { return h.t >= since; }) || snaps[0];
  if (!last || !first) return [];
  var base = new Map(first.buckets.map(function (b) { return [b[0], b[1]]; }));
  return last.buckets.map(function (b) { return [b[0] === null ? Infinity : b[0], b[1] - (base.get(b[0]) || 0)]; });
}
/** The q-quantile (seconds) of a cumulative histogram, interpolated within its bucket. */
function quantile(buckets, q) {
  if (buckets.length === 0) return NaN;
  var total = buckets[buckets.length - 1][1];
  if (!(total > 0)) return NaN;
  var rank = q * total, lower = 0, below = 0;
  for (var i = 0; i < buckets.length; i++) {
    var le = buckets[i][0], cum = buckets[i][1];
    if (cum >= rank) {
      if (!Number.isFinite(le)) return lower;
      var inBucket = cum - below;
      return inBucket > 0 ? lower + (le - lower) * (rank - below) / inBucket : le;
    }
    lower = le; below = cum;
  }
  return lower;
}
function drawChart(id, points) {
  var c = document.getElementById(id);
  var g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  if (points.length < 2) return;
  var t0 = points[0][0], t1 = points[points.length - 1][0];
  var max = Math.max.apply(null, points.map(function (p) { return p[1]; }).concat([1]));
  g.strokeStyle = "#58a6ff"; g.lineWidth = 1.5; g.beginPath();
  points.forEach(function (p, i) {
    var x = (p[0] - t0) / Math.max(1, t1 - t0) * (c.width - 4) + 2;
    var y = c.height - 4 - (p[1] / max) * (c.height - 16);
    if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
  });
  g.stroke();
  g.fillStyle = "#8a96a3"; g.font = "11px system-ui"; g.fillText(fmt(max, max < 10 ? 1 : 0), 4, 11);
}
function drawCharts() {
  var rate = [], p99 = [], backlog = [];
  for (var i = 1; i < snaps.length; i++) {
    var a = snaps[i - 1], b = snaps[i];
    rate.push([b.t, Math.max(0, (b.count - a.count) / Math.max(0.001, (b.t - a.t) / 1000))]);
    var w = b.buckets.map(function (x, j) { return [x[0] === null ? Infinity : x[0], x[1] - ((a.buckets[j] || [0, 0])[1])]; });
    var q = quantile(w, 0.99);
    p99.push([b.t, Number.isFinite(q) ? q * 1000 : 0]);
    backlog.push([b.t, b.backlog]);
  }
  drawChart("chart-rate", rate); drawChart("chart-p99", p99); drawChart("chart-backlog", backlog);
}

/** An event of this mesh's items, or (site given: a hub) of an edge site's, shown as site/id. */
/**
 * Reads an SSE stream with fetch, so requests carry the API key (EventSource cannot send
 * headers). Calls onFrame per frame; resolves with the HTTP status once the stream ends.
 */
function readSse(path, signal, onFrame, headers) {
  var h = Object.assign({ accept: "text/event-stream" }, headers || {});
  return api(path, { headers: h, signal: signal }).then(function (r) {
    if (!r.ok || !r.body) return r.status;
    var reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    var buffer = "", frame = { id: "", event: "", data: "" };
    function pump() {
      return reader.read().then(function (chunk) {
        if (chunk.done) return r.status;
        buffer += chunk.value;
        var nl;
        while ((nl = buffer.indexOf("\\n")) >= 0) {
          var line = buffer.slice(0, nl).replace(/\\r$/, "");
          buffer = buffer.slice(nl + 1);
          if (line === "") {
            if (frame.data) onFrame(frame);
            frame = { id: "", event: "", data: "" };
          } else if (line.indexOf("data:") === 0) frame.data += line.slice(5).replace(/^ /, "");
          else if (line.indexOf("event:") === 0) frame.event = line.slice(6).trim();
          else if (line.indexOf("id:") === 0) frame.id = line.slice(3).trim();
        }
        return pump();
      });
    }
    return pump();
  }).catch(function () { return 0; });
}

var metricsCtl = null;
function connectMetrics() {
  var conn = document.getElementById("conn");
  if (metricsCtl) metricsCtl.abort();
  var ctl = metricsCtl = new AbortController();
  readSse("/dashboard/stream", ctl.signal, function (frame) {
    conn.textContent = "live"; conn.className = "live";
    if (frame.event === "metrics") onMetrics(JSON.parse(frame.data));
  }).then(function (status) {
    if (ctl.signal.aborted) return;
    if (status === 401 || status === 403) { conn.textContent = "needs an API key"; conn.className = "down"; return; }
    conn.textContent = "reconnecting"; conn.className = "down";
    setTimeout(connectMetrics, 2000);
  });
}

function setOptional(box, text) { box.textContent = text; box.className = "muted"; }

// The API key (kept for this tab only) goes in the Authorization header of API calls.
var keyInput = document.getElementById("apikey");
var reviewerInput = document.getElementById("reviewer");
keyInput.value = sessionStorage.getItem("weft.key") || "";
reviewerInput.value = sessionStorage.getItem("weft.reviewer") || "";
keyInput.addEventListener("change", function () {
  sessionStorage.setItem("weft.key", keyInput.value); loadDeadLetters(); loadPipelines();
  // The streams reconnect with the new key.
  connectMetrics();
  PANELS.forEach(function (p) { if (p.onKey) p.onKey(); });
});
reviewerInput.addEventListener("change", function () { sessionStorage.setItem("weft.reviewer", reviewerInput.value); });
function api(path, init) {
  init = init || {};
  var key = keyInput.value.trim();
  if (key) init.headers = Object.assign({}, init.headers || {}, { authorization: "Bearer " + key });
  return fetch(path, init);
}
function postJson(path, body) {
  return api(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
}

function loadDeadLetters() {
  var box = document.getElementById("dl");
  api("/deadletters?pending=true&limit=50").then(function (r) {
    if (r.status === 404 || r.status === 405) { setOptional(box, "Not available: this gateway has no /deadletters route."); return null; }
    if (r.status === 401 || r.status === 403) { setOptional(box, "Enter an admin API key above to see dead letters."); return null; }
    return r.json();
  }).then(function (body) {
    if (!body) return;
    var entries = body.items || [];
    box.textContent = ""; box.className = "";
    if (entries.length === 0) { setOptional(box, "No dead letters waiting for redrive."); return; }
    var t = el("table"); var tb = el("tbody");
    t.appendChild(el("thead")).appendChild(el("tr")).append(el("th", null, "Stage"), el("th", null, "Item"), el("th", null, "Reason"), el("th", null, ""));
    entries.forEach(function (e) {
      var l = e.letter || {};
      var tr = el("tr", { "data-letter": String(e.seq) });
      var b = el("button", { class: "secondary" }, "Redrive");
      b.addEventListener("click", function () { redrive(e.seq, b); });
      tr.append(el("td", null, l.stage || ""), el("td", null, l.item_id || ""), el("td", { title: l.reason || "" }, (l.code || "") + ": " + (l.reason || "")), el("td"));
      tr.lastChild.appendChild(b);
      tb.appendChild(tr);
    });
    t.appendChild(tb); box.appendChild(t);
  }).catch(function () { setOptional(box, "Could not load dead letters."); });
}

/** Re-submits one dead letter (by its DEADLETTER sequence). */
function redrive(seq, button) {
  button.disabled = true;
  postJson("/deadletters/redrive", { ids: [seq] })
    .then(function (r) { button.textContent = r.ok ? "Redriven" : "Failed (" + r.status + ")"; if (r.ok) loadDeadLetters(); })
    .catch(function () { button.textContent = "Failed"; });
}

// Pipelines run from definitions (GET /pipelines): one graph each, drawn from the definition
// (drawGraph): work steps (task, llm, router, agent: each with its durable consumer) get live
// figures; joins, waits, delays and ends are drawn as dashed boxes; an arrow for each edge; every
// edge is also listed under the graph with its label.
function addPipelines(list) {
  var holder = document.getElementById("defined");
  holder.querySelectorAll(".dag").forEach(function (d) { if (d.weftObserver) d.weftObserver.disconnect(); });
  holder.textContent = "";
  (list || []).forEach(function (p) {
    var section = el("section", { class: "wide", "data-pipeline": p.name });
    var h = el("h2", null, p.name + " pipeline ");
    h.appendChild(el("span", { class: "muted" }, "definition " + p.definition));
    section.appendChild(h);
    var g = el("div", { class: "graph" });
    section.appendChild(g);
    drawGraph(g, p.graph, function (n) { return n.label + " (" + n.kind + ")"; });
    section.appendChild(edgeList(p.graph));
    if ((p.waits || []).length > 0) {
      section.appendChild(el("h3", null, "Waiting for a decision"));
      section.appendChild(el("div", { class: "waiting", "data-waiting": p.name }, "…"));
    }
    holder.appendChild(section);
  });
  DEFINED = list || [];
  loadWaiting();
}
var DEFINED = [];
function loadPipelines() {
  api("/pipelines").then(function (r) { return r.ok ? r.json() : null; })
    .then(function (b) { if (b) addPipelines(b.pipelines); }).catch(function () {});
}

// Items held at a definition's wait steps (GET /pipelines/NAME/waiting), each with a form for
// its awaited event drawn from the wait's schema (a checkbox per boolean, a list per enum, a
// field per string or number; a JSON box without a schema). Sending it POSTs the event; a body
// the schema refuses shows the problem's detail.
function loadWaiting() {
  DEFINED.forEach(function (p) {
    var box = document.querySelector('[data-waiting="' + p.name + '"]');
    if (!box) return;
    api("/pipelines/" + encodeURIComponent(p.name) + "/waiting").then(function (r) {
      if (r.status === 401 || r.status === 403) { setOptional(box, "Enter an API key above to see what waits."); return null; }
      return r.ok ? r.json() : null;
    }).then(function (body) {
      if (!body) return;
      // Redrawn only when the list changes, so a form being filled in is kept.
      var ids = body.items.slice(0, 50).map(function (it) {
        return it.id + "@" + it.step + "@" + (it.claim ? it.claim.by : "");
      }).join(",");
      if (box.getAttribute("data-ids") === ids && box.textContent !== "…") return;
      box.setAttribute("data-ids", ids);
      // A row drawn again (its claim changed) keeps what the reviewer had typed into it.
      var typed = {};
      box.querySelectorAll("tr[data-waiting-item]").forEach(function (tr) {
        typed[tr.getAttribute("data-waiting-item") + "@" + tr.getAttribute("data-waiting-step")] =
          formValues(tr);
      });
      box.textContent = ""; box.className = "waiting";
      if (body.items.length === 0) { setOptional(box, "Nothing waits for a decision."); return; }
      var t = el("table"); var tb = el("tbody");
      body.items.slice(0, 50).forEach(function (it) {
        var wait = (p.waits || []).find(function (w) { return w.step === it.step; }) || {};
        var input = JSON.stringify(it.input);
        var tr = el("tr", { "data-waiting-item": it.id, "data-waiting-step": it.step });
        tr.append(el("td", null, it.id), el("td", null, it.step),
          el("td", { title: input }, input.length > 80 ? input.slice(0, 80) + "…" : input),
          el("td", it.claim ? { "data-claim": it.claim.by } : null,
            "until " + new Date(it.until).toLocaleTimeString() +
            (it.claim ? " · claimed by " + it.claim.by : "")));
        var cell = el("td", { class: "decide" });
        var read = decisionForm(cell, wait.schema);
        var b = el("button", null, "send " + wait.event);
        var note = el("span", { class: "muted" });
        b.addEventListener("click", function () {
          var bodyOut;
          try { bodyOut = read(); } catch (e) { note.textContent = "not JSON"; return; }
          b.disabled = true;
          postJson("/pipelines/" + encodeURIComponent(p.name) + "/items/" + encodeURIComponent(it.id) + "/" + encodeURIComponent(wait.event), bodyOut)
            .then(function (r) { return r.json().then(function (j) { return { ok: r.ok, j: j }; }); })
            .then(function (x) {
              b.disabled = false;
              note.textContent = x.ok ? "sent" : (x.j.detail || x.j.title || "refused");
              // Sent: the next refresh drops the item (it no longer waits).
              if (x.ok) { b.disabled = true; b.blur(); }
            }).catch(function () { b.disabled = false; note.textContent = "failed"; });
        });
        cell.append(b, note);
        tr.appendChild(cell);
        restoreFormValues(tr, typed[it.id + "@" + it.step]);
        tb.appendChild(tr);
      });
      t.appendChild(tb); box.appendChild(t);
    }).catch(function () { setOptional(box, "Could not load what waits."); });
  });
}
/** What is typed or ticked in a row's decision form, by input name. */
function formValues(tr) {
  var v = {};
  tr.querySelectorAll("input, select, textarea").forEach(function (i) {
    v[i.name || "body"] = i.type === "checkbox" ? i.checked : i.value;
  });
  return v;
}
/** Puts back what {@link formValues} read, into a row drawn again. */
function restoreFormValues(tr, v) {
  if (!v) return;
  tr.querySelectorAll("input, select, textarea").forEach(function (i) {
    var had = v[i.name || "body"];
    if (had === undefined) return;
    if (i.type === "checkbox") i.checked = had; else i.value = had;
  });
}
/** Draws inputs for an awaited event's body into the cell; returns a function reading them. */
function decisionForm(cell, schema) {
  var props = schema && schema.properties;
  if (!props) {
    var area = el("textarea", { rows: "2", cols: "30", "aria-label": "event body (JSON)" });
    area.value = "{}";
    cell.appendChild(area);
    return function () { return JSON.parse(area.value); };
  }
  var readers = [];
  Object.keys(props).forEach(function (name) {
    var ps = props[name] || {};
    var label = el("label", null, name + " ");
    var input;
    if (Array.isArray(ps.enum)) {
      input = el("select", { name: name });
      ps.enum.forEach(function (v) { input.appendChild(el("option", { value: JSON.stringify(v) }, String(v))); });
      readers.push(function (o) { o[name] = JSON.parse(input.value); });
    } else if (ps.type === "boolean") {
      input = el("input", { type: "checkbox", name: name });
      readers.push(function (o) { o[name] = input.checked; });
    } else {
      var numeric = ps.type === "number" || ps.type === "integer";
      input = el("input", { type: numeric ? "number" : "text", name: name, size: "12" });
      readers.push(function (o) {
        if (input.value !== "") o[name] = numeric ? Number(input.value) : input.value;
      });
    }
    label.appendChild(input);
    cell.appendChild(label);
  });
  return function () { var o = {}; readers.forEach(function (f) { f(o); }); return o; };
}

// The hand-wired pipelines' own panels (their gateway parts' dashboard panels).
/*PANEL_SCRIPTS*/

buildGraph();
loadPipelines();
connectMetrics();
loadDeadLetters();
PANELS.forEach(function (p) { if (p.start) p.start(); });
setInterval(function () {
  loadDeadLetters(); loadWaiting();
  PANELS.forEach(function (p) { if (p.tick) p.tick(); });
}, 3000);
</script>
</body>
</html>
`;
