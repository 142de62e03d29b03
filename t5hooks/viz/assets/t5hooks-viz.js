/* t5hooks views: renders the page from its embedded JSON (<script type="application/json" id="t5hooks-data">).
   One script for every kind of page: "attention", "heatmap", "feature", "index". No network, no libraries. */
(function () {
  "use strict";

  var data = JSON.parse(document.getElementById("t5hooks-data").textContent);
  var root = document.getElementById("t5hooks-root");
  var tip = el("div", { id: "t5hooks-tooltip" });
  document.body.appendChild(tip);

  // ---- helpers -------------------------------------------------------------------------------
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        if (k === "text") node.textContent = attrs[k];
        else if (k === "className") node.className = attrs[k];
        else node.setAttribute(k, attrs[k]);
      });
    }
    (children || []).forEach(function (c) { if (c) node.appendChild(c); });
    return node;
  }
  function fmt(x) {  // what people read; the exact value is in data-value / the embedded JSON
    if (x === null || x === undefined) return "n/a";
    if (x === 0) return "0";
    var a = Math.abs(x);
    if (a >= 1e5 || a < 1e-3) return x.toExponential(3);
    return String(Number(x.toPrecision(4)));
  }
  function pct(x) { return x === 0 ? "0%" : (100 * x < 0.01 ? (100 * x).toExponential(2) : String(Number((100 * x).toPrecision(3)))) + "%"; }
  function showTip(ev, text) {
    tip.textContent = text;
    tip.style.display = "block";
    var x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + tip.offsetWidth > window.innerWidth) x = ev.clientX - tip.offsetWidth - 8;
    if (y + tip.offsetHeight > window.innerHeight) y = ev.clientY - tip.offsetHeight - 8;
    tip.style.left = x + "px";
    tip.style.top = y + "px";
  }
  function hideTip() { tip.style.display = "none"; }
  function hoverable(node, text) {
    node.addEventListener("mousemove", function (ev) { showTip(ev, typeof text === "function" ? text() : text); });
    node.addEventListener("mouseleave", hideTip);
  }
  function mix(a, b, t) { return "rgb(" + [0, 1, 2].map(function (i) { return Math.round(a[i] + (b[i] - a[i]) * t); }).join(",") + ")"; }
  var WHITE = [255, 255, 255], BLUE = [33, 102, 172], RED = [178, 24, 43], ORANGE = [230, 120, 40], INK = [40, 70, 170];
  function sequential(v, vmax, color) {
    var t = vmax > 0 ? Math.max(0, Math.min(1, v / vmax)) : 0;
    return mix(WHITE, color || INK, t);
  }
  function diverging(v, center, span) {
    var t = span > 0 ? Math.max(-1, Math.min(1, (v - center) / span)) : 0;
    return t >= 0 ? mix(WHITE, RED, t) : mix(WHITE, BLUE, -t);
  }
  function legend(low, high, gradient) {
    var bar = el("span", { className: "bar" });
    bar.style.background = gradient;
    return el("div", { className: "legend" }, [el("span", { text: fmt(low) }), bar, el("span", { text: fmt(high) })]);
  }

  // A labelled heatmap as a table: rows x cols, `color(v)`, `describe(r, c, v)` for the hover text.
  function grid(values, rowLabels, colLabels, color, describe) {
    var table = el("table", { className: "grid", id: "heatmap" });
    var head = el("tr", {}, [el("th")]);
    colLabels.forEach(function (label) { head.appendChild(el("th", { className: "col", text: label })); });
    table.appendChild(head);
    values.forEach(function (row, r) {
      var tr = el("tr", {}, [el("th", { className: "row", text: rowLabels[r] })]);
      row.forEach(function (v, c) {
        var td = el("td", { className: "cell", "data-row": r, "data-col": c });
        if (v === null) {
          td.className = "cell hidden-cell";
          td.setAttribute("data-value", "null");
        } else {
          td.setAttribute("data-value", String(v));
          td.style.background = color(v);
        }
        hoverable(td, function () { return describe(r, c, v); });
        tr.appendChild(td);
      });
      table.appendChild(tr);
    });
    return table;
  }

  function select(id, options, onChange) {
    var s = el("select", { id: id });
    options.forEach(function (o) { s.appendChild(el("option", { value: o[0], text: o[1] })); });
    s.addEventListener("change", onChange);
    return s;
  }

  // ---- attention -----------------------------------------------------------------------------
  var KIND_LABELS = { encoder: "encoder self-attention", decoder: "decoder self-attention", cross: "cross-attention" };
  var KIND_AXES = { encoder: ["encoder", "encoder"], decoder: ["decoder", "decoder"], cross: ["decoder", "encoder"] };

  function renderAttention() {
    var kinds = Object.keys(data.attention);
    var H = data.n_heads;
    root.appendChild(el("h1", { text: data.title }));
    root.appendChild(el("div", { className: "muted", text: data.subtitle || "" }));
    var kindSel = select("attn-kind", kinds.map(function (k) { return [k, KIND_LABELS[k]]; }), function () { fillLayers(); draw(); });
    var layerSel = el("select", { id: "attn-layer" });
    layerSel.addEventListener("change", draw);
    var heads = el("span", { className: "heads", id: "attn-heads" });
    for (var h = 0; h < H; h++) {
      var box = el("input", { type: "checkbox", "data-head": h, id: "head-" + h });
      if (h === 0) box.checked = true;
      box.addEventListener("change", draw);
      heads.appendChild(el("label", {}, [box, document.createTextNode("H" + h)]));
    }
    function setHeads(on) {
      heads.querySelectorAll("input").forEach(function (b, i) { b.checked = on === "all" ? true : i === on; });
      draw();
    }
    var allBtn = el("button", { id: "heads-all", text: "mean of all" });
    allBtn.addEventListener("click", function () { setHeads("all"); });
    root.appendChild(el("div", { className: "controls" }, [
      el("label", {}, [document.createTextNode("attention"), kindSel]),
      el("label", {}, [document.createTextNode("layer"), layerSel]),
      el("span", {}, [document.createTextNode("heads "), heads]),
      allBtn,
    ]));
    var summary = el("div", { id: "summary", className: "muted" });
    var holder = el("div", { id: "heatmap-holder" });
    root.appendChild(summary);
    root.appendChild(holder);
    root.appendChild(el("p", { className: "note", text: "Rows are queries, columns keys. One head shows its pattern; several show their mean. Padded positions are not shown." }));

    function fillLayers() {
      var layers = data.attention[kindSel.value].layers;
      layerSel.innerHTML = "";
      layers.forEach(function (l, i) { layerSel.appendChild(el("option", { value: i, text: "L" + l })); });
    }
    function draw() {
      var kind = kindSel.value, entry = data.attention[kind], li = Number(layerSel.value);
      var chosen = [];
      heads.querySelectorAll("input").forEach(function (b) { if (b.checked) chosen.push(Number(b.getAttribute("data-head"))); });
      holder.innerHTML = "";
      hideTip();
      if (!chosen.length) { summary.textContent = "pick at least one head"; return; }
      var per = entry.patterns[li];
      var Q = per[chosen[0]].length, K = Q ? per[chosen[0]][0].length : 0;
      var values = [];
      for (var q = 0; q < Q; q++) {
        var row = [];
        for (var k = 0; k < K; k++) {
          var s = 0;
          chosen.forEach(function (h) { s += per[h][q][k]; });
          row.push(s / chosen.length);
        }
        values.push(row);
      }
      var axes = KIND_AXES[kind];
      var qTok = data.tokens[axes[0]], kTok = data.tokens[axes[1]];
      var qPos = data.positions[axes[0]], kPos = data.positions[axes[1]];
      var label = function (pos, tok) { return pos + ":" + tok; };
      var headText = chosen.length === 1 ? "head " + chosen[0] : "mean of heads " + chosen.join(",");
      summary.textContent = KIND_LABELS[kind] + ", layer " + entry.layers[li] + ", " + headText;
      holder.setAttribute("data-kind", kind);
      holder.setAttribute("data-layer", entry.layers[li]);
      holder.setAttribute("data-heads", chosen.join(","));
      holder.appendChild(legend(0, 1, "linear-gradient(to right, #fff, rgb(40,70,170))"));
      holder.appendChild(grid(values,
        qTok.map(function (t, i) { return label(qPos[i], t); }),
        kTok.map(function (t, i) { return label(kPos[i], t); }),
        function (v) { return sequential(v, 1); },
        function (q, k, v) {
          return KIND_LABELS[kind] + "  L" + entry.layers[li] + " " + headText +
            "\nquery " + label(qPos[q], JSON.stringify(qTok[q])) + "  ->  key " + label(kPos[k], JSON.stringify(kTok[k])) +
            "\nattention " + (v === null ? "n/a" : fmt(v));
        }));
    }
    fillLayers();
    draw();
  }

  // ---- heatmap (patching, attribution) --------------------------------------------------------
  function renderHeatmap() {
    root.appendChild(el("h1", { text: data.title }));
    var stats = el("div", { className: "stats" });
    if (data.clean_metric !== undefined) {
      stats.appendChild(el("span", { className: "stat" }, [document.createTextNode("clean metric "), el("b", { id: "clean-metric", "data-value": String(data.clean_metric), text: fmt(data.clean_metric) })]));
      stats.appendChild(el("span", { className: "stat" }, [document.createTextNode("corrupted metric "), el("b", { id: "corrupted-metric", "data-value": String(data.corrupted_metric), text: fmt(data.corrupted_metric) })]));
      stats.appendChild(el("span", { className: "stat" }, [document.createTextNode("method "), el("b", { text: data.method })]));
    }
    root.appendChild(stats);
    var views = [["values", data.value_label]];
    if (data.normalized) views.push(["normalized", "normalised: (patched - corrupted) / (clean - corrupted)"]);
    var viewSel = select("heatmap-view", views, draw);
    root.appendChild(el("div", { className: "controls" }, [el("label", {}, [document.createTextNode("show"), viewSel])]));
    var holder = el("div", { id: "heatmap-holder" });
    root.appendChild(holder);
    function draw() {
      var normalized = viewSel.value === "normalized";
      var values = normalized ? data.normalized : data.values;
      var center = normalized ? 0 : data.center;
      var span = 0;
      values.forEach(function (row) { row.forEach(function (v) { if (v !== null) span = Math.max(span, Math.abs(v - center)); }); });
      holder.innerHTML = "";
      holder.setAttribute("data-view", viewSel.value);
      holder.appendChild(legend(center - span, center + span, "linear-gradient(to right, rgb(33,102,172), #fff, rgb(178,24,43))"));
      holder.appendChild(grid(values, data.row_labels, data.col_labels,
        function (v) { return diverging(v, center, span); },
        function (r, c, v) {
          return data.row_axis + " " + data.row_labels[r] + "\n" + data.col_axis + " " + data.col_labels[c] +
            "\n" + (normalized ? "normalised effect" : data.value_label) + " " + fmt(v);
        }));
    }
    draw();
  }

  // ---- feature page --------------------------------------------------------------------------
  function tokenRow(ex, vmax) {
    var box = el("div", { className: "example", "data-doc": ex.doc, "data-pos": ex.pos, "data-activation": String(ex.activation) });
    box.appendChild(el("span", { className: "value", text: fmt(ex.activation) }));
    ex.tokens.forEach(function (t, i) {
      var a = ex.acts[i], pos = ex.start + i;
      var span = el("span", { className: "tok" + (pos === ex.pos ? " center" : ""), "data-act": String(a), text: t });
      span.style.background = sequential(a, vmax, ORANGE);
      hoverable(span, "doc " + ex.doc + " pos " + pos + "  " + JSON.stringify(t) + "\nactivation " + fmt(a));
      box.appendChild(span);
    });
    if (ex.source !== undefined) {
      var src = ex.source === null ? "(source tokens not stored: the store holds no encoder hook)" : "source: " + ex.source.join("");
      box.appendChild(el("div", { className: "source", text: src }));
    }
    return box;
  }

  function renderFeature() {
    var d = data;
    if (d.index_href) root.appendChild(el("div", {}, [el("a", { href: d.index_href, text: "\u2190 all features" })]));
    root.appendChild(el("h1", { text: "Feature " + d.feature }));
    root.appendChild(el("div", { className: "muted", text: d.hook + " (" + d.stream + " stream) \u00b7 SAE " + (d.sae_label || "") }));
    function stat(id, label, value, text) {
      return el("span", { className: "stat" }, [document.createTextNode(label + " "), el("b", { id: id, "data-value": String(value), text: text })]);
    }
    root.appendChild(el("div", { className: "stats" }, [
      stat("stat-max", "max activation", d.max_activation, fmt(d.max_activation)),
      stat("stat-mean", "mean when active", d.mean_activation, fmt(d.mean_activation)),
      stat("stat-density", "density", d.density, pct(d.density)),
      stat("stat-firing", "active tokens", d.n_firing, d.n_firing + " / " + d.n_tokens),
    ]));
    var vmax = d.max_activation > 0 ? d.max_activation : 1;

    root.appendChild(el("h2", { text: "Top activations" }));
    var top = el("div", { id: "top-examples" });
    if (!d.top_examples.length) top.appendChild(el("p", { className: "note", text: "This feature never fired on the store." }));
    d.top_examples.forEach(function (ex) { top.appendChild(tokenRow(ex, vmax)); });
    root.appendChild(top);

    root.appendChild(el("h2", { text: "Activation histogram (active tokens, log-spaced bins)" }));
    var hist = el("div", { className: "hist", id: "histogram" });
    var maxCount = Math.max.apply(null, d.histogram.counts.concat([1]));
    d.histogram.counts.forEach(function (c, i) {
      var bar = el("div", { "data-count": c });
      bar.style.height = (100 * c / maxCount) + "%";
      hoverable(bar, "activation " + fmt(d.histogram.edges[i]) + " \u2013 " + fmt(d.histogram.edges[i + 1]) + "\n" + c + " tokens");
      hist.appendChild(bar);
    });
    root.appendChild(hist);
    if (d.histogram.edges.length) root.appendChild(el("div", { className: "muted", text: fmt(d.histogram.edges[0]) + " \u2026 " + fmt(d.histogram.edges[d.histogram.edges.length - 1]) }));

    root.appendChild(el("h2", { text: "Samples from activation quantiles" }));
    var bins = el("div", { id: "quantile-bins", className: "bins" });
    d.quantile_bins.forEach(function (b, i) {
      var head = el("div", { className: "muted", text: "quantile " + fmt(b.q_lo) + "\u2013" + fmt(b.q_hi) + ": activation " + fmt(b.lo) + " \u2013 " + fmt(b.hi) });
      var group = el("div", { className: "bin", "data-bin": i }, [head]);
      b.examples.forEach(function (ex) { group.appendChild(tokenRow(ex, vmax)); });
      bins.appendChild(group);
    });
    if (!d.quantile_bins.length) bins.appendChild(el("p", { className: "note", text: "No active tokens." }));
    root.appendChild(bins);

    root.appendChild(el("h2", { text: "Logit effect" }));
    var le = d.logit_effect;
    if (le.promoted) {
      var mk = function (title, rows, id) {
        var t = el("table", { id: id }, [el("tr", {}, [el("th", { text: title, colspan: 2 })])]);
        rows.forEach(function (r) { t.appendChild(el("tr", {}, [el("td", { text: JSON.stringify(r[0]) }), el("td", { "data-value": String(r[1]), text: fmt(r[1]) })])); });
        return t;
      };
      root.appendChild(el("div", { className: "logits" }, [mk("promoted", le.promoted, "logits-promoted"), mk("suppressed", le.suppressed, "logits-suppressed")]));
    }
    root.appendChild(el("p", { className: "note", text: le.note }));

    root.appendChild(el("h2", { text: "Nearest features (decoder cosine)" }));
    var nb = el("div", { id: "neighbours" });
    d.neighbours.forEach(function (n) {
      var link = d.page_pattern ? el("a", { href: d.page_pattern.replace("{feature}", n.feature), text: "feature " + n.feature }) : el("span", { text: "feature " + n.feature });
      nb.appendChild(el("div", { "data-feature": n.feature, "data-cosine": String(n.cosine) }, [link, document.createTextNode("  cos " + fmt(n.cosine))]));
    });
    root.appendChild(nb);
  }

  // ---- index ---------------------------------------------------------------------------------
  var LIMIT = 2000;
  function renderIndex() {
    var d = data;
    root.appendChild(el("h1", { text: "Feature dashboard" }));
    root.appendChild(el("div", { className: "muted", text: d.hook + " (" + d.stream + " stream) \u00b7 " + d.features.length + " features \u00b7 " + d.n_tokens + " tokens \u00b7 SAE " + (d.sae_label || "") }));
    var search = el("input", { type: "search", id: "search", placeholder: "search top tokens, or #id" });
    var count = el("span", { id: "count", className: "muted" });
    root.appendChild(el("div", { className: "controls" }, [search, count]));
    var columns = [["feature", "feature"], ["density", "density"], ["max_activation", "max act"], ["mean_activation", "mean act"], ["top_tokens", "top tokens"]];
    var table = el("table", { className: "index", id: "index" });
    var head = el("tr");
    columns.forEach(function (c) {
      var th = el("th", { "data-key": c[0], text: c[1] });
      if (c[0] !== "top_tokens") th.addEventListener("click", function () { sortBy(c[0]); });
      head.appendChild(th);
    });
    table.appendChild(el("thead", {}, [head]));
    var body = el("tbody");
    table.appendChild(body);
    root.appendChild(table);
    var rows = d.features.slice(), key = "feature", order = "asc";
    function sortBy(k) {
      order = k === key && order === "desc" ? "asc" : k === key ? "desc" : (k === "feature" ? "asc" : "desc");
      key = k;
      draw();
    }
    search.addEventListener("input", draw);
    function draw() {
      head.querySelectorAll("th").forEach(function (th) { th.removeAttribute("data-order"); if (th.getAttribute("data-key") === key) th.setAttribute("data-order", order); });
      var q = search.value.trim(), shown;
      if (q.charAt(0) === "#") shown = rows.filter(function (f) { return String(f.feature) === q.slice(1); });
      else if (q) shown = rows.filter(function (f) { return f.top_tokens.some(function (t) { return t.indexOf(q) >= 0; }); });
      else shown = rows;
      var sign = order === "asc" ? 1 : -1;
      shown = shown.slice().sort(function (a, b) { return sign * (a[key] - b[key]) || a.feature - b.feature; });
      body.innerHTML = "";
      shown.slice(0, LIMIT).forEach(function (f) {
        var link = el("a", { href: d.page_pattern.replace("{feature}", f.feature), text: String(f.feature) });
        body.appendChild(el("tr", { "data-feature": f.feature }, [
          el("td", {}, [link]),
          el("td", { "data-value": String(f.density), text: pct(f.density) }),
          el("td", { "data-value": String(f.max_activation), text: fmt(f.max_activation) }),
          el("td", { "data-value": String(f.mean_activation), text: fmt(f.mean_activation) }),
          el("td", { className: "tokens", text: f.top_tokens.map(function (t) { return JSON.stringify(t); }).join(" ") }),
        ]));
      });
      count.textContent = shown.length > LIMIT ? "showing " + LIMIT + " of " + shown.length + " (refine the search)" : shown.length + " features";
    }
    draw();
  }

  var renderers = { attention: renderAttention, heatmap: renderHeatmap, feature: renderFeature, index: renderIndex };
  if (!renderers[data.kind]) throw new Error("t5hooks view: unknown page kind " + data.kind);
  renderers[data.kind]();
  document.body.setAttribute("data-rendered", data.kind);
})();
