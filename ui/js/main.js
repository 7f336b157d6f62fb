// Wires the panels to the API. Every server shape is read defensively: the UI shows what it finds.
import { ApiError, asList, getJSON, postJSON, request, setOwner, streamGenerate, tokenText, wsUrl } from "./api.js";
import { bars, lineChart, scatter, LEVEL_COLORS } from "./charts.js";

const $ = (id) => document.getElementById(id);
const LEVELS = ["L0", "L1", "L2"];
const ID_RE = /^[A-Za-z0-9_-]{1,64}$/;
let modelConfig = {};
let selected = null;

const escapeHtml = (t) => String(t).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function showError(box, err) {
  box.hidden = !err;
  box.textContent = err ? (err instanceof ApiError && err.status ? `${err.status}: ` : "") + (err.message ?? err) : "";
}

const fmtNum = (v) => (typeof v === "number" && !Number.isInteger(v) ? +v.toPrecision(4) : v).toLocaleString();

function fmtBytes(b) {
  const u = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return `${i ? b.toFixed(1) : b} ${u[i]}`;
}

function fmtTime(t) {
  if (t == null || t === "") return "";
  const d = typeof t === "number" ? new Date(t < 1e12 ? t * 1000 : t) : new Date(t);
  return isNaN(d) ? String(t) : d.toLocaleTimeString();
}

/** Render any JSON value as nested definition lists (objects) and compact lists (arrays). */
function renderKV(container, value) {
  container.replaceChildren(kvNode(value, 0));
}
function kvNode(v, depth) {
  if (v === null || typeof v !== "object") {
    const s = document.createElement("span");
    s.textContent = typeof v === "number" ? fmtNum(v) : String(v);
    return s;
  }
  if (Array.isArray(v) && v.every((x) => x === null || typeof x !== "object")) {
    const s = document.createElement("span");
    s.textContent = v.length > 16 ? `[${v.slice(0, 16).map(fmtNum).join(", ")}, … ${v.length} items]` : `[${v.map(fmtNum).join(", ")}]`;
    return s;
  }
  const dl = document.createElement("dl");
  for (const [k, x] of Object.entries(v)) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k;
    if (typeof x === "number" && x > 1e9 && x < 1e11 && /(_at|^ts|time|timestamp)$/.test(k)) {
      dd.textContent = new Date(x * 1000).toLocaleString(); // unix seconds
    } else if (x && typeof x === "object" && depth < 3 && !(Array.isArray(x) && x.every((y) => typeof y !== "object"))) {
      const det = document.createElement("details");
      const sum = document.createElement("summary");
      sum.textContent = Array.isArray(x) ? `${x.length} items` : `${Object.keys(x).length} fields`;
      det.append(sum, kvNode(x, depth + 1));
      dd.appendChild(det);
    } else dd.appendChild(kvNode(x, depth + 1));
    dl.append(dt, dd);
  }
  return dl;
}

// ---- levels: find per-level slot counts whatever the server calls them ----------------------
const num = (x) => (typeof x === "number" ? x : x && typeof x === "object" ? (x.slots ?? x.used ?? x.count ?? x.valid) : undefined);
const cap = (x) => (x && typeof x === "object" ? (x.capacity ?? x.max ?? x.max_slots) : undefined);

/** -> [{label, value, max}] for L0..L2, or [] if the object has no level information. */
function levelsOf(obj) {
  if (!obj || typeof obj !== "object") return [];
  for (const key of ["levels", "slots", "slots_per_level", "level_slots", "slot_counts"]) {
    const v = obj[key];
    if (Array.isArray(v) && v.length) {
      return v.map((x, i) => ({ label: x?.level != null ? `L${String(x.level).replace(/^L/i, "")}` : LEVELS[i] ?? `L${i}`, value: num(x) ?? 0, max: cap(x) }));
    }
    if (v && typeof v === "object") {
      const ks = Object.keys(v).filter((k) => /^(l|level_?)?\d$/i.test(k));
      if (ks.length) return ks.sort().map((k) => ({ label: `L${k.slice(-1)}`, value: num(v[k]) ?? 0, max: cap(v[k]) }));
    }
  }
  const flat = [0, 1, 2].map((i) => obj[`slots_l${i}`] ?? obj[`l${i}_slots`] ?? obj[`L${i}`] ?? obj[`l${i}`] ?? obj[`mem/slots_l${i}`]);
  if (flat.some((x) => x != null)) return flat.map((x, i) => ({ label: LEVELS[i], value: num(x) ?? 0, max: cap(x) }));
  for (const key of ["summary", "bank", "memory", "stats"]) {
    const r = levelsOf(obj[key]);
    if (r.length) return r;
  }
  return [];
}

