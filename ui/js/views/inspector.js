// State inspector: the owner's sessions, the selected session's memory (fill per level, per-layer
// level cards, a card per slot by salience), its slot-cluster scatter and the fill over a replayed text. Everything derived from a
// session is dropped the moment the session changes (compact, delete, another selection, another
// owner or key), so no view shows a bank that no longer exists.
import { asList, getJSON, postJSON, request } from "../api.js";
import { bars, scatter, LEVEL_COLORS, LineChart } from "../charts.js";
import { $, LEVELS, escapeHtml, fillSessionSelects, fmtBytes, fmtNum, fmtTime, plural, renderKV, store } from "../util.js";

let clusterWanted = null; // the session whose clustering the user asked for: redone when it changes
let evolveChart = null;
let loadSeq = 0;          // bumped on every selection change: a late answer for an older one is dropped
let autoSelect = true;    // pick the first session on load; not after the user deleted one

const stateId = (s) => s?.state_id ?? s?.id;

/** Per-level {label, value, max} from StateInfo.levels ([{level, slots, capacity}]). */
function levelBars(info) {
  return asList(info?.levels).map((l, i) => ({ label: `L${l.level ?? i}`, value: l.slots ?? 0, max: l.capacity }));
}

// Each refresh's number: a list that arrives after a newer refresh began is stale (say the owner
// changed while it loaded) and is dropped, or the page would select another owner's session and
// ask for it under the new owner (a 404).
let refreshSeq = 0;

export async function refreshStates() {
  const box = $("states-error");
  box.hidden = true;
  const seq = ++refreshSeq;
  let list;
  try {
    list = asList(await getJSON("/v1/states"), "states");
  } catch (e) {
    if (seq !== refreshSeq) return;
    box.hidden = false;
    box.textContent = `${e.status ? e.status + ": " : ""}${e.message}`;
    return;
  }
  if (seq !== refreshSeq) return;
  store.sessions = list;
  const tbody = $("states-list");
  tbody.replaceChildren();
  $("states-empty").hidden = list.length > 0;
  for (const s of list) {
    const id = stateId(s);
    const tr = document.createElement("tr");
    tr.dataset.stateId = id;
    tr.dataset.testid = "state-row";
    tr.tabIndex = 0;
    tr.setAttribute("aria-selected", String(id === store.selected));
    const lv = asList(s.levels).map((l) => l.slots).join(" / ");
    for (const c of [id, fmtNum(s.tokens_seen ?? 0), lv, fmtTime(s.updated_at)]) {
      const td = document.createElement("td");
      td.textContent = c;
      tr.appendChild(td);
    }
    tr.addEventListener("click", () => selectState(id, "selected"));
    tr.addEventListener("keydown", (k) => { if (k.key === "Enter" || k.key === " ") { k.preventDefault(); selectState(id, "selected"); } });
    tbody.appendChild(tr);
  }
  fillSessionSelects();
  store.emit("sessions", list);
  if (store.selected && !list.some((s) => stateId(s) === store.selected)) clearSelection("gone");
  if (!store.selected && list.length && autoSelect) await selectState(stateId(list[0]), "selected");
}

/** Forget the selected session and everything drawn from it. */
export function clearSelection(reason = "cleared") {
  const was = store.selected;
  store.selected = null;
  loadSeq++; // a load still in flight stops before its next request (after an owner switch it would 404)
  $("state-detail-box").hidden = true;
  $("memory-bars").replaceChildren();
  $("slot-cards").replaceChildren();
  $("memory-facts").textContent = "";
  $("memory-empty").hidden = false;
  $("mem-for").textContent = "";
  $("cluster-btn").disabled = true;
  $("delete-confirm").hidden = true;
  clearDerived();
  clusterWanted = null;
  for (const tr of $("states-list").children) tr.setAttribute("aria-selected", "false");
  if (was) store.emit("session", { id: null, previous: was, reason });
}

/** Drop the slot cards, the cluster scatter and the replay chart: they describe a bank that just changed. */
function clearDerived() {
  $("slot-levels").replaceChildren();
  $("slots-msg").textContent = "";
  $("cluster-plot").replaceChildren();
  $("cluster-legend").replaceChildren();
  $("cluster-msg").textContent = "";
  evolveChart?.clear();
  $("evolve-msg").textContent = "";
}

