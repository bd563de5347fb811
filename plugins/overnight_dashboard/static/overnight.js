// The Overnight page: per-market charts (inline SVG) and the user lookup. Plain JS, relative URLs only.
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs, text) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  // Bars: duration in seconds; line: users processed; one small chart per market.
  function drawChart(market, runs) {
    var W = 360, H = 150, L = 36, R = 40, T = 10, B = 22;
    var box = el("div", { "class": "chart", "data-market": market });
    box.appendChild(el("h3", {}, market + " (" + runs.length + " runs)"));
    var s = svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
                         "aria-label": market + ": duration and users over the last runs" });
    var maxD = Math.max.apply(null, runs.map(function (r) { return r.durationSeconds || 0; }).concat([0.001]));
    var maxU = Math.max.apply(null, runs.map(function (r) { return r.usersProcessed || 0; }).concat([1]));
    var plotW = W - L - R, plotH = H - T - B, step = plotW / Math.max(runs.length, 1);
    s.appendChild(svg("line", { x1: L, y1: T + plotH, x2: L + plotW, y2: T + plotH, stroke: "#cbd5e0" }));
    s.appendChild(svg("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, maxD.toFixed(1) + "s"));
    s.appendChild(svg("text", { x: L - 4, y: T + plotH, "text-anchor": "end" }, "0"));
    s.appendChild(svg("text", { x: L + plotW + 4, y: T + 8 }, String(maxU)));
    var points = [];
    runs.forEach(function (r, i) {
      var d = r.durationSeconds || 0, h = plotH * d / maxD, x = L + i * step;
      var bar = svg("rect", { x: x + step * 0.15, y: T + plotH - h, width: Math.max(step * 0.7, 1), height: h,
                              fill: r.status === "failed" ? "#feb2b2" : "#90cdf4" });
      bar.appendChild(svg("title", {}, r.sessionDate + " " + r.status + ": " + d.toFixed(1) + " s, " +
                                       r.usersProcessed + " users"));
      s.appendChild(bar);
      points.push((x + step / 2).toFixed(1) + "," + (T + plotH - plotH * (r.usersProcessed || 0) / maxU).toFixed(1));
    });
    s.appendChild(svg("polyline", { points: points.join(" "), fill: "none", stroke: "#2f855a", "stroke-width": 2 }));
    points.forEach(function (p) {
      var xy = p.split(",");
      s.appendChild(svg("circle", { cx: xy[0], cy: xy[1], r: 2.5, fill: "#2f855a" }));
    });
    if (runs.length) {
      s.appendChild(svg("text", { x: L, y: H - 6 }, runs[0].sessionDate));
      s.appendChild(svg("text", { x: L + plotW, y: H - 6, "text-anchor": "end" }, runs[runs.length - 1].sessionDate));
    }
    box.appendChild(s);
    return box;
  }

  function drawCharts() {
    var holder = document.getElementById("charts");
    var data = [];
    try { data = JSON.parse(document.getElementById("history-data").textContent || "[]"); } catch (e) { data = []; }
    if (!data.length) { holder.appendChild(el("p", { "class": "muted" }, "No runs to chart yet.")); return; }
    data.forEach(function (m) { holder.appendChild(drawChart(m.market, m.history)); });
  }

  function badge(cls, text) { return el("span", { "class": "badge " + cls }, text); }

  function showDashboard(out, d) {
    out.textContent = "";
    var head = el("p", { "class": "summary", id: "lookup-summary" });
    head.appendChild(badge(d.fromCache ? "cache-hit" : "cache-miss", d.fromCache ? "from cache (Redis)" : "from Postgres"));
    head.appendChild(badge(d.stale ? "stale" : "fresh",
      d.stale ? "stale" + (d.staleReason ? ": " + d.staleReason.replace(/_/g, " ") : "") : "fresh"));
    var f = d.dataFreshness || {};
    head.appendChild(document.createTextNode(
      " Investable: " + (d.totalInvestable || "-") + " " + (d.baseCurrency || "") +
      " | generated " + (f.generatedAt || "never") + (f.criteriaVersion ? " | criteria " + f.criteriaVersion : "")));
    out.appendChild(head);
    var left = d.unallocated;
    if (left && left.amount && Number(left.amount) !== 0) {
      out.appendChild(el("p", { "class": "unallocated", id: "lookup-unallocated" },
        "Unallocated: " + left.amount + " " + (d.baseCurrency || "") + (left.message ? " (" + left.message + ")" : "")));
    }
    if (d.unpricedHoldings && d.unpricedHoldings.length) {
      out.appendChild(el("p", { "class": "muted", id: "lookup-unpriced" }, "Not valued: " +
        d.unpricedHoldings.map(function (u) { return u.symbol + " (" + u.reason + ")"; }).join(", ")));
    }
    if (d.lastKnownPrices && d.lastKnownPrices.length) {
      out.appendChild(el("p", { "class": "muted", id: "lookup-last-known" }, "Valued at an older price: " +
        d.lastKnownPrices.map(function (k) {
          return k.symbol + " (" + k.price + " " + k.currency + " of " + String(k.asOf).slice(0, 10) + ")";
        }).join(", ")));
    }
    if (!d.recommendations.length) { out.appendChild(el("p", { "class": "muted" }, "No recommendations.")); return; }
    var table = el("table", { "class": "grid", id: "recs" });
    var hr = el("tr");
    // The gaps' definition (docs/allocation.md), as a tooltip: both divide by the portfolio plus the contribution.
    var gapTitles = {
      4: "Percentage points below the class's target midpoint, before the buys, out of the portfolio plus the contribution",
      5: "The same after the recommended buys (money left unallocated counts as cash)"
    };
    ["Symbol", "Score", "Amount", "Currency", "Allocation gap", "Gap after", "Top contributor"].forEach(function (h, i) {
      var attrs = i > 0 && i < 3 || i === 4 || i === 5 ? { "class": "num" } : {};
      if (gapTitles[i]) attrs.title = gapTitles[i];
      hr.appendChild(el("th", attrs, h));
    });
    table.appendChild(el("thead")).appendChild(hr);
    var body = el("tbody");
    d.recommendations.forEach(function (r) {
      var tr = el("tr");
      tr.appendChild(el("td", {}, r.symbol));
      tr.appendChild(el("td", { "class": "num" }, r.score));
      tr.appendChild(el("td", { "class": "num" }, r.amount));
      tr.appendChild(el("td", {}, r.currency));
      tr.appendChild(el("td", { "class": "num" }, r.allocationGap));
      tr.appendChild(el("td", { "class": "num" }, r.allocationGapAfter || "-"));
      tr.appendChild(el("td", {}, (r.breakdown && r.breakdown.topContributor) || "-"));
      body.appendChild(tr);
    });
    table.appendChild(body);
    out.appendChild(table);
  }

  function lookup(ev) {
    ev.preventDefault();
    var id = document.getElementById("user-id").value.trim();
    var out = document.getElementById("lookup-result");
    out.textContent = "Loading...";
    fetch("api/v1/dashboard/" + encodeURIComponent(id), { credentials: "same-origin",
                                                          headers: { Accept: "application/json" } })
      .then(function (resp) {
        return resp.json().catch(function () { return {}; }).then(function (body) { return [resp.status, body]; });
      })
      .then(function (res) {
        var status = res[0], body = res[1];
        if (status === 200) { showDashboard(out, body.data); return; }
        var msg = status === 401 ? "Your session has expired: reload the page to log in again."
          : status === 403 ? "Investors' data needs the 'Overnight recommendations' permission; ask an admin (docs/access.md)."
          : status === 404 ? "Unknown user."
          : status === 422 ? "That is not a user id (a UUID)."
          : "Error " + status + ".";
        out.textContent = "";
        out.appendChild(badge("error", String(status)));
        out.appendChild(document.createTextNode(" " + msg));
      })
      .catch(function (err) { out.textContent = "Request failed: " + err; });
  }

  drawCharts();
  document.getElementById("lookup").addEventListener("submit", lookup);
})();
