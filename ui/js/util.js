// Helpers shared by the views: DOM lookup, number/byte/time formatting, errors, JSON rendering,
// and the page's shared state (owner/key, selected session) with change events.
import { ApiError } from "./api.js";

export const $ = (id) => document.getElementById(id);
export const LEVELS = ["L0", "L1", "L2"];
export const ID_RE = /^[A-Za-z0-9_-]{1,64}$/;

export const escapeHtml = (t) => String(t).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

export function showError(box, err) {
  box.hidden = !err;
  box.textContent = err ? (err instanceof ApiError && err.status ? `${err.status}: ` : "") + (err.message ?? err) : "";
}

export const fmtNum = (v) => (typeof v === "number" && !Number.isInteger(v) ? +v.toPrecision(4) : v)?.toLocaleString?.() ?? String(v);

export function fmtBytes(b) {
  if (typeof b !== "number" || !isFinite(b)) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(b) >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return `${i ? b.toFixed(1) : b} ${u[i]}`;
}

export function fmtTime(t) {
  if (t == null || t === "") return "";
  const d = typeof t === "number" ? new Date(t < 1e12 ? t * 1000 : t) : new Date(t);
  return isNaN(d) ? String(t) : d.toLocaleTimeString();
}

/** "1 turn", "2 turns". */
export const plural = (n, word, many = word + "s") => `${fmtNum(n)} ${n === 1 ? word : many}`;

/** Small labelled figures: [[label, value, title?], ...] into a container of .card elements. */
export function cards(container, items) {
  container.replaceChildren();
  for (const [label, value, title] of items) {
    if (value == null || value === "") continue;
    const c = document.createElement("div");
    c.className = "card";
    c.dataset.label = label;
    c.innerHTML = `<span class="card-value"></span><span class="card-label"></span>`;
    c.querySelector(".card-value").textContent = typeof value === "number" ? fmtNum(value) : value;
    c.querySelector(".card-label").textContent = label;
    if (title) c.title = title;
    container.appendChild(c);
  }
}

/** Render any JSON value as nested definition lists (objects) and compact lists (arrays). */
export function renderKV(container, value) {
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

/** Parse "128,512,2k,1m" into integers. */
export function parseLengths(text) {
  return String(text).split(/[\s,]+/).filter(Boolean).map((t) => {
    const m = /^(\d+(?:\.\d+)?)([km]?)$/i.exec(t);
    if (!m) return NaN;
    return Math.round(Number(m[1]) * ({ k: 1024, m: 1024 * 1024 }[m[2].toLowerCase()] ?? 1));
  });
}

/**
 * The page's shared state. Views listen for:
 *   "identity"  the key or owner changed (everything owner-scoped must be dropped and reloaded);
 *   "sessions"  the session list was reloaded (detail: the list);
 *   "session"   the selected session changed or was modified (detail: {id, reason}).
 */
export const store = Object.assign(new EventTarget(), {
  sessions: [],
  selected: null,
  modelConfig: {},
  emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); },
});

/** Fill every `.session-select` with "(no session)" plus the current sessions, keeping the choice. */
export function fillSessionSelects() {
  for (const sel of document.querySelectorAll("select.session-select")) {
    const keep = sel.value;
    sel.replaceChildren(new Option("(empty memory)", ""));
    for (const s of store.sessions) sel.append(new Option(s.state_id, s.state_id));
    sel.value = store.sessions.some((s) => s.state_id === keep) ? keep : (store.selected ?? "");
  }
}

/** Show a byte token; non-printable bytes (\\xNN) as a dim dot with the byte in the title. A line
 * break shows as a dim "↵" before the break: a span holding only "\n" has no width under pre-wrap, so
 * it could be neither seen nor hovered. */
export function byteToken(span, t) {
  if (/^\\x[0-9a-f]{2}$/.test(t)) {
    span.textContent = "·";
    span.classList.add("byte");
    span.title = t;
  } else if (t === "\n" || t === "\r") {
    span.textContent = "↵\n";
    span.classList.add("byte");
  } else span.textContent = t;
}
