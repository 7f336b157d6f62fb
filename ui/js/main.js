// The research dashboard: views as tabs (the URL hash names the view), the caller's identity (API
// key or owner), and the /ws/live connection that feeds the training monitor, the overview and the
// session list. Each view lives in js/views/ and talks to the server only through js/api.js.
import { openSocket, setApiKey, setOwner } from "./api.js";
import { $, ID_RE, fmtNum, store } from "./util.js";
import { initAttention, showAttention } from "./views/attention.js";
import { initComparison, showComparison } from "./views/comparison.js";
import { initEfficiency, showEfficiency } from "./views/efficiency.js";
import { initFlow, showFlow } from "./views/flow.js";
import { initInspector, refreshStates, selectState } from "./views/inspector.js";
import { initOverview, refreshHealth, refreshStats, showServing } from "./views/overview.js";
import { initProbe } from "./views/probe.js";
import { initTraining, onTrainingStep, showTraining } from "./views/training.js";

const VIEWS = {
  overview: () => { refreshStats(); refreshHealth(); },
  training: showTraining,
  inspector: () => refreshStates(),
  attention: showAttention,
  efficiency: showEfficiency,
  probe: () => {},
  comparison: showComparison,
  flow: showFlow,
};

function showView(name) {
  if (!(name in VIEWS)) name = "overview";
  for (const tab of document.querySelectorAll("#tabs [role=tab]")) {
    const on = tab.dataset.view === name;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $(`view-${tab.dataset.view}`).hidden = !on;
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  VIEWS[name]();
}

function initTabs() {
  const tabs = [...document.querySelectorAll("#tabs [role=tab]")];
  for (const tab of tabs) {
    tab.addEventListener("click", () => showView(tab.dataset.view));
    tab.addEventListener("keydown", (e) => { // arrow keys move between tabs (WAI-ARIA tabs pattern)
      const i = tabs.indexOf(tab), d = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (!d) return;
      const next = tabs[(i + d + tabs.length) % tabs.length];
      next.focus();
      showView(next.dataset.view);
    });
  }
  window.addEventListener("hashchange", () => showView(location.hash.slice(1)));
}

// ---- identity: API key (Bearer) or owner (X-Owner, loopback without keys) ---------------------------
function applyIdentity(announce) {
  const key = $("api-key").value.trim(), owner = $("owner").value.trim();
  setApiKey(key);
  setOwner(owner);
  $("owner").disabled = !!key;
  $("owner").title = key ? "with a key, the server takes the owner from the key" : "";
  $("identity-msg").textContent = key ? "using API key" : "";
  $("identity-msg").className = "muted";
  if (announce) {
    store.emit("identity", { key: !!key, owner });
    reconnectLive();
  }
}

function initIdentity() {
  $("api-key").value = localStorage.getItem("dnc-api-key") ?? "";
  $("owner").value = localStorage.getItem("dnc-owner") ?? "";
  applyIdentity(false);
  $("identity").addEventListener("submit", (e) => e.preventDefault());
  window.addEventListener("dnc-auth-required", (e) => {
    $("identity-msg").textContent = ($("api-key").value.trim() ? "API key refused: " : "this server needs an API key: ") + e.detail;
    $("identity-msg").className = "error";
  });
  $("api-key").addEventListener("change", () => {
    const k = $("api-key").value.trim();
    if (k) localStorage.setItem("dnc-api-key", k); else localStorage.removeItem("dnc-api-key");
    applyIdentity(true);
  });
  $("owner").addEventListener("change", () => {
    const o = $("owner").value.trim();
    if (o && !ID_RE.test(o)) { $("identity-msg").textContent = "owner: letters, digits, _ and -, up to 64"; return; }
    localStorage.setItem("dnc-owner", o);
    applyIdentity(true);
  });
}

// ---- /ws/live ----------------------------------------------------------------------------------
let ws = null, wsDelay = 1000, wsTimer = null, statesTimer = null;

function logEvent(text, cls = "") {
  const log = $("live-log"), li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  if (cls) li.className = cls;
  log.prepend(li);
  while (log.children.length > 100) log.lastChild.remove();
}

function onLive(msg) {
  let ev;
  try { ev = JSON.parse(msg.data); } catch { return; }
  switch (ev.type) {
    case "hello": logEvent(`connected (subscriber ${ev.subscriber ?? "?"})`); return;
    case "auth":
      $("identity-msg").textContent = ev.ok ? `signed in as ${ev.owner}` : "API key rejected";
      return;
    case "metrics": showServing(ev.generator ?? {}); return;
    case "training_step":
      onTrainingStep(ev);
      if (!ev.backlog) logEvent(`${ev.run_id} step ${ev.step} loss ${typeof ev.loss === "number" ? fmtNum(ev.loss) : "–"}`, "metric");
      return;
    default: {
      const who = ev.state_id ? ` [${ev.state_id}]` : "";
      const rate = typeof ev.tokens_per_s === "number" ? ` ${ev.tokens} tok ${ev.tokens_per_s.toFixed(0)} tok/s` : "";
      logEvent(`${ev.type ?? "event"}${who}${rate}`, "gen");
      // Another client changed a session: refresh the list (debounced, never on every token).
      if (ev.state_id && /gen|state|compact|delete/i.test(ev.type ?? "")) {
        const touched = ev.state_id === store.selected;
        clearTimeout(statesTimer);
        statesTimer = setTimeout(() => refreshStates().then(() => touched && store.selected === ev.state_id && selectState(ev.state_id, "changed")), 500);
      }
    }
  }
}

function connectLive() {
  const badge = $("ws-status");
  clearTimeout(wsTimer);
  let sock;
  try { sock = openSocket("/ws/live"); } catch { return; }
  ws = sock;
  sock.onopen = () => { badge.textContent = "live"; badge.className = "badge ok"; wsDelay = 1000; };
  sock.onmessage = onLive;
  sock.onclose = (e) => {
    if (sock !== ws) return; // replaced by a reconnect with another identity
    if (e.code === 4401) { // the server refused the key: do not retry with it
      badge.textContent = "key rejected"; badge.className = "badge bad";
      $("identity-msg").textContent = `API key rejected: ${e.reason || "unauthorised"}`;
      return;
    }
    badge.textContent = "offline"; badge.className = "badge warn";
    wsTimer = setTimeout(connectLive, wsDelay);
    wsDelay = Math.min(wsDelay * 2, 30000);
  };
}

function reconnectLive() {
  const old = ws;
  ws = null;
  old?.close();
  connectLive();
}

// ---- start -------------------------------------------------------------------------------------
function start() {
  initIdentity();
  initOverview();
  initTraining();
  initInspector();
  initAttention();
  initEfficiency();
  initProbe();
  initComparison();
  initFlow();
  initTabs();
  refreshHealth();
  refreshStats();
  refreshStates();
  connectLive();
  showView(location.hash.slice(1) || "overview");
  setInterval(refreshHealth, 15000);
}

start();
