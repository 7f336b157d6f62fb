// Overview: the model, its health, the owner's sessions and serving throughput (live).
import { getJSON } from "../api.js";
import { LineChart } from "../charts.js";
import { $, cards, fmtBytes, fmtNum, plural, renderKV, store } from "../util.js";

let tpsChart = null;
const serving = { t0: Date.now() / 1000, xs: [], tokens: [], requests: [] , lastTokens: null, lastT: null };

export async function refreshHealth() {
  const badge = $("health-status");
  try {
    const h = await getJSON("/health");
    badge.textContent = h.status;
    badge.className = "badge " + (h.status === "ok" ? "ok" : "warn");
    badge.title = JSON.stringify(h);
    cards($("ov-health"), [["status", h.status], ["forward pass", `${h.forward_ms.toFixed(1)} ms`],
      ["logits finite", String(h.logits_finite)], ["bank shards", `${h.shards_alive} / ${h.shards_total}`],
      ["device", h.device], ["uptime", `${(h.uptime_s / 60).toFixed(1)} min`]]);
  } catch (e) {
    badge.textContent = e.status ? `error ${e.status}` : "unreachable";
    badge.className = "badge bad";
    badge.title = e.message;
    cards($("ov-health"), [["status", badge.textContent, e.message]]);
  }
}

export async function refreshStats() {
  try {
    const s = await getJSON("/model/stats");
    store.modelConfig = s.config ?? {};
    const c = s.config ?? {};
    $("model-stats-summary").textContent = "model: " + [`${fmtNum(s.params)} params`, s.device, s.preset ?? s.checkpoint].filter(Boolean).join(" · ");
    cards($("ov-model"), [["parameters", s.params], ["source", s.source], ["device", s.device], ["dtype", s.dtype],
      ["layers / d_model", c.n_layers != null ? `${c.n_layers} / ${c.d_model}` : null], ["segment length", c.segment_len],
      ["memory layers", (s.memory_layers ?? []).join(", ")], ["bank slots", s.bank_capacity_slots],
      ["slots L0/L1/L2", c.l0_slots != null ? `${c.l0_slots}/${c.l1_slots}/${c.l2_slots}` : null], ["weights", s.weights_digest]]);
    renderKV($("model-stats"), s);
    showServing(s.serving?.generator ?? {}, s.serving);
  } catch (e) {
    $("model-stats-summary").textContent = `model: stats unavailable (${e.message})`;
  }
}

/** Serving figures (from /model/stats or a /ws/live `metrics` event) and the throughput chart. */
export function showServing(g, extra = null) {
  const parts = [
    g.requests != null && plural(g.requests, "request"),
    g.tokens_generated != null && plural(g.tokens_generated, "token"),
    typeof g.tokens_per_s_mean === "number" && `${g.tokens_per_s_mean.toFixed(1)} tok/s per request`,
    typeof g.latency_ms_p50 === "number" && `p50 ${g.latency_ms_p50.toFixed(0)} ms`,
    typeof g.ttft_ms_p50 === "number" && `TTFT ${g.ttft_ms_p50.toFixed(0)} ms`,
  ].filter(Boolean);
  $("live-serving").textContent = parts.length ? "serving: " + parts.join(" · ") : "serving: no requests yet";
  const prev = $("ov-serving").dataset;
  cards($("ov-serving"), [["requests", g.requests ?? 0], ["tokens generated", g.tokens_generated ?? 0],
    ["mean tok/s per request", typeof g.tokens_per_s_mean === "number" ? g.tokens_per_s_mean.toFixed(1) : "–"],
    ["latency p50", typeof g.latency_ms_p50 === "number" ? `${g.latency_ms_p50.toFixed(0)} ms` : "–"],
    ["sessions", extra?.sessions ?? prev.sessions], ["bank bytes", extra ? fmtBytes(extra.bank_bytes) : prev.bankBytes]]);
  if (extra) { prev.sessions = extra.sessions; prev.bankBytes = fmtBytes(extra.bank_bytes); }
  // server throughput: tokens generated per second between two samples
  const now = Date.now() / 1000, tok = g.tokens_generated;
  if (typeof tok === "number") {
    if (serving.lastT != null && now > serving.lastT) {
      serving.xs.push(Math.round(now - serving.t0));
      serving.tokens.push(Math.max(0, (tok - serving.lastTokens) / (now - serving.lastT)));
      if (serving.xs.length > 300) { serving.xs.shift(); serving.tokens.shift(); }
      tpsChart.set(serving.xs, [{ name: "server tokens/s", values: serving.tokens }]);
    }
    serving.lastTokens = tok;
    serving.lastT = now;
  }
}

function renderSessions(list) {
  const body = $("ov-sessions");
  body.replaceChildren();
  $("ov-sessions-empty").hidden = list.length > 0;
  $("ov-sessions-count").textContent = list.length ? `(${plural(list.length, "session")})` : "";
  for (const s of list.slice(0, 12)) {
    const tr = body.insertRow();
    for (const c of [s.state_id, fmtNum(s.tokens_seen ?? 0), fmtNum(s.turns ?? 0), fmtBytes(s.bank_bytes)]) tr.insertCell().textContent = c;
  }
}

export function initOverview() {
  tpsChart = new LineChart($("ov-tps-chart"), { xLabel: "seconds since page opened", yLabel: "tokens/s", height: 160 });
  $("health-refresh").addEventListener("click", refreshHealth);
  store.addEventListener("sessions", (e) => renderSessions(e.detail));
}
