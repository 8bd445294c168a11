// nanofleet dashboard charts: draws each server-rendered <div class="chart" data-chart="..."> with Chart.js.
// Chart.js 4.6.1 is vendored beside this file (chart.umd.min.js, from npm chart.js@4.6.1 dist/, MIT,
// chart.js-LICENSE.md): no CDN, and it needs no eval, so the dashboard's CSP (script-src 'self') holds.
// The server gives each chart its numbers (a JSON block), its colours (one per model version, the same on
// every chart) and its text alternative (aria-label, and a table under it); this file only draws.
(function () {
  "use strict";
  if (typeof window.Chart !== "function") return;
  var Chart = window.Chart;
  var FONT = { size: 12, family: "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif" };
  var MUTED = "#5b6570";

  function fmt(v, unit) {
    if (v === null || v === undefined || isNaN(v)) return "–";
    var a = Math.abs(v);
    if (unit === "B") {
      var units = [["GiB", 1073741824], ["MiB", 1048576], ["KiB", 1024]];
      for (var i = 0; i < units.length; i++) {
        if (a >= units[i][1]) return (v / units[i][1]).toFixed(1) + " " + units[i][0];
      }
      return v.toFixed(0) + " B";
    }
    return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(2);
  }

  function hhmmss(ms) {
    var d = new Date(ms);
    function two(n) { return (n < 10 ? "0" : "") + n; }
    return two(d.getUTCHours()) + ":" + two(d.getUTCMinutes()) + ":" + two(d.getUTCSeconds());
  }

  // The unit goes in the axis title, the ticks carry numbers only: no label is too wide for its axis.
  function valueAxis(unit) {
    return {
      beginAtZero: false,
      grace: "8%",
      title: { display: !!unit && unit !== "B", text: unit, font: FONT, color: MUTED },
      ticks: { font: FONT, color: MUTED, maxTicksLimit: 5, callback: function (v) { return fmt(v, unit); } },
    };
  }

  var legend = {
    display: true,
    position: "top",
    align: "start",
    labels: { font: FONT, color: "#14212e", boxWidth: 12, boxHeight: 12, padding: 10 },
  };

  function lineConfig(doc) {
    return {
      type: "line",
      data: {
        datasets: doc.series.map(function (s) {
          return {
            label: s.label,
            data: s.points.map(function (p) { return { x: p[0], y: p[1] }; }),
            borderColor: s.colour,
            backgroundColor: s.colour,
            borderWidth: 2,
            pointRadius: s.points.length > 1 ? 0 : 3,
            pointHoverRadius: 4,
            tension: 0,
          };
        }),
      },
      options: {
        scales: {
          x: {
            type: "linear",
            ticks: { font: FONT, color: MUTED, maxTicksLimit: 4, maxRotation: 0, callback: hhmmss },
            title: { display: true, text: "time (UTC)", font: FONT, color: MUTED },
          },
          y: valueAxis(doc.unit),
        },
        plugins: {
          legend: legend,
          tooltip: {
            callbacks: {
              title: function (items) { return items.length ? hhmmss(items[0].parsed.x) : ""; },
              label: function (item) { return item.dataset.label + ": " + fmt(item.parsed.y, doc.unit) + (doc.unit === "B" ? "" : " " + doc.unit); },
            },
          },
        },
      },
    };
  }

  function barsConfig(doc) {
    return {
      type: "bar",
      data: {
        labels: doc.devices,
        datasets: doc.series.map(function (s) {
          return { label: s.label, data: s.values, backgroundColor: s.colour, borderColor: s.colour, barPercentage: 0.9 };
        }),
      },
      options: {
        indexAxis: "y",
        scales: {
          x: Object.assign(valueAxis(doc.unit), { beginAtZero: true, grace: 0 }),
          y: { ticks: { font: FONT, color: MUTED, autoSkip: false } },
        },
        plugins: {
          legend: legend,
          tooltip: {
            callbacks: {
              label: function (item) { return item.dataset.label + ": " + fmt(item.parsed.x, doc.unit) + " " + doc.unit; },
            },
          },
        },
      },
    };
  }

  function draw(el) {
    var canvas = el.querySelector("canvas");
    var data = el.querySelector("script.chart-data");
    if (!canvas || !data) return;
    var doc;
    try {
      doc = JSON.parse(data.textContent);
    } catch (e) {
      return; // the text alternative and the table still say everything
    }
    var kind = el.getAttribute("data-chart");
    var config = kind === "bars" ? barsConfig(doc) : lineConfig(doc);
    if (kind === "bars") el.style.height = 70 + doc.devices.length * 30 + "px"; // CSSOM: allowed by the CSP
    config.options.responsive = true;
    config.options.maintainAspectRatio = false;
    config.options.animation = false; // live regions redraw every few seconds
    new Chart(canvas, config);
    el.setAttribute("data-rendered", "1");
  }

  function drawAll(root) {
    // Charts whose canvas a live update took out of the page: let them go.
    Object.keys(Chart.instances || {}).forEach(function (k) {
      var c = Chart.instances[k];
      if (c && c.canvas && !c.canvas.isConnected) c.destroy();
    });
    root.querySelectorAll('.chart[data-chart]:not([data-rendered])').forEach(draw);
  }

  document.addEventListener("DOMContentLoaded", function () { drawAll(document); });
  document.addEventListener("live:updated", function (ev) { drawAll(ev.target || document); });
})();
