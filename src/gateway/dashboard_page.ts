/**
 * The live dashboard: one self-contained HTML page (inline CSS and vanilla JS, no build
 * step, nothing fetched from elsewhere) served by the gateway at `GET /dashboard`. Kept in
 * a module rather than a file so the gateway needs no read permission.
 *
 * It draws the feedback pipeline with per-stage throughput, handler latency, backlog and
 * errors from `/dashboard/stream`; lists recent items from `/dashboard/recent` and the
 * live `/events` stream (a row opens the item's history from `/feedback/:id/events`);
 * shows dead letters waiting for redrive (`GET /deadletters?pending=true`, redrive with
 * `POST /deadletters/redrive {"ids":[seq]}`) and
 * the review queue (`GET /reviews`; approve or reject = `POST /reviews/:id/claim`, then
 * `POST /reviews/:id/decision`) when the gateway
 * has those routes, and says so when it does not. All data is written with textContent.
 *
 * @module
 */

/** The dashboard page. */
export const DASHBOARD_HTML: string = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Weft dashboard</title>
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
.graph { display:flex; align-items:stretch; gap:0; overflow-x:auto; }
.stage { flex:1 1 0; min-width:130px; border:1px solid var(--line); border-radius:6px; padding:.5rem .6rem; background:#1d252e; }
.stage h3 { margin:0 0 .3rem; font-size:.95rem; }
.stage dl { display:grid; grid-template-columns:auto 1fr; gap:.1rem .5rem; margin:0; font-size:.8rem; }
.stage dt { color:var(--dim); } .stage dd { margin:0; text-align:right; font-variant-numeric:tabular-nums; }
.stage.err { border-color:var(--bad); } .stage.busy { border-color:var(--warn); }
.arrow { align-self:center; color:var(--dim); padding:0 .35rem; font-size:1.2rem; }
table { width:100%; border-collapse:collapse; font-size:.82rem; table-layout:fixed; }
th, td { text-align:left; padding:.3rem .4rem; border-bottom:1px solid var(--line); white-space:nowrap; overflow:hidden; text-overflow:ellipsis; }
#items-table th:nth-child(1) { width:36%; } #items-table th:nth-child(2) { width:34%; }
#items-table th:nth-child(3) { width:13%; } #items-table th:nth-child(4) { width:17%; }
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
</style>
</head>
<body>
<header>
  <h1>Weft</h1>
  <span id="conn" class="down">connecting</span>
  <span class="kpi">end-to-end avg <b id="e2e">–</b></span>
  <span class="kpi">items done <b id="done">0</b></span>
  <span class="kpi">dead letters <b id="dlcount">0</b></span>
  <span class="kpi">SSE clients <b id="sse">0</b></span>
  <span class="creds"><input id="apikey" type="password" placeholder="API key (when required)" autocomplete="off">
    <input id="reviewer" type="text" placeholder="reviewer name" autocomplete="off"></span>
</header>
<main>
  <section class="wide">
    <h2>Feedback pipeline</h2>
    <div class="graph" id="graph"></div>
  </section>
  <section class="wide">
    <h2>Content moderation pipeline</h2>
    <div class="graph" id="content-graph"></div>
  </section>
  <section>
    <h2>Recent items</h2>
    <form id="submit"><input type="text" id="text" name="text" placeholder="Submit feedback text" required>
      <button type="submit">Submit</button></form>
    <table id="items-table"><thead><tr><th>Item</th><th>Text</th><th>Stage</th><th>Updated</th></tr></thead>
      <tbody id="items"></tbody></table>
  </section>
  <section>
    <h2>Item history <span id="hist-id" class="muted"></span></h2>
    <div id="history" class="muted">Click an item to see its full event history.</div>
  </section>
  <section>
    <h2>Dead letters</h2>
    <div id="dl" class="muted">Loading…</div>
  </section>
  <section>
    <h2>Review queue</h2>
    <div id="reviews" class="muted">Loading…</div>
  </section>
</main>
<script>
"use strict";
// Each pipeline's stages (durable consumer names, as the metrics label them) in flow order.
var PIPELINES = [
  { graph: "graph", stages: [["ingest", "ingest"], ["sentiment", "sentiment"], ["topics", "topics"],
    ["dispatch", "dispatch"], ["state", "state writer"]] },
  { graph: "content-graph", stages: [["moderation", "moderation"],
    ["storage-moderated", "storage (safe)"], ["review-queue", "review queue (flagged)"],
    ["review-sla", "review SLA"], ["storage-decided", "storage (decided)"],
    ["content-state", "state writer"]] },
];
var STAGES = [];
PIPELINES.forEach(function (p) { p.stages.forEach(function (s) { STAGES.push(s[0]); }); });
var STEP = { "feedback.ingested": "ingested", "feedback.sentiment_analyzed": "sentiment",
  "feedback.topics_extracted": "topics", "feedback.dispatched": "dispatched",
  "feedback.processed": "processed", "feedback.failed": "failed" };
var RANK = { ingested: 1, sentiment: 2, topics: 3, dispatched: 4, processed: 5, failed: 5 };
var items = new Map();
var seen = new Set();
var prev = null;
var selected = null;
var historySource = null;

function el(tag, attrs, text) {
  var e = document.createElement(tag);
  if (attrs) for (var k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(n, digits) { return Number.isFinite(n) ? n.toFixed(digits) : "–"; }

function buildGraph() {
  PIPELINES.forEach(function (pipeline) {
    var g = document.getElementById(pipeline.graph);
    pipeline.stages.forEach(function (stage, i) {
      buildStage(g, stage[0], stage[1], i);
    });
  });
}

function buildStage(g, name, title, i) {
    if (i > 0) g.appendChild(el("span", { class: "arrow" }, /state/.test(name) ? "⇢" : "→"));
    var box = el("div", { class: "stage", "data-stage": name });
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
  document.getElementById("e2e").textContent = snap.endToEnd.count > 0
    ? fmt(snap.endToEnd.seconds / snap.endToEnd.count * 1000, 1) + " ms" : "–";
  prev = { t: t, snap: snap };
}

function onEvent(seq, ev) {
  if (!ev || typeof ev.item_id !== "string" || seen.has(ev.id)) return;
  seen.add(ev.id);
  var it = items.get(ev.item_id);
  if (!it) { it = { id: ev.item_id, text: "", step: "ingested", time: ev.time, row: null }; items.set(ev.item_id, it); }
  var step = STEP[ev.type] || ev.type;
  if (ev.data && typeof ev.data.text === "string" && !it.text) it.text = ev.data.text;
  if ((RANK[step] || 0) >= (RANK[it.step] || 0)) it.step = step;
  if (!it.time || ev.time > it.time) it.time = ev.time;
  renderItem(it);
}

function renderItem(it) {
  var tbody = document.getElementById("items");
  if (!it.row) {
    it.row = el("tr", { class: "item", "data-item": it.id });
    it.row.addEventListener("click", function () { openHistory(it.id); });
  }
  var row = it.row;
  row.textContent = "";
  row.appendChild(el("td", null, it.id));
  row.appendChild(el("td", { title: it.text }, it.text));
  var cls = it.step === "processed" ? "st-processed" : it.step === "failed" ? "st-failed" : "st-pending";
  row.appendChild(el("td", { class: "step " + cls }, it.step));
  row.appendChild(el("td", null, (it.time || "").slice(11, 23)));
  tbody.insertBefore(row, tbody.firstChild);
  while (tbody.children.length > 100) {
    var last = tbody.lastChild; items.delete(last.getAttribute("data-item")); tbody.removeChild(last);
  }
}

function openHistory(id) {
  if (historySource) historySource.close();
  selected = id;
  document.querySelectorAll("tr.sel").forEach(function (r) { r.classList.remove("sel"); });
  var row = document.querySelector('tr[data-item="' + CSS.escape(id) + '"]');
  if (row) row.classList.add("sel");
  document.getElementById("hist-id").textContent = id;
  var box = document.getElementById("history");
  box.textContent = "";
  box.classList.remove("muted");
  var src = historySource = new EventSource("/feedback/" + encodeURIComponent(id) + "/events");
  var types = Object.keys(STEP);
  var show = function (msg) {
    if (selected !== id) return;
    var ev; try { ev = JSON.parse(msg.data); } catch (e) { return; }
    var d = el("div", { class: "ev" });
    d.appendChild(el("b", null, ev.type));
    d.appendChild(document.createTextNode("  " + ev.time + "  " + (ev.source || "") + "  seq " + msg.lastEventId));
    d.appendChild(el("pre", null, JSON.stringify(ev.data, null, 1)));
    box.appendChild(d);
    if (ev.type === "feedback.processed" || ev.type === "feedback.failed") src.close();
  };
  types.forEach(function (t) { src.addEventListener(t, show); });
  src.onerror = function () { src.close(); };
}

function connectMetrics() {
  var conn = document.getElementById("conn");
  var src = new EventSource("/dashboard/stream");
  src.addEventListener("metrics", function (m) { onMetrics(JSON.parse(m.data)); });
  src.onopen = function () { conn.textContent = "live"; conn.className = "live"; };
  src.onerror = function () { conn.textContent = "reconnecting"; conn.className = "down"; };
}

// The live event feed, read with fetch so it can carry the API key (EventSource cannot send
// headers); reconnects with Last-Event-ID after a drop.
var lastSeq = "";
function connectEvents() {
  var headers = { accept: "text/event-stream" };
  if (lastSeq) headers["last-event-id"] = lastSeq;
  var buffer = "";
  var frame = { id: "", event: "", data: "" };
  api("/events", { headers: headers }).then(function (r) {
    if (!r.ok || !r.body) throw r;
    if (!lastSeq) loadRecent();
    var reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    function pump() {
      return reader.read().then(function (chunk) {
        if (chunk.done) throw new Error("closed");
        buffer += chunk.value;
        var nl;
        while ((nl = buffer.indexOf("\\n")) >= 0) {
          var line = buffer.slice(0, nl).replace(/\\r$/, "");
          buffer = buffer.slice(nl + 1);
          if (line === "") {
            if (frame.data && STEP[frame.event]) {
              lastSeq = frame.id;
              try { onEvent(Number(frame.id), JSON.parse(frame.data)); } catch (e) { /* skip */ }
            }
            frame = { id: "", event: "", data: "" };
          } else if (line.indexOf("data:") === 0) frame.data += line.slice(5).replace(/^ /, "");
          else if (line.indexOf("event:") === 0) frame.event = line.slice(6).trim();
          else if (line.indexOf("id:") === 0) frame.id = line.slice(3).trim();
        }
        return pump();
      });
    }
    return pump();
  }).catch(function () { setTimeout(connectEvents, 2000); });
}

function loadRecent() {
  api("/dashboard/recent?limit=300").then(function (r) { return r.json(); }).then(function (body) {
    body.events.forEach(function (e) { onEvent(e.seq, e.event); });
  }).catch(function () {});
}

function setOptional(box, text) { box.textContent = text; box.className = "muted"; }

// The API key (kept for this tab only) goes in the Authorization header of API calls.
var keyInput = document.getElementById("apikey");
var reviewerInput = document.getElementById("reviewer");
keyInput.value = sessionStorage.getItem("weft.key") || "";
reviewerInput.value = sessionStorage.getItem("weft.reviewer") || "";
keyInput.addEventListener("change", function () {
  sessionStorage.setItem("weft.key", keyInput.value); loadDeadLetters(); loadReviews();
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

function loadReviews() {
  var box = document.getElementById("reviews");
  api("/reviews?status=pending").then(function (r) {
    if (r.status === 404 || r.status === 405) { setOptional(box, "Not available: the moderation flow is not enabled."); return null; }
    if (r.status === 401 || r.status === 403) { setOptional(box, "Enter a reviewer API key above to see the queue."); return null; }
    return r.json();
  }).then(function (body) {
    if (!body) return;
    var list = Array.isArray(body) ? body : (body.items || []);
    box.textContent = ""; box.className = "";
    if (list.length === 0) { setOptional(box, "Nothing waits for review."); return; }
    var t = el("table"); var tb = el("tbody");
    list.slice(0, 50).forEach(function (rv) {
      var id = rv.id;
      var text = (rv.content && rv.content.text) || "(binary upload)";
      var reasons = (rv.moderation && rv.moderation.reasons || []).join("; ");
      var tr = el("tr", { "data-review": id });
      tr.append(el("td", null, id), el("td", { title: text }, text), el("td", null, reasons), el("td"));
      ["approve", "reject"].forEach(function (verb) {
        var b = el("button", { class: verb === "reject" ? "danger" : "" }, verb);
        b.addEventListener("click", function () { decide(id, verb, b); });
        tr.lastChild.appendChild(b);
      });
      tb.appendChild(tr);
    });
    t.appendChild(tb); box.appendChild(t);
  }).catch(function () { setOptional(box, "Could not load the review queue."); });
}

/** Claims the item (so no other reviewer decides it too), then decides. */
function decide(id, verb, button) {
  button.disabled = true;
  var who = reviewerInput.value.trim();
  var base = who ? { reviewer: who } : {};
  postJson("/reviews/" + encodeURIComponent(id) + "/claim", base).then(function (r) {
    if (!r.ok) throw r;
    return postJson("/reviews/" + encodeURIComponent(id) + "/decision",
      Object.assign({ decision: verb, reason: verb + "d on the dashboard" }, base));
  }).then(function (r) {
    if (!r.ok) throw r;
    button.textContent = verb === "approve" ? "approved" : "rejected";
    loadReviews();
  }).catch(function (r) {
    button.textContent = "failed" + (r && r.status ? " (" + r.status + ")" : "");
  });
}

document.getElementById("submit").addEventListener("submit", function (e) {
  e.preventDefault();
  var input = document.getElementById("text");
  postJson("/feedback", { text: input.value, channel: "dashboard" })
    .then(function (r) { return r.json(); })
    .then(function (body) { if (body.id) { input.value = ""; document.body.setAttribute("data-last-submitted", body.id); } });
});

buildGraph();
connectMetrics();
connectEvents();
loadDeadLetters();
loadReviews();
setInterval(function () { loadDeadLetters(); loadReviews(); }, 3000);
</script>
</body>
</html>
`;
