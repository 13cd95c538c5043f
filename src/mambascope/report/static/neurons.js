// Neuron pages of report.html and of `mambascope serve`, rendered client-side from the JSON in
// <script id="neuron-data"> (layout: mambascope.report.neuron_payload.neuron_data; served: fetched per neuron
// from /api/neuron/L/N).  Every element is built with DOM calls and text set with textContent only, so token
// strings from the corpus can never inject markup.
(function () {
  "use strict";
  var node = document.getElementById("neuron-data");
  var DATA = JSON.parse(node.textContent);
  // Static report: every layer's payload is embedded.  Served by `mambascope serve`: each neuron's payload
  // (the same layout, one neuron filled in) is fetched from the server's API when its page opens.
  var SERVED = DATA.source === "server";
  var S = DATA.strings || [];
  var WINDOWS = DATA.windows || {};
  var LAYERS = DATA.layers || {};
  var SIZES = DATA.sizes || {};
  // "feature" on the pages of a dictionary's features (features.html, serve's features/): the same layout
  var UNIT = DATA.unit || "neuron";
  var LAYER_IDS = (SERVED ? Object.keys(SIZES) : Object.keys(LAYERS)).map(Number).sort(function (a, b) {
    return a - b;
  });
  var pending = null;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function add(parent) {
    for (var i = 1; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) { continue; }
      parent.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return parent;
  }
  function fmt(x, digits) {
    if (x === null || x === undefined || (typeof x === "number" && !isFinite(x))) { return "n/a"; }
    if (typeof x !== "number") { return String(x); }
    if (Number.isInteger(x)) { return String(x); }
    return String(Number(x.toPrecision(digits || 4)));
  }
  function visible(s) {
    if (s === "") { return "\u2205"; }
    return s.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5").replace(/\r/g, "\u240d");
  }
  function chip(s) {  // spaces shown as middle dots, so " the" and "the" differ at a glance
    var c = el("code", "tok", visible(s === null ? "" : s).replace(/ /g, "\u00b7"));
    c.title = JSON.stringify(s);
    return c;
  }
  function str(i) { return (i === null || i === undefined || i < 0) ? null : S[i]; }
  function q16(b64, scale) {
    var bin = atob(b64), n = bin.length >> 1, out = new Array(n);
    for (var i = 0; i < n; i++) {
      var v = bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8);
      if (v >= 32768) { v -= 65536; }
      out[i] = v === -32768 ? null : v / 32767 * scale;
    }
    return out;
  }
  function shade(span, v, max) {
    if (v === null || v === undefined) { return; }
    var a = max > 0 ? Math.min(1, Math.abs(v) / max) : 0;
    span.style.backgroundColor = (v >= 0 ? "rgba(230,85,13," : "rgba(49,130,189,") + a.toFixed(3) + ")";
    span.setAttribute("data-act", fmt(v));
    span.title = "activation " + fmt(v);
  }
  function row(table, cells, header) {
    var tr = el("tr");
    cells.forEach(function (c) {
      var td = el(header ? "th" : "td");
      if (c instanceof Node) { td.appendChild(c); } else { td.textContent = c; }
      tr.appendChild(td);
    });
    table.appendChild(tr);
    return tr;
  }
  function has(list, x) { return Array.isArray(list) && list.indexOf(x) >= 0; }
  function link(layer, n, text) {
    var a = el("a", null, text || ("L" + layer + " N" + n));
    a.href = "#neuron-" + layer + "-" + n;
    return a;
  }
  function notComputed(parent, what) {
    add(parent, el("p", "muted", what + ": not computed in this run."));
  }
  function isEmbedded(d, e) { return !Array.isArray(d.embedded) || d.embedded.indexOf(e) >= 0; }
  function notEmbedded(parent) {
    add(parent, el("p", "muted", "Not embedded in this report (see the note above)."));
  }

  function tokenRow(tokens, values, peakIndex) {
    var div = el("div", "ctx");
    var max = 0;
    values.forEach(function (v) { if (v !== null && Math.abs(v) > max) { max = Math.abs(v); } });
    tokens.forEach(function (t, i) {
      if (t === null) { return; }
      var span = el("span", "t" + (t === "" ? " empty" : ""), visible(t));
      shade(span, values[i], max);
      if (i === peakIndex) { span.className += " peak"; }
      div.appendChild(span);
    });
    return div;
  }

  function contextTokens(L, e, j, ctx) {
    var w = ctx.w;
    if (ctx.t) { return ctx.t[e][j].map(str); }
    var win = ctx.wp[e][2 * j], pos = ctx.wp[e][2 * j + 1];
    var seq = WINDOWS[String(win)] || [];
    var out = [];
    for (var i = 0; i < w; i++) {
      var p = pos - (w - 1) + i;
      out.push(p < 0 ? null : (p < seq.length ? str(seq[p]) : null));
    }
    return out;
  }

  function renderContexts(box, L, e, d) {
    var ctx = d.ctx;
    add(box, el("h4", null, "Top-activating contexts"));
    if (!ctx) { notComputed(box, "Top contexts"); return; }
    if (ctx.v[e] === null) { notEmbedded(box); return; }
    var vals = ctx.v[e] || [];
    if (!vals.length) { add(box, el("p", "muted", "No activations recorded for this " + UNIT + ".")); return; }
    var acts = q16(ctx.a[e], ctx.s[e]);
    var legend = el("p", "muted");
    var sw1 = el("span", "legend-swatch"); sw1.style.background = "linear-gradient(90deg,#fff,#e6550d)";
    var sw2 = el("span", "legend-swatch"); sw2.style.background = "linear-gradient(90deg,#fff,#3182bd)";
    add(legend, "Each token is shaded by the " + UNIT + "'s activation there / the largest |activation| in the context " +
        "(orange", sw1, "positive, blue", sw2, "negative); the outlined token is the peak (the context ends at it).");
    add(box, legend);
    for (var j = 0; j < vals.length; j++) {
      var tokens = contextTokens(L, e, j, ctx);
      var values = acts.slice(j * ctx.w, (j + 1) * ctx.w);
      var head = el("div", "ctx-head", "#" + (j + 1) + "  peak activation " + fmt(vals[j]) +
                    (ctx.wp ? "  (window " + ctx.wp[e][2 * j] + ", position " + ctx.wp[e][2 * j + 1] + ")" : ""));
      add(box, head, tokenRow(tokens, values, ctx.w - 1));
    }
  }

  function renderLogits(box, e, d) {
    add(box, el("h4", null, "Direct logit effects (through the final norm and unembedding)"));
    var lg = d.logit;
    if (!lg) { notComputed(box, "Logit effects"); return; }
    if (lg.p[e] === null) { notEmbedded(box); return; }
    var both = q16(lg.v[e], lg.s[e]);
    var k = lg.p[e].length;
    var wrap = el("div", "logit");
    var parts = [["Promoted", lg.p[e], both.slice(0, k), "pos"], ["Suppressed", lg.n[e], both.slice(k), "neg"]];
    parts.forEach(function (part) {
      var t = el("table");
      row(t, [part[0] + " token", "effect"], true);
      part[1].forEach(function (sid, i) {
        var v = part[2][i];
        var cell = el("span", null, fmt(v, 3));
        var bar = el("span", "bar " + part[3]);
        bar.style.width = (lg.s[e] > 0 ? Math.round(60 * Math.abs(v) / lg.s[e]) : 0) + "px";
        cell.appendChild(bar);
        row(t, [chip(str(sid)), cell]);
      });
      wrap.appendChild(t);
    });
    add(box, wrap);
  }

  function renderAttention(box, L, e, d) {
    add(box, el("h4", null, "Hidden-attention row at the top context's peak"));
    var at = d.attn;
    if (!at) {
      add(box, el("p", "muted", DATA.arch === "gpt2" ? "Not applicable: GPT-2 neurons have no hidden attention."
                                                      : "Hidden-attention rows: not computed in this run."));
      return;
    }
    var r = at.index[String(e)];
    if (r === undefined) {
      if (isEmbedded(d, e)) { add(box, el("p", "muted", "Not computed for this neuron.")); } else { notEmbedded(box); }
      return;
    }
    var values = q16(at.v[r], at.s[r]);
    var tokens = at.t[r] === 0 && d.ctx ? contextTokens(L, e, 0, d.ctx) : (at.t[r] || []).map(str);
    add(box, el("p", "muted", "α[t, s] of this neuron's " + (at.unit || "channel") +
        " from the peak token t (outlined) to each earlier token s, shaded by |α| / max |α|."));
    add(box, tokenRow(tokens, values, tokens.length - 1));
  }

  function statsTable(L, e, d) {
    var t = el("table", "kv");
    var N = d.tokens;
    var f = d.freq ? d.freq[e] : null;
    row(t, ["activation frequency", fmt(f) + (N && f !== null ? "  (active on " + Math.round(f * N) + " of " + N +
        " tokens)" : "")]);
    if (d.mp) { row(t, ["mean post", fmt(d.mp[e])]); }
    if (d.map) { row(t, ["mean |post|", fmt(d.map[e])]); }
    if (d.mpa) { row(t, ["mean post while active", fmt(d.mpa[e])]); }
    if (d.mi) { row(t, ["positional MI I(active; position)", fmt(d.mi[e]) + "  (threshold " + fmt(d.mi_thr) + ")"]); }
    if (d.corr) { row(t, ["correlation of post with position", fmt(d.corr[e])]); }
    if (d.delta) {
      var u = Math.floor(e / (d.delta.per || 1));
      var label = d.delta.unit === "head" ? "head " + u : "channel " + u;
      row(t, ["Δ mean (" + label + ")", fmt(d.delta.mean[u])]);
      row(t, ["Δ std", fmt(d.delta.std[u])]);
      row(t, ["Δ selectivity (std of ln Δ)", fmt(d.delta.sel[u])]);
    } else {
      row(t, ["Δ statistics", DATA.arch === "gpt2" ? "not applicable (GPT-2)" : "not computed"]);
    }
    Object.keys(d.imp || {}).forEach(function (m) {
      var imp = d.imp[m];
      var rank = 1;
      for (var i = 0; i < imp.length; i++) { if (imp[i] !== null && imp[i] > imp[e]) { rank++; } }
      row(t, ["attention-neuron importance (" + m + ")", fmt(imp[e]) + "  (rank " + rank + " of " + imp.length + ")"]);
    });
    return t;
  }

  function renderDetector(box, e, d) {
    var det = null;
    (d.det || []).forEach(function (x) { if (x[0] === e) { det = x; } });
    if (!det) { return; }
    add(box, el("h4", null, "Token detector"));
    var t = el("table");
    row(t, ["trigger token", "activations", "precision", "suppression rank"], true);
    det[1].forEach(function (sid, i) {
      row(t, [chip(str(sid)), fmt(det[4] ? det[4][i] : null), fmt(det[2][i]), det[5] ? fmt(det[5][i]) : "n/a"]);
    });
    add(box, t, el("p", "muted", "These tokens cover " + fmt(det[3]) + " of the " + UNIT + "'s activations."));
  }

  function renderDelta(box, e, d) {
    if (!d.delta || !d.delta.top) { return; }
    var u = Math.floor(e / (d.delta.per || 1));
    var entry = null;
    d.delta.top.forEach(function (x) { if (x[0] === u) { entry = x; } });
    if (!entry) { return; }
    add(box, el("h4", null, "Δ-sensitive " + (d.delta.unit || "channel") + " (rank " + entry[1] + " by selectivity)"));
    if (!entry[2] || !entry[2].length) { add(box, el("p", "muted", "Top Δ tokens: not recorded.")); return; }
    var t = el("table");
    row(t, ["token", "mean Δ", "count"], true);
    entry[2].forEach(function (x) { row(t, [chip(str(x[0])), fmt(x[1]), fmt(x[2])]); });
    add(box, t);
  }

  function render(L, e) {
    var page = document.getElementById("neuron-page");
    var msg = document.getElementById("neuron-message");
    page.textContent = "";
    msg.textContent = "";
    pending = null;
    if (LAYER_IDS.indexOf(L) < 0) {
      msg.textContent = "Layer " + L + " is not in this report (layers: " + LAYER_IDS.join(", ") + ").";
      return false;
    }
    var E = SERVED ? SIZES[String(L)] : LAYERS[String(L)].E;
    if (!(e >= 0 && e < E)) {
      msg.textContent = UNIT.charAt(0).toUpperCase() + UNIT.slice(1) + " " + e + " is out of range: layer " + L +
        " has " + UNIT + "s 0.." + (E - 1) + ".";
      return false;
    }
    if (!SERVED) { show(L, e, LAYERS[String(L)]); return true; }
    var key = L + ":" + e;
    pending = key;
    msg.textContent = "Loading layer " + L + " " + UNIT + " " + e + "\u2026";
    fetch("api/neuron/" + L + "/" + e).then(function (resp) {
      return resp.json().then(function (body) {
        if (!resp.ok) { throw new Error(body.error || ("HTTP " + resp.status)); }
        return body;
      });
    }).then(function (body) {
      if (pending !== key) { return; }  // a later request superseded this one
      S = body.strings;
      WINDOWS = body.windows;
      msg.textContent = "";
      show(L, e, body.layer);
    }).catch(function (err) {
      if (pending === key) { msg.textContent = "Could not load layer " + L + " " + UNIT + " " + e + ": " + err.message; }
    });
    return true;
  }

  function show(L, e, d) {
    var page = document.getElementById("neuron-page");
    document.getElementById("neuron-layer").value = String(L);
    document.getElementById("neuron-index").value = String(e);
    var head = el("h3", null, "Layer " + L + " \u00b7 " + UNIT + " " + e);
    head.id = "neuron-title";
    var nav = el("p");
    if (e > 0) { add(nav, link(L, e - 1, "\u2190 " + UNIT + " " + (e - 1)), "  "); }
    if (e < d.E - 1) { add(nav, link(L, e + 1, UNIT + " " + (e + 1) + " \u2192")); }
    var badges = el("p");
    if (has(d.dead, e)) { add(badges, el("span", "badge dead", "dead")); }
    if (has(d.rare, e)) { add(badges, el("span", "badge rare", "rarely active")); }
    if (has(d.pos, e)) { add(badges, el("span", "badge pos", "positional")); }
    if ((d.det || []).some(function (x) { return x[0] === e; })) {
      add(badges, el("span", "badge det", "token detector"));
    }
    var unit = d.delta ? Math.floor(e / (d.delta.per || 1)) : -1;
    if (d.delta && d.delta.top && d.delta.top.some(function (x) { return x[0] === unit; })) {
      add(badges, el("span", "badge delta", "\u0394-sensitive"));
    }
    add(page, head, nav, badges);
    if (!isEmbedded(d, e)) { add(page, el("p", "note", DATA.partial.message)); }
    add(page, statsTable(L, e, d));
    renderDetector(page, e, d);
    renderDelta(page, e, d);
    renderContexts(page, L, e, d);
    renderLogits(page, e, d);
    renderAttention(page, L, e, d);
    document.dispatchEvent(new CustomEvent("mambascope:neuron", {detail: {layer: L, neuron: e, data: d,
                                                                          unit: UNIT}}));
  }

  function parseQuery(q) {
    q = q.trim();
    var m = q.match(/^#?neuron-(\d+)-(\d+)$/i) ||
            q.match(/^l(?:ayer)?\s*(\d+)\s*[,:\/.\-]?\s*(?:n(?:euron)?|f(?:eature)?)\s*(\d+)$/i) ||
            q.match(/^(\d+)\s*[:\/,.\s]\s*f?(\d+)$/i);  // a feature's id: "2:f17"
    return m ? [parseInt(m[1], 10), parseInt(m[2], 10)] : null;
  }

  function go(L, e) {
    var hash = "#neuron-" + L + "-" + e;
    if (location.hash === hash) { route(); } else { location.hash = hash; }
  }

  function showNeuronView(on) {
    document.getElementById("neuron-view").hidden = !on;
    document.getElementById("report").hidden = on;
  }

  function route() {
    var m = location.hash.match(/^#neuron-(\d+)-(\d+)$/);
    if (m) {
      showNeuronView(true);
      render(parseInt(m[1], 10), parseInt(m[2], 10));
      window.scrollTo(0, 0);
      return;
    }
    var wasOpen = !document.getElementById("neuron-view").hidden;
    showNeuronView(false);
    if (wasOpen && location.hash.length > 1) {
      var target = document.getElementById(decodeURIComponent(location.hash.slice(1)));
      if (target && target.scrollIntoView) { target.scrollIntoView(); }
    }
  }

  var select = document.getElementById("neuron-layer");
  LAYER_IDS.forEach(function (L) {
    var o = el("option", null, "layer " + L);
    o.value = String(L);
    select.appendChild(o);
  });
  document.getElementById("neuron-search-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var q = document.getElementById("neuron-search").value;
    var p = parseQuery(q);
    if (!p) {
      showNeuronView(true);
      document.getElementById("neuron-page").textContent = "";
      document.getElementById("neuron-message").textContent =
        "Could not read \u201c" + q + "\u201d: type a layer and a neuron, like \u201cL2 N37\u201d or \u201c2:37\u201d.";
      return;
    }
    go(p[0], p[1]);
  });
  document.getElementById("neuron-go").addEventListener("click", function () {
    go(parseInt(select.value, 10), parseInt(document.getElementById("neuron-index").value, 10) || 0);
  });
  window.addEventListener("hashchange", route);
  window.mambascopeNeurons = { parseQuery: parseQuery, render: render, go: go, chip: chip, fmt: fmt, el: el,
                             tokenRow: tokenRow, link: link };
  route();
})();
