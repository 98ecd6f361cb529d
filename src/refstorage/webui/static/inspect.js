// refstorage inspect: the few scripts of the pages (plots with the bundled plotly.min.js).
"use strict";

function pollStatus(url) {
  function tick() {
    fetch(url, {credentials: "same-origin"}).then(r => r.json()).then(s => {
      const bar = document.getElementById("indexbar");
      if (bar) { bar.value = s.position; }
      const p = document.getElementById("indexstatus");
      if (s.state === "ready") { location.reload(); return; }
      if (s.state === "failed") { if (p) { p.textContent = "Indexing failed: " + s.error; } return; }
      if (p) { p.textContent = Math.round(100 * s.position / Math.max(1, s.size)) + "% read"; }
      setTimeout(tick, 500);
    }).catch(() => setTimeout(tick, 1000));
  }
  tick();
}

const PLOT_CONFIG = {displaylogo: false, responsive: true};

// Plotly reads a subset of HTML in text, labels and hover text (<a href>, <b>,
// <span style>, <br>); strings from the database (class names, any bytes a
// pickle holds) are shown as text, never as that markup.
function plotText(s) {
  return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

function plotGrowth(id, g) {
  Plotly.newPlot(id, [
    {x: g.day, y: g.bytes, type: "bar", name: "bytes written per day", marker: {color: "#4a7ab5"}},
    {x: g.day, y: g.objects, type: "scatter", mode: "lines+markers", name: "new objects per day",
     yaxis: "y2", line: {color: "#d4752c"}},
  ], {
    margin: {t: 20, r: 60, b: 50, l: 70}, legend: {orientation: "h", y: 1.12},
    yaxis: {title: {text: "bytes"}}, yaxis2: {title: {text: "objects"}, overlaying: "y", side: "right"},
    xaxis: {type: "category"},
  }, PLOT_CONFIG);
}

function plotClasses(id, p) {
  const names = p.names.map(plotText);
  Plotly.newPlot(id, [
    {y: names, x: p.current, type: "bar", orientation: "h", name: "current bytes", marker: {color: "#4a7ab5"}},
    {y: names, x: p.historical, type: "bar", orientation: "h", name: "historical bytes", marker: {color: "#c9c9c9"}},
  ], {barmode: "stack", margin: {t: 20, r: 20, b: 40, l: 280}, legend: {orientation: "h", y: 1.1},
      height: Math.max(260, 22 * p.names.length + 80)}, PLOT_CONFIG);
}

function plotGraph(id, url) {
  fetch(url, {credentials: "same-origin"}).then(r => r.json()).then(g => {
    const byLevel = {};
    g.nodes.forEach(n => { (byLevel[n.level] = byLevel[n.level] || []).push(n); });
    const pos = {};
    Object.keys(byLevel).forEach(lv => {
      const ns = byLevel[lv];
      ns.forEach((n, i) => { pos[n.oid] = [Number(lv), (i - (ns.length - 1) / 2)]; });
    });
    const ys = Object.values(pos).map(p => p[1]);
    const ex = [], ey = [];
    g.edges.forEach(([a, b]) => { ex.push(pos[a][0], pos[b][0], null); ey.push(pos[a][1], pos[b][1], null); });
    const node = {
      x: g.nodes.map(n => pos[n.oid][0]), y: g.nodes.map(n => pos[n.oid][1]),
      text: g.nodes.map(n => plotText(n.oid) + "<br>" + plotText(n["class"].split(".").slice(-1)[0])),
      hovertext: g.nodes.map(n => plotText(n.oid + " " + n["class"])), customdata: g.nodes.map(n => n.url),
      mode: "markers+text", type: "scatter", textposition: "top center", hoverinfo: "text",
      marker: {size: g.nodes.map(n => n.level === 0 ? 18 : 11),
               color: g.nodes.map(n => n.level === 0 ? "#d4752c" : (n.level < 0 ? "#6a3d9a" : "#4a7ab5"))},
    };
    Plotly.newPlot(id, [
      {x: ex, y: ey, mode: "lines", type: "scatter", hoverinfo: "skip", line: {color: "#bbb", width: 1}},
      node,
    ], {showlegend: false, margin: {t: 10, r: 10, b: 30, l: 10},
        xaxis: {zeroline: false, range: [-2.7, 2.7], tickvals: [-2, -1, 0, 1, 2],
                ticktext: ["referrers'<br>referrers", "referrers", "this object", "references", "their<br>references"]},
        yaxis: {visible: false, range: [Math.min(...ys) - 0.6, Math.max(...ys) + 0.8]}}, PLOT_CONFIG);
    document.getElementById(id).on("plotly_click", ev => {
      const url = ev.points[0].customdata;
      if (url) { location.href = url; }
    });
  });
}