export async function selectState(id, reason = "selected") {
  if (!id) return;
  autoSelect = true;
  const changed = id !== store.selected;
  store.selected = id;
  const seq = ++loadSeq;
  for (const tr of $("states-list").children) tr.setAttribute("aria-selected", String(tr.dataset.stateId === id));
  $("state-detail-box").hidden = false;
  $("state-detail-id").textContent = id;
  $("cluster-btn").disabled = false;
  $("mem-for").textContent = `· ${id}`;
  if (changed) { $("state-action-msg").textContent = ""; $("delete-confirm").hidden = true; }
  clearDerived();
  if (changed && clusterWanted !== id) clusterWanted = null;
  let d;
  try {
    d = await getJSON(`/v1/state/${encodeURIComponent(id)}`);
  } catch (e) {
    if (seq === loadSeq) $("state-action-msg").textContent = e.message;
    return;
  }
  if (seq !== loadSeq || store.selected !== id) return; // another session was picked (or none) while this one loaded
  renderKV($("state-detail"), d);
  const levels = levelBars(d);
  bars($("memory-bars"), levels, { unit: " slots" });
  renderLevelCards(d?.summary);
  $("memory-facts").textContent = [
    d.tokens_seen != null && `${fmtNum(d.tokens_seen)} tokens seen`,
    d.turns != null && plural(d.turns, "turn"),
    d.bank_bytes != null && `${fmtBytes(d.bank_bytes)} bank`,
    d.offloaded && "offloaded to storage",
    d.shard != null && `shard ${d.shard}`,
  ].filter(Boolean).join(" · ");
  renderHistory(asList(d.history ?? []));
  $("memory-empty").hidden = levels.length > 0;
  store.emit("session", { id, reason, info: d });
  await loadSlots(id, seq);
  if (clusterWanted === id) await onCluster();
}

/** Every valid slot of the session's bank (``/research/slots``), the most salient per level first. */
async function loadSlots(id, seq = loadSeq) {
  const msg = $("slots-msg");
  msg.textContent = "loading slots…";
  let r;
  try {
    const perLevel = Number($("slots-per-level").value);
    r = await postJSON("/research/slots", { state_id: id, per_level: Number.isFinite(perLevel) ? perLevel : 12 });
  } catch (e) {
    if (seq === loadSeq && store.selected === id) { $("slot-levels").replaceChildren(); msg.textContent = e.message; }
    return;
  }
  if (seq !== loadSeq || store.selected !== id) return; // the session changed while this loaded
  renderSlots(r, id);
}

/** Salience and importance with 3 decimals; counts (age, access: a merged pair's age is a mean) whole when whole. */
const fixed = (v) => (typeof v === "number" ? v.toFixed(3) : "–");
const count = (v) => (typeof v === "number" ? (Number.isInteger(v) ? fmtNum(v) : v.toFixed(1)) : "–");

/** Per level: a header (valid / capacity, how many are not shown) and a card per listed slot. */
function renderSlots(r, id) {
  const box = $("slot-levels");
  box.replaceChildren();
  const total = r?.total_slots ?? 0;
  if (!total) {
    $("slots-msg").textContent = "The bank is empty: generate with this session to fill its memory.";
    return;
  }
  const hidden = asList(r.levels).reduce((a, l) => a + (l.not_shown ?? 0), 0);
  $("slots-msg").textContent = `${plural(total, "slot")} · clock ${fmtNum(r.clock ?? 0)} segments` +
    (r.has_importance ? "" : " · the model learns no write importance") + ` · ${id}`;
  for (const level of asList(r.levels)) {
    const lv = level.level ?? 0;
    const sec = document.createElement("section");
    sec.className = "slot-level";
    sec.dataset.testid = "slot-level";
    sec.dataset.level = String(lv);
    const more = level.not_shown ? ` · <span data-testid="slots-more">${fmtNum(level.not_shown)} more not shown</span>` : "";
    sec.innerHTML = `<h4><i style="background:${LEVEL_COLORS[lv % LEVEL_COLORS.length]}"></i>${escapeHtml(level.name ?? LEVELS[lv])}` +
      ` <span class="muted">${fmtNum(level.valid ?? 0)} / ${fmtNum(level.capacity ?? 0)} slots${more}</span></h4>`;
    const grid = document.createElement("div");
    grid.className = "slot-grid";
    const slots = asList(level.slots);
    const top = Math.max(1e-9, ...slots.map((c) => c.salience ?? 0));
    if (!slots.length) grid.innerHTML = `<p class="muted">no slots in ${escapeHtml(level.name ?? LEVELS[lv])}</p>`;
    for (const c of slots) {
      const el = document.createElement("div");
      el.className = "slot-item";
      el.dataset.testid = "slot-item";
      el.dataset.layer = String(c.layer);
      el.dataset.index = String(c.index);
      el.style.borderLeftColor = LEVEL_COLORS[lv % LEVEL_COLORS.length];
      const rows = [["salience", fixed(c.salience)], ["age", count(c.age)], ["access", count(c.access)]];
      if ("importance" in c) rows.push(["importance", fixed(c.importance)]);
      el.innerHTML = `<b>#${escapeHtml(c.index)} <span class="muted">layer ${escapeHtml(c.layer)}</span></b>` +
        rows.map(([k, v]) => `<span class="kv-row"><span class="muted">${k}</span><span data-field="${k}">${v}</span></span>`).join("") +
        `<span class="fill" style="--fill:${Math.max(0, Math.min(100, (100 * (c.salience ?? 0)) / top))}%"></span>`;
      el.title = `layer ${c.layer} ${level.name} slot ${c.index}: salience ${c.salience}, age ${c.age} segments, ` +
        `${c.access} accesses, last access at segment ${c.last_access}` + ("importance" in c ? `, importance ${c.importance}` : "");
      grid.appendChild(el);
    }
    sec.appendChild(grid);
    box.appendChild(sec);
  }
  if (hidden) $("slots-msg").textContent += ` · ${fmtNum(hidden)} not shown`;
}

