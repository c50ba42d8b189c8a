/**
 * The content moderation pipeline's panel on the dashboard (src/gateway/dashboard_page.ts):
 * the review queue (`GET /reviews`; approve or reject = `POST /reviews/:id/claim`, then
 * `POST /reviews/:id/decision`, as the reviewer named in the page's header), and says so when
 * the gateway has no such routes. Run in the page's script with its helpers.
 *
 * @module
 */
import type { DashboardPanel } from "../../src/gateway/dashboard_page.ts";

/** The review-queue panel. */
export const REVIEW_PANEL: DashboardPanel = {
  html: `  <section>
    <h2>Review queue</h2>
    <div id="reviews" class="muted">Loading…</div>
  </section>
`,
  script: `function loadReviews() {
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

PANELS.push({ start: loadReviews, onKey: loadReviews, tick: loadReviews });
`,
};
