// Training monitor: any run under the server's runs root (followed through its metrics.jsonl:
// GET /v1/runs, GET /v1/runs/{run}/metrics?after_step=N) or pushed by a trainer
// (POST /research/training-step, arriving here on /ws/live). Charts are grouped by what a researcher
// asks of a run: is it learning (loss, LR, bits per byte), what has it learned (accuracy per task, the
// curriculum), and what does its memory do (fill per level, diversity, read entropy, compressions).
import { asList, getJSON } from "../api.js";
import { LineChart, columns } from "../charts.js";
import { $, escapeHtml, fmtNum, fmtTime, plural, showError } from "../util.js";

const POLL_MS = 1500;
const RUNS_POLL_MS = 5000;

/** Chart panels: which metric keys each shows. The first key that matches a panel claims it. */
const PANELS = [
  { id: "loss", title: "Loss", y: "loss", match: (k) => /^(train|eval)\/(loss|lm_loss)$/.test(k) || k === "loss" || k === "train_loss" },
  { id: "lr", title: "Learning rate", y: "lr", match: (k) => k === "lr" || k === "learning_rate" },
  { id: "acc", title: "Accuracy per task", y: "accuracy", match: (k) => /^eval\/acc(\/|$)/.test(k) || /^eval\/stage_acc\//.test(k) },
  { id: "stage", title: "Curriculum: stage and difficulty", y: "stage / difficulty", match: (k) => /^curriculum\/(stage_index|difficulty\/)/.test(k) },
  { id: "bpb", title: "Bits per byte", y: "bits/byte", match: (k) => /bpb|bits_per_byte/.test(k) },
  { id: "slots", title: "Memory: slot fill per level", y: "slots", match: (k) => /^mem\/slots_l\d$/.test(k) },
  { id: "memq", title: "Memory: diversity and read entropy", y: "", match: (k) => /^mem\/(slot_diversity|.*entropy.*)$/.test(k) },
  { id: "memops", title: "Memory: compressions and evictions", y: "per step", match: (k) => /^mem\/(compressions|evictions|merges?)$/.test(k) },
  { id: "tps", title: "Throughput", y: "tokens/s", match: (k) => k === "throughput/tokens_per_s" || k === "tokens_per_s" },
  { id: "grad", title: "Gradient norm and reconstruction loss", y: "", match: (k) => /grad_norm$|recon_loss$/.test(k) },
];

const runs = new Map();      // id -> {id, kind: "file" | "push", run, label, live, modified}
const pushed = new Map();    // run_id -> rows pushed on /ws/live
let current = null;          // {id, kind, run, rows: [], lastStep, modified, lastEvent}
let userChose = false;
const charts = new Map();    // panel id -> LineChart
let pollTimer = null, runsTimer = null, pendingDraw = false;

const visible = () => !$("view-training").hidden;

function optionLabel(r) {
  const bits = [r.kind === "push" ? `${r.run} (pushed)` : r.run];
  if (r.lastStep != null) bits.push(`step ${r.lastStep}`);
  if (r.live) bits.push("● training");
  return bits.join(" · ");
}

export async function refreshRuns() {
  let files = [];
  try {
    files = asList(await getJSON("/v1/runs"), "runs");
    showError($("run-error"), null);
  } catch (e) {
    showError($("run-error"), e);
  }
  for (const [id, r] of runs) if (r.kind === "file") runs.delete(id);
  for (const f of files) {
    runs.set(`file:${f.run}`, { id: `file:${f.run}`, kind: "file", run: f.run, live: f.live, modified: f.modified, lastStep: f.last_step });
  }
  try { // steps a trainer pushed before this page opened
    const steps = asList(await getJSON("/research/training-steps?limit=2000"), "steps");
    for (const s of steps) addPushed(s, false);
  } catch { /* the hub may be starting: pushed runs arrive on /ws/live */ }
  renderRunSelect();
}

function renderRunSelect() {
  const sel = $("run-select");
  const list = [...runs.values()].sort((a, b) => (b.live - a.live) || ((b.modified ?? 0) - (a.modified ?? 0)));
  $("runs-empty").hidden = list.length > 0;
  const keep = current?.id;
  sel.replaceChildren(...list.map((r) => new Option(optionLabel(r), r.id)));
  if (!list.length) return;
  // Follow the run that is training now, unless the user picked one.
  const best = list[0];
  const target = keep && runs.has(keep) && (userChose || !best.live || best.id === keep) ? keep : best.id;
  sel.value = target;
  if (target !== keep) openRun(target);
}

function addPushed(ev, live) {
  const run = String(ev.run_id ?? "default"), step = ev.step;
  if (typeof step !== "number") return;
  const row = { step, ...(ev.metrics ?? {}) };
  if (typeof ev.loss === "number" && row.loss == null && row["train/loss"] == null) row.loss = ev.loss;
  if (!pushed.has(run)) pushed.set(run, []);
  const rows = pushed.get(run);
  if (rows.length && step <= rows[rows.length - 1].step) {
    const i = rows.findIndex((r) => r.step >= step);
    if (rows[i]?.step === step && !live) return; // already have it (backlog overlap)
    rows.splice(i);                                // a restarted run: drop what it rewrites
  }
  rows.push(row);
  const id = `push:${run}`;
  const r = runs.get(id) ?? { id, kind: "push", run };
  Object.assign(r, { lastStep: step, modified: ev.ts ?? Date.now() / 1000, live: live || r.live });
  runs.set(id, r);
}

/** A training_step event from /ws/live. */
export function onTrainingStep(ev) {
  const isNew = !runs.has(`push:${ev.run_id ?? "default"}`);
  addPushed(ev, !ev.backlog);
  if (current?.kind === "push" && current.run === String(ev.run_id ?? "default")) {
    current.rows = pushed.get(current.run);
    current.lastEvent = Date.now();
    scheduleDraw();
  }
  if (isNew || !current) renderRunSelect();
}

function openRun(id) {
  const r = runs.get(id);
  if (!r) return;
  current = { id, kind: r.kind, run: r.run, rows: r.kind === "push" ? pushed.get(r.run) ?? [] : [], lastStep: null, modified: r.modified };
  for (const c of charts.values()) c.clear();
  $("training-charts").replaceChildren();
  charts.clear();
  $("stage-strip").replaceChildren();
  $("run-summary").textContent = "loading…";
  delete $("run-summary").dataset.step;
  if (r.kind === "file") pollRun(); else draw();
}

async function pollRun() {
  const cur = current;
  if (!cur || cur.kind !== "file" || cur.polling) return;
  cur.polling = true;
  try {
    let more = true;
    while (more && cur === current) {
      const q = cur.lastStep == null ? "" : `?after_step=${cur.lastStep}`;
      const r = await getJSON(`/v1/runs/${cur.run.split("/").map(encodeURIComponent).join("/")}/metrics${q}`);
      if (cur !== current) return;
      if (cur.lastStep != null && r.last_step != null && r.last_step < cur.lastStep) { // restarted from a checkpoint
        cur.rows = cur.rows.filter((x) => x.step <= r.last_step);
        cur.lastStep = r.last_step;
        continue;
      }
      if (r.rows.length) { cur.rows.push(...r.rows); cur.lastStep = r.last_step; }
      else if (cur.lastStep == null) cur.lastStep = -1;
      cur.modified = r.modified;
      more = r.more;
    }
    showError($("run-error"), null);
  } catch (e) {
    if (cur === current) showError($("run-error"), e);
  } finally {
    cur.polling = false;
  }
  if (cur === current) draw();
}

function scheduleDraw() {
  if (pendingDraw) return;
  pendingDraw = true;
  requestAnimationFrame(() => { pendingDraw = false; draw(); });
}

function isLive(cur) {
  const now = Date.now() / 1000;
  if (cur.kind === "push") return cur.lastEvent != null && Date.now() - cur.lastEvent < 60_000;
  return cur.modified != null && now - cur.modified < 120;
}

function draw() {
  const cur = current;
  if (!cur) return;
  const rows = cur.rows;
  const keys = new Set();
  for (const r of rows) for (const [k, v] of Object.entries(r)) if (typeof v === "number" && k !== "step" && k !== "time") keys.add(k);
  const claimed = new Map(PANELS.map((p) => [p.id, []]));
  for (const k of [...keys].sort()) {
    const p = PANELS.find((q) => q.match(k));
    if (p) claimed.get(p.id).push(k);
  }
  const box = $("training-charts");
  for (const p of PANELS) {
    const ks = claimed.get(p.id);
    if (!ks.length) continue;
    if (!charts.has(p.id)) {
      const panel = document.createElement("div");
      panel.className = "panel";
      panel.dataset.testid = `train-panel-${p.id}`;
      panel.innerHTML = `<h2>${escapeHtml(p.title)}</h2><div class="uchart"></div>`;
      // keep PANELS order
      const after = [...box.children].find((el) => PANELS.findIndex((q) => `train-panel-${q.id}` === el.dataset.testid) > PANELS.indexOf(p));
      box.insertBefore(panel, after ?? null);
      charts.set(p.id, new LineChart(panel.querySelector(".uchart"), { xLabel: "step", yLabel: p.y }));
    }
    const { xs, series } = columns(rows, "step", ks, (k) => k.replace(/^(mem|eval|train|curriculum)\//, ""));
    charts.get(p.id).set(xs, series);
  }
  drawStages(rows);
  const last = rows[rows.length - 1];
  const loss = last && (last["train/loss"] ?? last.loss ?? last.train_loss);
  const live = isLive(cur);
  const badge = $("run-live");
  badge.hidden = false;
  badge.textContent = live ? "training" : "finished or idle";
  badge.className = "badge " + (live ? "ok" : "");
  $("run-summary").textContent = last
    ? [`${cur.run}`, `step ${last.step}`, typeof loss === "number" && `loss ${fmtNum(loss)}`, last.stage && `stage ${last.stage}`,
      plural(rows.length, "row"), last.time && `logged ${fmtTime(last.time)}`].filter(Boolean).join(" · ")
    : `${cur.run}: no steps logged yet`;
  $("run-summary").dataset.step = last ? String(last.step) : "";
}

/** The curriculum as chips: each stage with the step it began (promotions). */
function drawStages(rows) {
  const strip = $("stage-strip");
  const stages = [];
  for (const r of rows) {
    const name = r.stage ?? (typeof r["curriculum/stage_index"] === "number" ? `stage ${r["curriculum/stage_index"]}` : null);
    if (name != null && (!stages.length || stages[stages.length - 1].name !== name)) stages.push({ name, step: r.step });
  }
  strip.replaceChildren(...stages.map((s, i) => {
    const c = document.createElement("span");
    c.className = "stage-chip" + (i === stages.length - 1 ? " current" : "");
    c.textContent = `${i ? "→ " : ""}${s.name} (from step ${s.step})`;
    return c;
  }));
  if (stages.length) {
    const promos = stages.length - 1;
    strip.insertAdjacentHTML("afterbegin", `<span class="muted">curriculum · ${plural(promos, "promotion")}:</span>`);
  }
}

export function initTraining() {
  $("run-select").addEventListener("change", (e) => { userChose = true; openRun(e.target.value); });
  $("runs-refresh").addEventListener("click", refreshRuns);
  pollTimer = setInterval(() => { if (visible() && current?.kind === "file") pollRun(); }, POLL_MS);
  runsTimer = setInterval(() => { if (visible()) refreshRuns(); }, RUNS_POLL_MS);
}

export function showTraining() {
  refreshRuns();
  for (const c of charts.values()) c.resize();
}
