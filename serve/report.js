// The report page's renderer: reads the JSON in #report-data and draws every chart as
// inline SVG. No library and no network: the page works from a file, offline.
// A chart is <svg class="chart" data-chart=ID> with one <g class="series" data-series=NAME>
// per series; points carry their hover text in data-tip (and a <title> for no-JS readers).
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"];
  var data = JSON.parse(document.getElementById("report-data").textContent);

  function el(tag, attrs, parent, text) {
    var node = document.createElement(tag);
    for (var k in attrs || {}) node.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }
  function svg(tag, attrs, parent) {
    var node = document.createElementNS(SVG, tag);
    for (var k in attrs || {}) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }
  function fmt(x, digits) {
    if (x === null || x === undefined) return "–";
    if (typeof x !== "number") return String(x);
    if (x !== 0 && (Math.abs(x) >= 1e5 || Math.abs(x) < 1e-3)) return x.toExponential(2).replace(/\.?0+e/, "e").replace("e+", "e");
    return Number(x.toPrecision(digits || 3)).toString();
  }

  // ---- scales and ticks -----------------------------------------------------------------
  function scale(axis, values, lo, hi) {
    var finite = values.filter(function (v) { return v !== null && isFinite(v) && (!axis.log || v > 0); });
    var min = axis.min !== undefined ? axis.min : Math.min.apply(null, finite);
    var max = Math.max.apply(null, finite);
    if (!finite.length) { min = axis.log ? 1 : 0; max = axis.log ? 10 : 1; }
    if (axis.log) {
      var a = Math.log10(min), b = Math.log10(max);
      if (b - a < 1e-9) { a -= 0.5; b += 0.5; }
      var pad = 0.04 * (b - a);
      a -= pad; b += pad;
      var f = function (v) { return lo + (Math.log10(v) - a) / (b - a) * (hi - lo); };
      f.ticks = logTicks(a, b);
      return f;
    }
    if (max - min < 1e-12) { min -= 0.5; max += 0.5; }
    var span = max - min;
    if (axis.min === undefined) min -= 0.05 * span;
    max += 0.05 * span;
    var g = function (v) { return lo + (v - min) / (max - min) * (hi - lo); };
    g.ticks = linearTicks(min, max);
    return g;
  }
  function linearTicks(min, max) {
    var raw = (max - min) / 5, power = Math.pow(10, Math.floor(Math.log10(raw)));
    var step = [1, 2, 5, 10].map(function (m) { return m * power; }).filter(function (s) { return s >= raw; })[0];
    var out = [];
    for (var t = Math.ceil(min / step) * step; t <= max + 1e-12; t += step) out.push(Number(t.toPrecision(12)));
    return out;
  }
  function logTicks(a, b) {
    var out = [], mults = b - a < 2 ? [1, 2, 5] : [1];
    for (var p = Math.floor(a); p <= Math.ceil(b); p++) {
      mults.forEach(function (m) { var v = m * Math.pow(10, p); if (Math.log10(v) >= a && Math.log10(v) <= b) out.push(v); });
    }
    return out;
  }

  // ---- marks ----------------------------------------------------------------------------
  function marker(kind, x, y, r, color, parent) {
    var d;
    if (kind === "square") d = "M" + (x - r) + "," + (y - r) + "h" + 2 * r + "v" + 2 * r + "h" + -2 * r + "Z";
    else if (kind === "triangle") d = "M" + x + "," + (y - r * 1.2) + "L" + (x + r * 1.1) + "," + (y + r * 0.8) + "L" + (x - r * 1.1) + "," + (y + r * 0.8) + "Z";
    else if (kind === "diamond") d = "M" + x + "," + (y - r * 1.3) + "L" + (x + r) + "," + y + "L" + x + "," + (y + r * 1.3) + "L" + (x - r) + "," + y + "Z";
    else if (kind === "cross") d = "M" + (x - r) + "," + (y - r) + "L" + (x + r) + "," + (y + r) + "M" + (x - r) + "," + (y + r) + "L" + (x + r) + "," + (y - r);
    if (d) return svg("path", { d: d, fill: kind === "cross" ? "none" : color, stroke: kind === "cross" ? color : "#222", "stroke-width": kind === "cross" ? 2 : 0.6 }, parent);
    return svg("circle", { cx: x, cy: y, r: r, fill: color, stroke: "#222", "stroke-width": 0.6 }, parent);
  }
  function pathOf(points, step) {
    var d = "";
    points.forEach(function (p, i) {
      if (i === 0) d += "M" + p[0] + "," + p[1];
      else if (step) d += "H" + p[0] + "V" + p[1];
      else d += "L" + p[0] + "," + p[1];
    });
    return d;
  }

  function chart(spec, parent) {
    var small = !!spec.small;
    var W = small ? 300 : 560, H = small ? 190 : 360;
    var m = small ? { l: 48, r: 10, t: 10, b: 34 } : { l: 64, r: 16, t: 14, b: 46 };
    var figure = el("figure", { "class": small ? "small" : "" }, parent);
    if (spec.title) el("figcaption", {}, figure, spec.title);
    var xs = [], ys = [];
    spec.series.forEach(function (s) {
      s.marks.forEach(function (mk) {
        mk.data.forEach(function (p) {
          xs.push(p[0]); ys.push(p[1]);
          if (mk.type === "errorbars") { xs.push(p[3], p[4]); ys.push(p[5], p[6]); }
        });
      });
    });
    var sx = scale(spec.x, xs, m.l, W - m.r), sy = scale(spec.y, ys, H - m.b, m.t);
    var root = svg("svg", { "class": "chart", "data-chart": spec.id, "data-kind": spec.kind || "", viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img" }, figure);
    var axes = svg("g", { "class": "axes" }, root);
    sx.ticks.forEach(function (t) {
      var x = sx(t);
      svg("line", { x1: x, x2: x, y1: m.t, y2: H - m.b, "class": "grid" }, axes);
      svg("text", { x: x, y: H - m.b + 14, "text-anchor": "middle" }, axes).textContent = fmt(t);
    });
    sy.ticks.forEach(function (t) {
      var y = sy(t);
      svg("line", { x1: m.l, x2: W - m.r, y1: y, y2: y, "class": "grid" }, axes);
      svg("text", { x: m.l - 5, y: y + 4, "text-anchor": "end" }, axes).textContent = fmt(t);
    });
    svg("rect", { x: m.l, y: m.t, width: W - m.l - m.r, height: H - m.t - m.b, "class": "frame" }, axes);
    svg("text", { x: (m.l + W - m.r) / 2, y: H - 6, "text-anchor": "middle", "class": "label" }, axes).textContent = spec.x.label;
    svg("text", { x: 12, y: (m.t + H - m.b) / 2, "text-anchor": "middle", "class": "label", transform: "rotate(-90 12 " + (m.t + H - m.b) / 2 + ")" }, axes).textContent = spec.y.label;
    var ok = function (p) { return p[0] !== null && p[1] !== null && isFinite(sx(p[0])) && isFinite(sy(p[1])); };
    var legend = el("div", { "class": "legend" });
    spec.series.forEach(function (s, i) {
      var color = s.color || PALETTE[i % PALETTE.length];
      var g = svg("g", { "class": "series", "data-series": s.name }, root);
      s.marks.forEach(function (mk) {
        var pts = mk.data.filter(ok);
        if (mk.type === "line" || mk.type === "step") {
          if (pts.length < 2 && mk.type === "line") return;
          var scaled = pts.map(function (p) { return [sx(p[0]), sy(p[1])]; });
          svg("path", { d: pathOf(scaled, mk.type === "step"), fill: "none", stroke: color, "stroke-width": mk.type === "step" ? 1.6 : 1.4, "stroke-dasharray": mk.dash || mk.type === "step" ? "5 3" : "none", "class": mk.type }, g);
        } else if (mk.type === "errorbars") {
          pts.forEach(function (p) {
            if (p[3] !== null && p[4] !== null) svg("line", { x1: sx(p[3]), x2: sx(p[4]), y1: sy(p[1]), y2: sy(p[1]), stroke: color, "class": "bar" }, g);
            if (p[5] !== null && p[6] !== null) svg("line", { x1: sx(p[0]), x2: sx(p[0]), y1: sy(p[5]), y2: sy(p[6]), stroke: color, "class": "bar" }, g);
          });
        }
        if (mk.type === "points" || mk.type === "line") {
          pts.forEach(function (p) {
            var node = mk.type === "points" ? marker(mk.marker, sx(p[0]), sy(p[1]), small ? 2.5 : 4.5, color, g)
              : svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: "transparent", "class": "hit" }, g);
            if (p[2]) { node.setAttribute("data-tip", p[2]); svg("title", {}, node).textContent = p[2]; }
            if (mk.labels && p[7]) { var t = svg("text", { x: sx(p[0]) + 6, y: sy(p[1]) - 6, "class": "point-label" }, g); t.textContent = p[7]; }
          });
        }
      });
      var item = el("span", { "class": "item" }, legend);
      el("span", { "class": "swatch", style: "background:" + color }, item);
      item.appendChild(document.createTextNode(s.name));
    });
    if (!small || spec.series.length > 1) figure.appendChild(legend);
    if (spec.note) el("p", { "class": "note" }, figure, spec.note);
    return figure;
  }

  // ---- tables ---------------------------------------------------------------------------
  function table(columns, rows, parent, cls) {
    var t = el("table", { "class": cls || "" }, parent), head = el("tr", {}, el("thead", {}, t)), body = el("tbody", {}, t);
    columns.forEach(function (c) { el("th", {}, head, c[0]); });
    rows.forEach(function (r) {
      var tr = el("tr", {}, body);
      columns.forEach(function (c) { var v = c[1](r); var td = el("td", {}, tr); if (v instanceof Node) td.appendChild(v); else td.textContent = v; });
    });
    return t;
  }
  function ci(lo, hi) { return lo === null && hi === null ? "" : " [" + fmt(lo) + ", " + fmt(hi) + "]"; }
  function section(title, id) { var s = el("section", { id: id }, document.getElementById("report")); el("h2", {}, s, title); return s; }

  // ---- the page -------------------------------------------------------------------------
  var meta = "store " + data.store + " · generated " + data.generated_at + (data.fitted_at ? " · laws fitted " + data.fitted_at : " · not fitted yet: run `tokenscale fit " + data.grid + "`");
  document.getElementById("meta").textContent = meta;

  data.families.forEach(function (family) {
    var s = section("Task family: " + family.name + (family.form ? " (" + family.form + " law)" : ""), "family-" + family.name);
    var row = el("div", { "class": "charts" }, s);
    family.charts.forEach(function (spec) { chart(spec, row); });
    if (family.optimal.length) {
      el("h3", {}, s, "/optimal over a range of budgets");
      table([
        ["budget FLOPs", function (r) { return fmt(r.budget_flops); }],
        ["Q", function (r) { return fmt(r.text_tokens); }],
        ["LLM", function (r) { return r.llm; }],
        ["V", function (r) { return r.visual_tokens; }],
        ["compressor", function (r) { return r.compressor; }],
        ["predicted error [CI]", function (r) { return fmt(r.predicted_error) + ci(r.predicted_error_lo, r.predicted_error_hi); }],
        ["p_optimal", function (r) { return fmt(r.p_optimal, 2); }],
        ["runner-up", function (r) { return r.runner_up || ""; }],
      ], family.optimal, s, "optimal");
    }
  });

  var laws = section("Fitted laws", "laws");
  if (data.laws.length) {
    table([
      ["family", function (r) { return r.task_family; }],
      ["compressor", function (r) { return r.compressor; }],
      ["form", function (r) { return r.form + (r.preferred ? " ✓" : ""); }],
      ["α [CI]", function (r) { return fmt(r.alpha) + ci(r.alpha_lo, r.alpha_hi); }],
      ["β [CI]", function (r) { return fmt(r.beta) + ci(r.beta_lo, r.beta_hi); }],
      ["α/β CI", function (r) { return ci(r.ratio_lo, r.ratio_hi); }],
      ["A", function (r) { return fmt(r.A); }],
      ["D", function (r) { return fmt(r.D); }],
      ["r²", function (r) { return fmt(r.r2); }],
      ["holdout error", function (r) { return fmt(r.holdout_error); }],
      ["points", function (r) { return r.n_points; }],
      ["identified", function (r) { return r.identification ? "no: " + r.identification : "yes"; }],
    ], data.laws, laws, "laws");
    el("p", { "class": "note" }, laws, "✓ = the form that fits the family better (lower holdout error, then higher r²); the charts and /optimal use it.");
  } else {
    el("p", {}, laws, "No laws yet: run `tokenscale fit " + data.grid + "`.");
  }
  chart(data.alpha_beta, el("div", { "class": "charts" }, laws));
  if (data.heldout.length) {
    el("h3", {}, laws, "Held-out LLMs: observed against predicted");
    table([
      ["family", function (r) { return r.task_family; }], ["compressor", function (r) { return r.compressor; }],
      ["form", function (r) { return r.form; }], ["LLM", function (r) { return r.llm; }], ["V", function (r) { return r.visual_tokens; }],
      ["observed", function (r) { return fmt(r.observed_error); }],
      ["predicted [CI]", function (r) { return fmt(r.predicted_error) + ci(r.predicted_lo, r.predicted_hi); }],
    ], data.heldout, laws, "heldout");
  }

  var trials = section("Trials", "trials");
  var counts = {};
  data.trials.forEach(function (t) { counts[t.status] = (counts[t.status] || 0) + 1; });
  el("p", {}, trials, Object.keys(counts).sort().map(function (k) { return counts[k] + " " + k; }).join(", ") || "no trials");
  var columns = [
    ["trial", function (t) { return t.trial_id; }], ["LLM", function (t) { return t.llm; }], ["V", function (t) { return t.visual_tokens; }],
    ["compressor", function (t) { return t.compressor; }], ["seed", function (t) { return t.seed; }],
    ["status", function (t) { var s = el("span", { "class": "status " + t.status }, null, t.status); if (t.error) s.title = t.error; return s; }],
    ["progress", function (t) { return (t.progress || "") + (t.eta ? " · ETA " + t.eta : ""); }],
  ];
  data.benchmarks.forEach(function (b) { columns.push([b, function (t) { return fmt(t.scores[b]); }]); });
  table(columns, data.trials, trials, "trials");
  var curves = data.trials.filter(function (t) { return t.curve; });
  if (curves.length) {
    el("h3", {}, trials, "Training loss per trial");
    var grid = el("div", { "class": "charts curves" }, trials);
    curves.forEach(function (t) { chart(t.curve, grid); });
  }

  // ---- hover ----------------------------------------------------------------------------
  var tip = document.getElementById("tip");
  document.addEventListener("mouseover", function (e) {
    var text = e.target.getAttribute && e.target.getAttribute("data-tip");
    if (!text) { tip.hidden = true; return; }
    tip.textContent = text;
    tip.hidden = false;
    tip.style.left = (e.pageX + 12) + "px";
    tip.style.top = (e.pageY + 12) + "px";
  });
  document.documentElement.setAttribute("data-rendered", document.querySelectorAll("svg.chart").length);
})();