/** One card per memory layer and level: fill, mean salience, bytes (from DNCState.summary()). */
function renderLevelCards(summary) {
  const box = $("slot-cards");
  box.replaceChildren();
  for (const layer of asList(summary?.layers)) {
    const row = document.createElement("div");
    row.className = "slot-layer";
    row.innerHTML = `<h4>layer ${escapeHtml(layer.layer)} <span class="muted">${fmtBytes(layer.bytes)}</span></h4>`;
    asList(layer.slots).forEach((n, lv) => {
      const cap = layer.capacity?.[lv] ?? 0, valid = layer.valid_slots?.[lv] ?? n;
      const sal = layer.mean_salience?.[lv];
      const c = document.createElement("div");
      c.className = "slot-card";
      c.dataset.testid = "slot-card";
      c.style.borderColor = LEVEL_COLORS[lv % LEVEL_COLORS.length];
      c.innerHTML = `<b>${LEVELS[lv] ?? "L" + lv}</b><span>${fmtNum(valid)} / ${fmtNum(cap)} slots</span>` +
        `<span>salience ${typeof sal === "number" ? sal.toFixed(3) : "–"}</span>` +
        `<span class="fill" style="--fill:${cap ? (100 * valid) / cap : 0}%"></span>`;
      c.title = `layer ${layer.layer} ${LEVELS[lv]}: ${valid} valid of ${cap} (${n} written); mean salience ${sal}`;
      row.appendChild(c);
    });
    box.appendChild(row);
  }
}

/** Turns of a session, newest first: what happened to its memory and when. */
function renderHistory(turns) {
  const body = $("state-history").tBodies[0];
  body.replaceChildren();
  $("state-history").hidden = !turns.length;
  for (const t of [...turns].reverse().slice(0, 20)) {
    const tr = body.insertRow();
    for (const c of [t.seq ?? "", t.kind ?? "", fmtTime(t.at), t.new_tokens ?? "", t.tokens_seen ?? "",
      typeof t.duration_ms === "number" ? t.duration_ms.toFixed(0) : ""]) tr.insertCell().textContent = c;
    tr.title = [t.prompt_preview, t.completion_preview].filter(Boolean).join(" → ");
  }
}

async function onCompact() {
  const id = store.selected;
  if (!id) return;
  const msg = $("state-action-msg");
  msg.textContent = "compacting…";
  try {
    const r = await postJSON(`/v1/state/${encodeURIComponent(id)}/compact`, {});
    await refreshStates();
    await selectState(id, "compacted");
    msg.textContent = `compacted ${id}` + compactSummary(r);
  } catch (e) { msg.textContent = `compact failed: ${e.message}`; }
}

