// Charts. Line charts over a shared x (steps, context lengths) use the vendored uPlot (ui/vendor/,
// pinned, MIT); the slot scatter, level bars and heatmaps are small hand-drawn SVG/canvas/DOM, where
// a library adds nothing.
import uPlot from "../vendor/uplot-1.6.32/uPlot.esm.js";

const NS = "http://www.w3.org/2000/svg";
export const LEVEL_COLORS = ["#2f7ed8", "#e8a33d", "#8e5bd6", "#3aa675", "#d64b4b"];

function el(name, attrs = {}, parent) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

function extent(vals) {
  let lo = Math.min(...vals), hi = Math.max(...vals);
  if (!isFinite(lo)) return [0, 1];
  if (lo === hi) { lo -= 0.5; hi += 0.5; }
  return [lo, hi];
}

const fmt = (v) => (Math.abs(v) >= 1000 || (Math.abs(v) < 0.01 && v !== 0) ? v.toExponential(1) : +v.toFixed(2)).toString();

/** Clear `svg` and draw axes; returns {g, sx, sy} mapping data to pixels. */
function frame(svg, xs, ys, { w = 480, h = 220, pad = 36, xLabel = "", yLabel = "" } = {}) {
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const [x0, x1] = extent(xs), [y0, y1] = extent(ys);
  const sx = (x) => pad + ((x - x0) / (x1 - x0)) * (w - pad - 10);
  const sy = (y) => h - pad + -((y - y0) / (y1 - y0)) * (h - pad - 10);
  const g = el("g", {}, svg);
  el("line", { x1: pad, y1: h - pad, x2: w - 10, y2: h - pad, class: "axis" }, g);
  el("line", { x1: pad, y1: 10, x2: pad, y2: h - pad, class: "axis" }, g);
  const tick = (x, y, text, anchor) => { el("text", { x, y, "text-anchor": anchor, class: "tick" }, g).textContent = text; };
  tick(pad, h - pad + 14, fmt(x0), "middle");
  tick(w - 10, h - pad + 14, fmt(x1), "end");
  tick(pad - 4, h - pad, fmt(y0), "end");
  tick(pad - 4, 18, fmt(y1), "end");
  if (xLabel) tick((w + pad) / 2, h - 6, xLabel, "middle");
  if (yLabel) el("text", { x: 12, y: h / 2, transform: `rotate(-90 12 ${h / 2})`, "text-anchor": "middle", class: "tick" }, g).textContent = yLabel;
  return { g, sx, sy };
}

/** Scatter of [[x, y], ...] coloured by `groups[i]` (e.g. memory level); titles give tooltips. */
export function scatter(svg, pts, groups = [], titles = [], opts = {}) {
  const { g, sx, sy } = frame(svg, pts.map((p) => p[0]), pts.map((p) => p[1]), opts);
  const keys = [...new Set(groups.map(String))];
  pts.forEach((p, i) => {
    const k = keys.indexOf(String(groups[i]));
    const c = el("circle", { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 3.5, class: "point",
      fill: LEVEL_COLORS[Math.max(0, k) % LEVEL_COLORS.length] }, g);
    if (titles[i] != null) el("title", {}, c).textContent = titles[i];
  });
  return keys;
}

/**
 * Horizontal bars into a container element: items [{label, value, max, title}].
 * Plain DOM (not SVG) so screen readers get role="meter" with values.
 */
export function bars(container, items, { unit = "" } = {}) {
  container.replaceChildren();
  items.forEach((it, i) => {
    const row = document.createElement("div");
    row.className = "bar-row";
    row.dataset.testid = `bar-${it.label}`;
    const max = it.max > 0 ? it.max : Math.max(1, ...items.map((x) => x.value));
    const pct = Math.max(0, Math.min(100, (100 * it.value) / max));
    row.innerHTML = `<span class="bar-label"></span><span class="bar-track" role="meter"
      aria-valuemin="0"><span class="bar-fill"></span></span><span class="bar-value"></span>`;
    row.querySelector(".bar-label").textContent = it.label;
    const track = row.querySelector(".bar-track");
    track.setAttribute("aria-valuenow", it.value);
    track.setAttribute("aria-valuemax", max);
    track.setAttribute("aria-label", `${it.label}: ${it.value}${it.max ? " of " + it.max : ""}${unit}`);
    const fill = row.querySelector(".bar-fill");
    fill.style.width = pct + "%";
    fill.style.background = LEVEL_COLORS[i % LEVEL_COLORS.length];
    row.querySelector(".bar-value").textContent =
      (Number.isInteger(it.value) ? it.value : fmt(it.value)) + (it.max ? ` / ${it.max}` : "") + unit;
    if (it.title) row.title = it.title;
    container.appendChild(row);
  });
}

