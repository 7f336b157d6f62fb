// Comparison with the Transformer baseline, from the benchmark results the repository keeps
// (bench/results/*.json, summarised by GET /v1/bench/results): throughput, memory and accuracy
// against context length, and serving load.
import { asList, getJSON } from "../api.js";
import { LineChart, columns } from "../charts.js";
import { $, fmtNum } from "../util.js";

let data = null, tpsChart, memChart, accChart;

/** rows -> {xs, series}: one series per group (e.g. "small dnc"), y averaged over equal x. */
function pivot(rows, group, y) {
  const byX = new Map(), names = new Set(), counts = new Map();
  for (const r of rows) {
    const v = y(r);
    if (typeof r.length !== "number" || typeof v !== "number" || !isFinite(v)) continue;
    const name = group(r);
    names.add(name);
    const row = byX.get(r.length) ?? { length: r.length };
    const key = `${r.length}\u0001${name}`;
    const n = (counts.get(key) ?? 0) + 1;
    row[name] = ((row[name] ?? 0) * (n - 1) + v) / n;
    counts.set(key, n);
    byX.set(r.length, row);
  }
  const order = [...names].sort((a, b) => a.localeCompare(b));
  return columns([...byX.values()], "length", order);
}

const files = (kind) => asList(data?.results).filter((r) => r.benchmark === kind && r.rows.length);

function fill(select, list, prefer) {
  select.replaceChildren(...list.map((r) => new Option(`${r.file}${r.device ? " · " + r.device : ""}`, r.file)));
  const p = list.find((r) => prefer.test(r.file));
  if (p) select.value = p.file;
}

function drawSpeed() {
  const f = files("model_speed").find((r) => r.file === $("cmp-speed-file").value);
  if (!f) return;
  const train = f.rows.filter((r) => r.kind === "train");
  const t = pivot(train, (r) => `${r.preset} ${r.model}`, (r) => r.tokens_per_s);
  tpsChart.set(t.xs, t.series);
  const infer = f.rows.filter((r) => r.kind === "infer");
  const m = pivot(infer, (r) => `${r.preset} ${r.model}`, (r) => r.peak_mb);
  memChart.set(m.xs, m.series);
}

function drawAccuracy() {
  const f = files("long_context").find((r) => r.file === $("cmp-acc-file").value);
  if (!f) return;
  const rows = f.rows.filter((r) => typeof r.acc === "number");
  const a = pivot(rows, (r) => `${r.suite} ${r.model}`, (r) => r.acc);
  accChart.set(a.xs, a.series);
}

function drawServe() {
  const f = files("serve_load").find((r) => r.file === $("cmp-serve-file").value);
  const body = $("cmp-serve-table").tBodies[0];
  body.replaceChildren();
  for (const r of f?.rows ?? []) {
    const tr = body.insertRow();
    const n = (v, d = 1) => (typeof v === "number" ? v.toFixed(d) : "");
    for (const c of [r.mode, r.clients, n(r.requests_per_s), n(r.tokens_per_s, 0), n(r.latency_ms_p50, 0), n(r.latency_ms_p99, 0), n(r.ttft_ms_p50, 0)]) tr.insertCell().textContent = c ?? "";
  }
}

async function load() {
  try {
    data = await getJSON("/v1/bench/results");
  } catch (e) {
    $("cmp-msg").textContent = `benchmark results unavailable: ${e.message}`;
    return;
  }
  fill($("cmp-speed-file"), files("model_speed"), /h100_r4/);
  fill($("cmp-acc-file"), files("long_context"), /tiny_cpu_imp50_20min/);
  fill($("cmp-serve-file"), files("serve_load"), /cpu2/);
  drawSpeed();
  drawAccuracy();
  drawServe();
  const n = asList(data.results).filter((r) => r.rows.length).length;
  $("cmp-msg").textContent = `${fmtNum(n)} result files with measurements in ${data.dir}` + (data.errors.length ? ` · ${data.errors.length} unreadable` : "");
}

export function initComparison() {
  const fmtX = (v) => (v == null ? "" : v >= 1 << 20 ? `${+(v / (1 << 20)).toFixed(1)}M` : v >= 1024 ? `${+(v / 1024).toFixed(0)}k` : String(Math.round(v)));
  tpsChart = new LineChart($("cmp-tps-chart"), { xLabel: "context tokens", yLabel: "train tokens/s", logX: true, xFormat: fmtX });
  memChart = new LineChart($("cmp-mem-chart"), { xLabel: "context tokens", yLabel: "peak MiB", logX: true, logY: true, xFormat: fmtX });
  accChart = new LineChart($("cmp-acc-chart"), { xLabel: "context tokens", yLabel: "accuracy", logX: true, xFormat: fmtX });
  $("cmp-speed-file").addEventListener("change", drawSpeed);
  $("cmp-acc-file").addEventListener("change", drawAccuracy);
  $("cmp-serve-file").addEventListener("change", drawServe);
}

export function showComparison() {
  if (!data) load();
}
