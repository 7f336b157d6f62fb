// Small inline-SVG charts (no libraries): a line chart, a scatter plot and horizontal bars.

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

/** Line chart of several series [{name, points: [{x, y}]}], one colour each. */
export function lineChart(svg, series, opts = {}) {
  const all = series.flatMap((s) => s.points);
  const { g, sx, sy } = frame(svg, all.map((p) => p.x), all.map((p) => p.y), opts);
  series.forEach((s, k) => {
    if (!s.points.length) return;
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join("");
    const path = el("path", { d, class: "line", fill: "none", stroke: LEVEL_COLORS[k % LEVEL_COLORS.length] }, g);
    el("title", {}, path).textContent = s.name;
  });
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