// ---- uPlot line charts -------------------------------------------------------------------------
const SERIES_COLORS = ["#2f7ed8", "#e8a33d", "#8e5bd6", "#3aa675", "#d64b4b", "#1fa2b5", "#b5651d", "#6b7a8f"];
export const seriesColor = (i) => SERIES_COLORS[i % SERIES_COLORS.length];

/** Pad a degenerate range so one point (or a flat line) is drawn mid-chart, not on an edge. */
function padRange(min, max) {
  if (min == null || max == null || !isFinite(min) || !isFinite(max)) return [0, 1];
  if (min === max) {
    if (min === 0) return [0, 1]; // an all-zero metric (accuracy, evictions) sits on the floor
    const d = Math.abs(min) > 0 ? Math.abs(min) * 0.1 : 1;
    return [min - d, max + d];
  }
  const d = (max - min) * 0.05;
  return [min - d, max + d];
}

/**
 * A uPlot line chart in `container`: `set(xs, series)` with `series = [{name, values}]` (values aligned
 * with xs; null = no value at that x, gaps are spanned). Rebuilt only when the series names change,
 * otherwise updated in place (setData), so a live run redraws cheaply. Points are drawn when there are
 * few, so a single step shows as a dot. The container's data-points / data-xmin / data-xmax say what
 * was drawn (for tests and screen readers).
 */
export class LineChart {
  constructor(container, { xLabel = "step", yLabel = "", height = 200, logX = false, logY = false, xFormat = null } = {}) {
    Object.assign(this, { container, xLabel, yLabel, height, logX, logY, xFormat });
    this.plot = null;
    this.names = "";
    this.ro = new ResizeObserver(() => this.resize());
    this.ro.observe(container);
  }

  width() { return Math.max(240, Math.floor(this.container.clientWidth || 480)); }

  resize() {
    if (this.plot && this.container.clientWidth) this.plot.setSize({ width: this.width(), height: this.height });
  }

  clear() {
    this.plot?.destroy();
    this.plot = null;
    this.names = "";
    this.container.replaceChildren();
    delete this.container.dataset.points;
  }

  set(xs, series) {
    const names = series.map((s) => s.name).join("\u0001");
    const data = [xs, ...series.map((s) => s.values)];
    if (!this.plot || names !== this.names) this.build(series, data);
    else this.plot.setData(data);
    const finite = xs.filter((x) => x != null && isFinite(x));
    this.container.dataset.points = String(finite.length);
  }

  build(series, data) {
    this.plot?.destroy();
    this.container.replaceChildren();
    this.names = series.map((s) => s.name).join("\u0001");
    const few = (u) => u.data[0].length <= 60;
    const fmtX = this.xFormat ?? ((v) => (v == null ? "" : fmtTick(v)));
    const opts = {
      width: this.width(), height: this.height,
      // Log scales keep uPlot's own range (its log axis splits need decade-aligned ranges; a
      // custom range there can make it loop); linear ones are padded so one point is visible.
      scales: {
        x: this.logX ? { time: false, distr: 3 } : { time: false, range: (u, min, max) => padRange(min, max) },
        y: this.logY ? { distr: 3 } : { range: (u, min, max) => padRange(min, max) },
      },
      axes: [
        { label: this.xLabel, values: (u, vals) => vals.map(fmtX), stroke: "#6a7385", grid: { stroke: "#8881", width: 1 } },
        { label: this.yLabel, values: (u, vals) => vals.map((v) => (v == null ? "" : fmtTick(v))), stroke: "#6a7385",
          grid: { stroke: "#8881", width: 1 }, size: 56 },
      ],
      legend: { show: true, live: true },
      hooks: { draw: [(u) => { // what was drawn, for tests and assistive tech
        this.container.dataset.xmin = String(u.scales.x.min);
        this.container.dataset.xmax = String(u.scales.x.max);
      }] },
      cursor: { drag: { x: true, y: false } },
      series: [
        { label: this.xLabel, value: (u, v) => (v == null ? "" : fmtX(v)) },
        ...series.map((s, i) => ({
          label: s.name, stroke: s.color ?? seriesColor(i), width: 1.6, spanGaps: true,
          points: { show: few, size: 6, fill: s.color ?? seriesColor(i) },
          value: (u, v) => (v == null ? "–" : fmtTick(v)),
        })),
      ],
    };
    this.plot = new uPlot(opts, data, this.container);
  }
}

