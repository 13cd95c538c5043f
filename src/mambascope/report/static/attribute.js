// `mambascope serve`'s attribution page: a text (and optional target token) sent to POST api/attribute, the
// answer drawn as a heat strip, one row per method (per layer for the attention-neuron methods), one column
// per token up to the explained position.  Every string is set with textContent (never parsed as HTML).
(function () {
  "use strict";
  var sent = 0;  // requests sent; only the latest one's answer is shown

  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function fmt(x) {
    return (typeof x === "number" && isFinite(x)) ? String(Number(x.toPrecision(3))) : "n/a";
  }
  function say(text, bad) {
    var m = $("attribute-message");
    m.textContent = text;
    m.className = bad ? "bad" : "muted";
  }
  // a token as a chip: spaces as middle dots and line breaks as arrows, so " the" and "the" differ
  function chip(tok) {
    var shown = tok === "" ? "\u2205" : tok.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5").replace(/ /g, "\u00b7");
    var c = el("code", "tok", shown);
    c.title = JSON.stringify(tok);
    return c;
  }
  function rowLabel(row) { return row.method + (row.layer === null || row.layer === undefined ? "" : " L" + row.layer); }

  function strip(r) {
    var last = r.target.position;
    var t = el("table", "strip");
    t.id = "attribute-strip";
    var head = el("tr");
    head.appendChild(el("th", null, "method"));
    r.tokens.slice(0, last + 1).forEach(function (tok) {
      var th = el("th", "tokcol");
      th.appendChild(chip(tok));
      head.appendChild(th);
    });
    t.appendChild(head);
    r.rows.forEach(function (row) {
      var tr = el("tr");
      tr.appendChild(el("th", null, rowLabel(row)));
      var values = row.relevance.slice(0, last + 1);
      var max = 0;
      values.forEach(function (v) { if (typeof v === "number" && Math.abs(v) > max) { max = Math.abs(v); } });
      values.forEach(function (v, j) {
        var shown = (typeof v === "number" && max > 0) ? v / max : 0;  // the row's scale: -1..1
        var td = el("td", "cell", shown.toFixed(2));
        td.style.backgroundColor = (v >= 0 ? "rgba(214,39,40," : "rgba(31,119,180,") +
                                   Math.abs(shown).toFixed(3) + ")";
        td.title = JSON.stringify(r.tokens[j]) + " @" + j + ": " + v;
        td.setAttribute("data-relevance", String(v));
        tr.appendChild(td);
      });
      t.appendChild(tr);
    });
    return t;
  }

  function show(r) {
    var box = $("attribute-result");
    box.textContent = "";
    var tg = r.target;
    var p = el("p");
    p.appendChild(document.createTextNode("Explaining the prediction of "));
    p.appendChild(chip(tg.token));
    p.appendChild(document.createTextNode(" (" + tg.chosen + ", log p = " + fmt(tg.logprob) + ") after position " +
                                          tg.position + " of " + r.tokens.length + " tokens, by " + r.model + "."));
    box.appendChild(p);
    if (r.rows.length) {
      box.appendChild(el("p", "muted", "Each cell: the relevance divided by its row's largest |relevance|; " +
                                       "hover a cell for the relevance itself."));
      box.appendChild(strip(r));
    }
    Object.keys(r.errors).forEach(function (m) { box.appendChild(el("p", "error", m + " failed: " + r.errors[m])); });
    box.appendChild(el("p", "muted", "seconds: " + Object.keys(r.timings).map(function (m) {
      return m + " " + r.timings[m];
    }).join(", ")));
  }

  function explain() {
    var methods = Array.prototype.map.call(
      document.querySelectorAll("#attribute-methods input:checked"), function (i) { return i.value; });
    var position = parseInt($("attribute-position").value, 10);
    var body = {text: $("attribute-text").value, target: $("attribute-target").value || null, methods: methods,
                position: isNaN(position) ? -1 : position, ig_steps: parseInt($("attribute-ig-steps").value, 10),
                baseline: $("attribute-baseline").value};
    say("computing\u2026");
    var mine = ++sent;
    fetch("api/attribute", {method: "POST", headers: {"Content-Type": "application/json"},
                            body: JSON.stringify(body)})
      .then(function (resp) {
        return resp.json().then(function (b) {
          if (!resp.ok) { throw new Error(b.error || ("HTTP " + resp.status)); }
          return b;
        });
      }).then(function (r) {
        if (mine !== sent) { return; }
        say(r.rows.length + " rows of relevance");
        show(r);
      }).catch(function (err) { if (mine === sent) { say(err.message, true); } });
  }

  if ($("attribute-form")) {
    $("attribute-form").addEventListener("submit", function (ev) { ev.preventDefault(); explain(); });
  }
})();