/** Fill missing capacities from the model config (per layer, per sequence). */
function withCapacity(levels, layers = 1) {
  return levels.map((l, i) => {
    const c = l.max ?? (modelConfig[`l${i}_slots`] ? modelConfig[`l${i}_slots`] * layers : undefined);
    return { ...l, max: c && c >= l.value ? c : undefined };
  });
}

const stateId = (s) => s?.state_id ?? s?.id ?? s?.session_id;

// ---- header ----------------------------------------------------------------------------------
async function refreshHealth() {
  const badge = $("health-status");
  try {
    const h = await getJSON("/health");
    const status = String(h?.status ?? "unknown");
    badge.textContent = status;
    badge.className = "badge " + (/^(ok|healthy|ready|up)$/i.test(status) ? "ok" : "warn");
    badge.title = JSON.stringify(h);
  } catch (e) {
    badge.textContent = e.status ? `error ${e.status}` : "unreachable";
    badge.className = "badge bad";
    badge.title = e.message;
  }
}

async function refreshStats() {
  try {
    const s = await getJSON("/model/stats");
    modelConfig = s?.config ?? {};
    const params = s?.params ?? s?.parameters ?? s?.n_params ?? s?.num_parameters;
    const bits = [params != null && `${fmtNum(params)} params`, s?.device, s?.preset ?? s?.checkpoint].filter(Boolean);
    $("model-stats-summary").textContent = "model: " + (bits.join(" · ") || "stats");
    renderKV($("model-stats"), s);
  } catch (e) {
    $("model-stats-summary").textContent = `model: stats unavailable (${e.message})`;
  }
}

// ---- generate --------------------------------------------------------------------------------
let controller = null;

async function onGenerate(ev) {
  ev.preventDefault();
  const out = $("gen-output"), meta = $("gen-meta");
  showError($("gen-error"), null);
  const sid = $("state-id").value.trim();
  const seed = $("seed").value.trim();
  const body = {
    prompt: $("prompt").value,
    max_new_tokens: Number.parseInt($("max-new-tokens").value, 10),
    temperature: Number.parseFloat($("temperature").value),
    state_id: sid || null,
    seed: seed === "" ? null : Number(seed),
  };
  // The server validates everything; the UI only refuses what JSON cannot carry.
  if (Number.isNaN(body.max_new_tokens)) body.max_new_tokens = $("max-new-tokens").value;
  if (Number.isNaN(body.temperature)) body.temperature = $("temperature").value;
  if (Number.isNaN(body.seed)) body.seed = seed;
  out.textContent = "";
  meta.textContent = "streaming…";
  $("generate-btn").disabled = true;
  $("stop-btn").disabled = false;
  controller = new AbortController();
  const t0 = performance.now();
  let n = 0;
  try {
    const final = await streamGenerate(body, (e) => {
      const t = tokenText(e);
      if (t && !e.done) { out.textContent += t; n++; }
      else if (e.done && t && !n) out.textContent += t; // non-streamed reply
    }, controller.signal);
    const secs = (performance.now() - t0) / 1000;
    const nTok = final?.tokens ?? final?.n_tokens ?? final?.usage?.completion_tokens ?? n;
    meta.textContent = `${typeof nTok === "number" ? nTok : n} tokens in ${secs.toFixed(2)} s` +
      (final?.finish_reason ? ` · ${final.finish_reason}` : "");
    if (sid) { await refreshStates(); await selectState(stateId(final) ?? sid); }
  } catch (e) {
    meta.textContent = "";
    if (e.name === "AbortError") meta.textContent = "stopped";
    else showError($("gen-error"), e);
  } finally {
    $("generate-btn").disabled = false;
    $("stop-btn").disabled = true;
    controller = null;
  }
}

