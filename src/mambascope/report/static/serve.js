// `mambascope serve`: neuron search and sorting, "which neurons fire most on this token", and the live trace
// panel of a neuron page.  Every string from the server is set with textContent (never parsed as HTML).
(function () {
  "use strict";
  var N = window.mambascopeNeurons;
  var el = N.el, fmt = N.fmt;
  var current = null;  // the neuron whose page is open: {layer, neuron}
  var offset = 0;
  var searches = 0;  // searches sent; only the latest one's answer is shown (an earlier one may arrive later)

  function $(id) { return document.getElementById(id); }
  function getJSON(url, options) {
    return fetch(url, options).then(function (resp) {
      return resp.json().then(function (body) {
        if (!resp.ok) { throw new Error(body.error || ("HTTP " + resp.status)); }
        return body;
      });
    });
  }
  function say(id, text, bad) {
    var m = $(id);
    m.textContent = text;
    m.className = bad ? "bad" : "muted";
  }
  function cellText(v) {
    if (Array.isArray(v)) { return v.map(function (x) { return JSON.stringify(x); }).join(", "); }
    return typeof v === "string" ? v : fmt(v);
  }
  // The search table shows the statistics one sorts by (and the sorted column); the API returns every column.
  var SHOWN = ["frequency", "positional_mi", "dt_selectivity", "detector_tokens", "peak_abs_post"];
  function shown(c, sort) {
    return !sort || c === sort || SHOWN.indexOf(c) >= 0 || c.indexOf("importance_") === 0;
  }
  function neuronTable(box, body, sort) {
    box.textContent = "";
    var t = el("table");
    t.className = "results";
    var cols = body.columns.filter(function (c) { return c !== "layer" && c !== "neuron" && shown(c, sort); });
    var head = el("tr");
    ["neuron"].concat(cols).forEach(function (c) { head.appendChild(el("th", null, c)); });
    t.appendChild(head);
    body.rows.forEach(function (r) {
      var tr = el("tr");
      var td = el("td");
      td.appendChild(N.link(r.layer, r.neuron));
      tr.appendChild(td);
      cols.forEach(function (c) {
        var cell = el("td", typeof r[c] === "number" ? "num" : null);
        if (c === "token" && typeof r[c] === "string") { cell.appendChild(N.chip(r[c])); } else {
          cell.textContent = cellText(r[c]);
        }
        tr.appendChild(cell);
      });
      t.appendChild(tr);
    });
    box.appendChild(t);
  }

  function search() {
    var p = new URLSearchParams();
    if ($("search-layer").value) { p.set("layer", $("search-layer").value); }
    if ($("search-q").value) { p.set("q", $("search-q").value); }
    p.set("sort", $("search-sort").value);
    if ($("search-order").value) { p.set("order", $("search-order").value); }  // else the column's own
    p.set("limit", $("search-limit").value);
    p.set("offset", String(offset));
    say("search-message", "searching\u2026");
    var mine = ++searches;
    getJSON("api/neurons?" + p.toString()).then(function (body) {
      if (mine !== searches) { return; }
      var last = Math.min(body.offset + body.rows.length, body.total);
      say("search-message", body.total ? ("neurons " + (body.offset + 1) + "\u2013" + last + " of " + body.total)
                                       : "no neuron matches");
      neuronTable($("search-results"), body, body.sort);
      $("search-prev").disabled = body.offset === 0;
      $("search-next").disabled = last >= body.total;
      $("search-next").onclick = function () { offset = body.offset + body.limit; search(); };
      $("search-prev").onclick = function () { offset = Math.max(0, body.offset - body.limit); search(); };
    }).catch(function (err) { if (mine === searches) { say("search-message", err.message, true); } });
  }

  function byToken() {
    var p = new URLSearchParams({token: $("bytoken-token").value, k: $("bytoken-k").value});
    say("bytoken-message", "looking up\u2026");
    getJSON("api/by_token?" + p.toString()).then(function (body) {
      say("bytoken-message", body.rows.length + " neurons fire most on " + JSON.stringify(body.token));
      neuronTable($("bytoken-results"), body);
    }).catch(function (err) { say("bytoken-message", err.message, true); });
  }

  function liveResult(box, r) {
    box.textContent = "";
    box.appendChild(el("h4", null, "Activation of layer " + r.layer + " neuron " + r.neuron + " at each token"));
    box.appendChild(N.tokenRow(r.tokens, r.activations, r.position));
    var row = r.attention ? r.attention.row : null;
    if (row) {
      box.appendChild(el("h4", null, "Hidden-attention row \u03b1[t, \u00b7] of " + r.attention.unit + " " +
                         r.attention.index + " at position t = " + r.position));
      box.appendChild(N.tokenRow(r.tokens.slice(0, r.position + 1), row, r.position));
    } else {
      box.appendChild(el("p", "muted", r.reason));
    }
    var t = el("table");
    t.id = "live-table";
    var head = el("tr");
    ["position", "token", "activation", row ? "\u03b1[t, s]" : null].forEach(function (c) {
      if (c) { head.appendChild(el("th", null, c)); }
    });
    t.appendChild(head);
    r.tokens.forEach(function (tok, i) {
      var tr = el("tr");
      var chipCell = el("td");
      chipCell.appendChild(N.chip(tok));
      tr.appendChild(el("td", "num", String(i)));
      tr.appendChild(chipCell);
      tr.appendChild(el("td", "num", fmt(r.activations[i])));
      if (row) { tr.appendChild(el("td", "num", i < row.length ? fmt(row[i]) : "")); }
      t.appendChild(tr);
    });
    box.appendChild(t);
  }

  function trace() {
    if (!current) { return; }
    var position = parseInt($("live-position").value, 10);
    var body = {text: $("live-text").value, layer: current.layer, neuron: current.neuron,
                position: isNaN(position) ? null : position};
    say("live-message", "tracing\u2026");
    getJSON("api/trace", {method: "POST", headers: {"Content-Type": "application/json"},
                          body: JSON.stringify(body)}).then(function (r) {
      if (!current || r.layer !== current.layer || r.neuron !== current.neuron) { return; }
      say("live-message", r.tokens.length + " tokens traced through " + r.model);
      liveResult($("live-result"), r);
    }).catch(function (err) { say("live-message", err.message, true); });
  }

  $("search-form").addEventListener("submit", function (ev) { ev.preventDefault(); offset = 0; search(); });
  $("bytoken-form").addEventListener("submit", function (ev) { ev.preventDefault(); byToken(); });
  if ($("live-form")) {
    $("live-form").addEventListener("submit", function (ev) { ev.preventDefault(); trace(); });
  }
  document.addEventListener("mambascope:neuron", function (ev) {
    current = {layer: ev.detail.layer, neuron: ev.detail.neuron};
    if ($("live-result")) { $("live-result").textContent = ""; say("live-message", ""); }
  });
  search();  // the first page of neurons (the form's defaults) is listed on load, before any search
})();
