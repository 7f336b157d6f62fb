// Attention analysis: local-attention heatmap (last full segment, mean over heads, per layer),
// memory-read mass per level and token, and for each token the slots it read (by layer and level).
import { asList, postJSON } from "../api.js";
import { bars, heatmap } from "../charts.js";
import { $, LEVELS, byteToken, fmtNum, showError } from "../util.js";

let last = null; // {attn, text}: the latest analysis, for switching layers

const shown = (t) => (t === "\n" ? "⏎" : t === " " ? "␣" : t);

function drawLocal() {
  const layerSel = $("attention-layer");
  const entry = asList(last?.attn?.layers).find((l) => String(l.layer) === layerSel.value);
  const local = entry?.local;
  const canvas = $("local-heatmap");
  const body = $("head-table").tBodies[0];
  body.replaceChildren();
  if (!local?.matrix?.length) { heatmap(canvas, []); return; }
  const toks = local.segment_tokens.map(shown);
  // The matrix's columns are the last m keys (carried window + segment); label those we know.
  const m = local.matrix[0].length;
  const colLabels = Array.from({ length: m }, (_, j) => toks[toks.length - m + j] ?? "");
  heatmap(canvas, local.matrix, { rowLabels: toks, colLabels, onHover: (i, j, v) => `query ${JSON.stringify(toks[i])} → key ${JSON.stringify(colLabels[j])}: ${v.toFixed(3)}` });
  for (const h of local.heads) {
    const tr = body.insertRow();
    for (const c of [h.head, h.entropy.toFixed(3), h.mean_distance.toFixed(2)]) tr.insertCell().textContent = c;
  }
}

function drawTokens(an) {
  const box = $("analyze-tokens");
  box.replaceChildren();
  const loss = an.loss ?? [];
  const finite = loss.filter((x) => typeof x === "number" && isFinite(x));
  const lo = finite.length ? Math.min(...finite) : 0, hi = finite.length ? Math.max(...finite) : 1;
  const rel = (l) => (hi > lo ? (l - lo) / (hi - lo) : 0.5);
  const reads = asList(an.memory_reads);
  an.tokens.forEach((t, i) => {
    const s = document.createElement("span");
    s.className = "tok";
    s.tabIndex = 0;
    byteToken(s, t);
    s.dataset.index = i;
    const l = loss[i];
    if (typeof l === "number" && isFinite(l)) {
      s.style.background = `hsla(${120 - 120 * rel(l)}, 75%, 55%, 0.45)`;
      s.dataset.loss = l;
    }
    const show = () => showReads(an, reads, i);
    s.addEventListener("mouseenter", show);
    s.addEventListener("focus", show);
    s.addEventListener("click", show);
    box.appendChild(s);
  });
  $("analyze-scale").hidden = !finite.length;
  $("loss-lo").textContent = `loss ${lo.toFixed(2)}`;
  $("loss-hi").textContent = hi.toFixed(2);
}

/** Which slots token i read, per memory layer: level, slot index, attention weight. */
export function readsText(reads, i) {
  return reads.map((r) => {
    const top = r.top_slots?.[i] ?? [];
    const list = top.length ? top.map((s) => `${LEVELS[s.level] ?? "L" + s.level}#${s.slot} ${(s.weight * 100).toFixed(0)}%`).join(", ") : "no slots (empty memory)";
    return `layer ${r.layer}: ${list}`;
  });
}

function showReads(an, reads, i) {
  const box = $("token-reads");
  const l = an.loss?.[i];
  box.replaceChildren();
  const head = document.createElement("b");
  head.textContent = `token ${i} ${JSON.stringify(an.tokens[i])}` + (typeof l === "number" ? ` · loss ${l.toFixed(3)}` : "");
  box.appendChild(head);
  const mass = an.memory_read_mass?.[i];
  if (mass) box.append(` · read mass ${mass.map((v, j) => `${LEVELS[j]} ${(+v).toFixed(2)}`).join(" ")}`);
  for (const line of readsText(reads, i)) {
    const d = document.createElement("div");
    d.textContent = line;
    box.appendChild(d);
  }
}

async function onAnalyze(ev) {
  ev.preventDefault();
  showError($("attention-error"), null);
  const text = $("attention-text").value, state_id = $("attention-state").value || null;
  $("attention-meta").textContent = "analysing…";
  try {
    const [attn, an] = await Promise.all([
      postJSON("/research/attention-analysis", { text, state_id, max_matrix: 64 }),
      postJSON("/research/analyze-text", { text, state_id }),
    ]);
    last = { attn, an };
    const layerSel = $("attention-layer");
    const keep = layerSel.value;
    layerSel.replaceChildren(...asList(attn.layers).filter((l) => l.local).map((l) => new Option(`layer ${l.layer}`, String(l.layer))));
    if ([...layerSel.options].some((o) => o.value === keep)) layerSel.value = keep;
    drawLocal();
    // memory reads: levels x tokens (mean over memory layers)
    const mass = an.memory_read_mass ?? [];
    heatmap($("memory-heatmap"), [0, 1, 2].map((j) => mass.map((row) => row[j] ?? 0)), {
      rowLabels: LEVELS, max: 1, hue: 30, rowHeight: 22, onHover: (i, j, v) => `${LEVELS[i]} · token ${j} ${JSON.stringify(an.tokens[j])}: ${v.toFixed(3)}`,
    });
    const levelItems = [];
    for (const l of asList(attn.layers)) {
      if (!l.memory) continue;
      for (const [name, v] of Object.entries(l.memory.level_mass)) levelItems.push({ label: `layer ${l.layer} ${name}`, value: v, max: 1 });
      levelItems.push({ label: `layer ${l.layer} none`, value: l.memory.null_mass, max: 1, title: "mass on the null slot: read nothing" });
    }
    bars($("memory-level-bars"), levelItems);
    drawTokens(an);
    $("token-reads").textContent = "Hover or focus a token to see the slots it read.";
    $("attention-meta").textContent = `${an.tokens.length} tokens · mean loss ${fmtNum(an.mean_loss)} · ${(attn.compute_ms + an.compute_ms).toFixed(0)} ms` +
      (state_id ? ` · on ${state_id}'s memory` : " · empty memory");
  } catch (e) {
    $("attention-meta").textContent = "";
    showError($("attention-error"), e);
  }
}

export function initAttention() {
  $("attention-form").addEventListener("submit", onAnalyze);
  $("attention-layer").addEventListener("change", drawLocal);
}

export function showAttention() {
  if (!last) $("attention-form").requestSubmit();
}
