// Information flow (how much of each layer's update comes from the memory read vs local attention)
// and decision explanation (which input tokens and memory slots raised the next-token logit).
import { asList, postJSON } from "../api.js";
import { LineChart, bars } from "../charts.js";
import { $, LEVELS, escapeHtml, showError } from "../util.js";

let tokenChart = null, done = false;

async function onTrace(ev) {
  ev.preventDefault();
  showError($("flow-error"), null);
  const text = $("flow-text").value, state_id = $("flow-state").value || null;
  const target = $("explain-target").value;
  $("flow-meta").textContent = "tracing…";
  try {
    const [flow, ex] = await Promise.all([
      postJSON("/research/information-flow", { text, state_id }),
      postJSON("/research/explain-decision", { text, state_id, ...(target ? { target } : {}) }),
    ]);
    done = true;
    const items = [];
    for (const l of asList(flow.layers)) {
      items.push({ label: `layer ${l.layer} local`, value: l.local_share, max: 1 });
      if (l.has_memory) items.push({ label: `layer ${l.layer} memory`, value: l.memory_share, max: 1, title: `memory share of the whole update (with FFN): ${l.memory_share_of_total.toFixed(3)}` });
    }
    bars($("flow-bars"), items);
    const memLayers = asList(flow.layers).filter((l) => l.has_memory);
    const n = memLayers[0]?.per_token_memory_share?.length ?? 0;
    tokenChart.set(Array.from({ length: n }, (_, i) => i),
      memLayers.map((l) => ({ name: `layer ${l.layer} memory share`, values: l.per_token_memory_share })));

    const t = ex.target;
    $("explain-head").innerHTML = `Next token after <code>…${escapeHtml(ex.context.slice(-30))}</code>: ` +
      `<b>${escapeHtml(JSON.stringify(t.text))}</b> with p = ${t.prob.toFixed(3)} (logit ${t.logit.toFixed(2)})`;
    bars($("explain-preds"), asList(ex.top_predictions).map((p) => ({ label: JSON.stringify(p.text), value: +p.prob.toFixed(4), max: 1 })));
    const maxScore = Math.max(1e-9, ...asList(ex.input_attribution).map((x) => Math.abs(x.score)));
    const box = $("explain-tokens");
    box.replaceChildren(...asList(ex.input_attribution).map((x) => {
      const s = document.createElement("span");
      s.className = "tok attr";
      s.textContent = `${JSON.stringify(x.token)} @${x.position}`;
      s.title = `position ${x.position}: gradient × input ${x.score.toFixed(4)}`;
      const a = Math.abs(x.score) / maxScore;
      s.style.background = x.score >= 0 ? `hsla(210, 80%, 55%, ${0.15 + 0.6 * a})` : `hsla(0, 80%, 55%, ${0.15 + 0.6 * a})`;
      s.dataset.score = x.score;
      return s;
    }));
    const body = $("explain-slots").tBodies[0];
    body.replaceChildren();
    for (const s of asList(ex.memory_attribution)) {
      const tr = body.insertRow();
      for (const c of [s.layer, LEVELS[s.level] ?? s.level, s.slot, s.grad_score.toFixed(4), (s.ablation_delta ?? 0).toFixed(4)]) tr.insertCell().textContent = c;
    }
    if (!asList(ex.memory_attribution).length) body.insertRow().insertCell().textContent = `no memory slots to attribute (${ex.memory_slots_available} available)`;
    $("explain-method").textContent = ex.method;
    $("flow-meta").textContent = `${flow.tokens} tokens · ${(flow.compute_ms + ex.compute_ms).toFixed(0)} ms` + (state_id ? ` · on ${state_id}'s memory` : "");
  } catch (e) {
    $("flow-meta").textContent = "";
    showError($("flow-error"), e);
  }
}

export function initFlow() {
  tokenChart = new LineChart($("flow-token-chart"), { xLabel: "token", yLabel: "memory share" });
  $("flow-form").addEventListener("submit", onTrace);
}

export function showFlow() {
  if (!done) $("flow-form").requestSubmit();
}
