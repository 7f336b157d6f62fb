// Efficiency: tokens/s and the memory the DNC holds (bank + local cache) against the KV cache a plain
// Transformer would need at the same context, measured now at several lengths
// (POST /research/efficiency-metrics), plus this server's serving latency percentiles.
import { getJSON, postJSON } from "../api.js";
import { LineChart } from "../charts.js";
import { $, cards, fmtBytes, fmtNum, parseLengths, showError } from "../util.js";

let bytesChart = null, tpsChart = null, measured = false;

async function onMeasure() {
  showError($("eff-error"), null);
  const lengths = parseLengths($("eff-lengths").value);
  if (!lengths.length || lengths.some((n) => !Number.isInteger(n) || n < 1)) {
    showError($("eff-error"), "context lengths: positive integers separated by commas (e.g. 128,512,2k)");
    return;
  }
  const newTokens = Number.parseInt($("eff-new").value, 10);
  const rows = [];
  const body = $("eff-table").tBodies[0];
  body.replaceChildren();
  try {
    for (const [i, n] of lengths.entries()) { // one at a time: each runs the model
      $("eff-msg").textContent = `measuring ${i + 1}/${lengths.length} (context ${n})…`;
      const r = await postJSON("/research/efficiency-metrics", { context_tokens: n, new_tokens: newTokens });
      rows.push(r);
      const tr = body.insertRow();
      for (const c of [fmtNum(r.context_tokens), fmtNum(Math.round(r.prefill_tokens_per_s)), fmtNum(Math.round(r.decode_tokens_per_s)),
        r.decode_ms_per_token.toFixed(1), fmtBytes(r.bank_bytes), fmtBytes(r.local_cache_bytes), fmtBytes(r.baseline_kv_cache_bytes),
        r.state_vs_kv_ratio.toFixed(3)]) tr.insertCell().textContent = c;
    }
    rows.sort((a, b) => a.context_tokens - b.context_tokens);
    const xs = rows.map((r) => r.context_tokens);
    bytesChart.set(xs, [
      { name: "DNC state (bank + cache)", values: rows.map((r) => r.state_bytes) },
      { name: "Transformer KV cache", values: rows.map((r) => r.baseline_kv_cache_bytes) },
    ]);
    tpsChart.set(xs, [
      { name: "prefill tok/s", values: rows.map((r) => r.prefill_tokens_per_s) },
      { name: "decode tok/s", values: rows.map((r) => r.decode_tokens_per_s) },
    ]);
    measured = true;
    $("eff-msg").textContent = `measured on ${rows[0]?.device} at ${xs.join(", ")} tokens`;
  } catch (e) {
    $("eff-msg").textContent = "";
    showError($("eff-error"), e);
  }
  refreshServing();
}

async function refreshServing() {
  try {
    const s = await getJSON("/model/stats");
    const g = s.serving?.generator ?? {};
    const ms = (v) => (typeof v === "number" ? `${v.toFixed(0)} ms` : null);
    cards($("eff-serving"), [
      ["requests", g.requests], ["tokens generated", g.tokens_generated],
      ["mean tok/s per request", typeof g.tokens_per_s_mean === "number" ? g.tokens_per_s_mean.toFixed(1) : null],
      ["latency p50", ms(g.latency_ms_p50)], ["latency p99", ms(g.latency_ms_p99)], ["TTFT p50", ms(g.ttft_ms_p50)],
      ["mean batch", typeof g.mean_batch === "number" ? g.mean_batch.toFixed(2) : null],
      ["bank bytes (all sessions)", fmtBytes(s.serving?.bank_bytes)],
    ]);
    if (!$("eff-serving").children.length) $("eff-serving").textContent = "No requests served yet.";
  } catch (e) { $("eff-serving").textContent = e.message; }
}

export function initEfficiency() {
  const fmtX = (v) => (v == null ? "" : v >= 1024 ? `${+(v / 1024).toFixed(1)}k` : String(Math.round(v)));
  bytesChart = new LineChart($("eff-bytes-chart"), { xLabel: "context tokens", yLabel: "bytes", logX: true, logY: true, xFormat: fmtX });
  tpsChart = new LineChart($("eff-tps-chart"), { xLabel: "context tokens", yLabel: "tokens/s", logX: true, xFormat: fmtX });
  $("eff-btn").addEventListener("click", onMeasure);
}

export function showEfficiency() {
  refreshServing();
  if (!measured) onMeasure();
}
