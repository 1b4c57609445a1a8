// Draws every chart on the page (and in content htmx swaps in) with uPlot, from the JSON next to it.
"use strict";
window.mfCharts = window.mfCharts || {};

function mfFormat(v) {
  return v == null ? "" : v.toLocaleString("en-US", { maximumFractionDigits: 6 });
}

function mfChartData(kind, doc) {
  if (kind === "usage") {
    // The answer of GET /v1/usage: one point per window, at its start.
    var xs = [], ys = [];
    (doc.series || []).forEach(function (s) { xs.push(s.start / 1000); ys.push(Number(s.value)); });
    return { data: [xs, ys], series: [{ label: doc.meter + (doc.unit ? " (" + doc.unit + ")" : "") }] };
  }
  return {
    data: [doc.x].concat(doc.series.map(function (s) { return s.values; })),
    series: doc.series.map(function (s) { return { label: s.label }; }),
  };
}

var MF_COLOURS = ["#2563eb", "#d97706", "#dc2626", "#059669", "#7c3aed"];

function mfDraw(root) {
  root.querySelectorAll("div.chart[data-chart]").forEach(function (el) {
    var id = el.dataset.chart, source = document.getElementById(id);
    if (!source || el.dataset.drawn) return;
    el.dataset.drawn = "1";
    var built = mfChartData(el.dataset.kind, JSON.parse(source.textContent));
    var width = Math.max(240, el.clientWidth || el.parentElement.clientWidth - 32);
    var opts = {
      width: width,
      height: width < 500 ? 200 : 260,
      tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"); },
      scales: { x: { time: true } },
      axes: [{}, { values: function (u, vals) { return vals.map(mfFormat); }, size: 70 }],
      series: [{ value: function (u, v) { return v == null ? "" : new Date(v * 1e3).toISOString().slice(0, 16).replace("T", " ") + " UTC"; } }].concat(
        built.series.map(function (s, i) {
          return { label: s.label, stroke: MF_COLOURS[i % MF_COLOURS.length], width: 2,
                   value: function (u, v) { return mfFormat(v); } };
        })),
    };
    if (window.mfCharts[id]) window.mfCharts[id].destroy();
    window.mfCharts[id] = new uPlot(opts, built.data, el);
  });
}

document.addEventListener("DOMContentLoaded", function () { mfDraw(document); });
document.addEventListener("htmx:afterSwap", function (e) { mfDraw(e.target); });