function compactSummary(r) {
  const bits = [];
  const lv = (x) => asList(x).map((l) => l.slots ?? l).join("/");
  if (r?.levels_before && r?.levels_after) bits.push(`slots ${lv(r.levels_before)} → ${lv(r.levels_after)}`);
  if (typeof r?.merged === "number") bits.push(`${r.merged} merged`);
  if (r?.bytes_before != null && r?.bytes_after != null) bits.push(`${fmtBytes(r.bytes_before)} → ${fmtBytes(r.bytes_after)}`);
  return bits.length ? ": " + bits.join(", ") : "";
}

function askDelete() {
  if (!store.selected) return;
  $("delete-q").textContent = `Delete session ${store.selected} and its memory? This cannot be undone.`;
  $("delete-confirm").hidden = false;
  $("delete-yes").focus();
}

async function onDelete() {
  const id = store.selected;
  $("delete-confirm").hidden = true;
  if (!id) return;
  const msg = $("state-action-msg");
  msg.textContent = `deleting ${id}…`;
  try {
    await request("DELETE", `/v1/state/${encodeURIComponent(id)}`);
    autoSelect = false;
    clearSelection("deleted");
    await refreshStates();
    msg.textContent = `deleted session ${id}`;
  } catch (e) { msg.textContent = `delete failed: ${e.message}`; }
}

export async function onCluster() {
  const id = store.selected;
  if (!id) return;
  clusterWanted = id;
  const msg = $("cluster-msg");
  msg.textContent = "clustering…";
  try {
    const k = Number.parseInt($("cluster-k").value, 10) || 4;
    const r = await postJSON("/research/state-clustering", { state_id: id, k });
    if (store.selected !== id) return; // the session changed while clustering
    const pts = asList(r?.points);
    if (!pts.length) {
      clearDerived();
      msg.textContent = r?.message ?? "no slots to cluster";
      return;
    }
    const labels = r.labels ?? [];
    const groups = (r.levels ?? []).map((l) => `L${l}`);
    const titles = pts.map((_, i) => `layer ${r.layers?.[i]} · L${r.levels?.[i]} slot ${r.slot_index?.[i]} · cluster ${labels[i]}`);
    const ev = r.explained_variance ?? [];
    const axis = (i) => `PC${i + 1}` + (typeof ev[i] === "number" ? ` (${(100 * ev[i]).toFixed(0)}% var)` : "");
    const keys = scatter($("cluster-plot"), pts, groups, titles, { xLabel: axis(0), yLabel: axis(1) });
    $("cluster-legend").innerHTML = keys.map((k, i) => `<span><i style="background:${LEVEL_COLORS[i % LEVEL_COLORS.length]}"></i>${escapeHtml(k)}</span>`).join("");
    msg.textContent = `${plural(pts.length, "slot")} · ${plural(new Set(labels.map(String)).size, "cluster")} · ${id}`;
  } catch (e) { msg.textContent = e.message; }
}

async function onEvolve() {
  const msg = $("evolve-msg");
  msg.textContent = "replaying…";
  try {
    const r = await postJSON("/research/state-evolution", { text: $("evolve-text").value, state_id: store.selected || null });
    const steps = asList(r?.steps);
    const xs = steps.map((s) => s.tokens_seen);
    const series = LEVELS.map((name, lv) => ({ name: `${name} slots`, values: steps.map((s) => s.levels?.[lv]?.slots ?? null) }));
    series.push({ name: "loss", values: steps.map((s) => s.loss) });
    evolveChart.set(xs, series);
    msg.textContent = `${plural(steps.length, "segment")} of ${r.segment_len} tokens`;
  } catch (e) { msg.textContent = e.message; }
}

export function initInspector() {
  evolveChart = new LineChart($("evolve-chart"), { xLabel: "tokens seen", yLabel: "slots / loss" });
  $("states-refresh").addEventListener("click", refreshStates);
  $("compact-btn").addEventListener("click", onCompact);
  $("delete-btn").addEventListener("click", askDelete);
  $("delete-yes").addEventListener("click", onDelete);
  $("delete-no").addEventListener("click", () => { $("delete-confirm").hidden = true; $("delete-btn").focus(); });
  $("cluster-btn").addEventListener("click", onCluster);
  $("evolve-btn").addEventListener("click", onEvolve);
  $("slots-per-level").addEventListener("change", () => { if (store.selected) loadSlots(store.selected); });
  store.addEventListener("identity", () => {
    autoSelect = true;
    clearSelection("identity");
    $("state-action-msg").textContent = "";
    store.sessions = [];
    $("states-list").replaceChildren();
    refreshStates();
  });
}