function fmtTick(v) {
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1e6) return (v / 1e6).toPrecision(3).replace(/\.?0+$/, "") + "M";
  if (a >= 1e4) return (v / 1e3).toPrecision(3).replace(/\.?0+$/, "") + "k";
  if (a < 1e-3) return v.toExponential(1);
  return String(+v.toPrecision(4));
}

/**
 * Align rows (objects with an x key) into uPlot's columnar data for the given keys:
 * -> {xs, series: [{name, values}]}; rows lacking a key get null there.
 */
export function columns(rows, xKey, keys, label = (k) => k) {
  const sorted = [...rows].filter((r) => typeof r[xKey] === "number").sort((a, b) => a[xKey] - b[xKey]);
  const xs = sorted.map((r) => r[xKey]);
  const series = keys.map((k) => ({ name: label(k), values: sorted.map((r) => (typeof r[k] === "number" && isFinite(r[k]) ? r[k] : null)) }));
  return { xs, series };
}

// ---- heatmap (canvas) -------------------------------------------------------------------------
/**
 * Draw `matrix` (rows x cols, values >= 0) into a canvas as cells shaded by value (relative to the
 * matrix maximum, or `max`). Optional `rowLabels` / `colLabels` (short strings) go on the left / top.
 * The canvas gets data-rows / data-cols, and a title per hovered cell through `onHover`.
 */
export function heatmap(canvas, matrix, { rowLabels = [], colLabels = [], max = null, hue = 212, cell = 0, rowHeight = 0, onHover = null } = {}) {
  const rows = matrix.length, cols = rows ? Math.max(...matrix.map((r) => r.length)) : 0;
  const left = rowLabels.length ? 34 : 0, top = colLabels.length ? 30 : 0;
  const cw = cell || Math.max(4, Math.min(22, Math.floor(((canvas.parentElement?.clientWidth || 480) - left - 8) / Math.max(1, cols))));
  const ch = rowHeight || cell || Math.max(4, Math.min(22, cw));
  const dpr = window.devicePixelRatio || 1;
  canvas.width = (left + cols * cw) * dpr;
  canvas.height = (top + rows * ch) * dpr;
  canvas.style.width = `${left + cols * cw}px`;
  canvas.style.height = `${top + rows * ch}px`;
  canvas.dataset.rows = String(rows);
  canvas.dataset.cols = String(cols);
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.clearRect(0, 0, left + cols * cw, top + rows * ch);
  let hi = max ?? 0;
  if (max == null) for (const r of matrix) for (const v of r) if (v > hi) hi = v;
  hi = hi > 0 ? hi : 1;
  for (let i = 0; i < rows; i++) {
    for (let j = 0; j < matrix[i].length; j++) {
      const v = Math.max(0, Math.min(1, matrix[i][j] / hi));
      g.fillStyle = `hsl(${hue}, 70%, ${97 - 62 * v}%)`;
      g.fillRect(left + j * cw, top + i * ch, cw, ch);
    }
  }
  g.fillStyle = "#6a7385";
  g.font = `${Math.min(11, Math.max(8, ch - 2))}px ui-monospace, monospace`;
  g.textBaseline = "middle";
  rowLabels.forEach((t, i) => { if (ch >= 8) g.fillText(String(t).slice(0, 4), 2, top + i * ch + ch / 2); });
  g.save();
  colLabels.forEach((t, j) => {
    if (cw < 8) return;
    g.save();
    g.translate(left + j * cw + cw / 2, top - 3);
    g.rotate(-Math.PI / 3);
    g.fillText(String(t).slice(0, 4), 0, 0);
    g.restore();
  });
  g.restore();
  if (onHover) {
    canvas.onmousemove = (e) => {
      const r = canvas.getBoundingClientRect();
      const j = Math.floor((e.clientX - r.left - left) / cw), i = Math.floor((e.clientY - r.top - top) / ch);
      canvas.title = i >= 0 && i < rows && j >= 0 && j < cols ? onHover(i, j, matrix[i][j]) : "";
    };
  }
}
