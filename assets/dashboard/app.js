// oxserve dashboard: polls /dashboard/api/history once a second and draws each panel the server
// lists with uPlot. The server decides which panels exist (src/dashboard/history.rs, PANELS), so a
// family that starts having data (a GPU, an LLM model) gets its chart without a change here.
"use strict";

(function () {
  const COLORS = ["#0969da", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bc4c00", "#1b7c83", "#6e7781"];
  const params = new URLSearchParams(location.hash.slice(1));
  const state = {
    model: params.get("model") || "",
    range: [300, 900, 3600].includes(Number(params.get("range"))) ? Number(params.get("range")) : 300,
    // The token may come in the URL fragment (never sent to the server, so never in its logs).
    token: params.get("token") || sessionStorage.getItem("oxserve-token") || "",
    charts: new Map(), // panel id -> {u, signature, el}
    drawn: {},         // panel id -> what its chart drew last
    busy: false,
    updated: null,
  };
  const $ = (id) => document.getElementById(id);

  function keepHash() {
    const h = new URLSearchParams();
    if (state.model) h.set("model", state.model);
    h.set("range", String(state.range));
    history.replaceState(null, "", "#" + h.toString());
  }

  function fmt(v, unit) {
    if (v == null || !isFinite(v)) return "-";
    if (Number.isInteger(v) && Math.abs(v) < 1e6) return v + (unit ? " " + unit : "");
    const a = Math.abs(v);
    const digits = a >= 100 ? 0 : a >= 10 ? 1 : a >= 1 ? 2 : 3;
    return v.toFixed(digits) + (unit ? " " + unit : "");
  }

  function publish() {
    const out = { model: state.model, range: state.range, updated: state.updated, panels: [] };
    for (const el of $("panels").children) {
      const d = state.drawn[el.dataset.id] || { series: [] };
      out.panels.push({ id: el.dataset.id, title: el.dataset.title, draws: d.draws || 0, series: d.series });
    }
    $("chart-state").textContent = JSON.stringify(out);
  }

  // What uPlot actually holds when it draws: non-null points per series.
  function onDraw(id) {
    return (u) => {
      const prev = state.drawn[id] || { draws: 0 };
      state.drawn[id] = {
        draws: prev.draws + 1,
        series: u.series.slice(1).map((s, i) => ({
          label: s.label,
          points: u.data[i + 1].filter((v) => v != null).length,
        })),
      };
      publish();
    };
  }

  function makeChart(el, panel, data) {
    const units = [...new Set(panel.series.map((s) => s.unit))];
    const scaleOf = (unit) => (units.indexOf(unit) === 0 ? "y" : "y2");
    const axes = [{ stroke: "#57606a", grid: { stroke: "#eaeef2" } }];
    units.slice(0, 2).forEach((unit, i) => {
      axes.push({
        scale: i === 0 ? "y" : "y2",
        side: i === 0 ? 3 : 1,
        label: unit,
        labelSize: 18,
        size: 56,
        stroke: "#57606a",
        grid: { show: i === 0, stroke: "#eaeef2" },
        values: (u, ticks) => ticks.map((t) => fmt(t, "")),
      });
    });
    const scales = { x: { time: true }, y: { range: (u, min, max) => [Math.min(0, min), max > 0 ? max * 1.1 : 1] } };
    if (units.length > 1) scales.y2 = { range: (u, min, max) => [Math.min(0, min), max > 0 ? max * 1.1 : 1] };
    const opts = {
      width: Math.max(300, el.clientWidth),
      height: 180,
      scales,
      axes,
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      series: [{}].concat(
        panel.series.map((s, i) => ({
          label: s.label,
          scale: scaleOf(s.unit),
          stroke: COLORS[i % COLORS.length],
          width: 1.5,
          spanGaps: false,
          points: { show: false },
          value: (u, v) => fmt(v, s.unit),
        }))
      ),
      hooks: { draw: [onDraw(panel.id)] },
    };
    return new uPlot(opts, data, el);
  }

  function render(view) {
    state.updated = new Date().toISOString();
    const sel = $("model");
    const names = view.models;
    if (sel.dataset.names !== names.join("\n")) {
      sel.dataset.names = names.join("\n");
      sel.replaceChildren(...names.map((n) => new Option(n, n)));
    }
    if (view.model) {
      sel.value = view.model;
      state.model = view.model;
    }
    const main = $("panels");
    const seen = new Set();
    view.panels.forEach((panel, index) => {
      seen.add(panel.id);
      const data = [view.times].concat(panel.series.map((s) => s.values));
      const signature = panel.series.map((s) => s.key).join("|");
      let c = state.charts.get(panel.id);
      if (c && c.signature !== signature) {
        c.u && c.u.destroy();
        c.el.remove();
        state.charts.delete(panel.id);
        c = null;
      }
      if (!c) {
        const el = document.createElement("section");
        el.className = "panel";
        el.dataset.id = panel.id;
        el.dataset.title = panel.title;
        const h = document.createElement("h2");
        h.textContent = panel.title;
        const chart = document.createElement("div");
        chart.className = "chart";
        const empty = document.createElement("div");
        empty.className = "empty";
        el.append(h, chart, empty);
        main.insertBefore(el, main.children[index] || null);
        c = { el, chart, empty, signature, u: null };
        state.charts.set(panel.id, c);
      }
      const points = panel.series.reduce((n, s) => n + s.values.filter((v) => v != null).length, 0);
      c.empty.textContent = points ? "" : view.model ? "no data yet for " + view.model : "no model registered";
      if (!panel.series.length) {
        state.drawn[panel.id] = { draws: 0, series: [] };
        return;
      }
      if (!c.u) c.u = makeChart(c.chart, panel, data);
      else c.u.setData(data);
      // Without the pointer over the chart, the legend shows the newest values.
      if (c.u.cursor.left == null || c.u.cursor.left < 0) c.u.setLegend({ idx: view.times.length - 1 });
    });
    for (const [id, c] of state.charts) {
      if (!seen.has(id)) {
        c.u && c.u.destroy();
        c.el.remove();
        state.charts.delete(id);
        delete state.drawn[id];
      }
    }
    $("memory").textContent = fmt(view.memory_bytes / 1048576, "MB");
    const untracked = view.untracked_models ? ` (${view.untracked_models} more models not tracked)` : "";
    $("status").textContent = "updated " + new Date().toLocaleTimeString() + untracked;
    $("status").className = "";
    publish();
  }

  async function refresh() {
    if (state.busy) return;
    state.busy = true;
    try {
      const q = new URLSearchParams({ range: String(state.range) });
      if (state.model) q.set("model", state.model);
      const headers = state.token ? { Authorization: "Bearer " + state.token } : {};
      const r = await fetch("/dashboard/api/history?" + q.toString(), { headers, cache: "no-store" });
      if (r.status === 401) {
        $("auth").hidden = false;
        throw new Error("the metrics listener wants a token");
      }
      if (r.status === 404 && state.model) {
        state.model = ""; // the model was unregistered: show the first one
        throw new Error("model no longer registered");
      }
      if (!r.ok) throw new Error("HTTP " + r.status + ": " + (await r.text()).slice(0, 200));
      $("auth").hidden = true;
      render(await r.json());
    } catch (e) {
      $("status").textContent = String(e.message || e);
      $("status").className = "error";
    } finally {
      state.busy = false;
    }
  }

  function markRange() {
    for (const b of $("ranges").querySelectorAll("button")) {
      b.classList.toggle("active", Number(b.dataset.range) === state.range);
    }
  }

  $("ranges").addEventListener("click", (e) => {
    const r = Number(e.target.dataset && e.target.dataset.range);
    if (!r) return;
    state.range = r;
    markRange();
    keepHash();
    refresh();
  });
  $("model").addEventListener("change", (e) => {
    state.model = e.target.value;
    keepHash();
    refresh();
  });
  $("auth").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem("oxserve-token", state.token);
    refresh();
  });
  window.addEventListener("resize", () => {
    for (const c of state.charts.values()) {
      if (c.u) c.u.setSize({ width: Math.max(300, c.chart.clientWidth), height: 180 });
    }
  });

  if (params.get("token")) {
    sessionStorage.setItem("oxserve-token", state.token);
  }
  markRange();
  keepHash(); // drops a token from the address bar
  refresh();
  setInterval(refresh, 1000);
})();