// ---- sessions --------------------------------------------------------------------------------
async function refreshStates() {
  showError($("states-error"), null);
  let list;
  try {
    list = asList(await getJSON("/v1/states"), "states", "sessions")
      .map((s) => (typeof s === "string" ? { state_id: s } : s));
  } catch (e) { showError($("states-error"), e); return; }
  const tbody = $("states-list");
  tbody.replaceChildren();
  $("states-empty").hidden = list.length > 0;
  for (const s of list) {
    const id = stateId(s);
    const tr = document.createElement("tr");
    tr.dataset.stateId = id;
    tr.dataset.testid = "state-row";
    tr.tabIndex = 0;
    tr.setAttribute("aria-selected", String(id === selected));
    const lv = levelsOf(s).map((l) => l.value).join(" / ");
    const cells = [id, s.tokens ?? s.tokens_seen ?? s.n_tokens ?? "", lv, fmtTime(s.updated_at ?? s.updated ?? s.last_access ?? s.modified)];
    for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
    tr.addEventListener("click", () => selectState(id));
    tr.addEventListener("keydown", (k) => { if (k.key === "Enter" || k.key === " ") { k.preventDefault(); selectState(id); } });
    tbody.appendChild(tr);
  }
  if (selected && !list.some((s) => stateId(s) === selected)) clearSelection();
  if (!selected && list.length) await selectState(stateId(list[0]));
}

function clearSelection() {
  selected = null;
  $("state-detail-box").hidden = true;
  $("memory-bars").replaceChildren();
  $("memory-facts").textContent = "";
  $("memory-empty").hidden = false;
  $("mem-for").textContent = "";
  $("cluster-btn").disabled = true;
}

async function selectState(id) {
  if (!id) return;
  selected = id;
  for (const tr of $("states-list").children) tr.setAttribute("aria-selected", String(tr.dataset.stateId === id));
  $("state-detail-box").hidden = false;
  $("state-detail-id").textContent = id;
  $("state-action-msg").textContent = "";
  $("cluster-btn").disabled = false;
  $("mem-for").textContent = `· ${id}`;
  try {
    const d = await getJSON(`/v1/state/${encodeURIComponent(id)}`);
    if (selected !== id) return; // another session was picked while this one loaded
    renderKV($("state-detail"), d);
    const layers = d?.n_memory_layers ?? d?.memory_layers ?? d?.summary?.n_layers;
    const levels = withCapacity(levelsOf(d), typeof layers === "number" ? layers : 1);
    bars($("memory-bars"), levels, { unit: " slots" });
    const facts = [
      d?.tokens_seen != null && `${fmtNum(d.tokens_seen)} tokens seen`,
      d?.turns != null && `${fmtNum(d.turns)} turns`,
      d?.bank_bytes != null && `${fmtBytes(d.bank_bytes)} bank`,
      d?.offloaded && "offloaded to storage",
      d?.shard != null && `shard ${d.shard}`,
    ].filter(Boolean);
    $("memory-facts").textContent = facts.join(" · ");
    renderHistory(asList(d?.history ?? [], "turns"));
    $("memory-empty").hidden = levels.length > 0;
    if (!levels.length) $("memory-empty").textContent = "This session reports no per-level slot counts.";
  } catch (e) {
    if (selected === id) $("state-action-msg").textContent = e.message;
  }
}

/** Turns of a session, newest first: what happened to its memory and when. */
function renderHistory(turns) {
  const body = $("state-history").tBodies[0];
  body.replaceChildren();
  $("state-history").hidden = !turns.length;
  for (const t of [...turns].reverse().slice(0, 20)) {
    const tr = body.insertRow();
    const ms = t.duration_ms ?? t.duration;
    for (const c of [t.seq ?? "", t.kind ?? t.type ?? "", fmtTime(t.at ?? t.t ?? t.time),
      t.new_tokens ?? "", t.tokens_seen ?? "", typeof ms === "number" ? ms.toFixed(0) : ""]) {
      tr.insertCell().textContent = c;
    }
    tr.title = [t.prompt_preview, t.completion_preview].filter(Boolean).join(" → ");
  }
}

