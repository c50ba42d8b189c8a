/**
 * The feedback pipeline's panels on the dashboard (src/gateway/dashboard_page.ts): recent
 * items with their sentiment, topics, team and stage, filled from `/dashboard/recent` and the
 * live `/events` stream (on a hub, its edge sites' items too), a form that submits feedback,
 * and an item's history from `/feedback/:id/events`. Plain HTML and vanilla JS, run in the
 * page's script with its helpers (`el`, `api`, `postJson`, `readSse`, `setOptional`); all data
 * is written with textContent.
 *
 * @module
 */
import type { DashboardPanel } from "../../src/gateway/dashboard_page.ts";

/** The recent-items and item-history panels. */
export const FEEDBACK_PANEL: DashboardPanel = {
  html: `  <section>
    <h2>Recent items</h2>
    <form id="submit"><input type="text" id="text" name="text" placeholder="Submit feedback text" required>
      <button type="submit">Submit</button></form>
    <input type="text" id="filter" class="filter" placeholder="Filter: item, text, sentiment, topic, team, stage" autocomplete="off">
    <table id="items-table"><thead><tr><th>Item</th><th>Text</th><th>Sentiment</th><th>Topics</th><th>Team</th><th>Stage</th><th>Updated</th></tr></thead>
      <tbody id="items"></tbody></table>
  </section>
  <section>
    <h2>Item history <span id="hist-id" class="muted"></span></h2>
    <div id="history" class="muted">Click an item to see its full event history.</div>
  </section>
`,
  script: `var STEP = { "feedback.ingested": "ingested", "feedback.sentiment_analyzed": "sentiment",
  "feedback.topics_extracted": "topics", "feedback.dispatched": "dispatched",
  "feedback.processed": "processed", "feedback.failed": "failed" };
var RANK = { ingested: 1, sentiment: 2, topics: 3, dispatched: 4, processed: 5, failed: 5 };
var items = new Map();
var seen = new Set();
var selected = null;
var historySource = null;

function onEvent(seq, ev, site) {
  if (!ev || typeof ev.item_id !== "string") return;
  var key = site ? site + "/" + ev.item_id : ev.item_id;
  if (seen.has(key + " " + ev.id)) return;
  seen.add(key + " " + ev.id);
  var it = items.get(key);
  if (!it) { it = { id: key, item: ev.item_id, site: site || "", text: "", sentiment: "", topics: "", team: "", step: "ingested", time: ev.time, row: null }; items.set(key, it); }
  var step = STEP[ev.type] || ev.type;
  var d = ev.data || {};
  if (typeof d.text === "string" && !it.text) it.text = d.text;
  if (d.sentiment && d.sentiment.label) it.sentiment = d.sentiment.label;
  if (d.topics && Array.isArray(d.topics.topics)) it.topics = d.topics.topics.join(", ");
  if (d.routing && d.routing.team) it.team = d.routing.team;
  if ((RANK[step] || 0) >= (RANK[it.step] || 0)) it.step = step;
  if (!it.time || ev.time > it.time) it.time = ev.time;
  renderItem(it);
}

function renderItem(it) {
  var tbody = document.getElementById("items");
  if (!it.row) {
    it.row = el("tr", { class: "item", "data-item": it.id });
    it.row.addEventListener("click", function () { if (it.site) openSiteItem(it); else openHistory(it.id); });
  }
  var row = it.row;
  row.textContent = "";
  row.appendChild(el("td", null, it.id));
  row.appendChild(el("td", { title: it.text }, it.text));
  row.appendChild(el("td", { class: "sentiment" }, it.sentiment));
  row.appendChild(el("td", { class: "topics", title: it.topics }, it.topics));
  row.appendChild(el("td", { class: "team", title: it.team }, it.team));
  var cls = it.step === "processed" ? "st-processed" : it.step === "failed" ? "st-failed" : "st-pending";
  row.appendChild(el("td", { class: "step " + cls }, it.step));
  row.appendChild(el("td", null, (it.time || "").slice(11, 23)));
  applyFilter(row, it);
  var hint = tbody.querySelector("tr.hint"); if (hint) tbody.removeChild(hint);
  tbody.insertBefore(row, tbody.firstChild);
  while (tbody.children.length > 100) {
    var last = tbody.lastChild; items.delete(last.getAttribute("data-item")); tbody.removeChild(last);
  }
}

var filterInput = document.getElementById("filter");
function applyFilter(row, it) {
  var f = filterInput.value.trim().toLowerCase();
  var hay = [it.id, it.text, it.sentiment, it.topics, it.team, it.step].join(" ").toLowerCase();
  row.style.display = !f || hay.indexOf(f) >= 0 ? "" : "none";
}
filterInput.addEventListener("input", function () {
  items.forEach(function (it) { if (it.row) applyFilter(it.row, it); });
});

/** One line saying what an event means, instead of its raw JSON. */
function summary(ev) {
  var d = ev.data || {};
  switch (ev.type) {
    case "feedback.ingested": return "text: " + (d.text || "") + (d.channel ? "  (via " + d.channel + ")" : "");
    case "feedback.sentiment_analyzed": return d.sentiment ? "sentiment " + d.sentiment.label + (typeof d.sentiment.score === "number" ? " (" + d.sentiment.score.toFixed(2) + ")" : "") : "";
    case "feedback.topics_extracted": return d.topics ? "topics: " + (d.topics.topics || []).join(", ") : "";
    case "feedback.dispatched": case "feedback.processed": return d.routing ? "team: " + d.routing.team + (d.routing.reason ? " (" + d.routing.reason + ")" : "") : "";
    case "feedback.failed": return "failed in " + (d.stage || "?") + ": " + (d.code || "") + " " + (d.reason || "");
    default: return "";
  }
}

function openHistory(id) {
  selected = id;
  document.querySelectorAll("tr.sel").forEach(function (r) { r.classList.remove("sel"); });
  var row = document.querySelector('tr[data-item="' + CSS.escape(id) + '"]');
  if (row) row.classList.add("sel");
  document.getElementById("hist-id").textContent = id;
  var box = document.getElementById("history");
  box.textContent = "";
  box.classList.remove("muted");
  if (historySource) historySource.abort();
  var ctl = historySource = new AbortController();
  readSse("/feedback/" + encodeURIComponent(id) + "/events", ctl.signal, function (frame) {
    if (selected !== id || !STEP[frame.event]) return;
    var ev; try { ev = JSON.parse(frame.data); } catch (e) { return; }
    var d = el("div", { class: "ev" });
    d.appendChild(el("b", null, ev.type));
    d.appendChild(document.createTextNode("  " + ev.time + "  " + (ev.source || "") + "  seq " + frame.id));
    var line = summary(ev);
    if (line) d.appendChild(el("div", { class: "sum" }, line));
    var raw = el("details"); raw.appendChild(el("summary", null, "raw event"));
    raw.appendChild(el("pre", null, JSON.stringify(ev.data, null, 1)));
    d.appendChild(raw);
    box.appendChild(d);
  }).then(function (status) {
    if (status === 401 || status === 403) setOptional(box, "Enter an API key above to see the item's history.");
  });
}

/** An edge site's item (on a hub): its state, folded from the events the hub holds. */
function openSiteItem(it) {
  selected = it.id;
  if (historySource) historySource.abort();
  document.getElementById("hist-id").textContent = it.id;
  var box = document.getElementById("history");
  box.textContent = ""; box.classList.remove("muted");
  api("/sites/" + encodeURIComponent(it.site) + "/feedback/" + encodeURIComponent(it.item)).then(function (r) {
    return r.ok ? r.json() : null;
  }).then(function (state) {
    if (!state || selected !== it.id) return;
    box.appendChild(el("div", { class: "sum" }, "site " + state.site + ": " + state.status + " (stage " + state.stage + ")"));
    box.appendChild(el("pre", null, JSON.stringify(state.stages, null, 1)));
  }).catch(function () {});
}

var eventsCtl = null;
// The live event feed; reconnects with Last-Event-ID after a drop.
var lastSeq = "";
function connectEvents() {
  if (eventsCtl) eventsCtl.abort();
  var ctl = eventsCtl = new AbortController();
  // First the snapshot, then the live feed from where the snapshot ends: an event stored in
  // between is not lost (a feed opened "from now" beside the snapshot could miss it).
  if (!lastSeq) {
    loadRecent().then(function (seq) {
      if (ctl.signal.aborted) return;
      if (seq !== null) lastSeq = String(seq);
      follow(ctl);
    });
  } else follow(ctl);
}
function follow(ctl) {
  var headers = lastSeq ? { "last-event-id": lastSeq } : {};
  readSse("/events", ctl.signal, function (frame) {
    if (!STEP[frame.event]) return;
    lastSeq = frame.id;
    try { onEvent(Number(frame.id), JSON.parse(frame.data)); } catch (e) { /* skip */ }
  }, headers).then(function (status) {
    if (ctl.signal.aborted || status === 401 || status === 403) return;
    setTimeout(connectEvents, 2000);
  });
}

// Fills the table from the latest events; resolves to the stream sequence the snapshot ends
// at (null when there is none: no key, or it failed).
function loadRecent() {
  var tbody = document.getElementById("items");
  return api("/dashboard/recent?pipeline=feedback&limit=300").then(function (r) {
    if (r.status === 401 || r.status === 403) {
      if (!tbody.querySelector("tr.hint")) {
        var tr = el("tr", { class: "hint" }); tr.appendChild(el("td", { colspan: "7", class: "muted" }, "Enter an API key above to see recent items."));
        tbody.appendChild(tr);
      }
      return null;
    }
    return r.json();
  }).then(function (body) {
    if (body) body.events.forEach(function (e) { onEvent(e.seq, e.event); });
    // A hub: its edge sites' items too, then each site's events live from where the snapshot
    // ends (GET /sites/{site}/events, resumed after the snapshot's last event: no gap).
    if (body && body.site_events) {
      body.site_events.forEach(function (e) {
        onEvent(e.seq, e.event, e.site);
        var st = siteStreams[e.site] = siteStreams[e.site] || { last: "", ctl: null };
        if (!st.ctl && (!st.last || e.seq > Number(st.last))) st.last = String(e.seq);
      });
      connectSites();
    }
    return body && typeof body.last_seq === "number" ? body.last_seq : null;
  }).catch(function () { return null; });
}

/** A hub's edge sites' live event streams, by site: the last event id seen, the reader. */
var siteStreams = {};
function connectSites() {
  api("/sites").then(function (r) { return r.ok ? r.json() : null; }).then(function (body) {
    if (!body) return;
    body.sites.forEach(function (s) {
      var st = siteStreams[s.site] = siteStreams[s.site] || { last: "", ctl: null };
      if (!st.ctl) connectSite(s.site);
    });
  }).catch(function () {});
}
function connectSite(site) {
  var st = siteStreams[site];
  if (st.ctl) st.ctl.abort();
  var ctl = st.ctl = new AbortController();
  var headers = st.last ? { "last-event-id": st.last } : {};
  readSse("/sites/" + encodeURIComponent(site) + "/events", ctl.signal, function (frame) {
    st.last = frame.id;
    if (!STEP[frame.event]) return;
    try { onEvent(Number(frame.id), JSON.parse(frame.data), site); } catch (e) { /* skip */ }
  }, headers).then(function (status) {
    if (ctl.signal.aborted || status === 401 || status === 403 || status === 404) return;
    setTimeout(function () { if (st.ctl === ctl) connectSite(site); }, 2000);
  });
}

document.getElementById("submit").addEventListener("submit", function (e) {
  e.preventDefault();
  var input = document.getElementById("text");
  postJson("/feedback", { text: input.value, channel: "dashboard" })
    .then(function (r) { return r.json(); })
    .then(function (body) { if (body.id) { input.value = ""; document.body.setAttribute("data-last-submitted", body.id); } });
});

PANELS.push({
  start: connectEvents,
  onKey: function () {
    // The streams reconnect with the new key.
    lastSeq = ""; connectEvents();
    Object.keys(siteStreams).forEach(function (site) { connectSite(site); });
    if (selected) openHistory(selected);
  },
});
`,
};
