// Interactive probe: chat with a session. Tokens stream in (POST /v1/generate, SSE); then the turn
// is re-read by /research/analyze-text and each generated token shows the memory slots it read.
import { asList, postJSON, streamGenerate, tokenText } from "../api.js";
import { $, byteToken, plural, showError, store } from "../util.js";
import { readsText } from "./attention.js";
import { refreshStates, selectState } from "./inspector.js";

let controller = null;

function addTurn(role, text) {
  const d = document.createElement("div");
  d.className = `turn ${role}`;
  d.dataset.testid = `turn-${role}`;
  d.textContent = text;
  $("chat-log").appendChild(d);
  return d;
}

async function onSend(ev) {
  ev.preventDefault();
  const out = $("gen-output"), meta = $("gen-meta");
  showError($("gen-error"), null);
  const sid = $("state-id").value.trim(), seed = $("seed").value.trim();
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
  $("probe-reads-box").replaceChildren();
  meta.textContent = "streaming…";
  $("generate-btn").disabled = true;
  $("stop-btn").disabled = false;
  controller = new AbortController();
  const t0 = performance.now();
  let n = 0, text = "";
  try {
    const final = await streamGenerate(body, (e) => {
      const t = tokenText(e);
      if (t && !e.done) { text += t; n++; out.textContent = text; }
    }, controller.signal);
    const secs = (performance.now() - t0) / 1000;
    const nTok = final?.tokens ?? n;
    meta.textContent = `${plural(nTok, "token")} in ${secs.toFixed(2)} s` + (final?.finish_reason ? ` · ${final.finish_reason}` : "");
    // The finished turn joins the conversation; the streaming box empties for the next one.
    addTurn("user", body.prompt);
    addTurn("model", text || "(no text: the model ended its turn at once)");
    out.textContent = "";
    if (sid) { await refreshStates(); await selectState(sid, "generated"); }
    if ($("probe-reads").checked && text) await showReads(body.prompt, text);
  } catch (e) {
    meta.textContent = e.name === "AbortError" ? "stopped" : "";
    if (e.name !== "AbortError") showError($("gen-error"), e);
  } finally {
    $("generate-btn").disabled = false;
    $("stop-btn").disabled = true;
    controller = null;
  }
}

/** Re-read prompt + answer on an empty memory and show, per generated token, the slots it read. */
async function showReads(prompt, answer) {
  const box = $("probe-reads-box");
  box.textContent = "reading the slots each token used…";
  const offset = new TextEncoder().encode(prompt).length;
  let an;
  try {
    an = await postJSON("/research/analyze-text", { text: prompt + answer });
  } catch (e) {
    box.textContent = `slot reads unavailable: ${e.message}`;
    return;
  }
  const reads = asList(an.memory_reads);
  box.replaceChildren();
  const head = document.createElement("p");
  head.className = "muted";
  head.textContent = "The answer token by token, as the model re-reads this turn on an empty memory (bytes that are not " +
    "valid UTF-8 come back as U+FFFD): hover or focus a token for the memory slots it read.";
  const toks = document.createElement("div");
  toks.className = "tokens";
  const detail = document.createElement("div");
  detail.className = "reads-detail";
  detail.dataset.testid = "probe-token-reads";
  an.tokens.slice(offset).forEach((t, k) => {
    const i = offset + k;
    const s = document.createElement("span");
    s.className = "tok probe-tok";
    s.tabIndex = 0;
    byteToken(s, t);
    const lines = readsText(reads, i);
    s.title = lines.join("\n");
    const show = () => { detail.textContent = `token ${k} ${JSON.stringify(t)} read — ${lines.join(" · ")}`; };
    s.addEventListener("mouseenter", show);
    s.addEventListener("focus", show);
    toks.appendChild(s);
  });
  box.append(head, toks, detail);
}

export function initProbe() {
  $("generate-form").addEventListener("submit", onSend);
  $("stop-btn").addEventListener("click", () => controller?.abort());
  $("state-id").addEventListener("input", (e) => {
    const v = e.target.value.trim();
    e.target.setCustomValidity(!v || /^[A-Za-z0-9_-]{1,64}$/.test(v) ? "" : "letters, digits, _ and -, up to 64");
  });
  store.addEventListener("identity", () => { $("chat-log").replaceChildren(); $("gen-output").textContent = ""; $("probe-reads-box").replaceChildren(); });
}