async function stateAction(kind) {
  if (!selected) return;
  const id = selected, msg = $("state-action-msg"), path = `/v1/state/${encodeURIComponent(id)}`;
  msg.textContent = kind === "compact" ? "compacting…" : "deleting…";
  try {
    if (kind === "compact") {
      const r = await postJSON(`${path}/compact`, {});
      await refreshStates();
      await selectState(id);
      msg.textContent = "compacted" + compactSummary(r);
    } else {
      await request("DELETE", path);
      clearSelection();
      await refreshStates();
    }
  } catch (e) { msg.textContent = e.message; }
}

function compactSummary(r) {
  if (!r || typeof r !== "object") return "";
  const bits = [];
  if (r.levels_before && r.levels_after) {
    const lv = (x) => asList(x).map((l) => l.slots ?? l).join("/");
    bits.push(`slots ${lv(r.levels_before)} → ${lv(r.levels_after)}`);
  }
  if (typeof r.merged === "number") bits.push(`${r.merged} merged`);
  if (r.bytes_before != null && r.bytes_after != null) bits.push(`${fmtNum(r.bytes_before)} → ${fmtNum(r.bytes_after)} B`);
  return bits.length ? ": " + bits.join(", ") : r.moved ? ": " + summarise(r.moved) : "";
}

const summarise = (o) => Object.entries(o).filter(([, v]) => typeof v !== "object").slice(0, 4).map(([k, v]) => `${k}=${fmtNum(v)}`).join(", ");

async function onCluster() {
  if (!selected) return;
  const msg = $("cluster-msg");
  msg.textContent = "clustering…";
  try {
    const r = await postJSON("/research/state-clustering", { state_id: selected });
    const pts = asList(r, "points", "coords", "embedding").filter((p) => Array.isArray(p) && p.length >= 2);
    const levels = r?.levels ?? [], labels = r?.labels ?? r?.clusters ?? [];
    const groups = levels.length ? levels.map((l) => (typeof l === "number" ? `L${l}` : l)) : labels;
    const titles = pts.map((_, i) => [groups[i] != null && `level ${groups[i]}`, labels[i] != null && `cluster ${labels[i]}`].filter(Boolean).join(", "));
    if (!pts.length) {
      $("cluster-plot").replaceChildren();
      $("cluster-legend").replaceChildren();
      msg.textContent = r?.message ?? "no slots to cluster";
      return;
    }
    const ev = r?.explained_variance ?? [];
    const axis = (i) => `PC${i + 1}` + (typeof ev[i] === "number" ? ` (${(100 * ev[i]).toFixed(0)}% var)` : "");
    const keys = scatter($("cluster-plot"), pts, groups, titles, { xLabel: axis(0), yLabel: axis(1) });
    $("cluster-legend").innerHTML = keys.map((k, i) => `<span><i style="background:${LEVEL_COLORS[i % LEVEL_COLORS.length]}"></i>${escapeHtml(k)}</span>`).join("");
    const nClusters = new Set(labels.map(String)).size;
    msg.textContent = `${pts.length} slots` + (nClusters ? ` · ${nClusters} clusters` : "");
  } catch (e) { msg.textContent = e.message; }
}

// ---- live ------------------------------------------------------------------------------------
const lossRuns = new Map(); // run_id -> [{x: step, y: loss}]
let wsDelay = 1000;

function logEvent(text, cls = "") {
  const log = $("live-log"), li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  if (cls) li.className = cls;
  log.prepend(li);
  while (log.children.length > 100) log.lastChild.remove();
}

