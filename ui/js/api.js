// HTTP/WebSocket client for the BWR-DNC serve API. Relative URLs only, so the UI works behind
// any host, port or path prefix the static files are mounted under.

/** Error carrying the server's own message (`error.message`, FastAPI `detail`, or `message`). */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// The UI is served at <prefix>/ui/; the API lives at <prefix>/.
const DIR = new URL(".", location.href).pathname;
const BASE = DIR.endsWith("/ui/") ? DIR.slice(0, -3) : DIR;
export const apiUrl = (path) => BASE.replace(/\/$/, "") + path;

// Sessions belong to an owner. With an API key the server takes the owner from the key
// (`Authorization: Bearer KEY`); without one (loopback) from the X-Owner header ("anonymous" by default).
let owner = "";
let apiKey = "";
export const setOwner = (o) => { owner = (o || "").trim(); };
export const setApiKey = (k) => { apiKey = (k || "").trim(); };
export const getApiKey = () => apiKey;
function ownerHeader() {
  if (apiKey) return { Authorization: `Bearer ${apiKey}` };
  return owner ? { "X-Owner": owner } : {};
}

/** Turn any error body into one readable line (handles FastAPI's 422 list of {loc, msg}). */
export function errorMessage(body, status) {
  if (body == null || body === "") return `HTTP ${status}`;
  if (typeof body === "string") return body;
  // OpenAI-style envelope {"error": {"message": ...}} first: it carries the fullest message.
  if (typeof body.error?.message === "string") return body.error.message;
  const d = body.detail ?? body.error ?? body.message ?? body;
  if (typeof d === "string") return d;
  if (Array.isArray(d)) {
    return d.map((e) => {
      if (typeof e !== "object" || e === null) return String(e);
      const loc = Array.isArray(e.loc) ? e.loc.filter((p) => p !== "body").join(".") : "";
      return (loc ? loc + ": " : "") + (e.msg ?? JSON.stringify(e));
    }).join("; ");
  }
  if (typeof d === "object") return d.message ?? d.msg ?? JSON.stringify(d);
  return String(d);
}

/** A 401 means this server wants an API key (or another one): tell the page once per answer. */
function noteAuth(res, message) {
  if (res.status === 401) window.dispatchEvent(new CustomEvent("dnc-auth-required", { detail: message }));
}

async function readBody(res) {
  const text = await res.text();
  try { return text ? JSON.parse(text) : null; } catch { return text; }
}

/** fetch + JSON; throws ApiError with the server's message on any non-2xx status. */
export async function request(method, path, body) {
  const opts = { method, headers: { Accept: "application/json", ...ownerHeader() } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(apiUrl(path), opts);
  } catch (e) {
    throw new ApiError(0, `network error: ${e.message}`);
  }
  const data = await readBody(res);
  if (!res.ok) {
    const message = errorMessage(data, res.status);
    noteAuth(res, message);
    throw new ApiError(res.status, message);
  }
  return data;
}

export const getJSON = (path) => request("GET", path);
export const postJSON = (path, body = {}) => request("POST", path, body);

/** Accept a bare list or an object wrapping one (`{states: [...]}`, `{items: [...]}`, ...). */
export function asList(data, ...keys) {
  if (Array.isArray(data)) return data;
  if (data && typeof data === "object") {
    for (const k of [...keys, "items", "data", "results"]) if (Array.isArray(data[k])) return data[k];
  }
  return [];
}

/** Parse one SSE `data:` payload: JSON object, `[DONE]`, or plain text treated as a token. */
export function parseSSEData(payload) {
  if (payload === "[DONE]") return { done: true };
  try {
    const v = JSON.parse(payload);
    if (v && typeof v === "object") return v;
    return { token: String(v) };
  } catch {
    return { token: payload };
  }
}

/** Token text of one streamed event, whatever the server calls it (incl. OpenAI-style chunks). */
export function tokenText(ev) {
  if (typeof ev.token === "string") return ev.token;
  if (typeof ev.text === "string" && !ev.done) return ev.text;
  if (typeof ev.delta === "string") return ev.delta;
  const c = ev.choices?.[0];
  return c?.text ?? c?.delta?.content ?? "";
}

/**
 * POST /v1/generate with stream=true; calls onEvent(ev) for every SSE event. Resolves with the
 * final event (`done`) or null. A JSON (non-streamed) reply becomes one event carrying its text.
 */
export async function streamGenerate(body, onEvent, signal) {
  let res;
  try {
    res = await fetch(apiUrl("/v1/generate"), {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...ownerHeader() },
      body: JSON.stringify({ ...body, stream: true }),
      signal,
    });
  } catch (e) {
    throw new ApiError(0, `network error: ${e.message}`);
  }
  if (!res.ok) {
    const message = errorMessage(await readBody(res), res.status);
    noteAuth(res, message);
    throw new ApiError(res.status, message);
  }
  if (!(res.headers.get("content-type") || "").includes("text/event-stream")) {
    const data = await readBody(res);
    const ev = { token: data?.text ?? data?.completion ?? "", ...data, done: true };
    onEvent(ev);
    return ev;
  }
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "", final = null;
  const flush = (block) => {
    const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
      .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
    if (!data) return;
    const ev = parseSSEData(data);
    if (ev.error) throw new ApiError(ev.status ?? 500, errorMessage(ev, 500));
    onEvent(ev);
    if (ev.done) final = ev;
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let i;
    while ((i = buf.search(/\r?\n\r?\n/)) >= 0) {
      const m = buf.slice(i).match(/^\r?\n\r?\n/)[0];
      flush(buf.slice(0, i));
      buf = buf.slice(i + m.length);
    }
  }
  if (buf.trim()) flush(buf);
  return final;
}

/**
 * Open a WebSocket; with a key, its first message is `{"type": "auth", "key"}` (browsers cannot set
 * headers on a WebSocket). The server answers `{"type": "auth", "ok": true, "owner"}` or closes with 4401.
 */
export function openSocket(path) {
  const ws = new WebSocket(wsUrl(path));
  if (apiKey) {
    const key = apiKey;
    ws.addEventListener("open", () => ws.send(JSON.stringify({ type: "auth", key })), { once: true });
  }
  return ws;
}

/** WebSocket URL for a path, ws:// or wss:// to match the page. */
export function wsUrl(path) {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}${apiUrl(path)}`;
}
