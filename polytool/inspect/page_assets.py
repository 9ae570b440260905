"""The style sheet and the script of `inspect --report`'s page, inlined into it (the page loads nothing).

The script reads the page's embedded JSON (id `inspect-data`), draws the heatmaps on canvases with a
viridis ramp and shows each cell's value under the pointer. When it has drawn everything it sets
`data-rendered="ok"`, the number of cells drawn and, as a self-test of the hover, the tooltip text of the
first cell (`data-probe`) on the <html> element; any script error is shown in the page (#errors).
"""

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; }
td, th { padding: 2px 10px 2px 0; text-align: left; vertical-align: top; }
th { border-bottom: 1px solid #ccc; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
.heats { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
figure.heat { margin: 0; } figure.heat figcaption { font-size: 12px; color: #444; }
canvas { display: block; image-rendering: pixelated; cursor: crosshair; border: 1px solid #ccc; }
#tip { position: absolute; background: #fffbe6; border: 1px solid #999; padding: 2px 6px; font-size: 12px;
       pointer-events: none; white-space: nowrap; }
.group h4 { margin: 0.2em 0; font-size: 13px; } .group { border-left: 3px solid #eee; padding-left: 8px; }
#errors { color: #b00; } .note { color: #555; font-size: 13px; }
"""

JS = r"""
(function () {
  "use strict";
  var errors = document.getElementById("errors");
  window.addEventListener("error", function (e) { errors.textContent += "script error: " + e.message + "\n"; });
  var D = JSON.parse(document.getElementById("inspect-data").textContent);
  var STOPS = [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142], [31, 158, 137],
               [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]];
  var tip = document.getElementById("tip");
  var cells = 0;

  function colour(v, lo, hi) {
    var x = hi > lo ? (v - lo) / (hi - lo) : 0;
    x = Math.max(0, Math.min(1, x)) * (STOPS.length - 1);
    var i = Math.min(Math.floor(x), STOPS.length - 2), f = x - i, a = STOPS[i], b = STOPS[i + 1];
    return "rgb(" + [0, 1, 2].map(function (k) { return Math.round(a[k] + f * (b[k] - a[k])); }).join(",") + ")";
  }

  function heatmap(parent, title, rows, cols, value, lo, hi, label) {
    var box = document.createElement("figure"), cap = document.createElement("figcaption");
    box.className = "heat";
    cap.textContent = title;
    box.appendChild(cap);
    var cell = Math.max(4, Math.min(22, Math.floor(480 / Math.max(rows, cols))));
    var c = document.createElement("canvas"), g = c.getContext("2d");
    c.width = cols * cell;
    c.height = rows * cell;
    for (var r = 0; r < rows; r++) {
      for (var k = 0; k < cols; k++) {
        g.fillStyle = colour(value(r, k), lo, hi);
        g.fillRect(k * cell, r * cell, cell, cell);
      }
    }
    c.addEventListener("mousemove", function (e) {
      var b = c.getBoundingClientRect();
      var k = Math.floor((e.clientX - b.left) / cell), r = Math.floor((e.clientY - b.top) / cell);
      if (r < 0 || k < 0 || r >= rows || k >= cols) { tip.hidden = true; return; }
      tip.textContent = label(r, k) + ": " + value(r, k).toFixed(4);
      tip.style.left = (e.pageX + 12) + "px";
      tip.style.top = (e.pageY + 12) + "px";
      tip.hidden = false;
    });
    c.addEventListener("mouseleave", function () { tip.hidden = true; });
    box.appendChild(c);
    parent.appendChild(box);
    cells += rows * cols;
    return c;
  }

  var order = D.order, T = order.length, S = D.n_skills;
  function range(rows) {
    var lo = Infinity, hi = -Infinity;
    rows.forEach(function (row) { row.forEach(function (v) { lo = Math.min(lo, v); hi = Math.max(hi, v); }); });
    return [lo, hi];
  }
  var simRange = range(D.similarity);
  var first = heatmap(document.getElementById("similarity"), "task x task cosine similarity, clustering order", T, T,
    function (r, k) { return D.similarity[order[r]][order[k]]; }, Math.min(simRange[0], 0.999), 1,
    function (r, k) { return "task " + order[r] + " vs task " + order[k]; });
  heatmap(document.getElementById("usage"), "share of routers with sigmoid(logit) >= 0.5", T, S,
    function (r, k) { return D.usage[order[r]][k]; }, 0, 1,
    function (r, k) { return "task " + order[r] + ", skill " + k; });

  var wmax = 0;
  D.weights.forEach(function (t) { t.forEach(function (m) { m.forEach(function (q) {
    q.forEach(function (v) { wmax = Math.max(wmax, v); }); }); }); });
  var select = document.getElementById("layer"), layerBox = document.getElementById("layer-heatmaps");
  function drawLayer(i) {
    layerBox.textContent = "";
    D.layer_modules[i].forEach(function (m, c) {
      if (m === null) { return; }
      var group = document.createElement("div"), head = document.createElement("h4");
      group.className = "group";
      head.textContent = D.module_types[c];
      group.appendChild(head);
      var row = document.createElement("div");
      row.className = "heats";
      group.appendChild(row);
      layerBox.appendChild(group);
      for (var q = 0; q < D.n_splits; q++) {
        var where = D.module_types[c] + (D.n_splits > 1 ? " split " + q : "");
        heatmap(row, (D.n_splits > 1 ? "split " + q + ": " : "") + "tasks x skills", T, S,
          (function (q) { return function (r, k) { return D.weights[order[r]][m][q][k]; }; })(q), 0, wmax,
          (function (where) { return function (r, k) {
            return "layer " + D.layer_labels[i] + " " + where + ": task " + order[r] + ", skill " + k; }; })(where));
      }
    });
  }
  D.layer_labels.forEach(function (label, i) {
    var o = document.createElement("option");
    o.value = i;
    o.textContent = label;
    select.appendChild(o);
  });
  select.addEventListener("change", function () { drawLayer(Number(select.value)); });
  drawLayer(0);

  var b = first.getBoundingClientRect();
  first.dispatchEvent(new MouseEvent("mousemove", {clientX: b.left + 1, clientY: b.top + 1}));
  document.documentElement.dataset.probe = tip.textContent;
  tip.hidden = true;
  document.documentElement.dataset.cells = cells;
  document.documentElement.dataset.rendered = "ok";
})();
"""