function onLive(msg) {
  let ev;
  try { ev = JSON.parse(msg.data); } catch { logEvent(String(msg.data)); return; }
  const type = String(ev.type ?? ev.event ?? ev.kind ?? "");
  if (type === "hello") { logEvent(`connected (subscriber ${ev.subscriber ?? "?"})`); return; }
  if (type === "metrics") { showServing(ev.generator ?? ev); return; } // periodic: a status line, not the log
  const m = ev.metrics ?? ev.data ?? ev;
  const loss = m?.loss ?? m?.train_loss ?? m?.["train/loss"];
  const step = m?.step ?? m?.global_step ?? ev.step;
  if (typeof loss === "number" && typeof step === "number" && !/gen/i.test(type)) {
    const run = String(ev.run_id ?? "default");
    if (!lossRuns.has(run)) lossRuns.set(run, []);
    const pts = lossRuns.get(run);
    if (pts.length && step <= pts[pts.length - 1].x) pts.splice(pts.findIndex((p) => p.x >= step)); // run restarted
    pts.push({ x: step, y: loss });
    if (pts.length > 2000) pts.shift();
    drawLoss();
    if (!ev.backlog) logEvent(`${run} step ${step} loss ${fmtNum(loss)}`, "metric");
  } else {
    const who = ev.state_id ? ` [${ev.state_id}]` : "";
    const rate = typeof ev.tokens_per_s === "number" ? ` ${ev.tokens}tok ${ev.tokens_per_s.toFixed(0)}tok/s` : "";
    const text = ev.text ?? ev.token ?? ev.prompt ?? "";
    logEvent(`${type || "event"}${who}${rate} ${text ? JSON.stringify(String(text).slice(0, 80)) : summarise(ev)}`, "gen");
    // Another client changed a session: refresh the list (debounced, never on every token).
    if (ev.state_id && /gen|state|compact/i.test(type)) {
      clearTimeout(statesTimer);
      statesTimer = setTimeout(() => refreshStates().then(() => selected && selectState(selected)), 500);
    }
  }
}
let statesTimer = null;

function showServing(g) {
  const parts = [
    g.requests != null && `${fmtNum(g.requests)} requests`,
    g.tokens_generated != null && `${fmtNum(g.tokens_generated)} tokens`,
    typeof g.tokens_per_s_mean === "number" && `${g.tokens_per_s_mean.toFixed(1)} tok/s`,
    typeof g.latency_ms_p50 === "number" && `p50 ${g.latency_ms_p50.toFixed(0)} ms`,
    typeof g.ttft_ms_p50 === "number" && `TTFT ${g.ttft_ms_p50.toFixed(0)} ms`,
  ].filter(Boolean);
  $("live-serving").textContent = parts.length ? "serving: " + parts.join(" · ") : "";
}

function drawLoss() {
  const series = [...lossRuns].map(([name, points]) => ({ name, points }));
  lineChart($("loss-chart"), series, { xLabel: "step", yLabel: "loss" });
  $("loss-empty").hidden = series.length > 0;
  $("loss-legend").innerHTML = series.length > 1
    ? series.map((s, i) => `<span><i style="background:${LEVEL_COLORS[i % LEVEL_COLORS.length]}"></i>${escapeHtml(s.name)}</span>`).join("") : "";
}

function connectLive() {
  const badge = $("ws-status");
  let ws;
  try { ws = new WebSocket(wsUrl("/ws/live")); } catch { return; }
  ws.onopen = () => { badge.textContent = "live"; badge.className = "badge ok"; wsDelay = 1000; };
  ws.onmessage = onLive;
  ws.onclose = () => {
    badge.textContent = "offline"; badge.className = "badge warn";
    setTimeout(connectLive, wsDelay);
    wsDelay = Math.min(wsDelay * 2, 30000);
  };
}

