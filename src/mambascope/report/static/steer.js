// `mambascope serve`: the steer panel of a unit's page.  The prompt is continued twice by the server
// (POST api/steer: unsteered and steered, the same greedy decoding as `mambascope steer`) and the two
// continuations are shown side by side; every string is set with textContent (never parsed as HTML).
(function () {
  "use strict";
  var N = window.mambascopeNeurons;
  var el = N.el;
  var unit = null;  // the unit whose page is open, as the API names it: {kind: "neuron", layer, neuron}
  var sent = 0;  // requests sent; only the latest one's answer is shown

  function $(id) { return document.getElementById(id); }
  function say(text, bad) {
    var m = $("steer-message");
    m.textContent = text;
    m.className = bad ? "bad" : "muted";
  }
  function sameUnit(a, b) { return JSON.stringify(a) === JSON.stringify(b); }
  // [start, stop) as `mambascope steer --positions` writes it: N, A:B or A:
  function range(r) { return r[1] === null ? r[0] + ":" : (r[1] === r[0] + 1 ? String(r[0]) : r[0] + ":" + r[1]); }

  // One continuation: the prompt (muted), then the new tokens; a token that differs from the other run's
  // token at the same step is marked.
  function continuation(prompt, run, other) {
    var div = el("div", "ctx steer-text");
    div.appendChild(el("span", "t prompt", prompt.join("")));
    run.tokens.forEach(function (tok, i) {
      var span = el("span", "t" + (run.ids[i] !== other.ids[i] ? " diff" : ""), tok);
      span.title = "token " + run.ids[i];
      div.appendChild(span);
    });
    return div;
  }

  function show(r) {
    var box = $("steer-result");
    box.textContent = "";
    var t = el("table");
    t.id = "steer-table";
    var head = el("tr");
    var how = (r.mode === "add" ? "+" : "set to ") + r.scale + " at " +
              (r.positions ? "positions " + r.positions.map(range).join(",") : "every position");
    head.appendChild(el("th", null, "unsteered"));
    head.appendChild(el("th", null, "steered (" + r.hook + ", " + how + ")"));
    t.appendChild(head);
    var tr = el("tr");
    [[r.unsteered, r.steered], [r.steered, r.unsteered]].forEach(function (pair) {
      var td = el("td");
      td.appendChild(continuation(r.prompt_tokens, pair[0], pair[1]));
      tr.appendChild(td);
    });
    t.appendChild(tr);
    box.appendChild(t);
    var first = r.steered.ids.findIndex(function (id, i) { return id !== r.unsteered.ids[i]; });
    box.appendChild(el("p", "muted", first < 0 ? "The steered continuation is the same as the unsteered one."
                                               : "The continuations part at new token " + (first + 1) + "."));
  }

  function steer() {
    if (!unit) { return; }
    var asked = unit;
    var body = {prompt: $("steer-prompt").value, unit: asked, scale: Number($("steer-scale").value),
                mode: $("steer-mode").value, positions: $("steer-positions").value || null,
                max_new_tokens: parseInt($("steer-new").value, 10)};
    if ($("steer-scale").value.trim() === "") { body.scale = null; }
    say("generating\u2026");
    var mine = ++sent;
    fetch("api/steer", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)})
      .then(function (resp) {
        return resp.json().then(function (b) {
          if (!resp.ok) { throw new Error(b.error || ("HTTP " + resp.status)); }
          return b;
        });
      }).then(function (r) {
        if (mine !== sent || !sameUnit(asked, unit)) { return; }
        say(r.max_new_tokens + " new tokens, greedy, from " + r.prompt_tokens.length + " prompt tokens (" +
            r.model + ")");
        show(r);
      }).catch(function (err) { if (mine === sent) { say(err.message, true); } });
  }

  function setUnit(u) {
    unit = u;
    sent++;  // an answer for the previous unit is not shown on this page
    if ($("steer-result")) { $("steer-result").textContent = ""; say(""); }
  }

  if ($("steer-form")) {
    $("steer-form").addEventListener("submit", function (ev) { ev.preventDefault(); steer(); });
  }
  document.addEventListener("mambascope:neuron", function (ev) {
    // a dictionary feature's page (serve's /features/) steers along its decoder row
    setUnit(ev.detail.unit === "feature" ? {kind: "feature", layer: ev.detail.layer, feature: ev.detail.neuron}
                                         : {kind: "neuron", layer: ev.detail.layer, neuron: ev.detail.neuron});
  });
})();