// ---- attention -------------------------------------------------------------------------------
async function onAnalyze(ev) {
  ev.preventDefault();
  showError($("analyze-error"), null);
  $("analyze-meta").textContent = "analysing…";
  try {
    const r = await postJSON("/research/analyze-text", { text: $("analyze-text").value });
    const toks = r?.tokens ?? [], loss = r?.loss ?? r?.losses ?? r?.token_loss ?? [];
    const finite = loss.filter((x) => typeof x === "number" && isFinite(x));
    const mass = r?.memory_read_mass ?? r?.memory_mass ?? r?.level_mass ?? r?.mem_level_mass;
    // Colour relative to this text's range: an untrained model's losses are all high, yet differ.
    const lo = finite.length ? Math.min(...finite) : 0, hi = finite.length ? Math.max(...finite) : 1;
    const rel = (l) => (hi > lo ? (l - lo) / (hi - lo) : 0.5);
    const box = $("analyze-tokens");
    box.replaceChildren();
    toks.forEach((t, i) => {
      const s = document.createElement("span");
      s.className = "tok";
      s.textContent = typeof t === "string" ? t : String(t?.text ?? t);
      const l = loss[i], tips = [];
      if (typeof l === "number" && isFinite(l)) {
        s.style.background = `hsla(${120 - 120 * rel(l)}, 75%, 55%, 0.45)`;
        tips.push(`loss ${l.toFixed(3)}`);
        s.dataset.loss = l;
      }
      const m = Array.isArray(mass?.[i]) ? mass[i] : null;
      if (m) tips.push("memory read " + m.map((v, j) => `${LEVELS[j] ?? j} ${(+v).toFixed(2)}`).join(" "));
      if (tips.length) s.title = tips.join(" · ");
      box.appendChild(s);
    });
    $("analyze-scale").hidden = !finite.length;
    $("loss-lo").textContent = `loss ${lo.toFixed(2)}`;
    $("loss-hi").textContent = `${hi.toFixed(2)}`;
    let levels = [];
    if (Array.isArray(mass)) {
      // Either per level [3], or per token [[3] ...]: average over tokens.
      const rows = mass.every(Array.isArray) ? mass : [mass];
      const n = Math.max(...rows.map((x) => x.length));
      levels = Array.from({ length: n }, (_, j) => ({ label: LEVELS[j] ?? `L${j}`, value: rows.reduce((a, x) => a + (x[j] ?? 0), 0) / rows.length, max: 1 }));
    } else if (mass && typeof mass === "object") {
      levels = Object.entries(mass).map(([k, v]) => ({ label: k.toUpperCase().replace(/^LEVEL_?/, "L"), value: Number(Array.isArray(v) ? v.reduce((a, b) => a + b, 0) / v.length : v), max: 1 }));
    }
    bars($("analyze-levels"), levels.map((l) => ({ ...l, label: `${l.label} read mass` })));
    const mean = r?.mean_loss ?? (finite.length ? finite.reduce((a, b) => a + b, 0) / finite.length : null);
    $("analyze-meta").textContent = `${toks.length} tokens` + (mean != null ? ` · mean loss ${mean.toFixed(3)}` : "") +
      (typeof r?.perplexity === "number" ? ` · perplexity ${fmtNum(r.perplexity)}` : "");
  } catch (e) {
    $("analyze-meta").textContent = "";
    showError($("analyze-error"), e);
  }
}

// ---- start -----------------------------------------------------------------------------------
function start() {
  $("health-refresh").addEventListener("click", refreshHealth);
  $("generate-form").addEventListener("submit", onGenerate);
  $("stop-btn").addEventListener("click", () => controller?.abort());
  $("states-refresh").addEventListener("click", refreshStates);
  $("compact-btn").addEventListener("click", () => stateAction("compact"));
  $("delete-btn").addEventListener("click", () => stateAction("delete"));
  $("cluster-btn").addEventListener("click", onCluster);
  $("analyze-form").addEventListener("submit", onAnalyze);
  $("state-id").addEventListener("input", (e) => {
    const v = e.target.value.trim();
    e.target.setCustomValidity(!v || ID_RE.test(v) ? "" : "letters, digits, _ and -, up to 64");
  });
  const ownerInput = $("owner");
  ownerInput.value = localStorage.getItem("dnc-owner") ?? "";
  setOwner(ownerInput.value);
  ownerInput.addEventListener("change", () => {
    localStorage.setItem("dnc-owner", ownerInput.value.trim());
    setOwner(ownerInput.value);
    clearSelection();
    refreshStates();
  });
  refreshHealth();
  refreshStats();
  refreshStates();
  connectLive();
  setInterval(refreshHealth, 15000);
}

start();
