"""Research/introspection computations on the real model (no Ray: unit-testable).

Each public function takes the model, the token ids (and optionally a session's state to start
from) and returns a JSON-ready dict. They run in the Generator's model thread; the registry that
names them as endpoints is :mod:`serve.research`.
Shapes in comments: T tokens, V vocab, H heads, S slots, L levels (3).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from .modeling import kv_cache_bytes, levels_of, state_from_bytes, state_to_bytes

LEVEL_NAMES = ("L0", "L1", "L2")


# --------------------------------------------------------------------------- helpers
def token_text(i: int) -> str:
    """Display form of one byte token: printable ASCII as is, other bytes as \\xNN, specials by name."""
    from dnc.tokenizer import BYTE_VOCAB, SPECIAL_TOKENS

    if i >= BYTE_VOCAB:
        return SPECIAL_TOKENS[i - BYTE_VOCAB] if i - BYTE_VOCAB < len(SPECIAL_TOKENS) else f"<{i}>"
    c = chr(i)
    return c if 32 <= i < 127 or c in "\n\t" else f"\\x{i:02x}"


def _copy_state(state, model):
    return state_from_bytes(state_to_bytes(state), model) if state is not None else model.init_state(1)


def run_segments(model, ids: list[int], state=None, trace: bool = True, grad: bool = False):
    """Run ``ids`` through the model in chunks aligned to its segments, keeping every chunk's trace
    (``model(..., trace=True)`` keeps only the last chunk's). Returns (logits [T, V], traces, state,
    metrics) where ``traces[layer]`` maps each trace key to a list of per-chunk entries."""
    cfg = model.config
    state = state if state is not None else model.init_state(1)
    x = torch.tensor([ids], device=model.device)
    logits, traces, metrics = [], [dict() for _ in range(cfg.n_layers)], {}
    t0 = 0
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        while t0 < len(ids):
            n = min(len(ids) - t0, cfg.segment_len - state.seg_pos)
            out = model(x[:, t0:t0 + n], state=state, trace=trace)
            logits.append(out.logits[0])
            for i, tr in enumerate(out.trace or []):
                for k, v in tr.items():
                    traces[i].setdefault(k, []).append((t0, n, v))
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v if k in ("mem/compressions", "mem/evictions") else v
            t0 += n
    return torch.cat(logits, 0), traces, state, metrics


def _per_token(traces_layer: dict, key: str, total: int, width: int | None = None) -> torch.Tensor:
    """Concatenate a per-token trace entry ([1, t] or [1, t, w]) over chunks; zeros where absent."""
    shape = (total,) if width is None else (total, width)
    out = torch.zeros(shape)
    for t0, n, v in traces_layer.get(key, []):
        out[t0:t0 + n] = v[0].detach().float().cpu()
    return out


def token_losses(logits: torch.Tensor, ids: list[int]) -> list[float | None]:
    """Loss of each token given its prefix; the first token has none."""
    if len(ids) < 2:
        return [None] * len(ids)
    tgt = torch.tensor(ids[1:], device=logits.device)
    ce = F.cross_entropy(logits[:-1].float(), tgt, reduction="none")
    return [None] + [round(float(v), 5) for v in ce]


def _memory_layers(model) -> list[int]:
    return list(model.config.memory_layer_ids)


# --------------------------------------------------------------------------- endpoints
def analyze_text(model, ids: list[int], state=None, top_slots: int = 4) -> dict[str, Any]:
    """Per-token loss and memory reads (level mass and the top slots read, per memory layer)."""
    logits, traces, state, metrics = run_segments(model, ids, state)
    T = len(ids)
    losses = token_losses(logits, ids)
    finite = [v for v in losses if v is not None]
    mem_layers = _memory_layers(model)
    reads, mass_avg = [], torch.zeros(T, 3)
    for li in mem_layers:
        mass = _per_token(traces[li], "mem_level_mass", T, 3)  # [T, 3]
        mass_avg += mass / max(1, len(mem_layers))
        top: list[list[dict[str, Any]]] = [[] for _ in range(T)]
        for t0, n, (idx, w, lvl) in traces[li].get("mem_top_slots", []):
            k = min(top_slots, idx.shape[-1])
            for j in range(n):
                top[t0 + j] = [{"slot": int(idx[0, j, q]), "level": int(lvl[0, j, q]), "weight": round(float(w[0, j, q]), 5)}
                               for q in range(k)]
        reads.append({"layer": li, "level_mass_mean": [round(float(v), 5) for v in mass.mean(0)],
                      "top_slots": top})
    return {
        "tokens": [token_text(i) for i in ids], "token_ids": ids, "loss": losses,
        "mean_loss": sum(finite) / len(finite) if finite else None,
        "perplexity": math.exp(min(50.0, sum(finite) / len(finite))) if finite else None,
        "memory_read_mass": [[round(float(v), 5) for v in row] for row in mass_avg],
        "memory_reads": reads, "metrics": metrics, "state": state.summary(),
    }


def gradient_analysis(model, ids: list[int], state=None) -> dict[str, Any]:
    """Per-layer gradient norms of the LM loss on ``ids`` from a real backward pass (parameters'
    ``.grad`` are left untouched: ``torch.autograd.grad``)."""
    if len(ids) < 2:
        raise ValueError("text must have at least 2 tokens")
    logits, _, _, _ = run_segments(model, ids, state, trace=False, grad=True)
    loss = F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:], device=logits.device))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    groups: dict[str, dict[str, float]] = {}
    components: dict[str, dict[str, float]] = {}
    for (name, p), g in zip(named, grads):
        parts = name.split(".")
        group = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        gsq = float(g.float().pow(2).sum()) if g is not None else 0.0
        d = groups.setdefault(group, {"grad_sq": 0.0, "param_sq": 0.0, "params": 0})
        d["grad_sq"] += gsq
        d["param_sq"] += float(p.detach().float().pow(2).sum())
        d["params"] += p.numel()
        if parts[0] == "blocks" and len(parts) > 2:
            comp = f"{parts[0]}.{parts[1]}.{parts[2].removesuffix('_norm')}"
            components.setdefault(comp, {"grad_sq": 0.0})["grad_sq"] += gsq
    total = math.sqrt(sum(d["grad_sq"] for d in groups.values()))
    layers = [{"name": k, "grad_norm": math.sqrt(d["grad_sq"]), "param_norm": math.sqrt(d["param_sq"]),
               "update_ratio": math.sqrt(d["grad_sq"]) / max(1e-12, math.sqrt(d["param_sq"])),
               "params": d["params"]} for k, d in groups.items()]
    return {"loss": float(loss.detach()), "total_grad_norm": total, "layers": layers,
            "components": {k: math.sqrt(v["grad_sq"]) for k, v in components.items()}, "tokens": len(ids)}


def state_evolution(model, ids: list[int], state=None, segment_len: int | None = None) -> dict[str, Any]:
    """The bank after each step of ``segment_len`` tokens (default: the model's segment)."""
    step_len = segment_len or model.config.segment_len
    state = state if state is not None else model.init_state(1)
    steps = []
    with torch.no_grad():
        for k, t0 in enumerate(range(0, len(ids), step_len)):
            chunk = ids[t0:t0 + step_len]
            tgt = torch.tensor([chunk[1:] + [-100]], device=model.device)
            t = time.perf_counter()
            out = model(torch.tensor([chunk], device=model.device), targets=tgt if len(chunk) > 1 else None,
                        state=state)
            summ = state.summary()
            steps.append({"step": k, "tokens_seen": state.tokens_seen, "segments": summ["segments"],
                          "levels": levels_of(summ), "bank_bytes": summ["bank_bytes"],
                          "loss": float(out.lm_loss) if out.lm_loss is not None else None,
                          "metrics": out.metrics, "ms": (time.perf_counter() - t) * 1e3})
    return {"segment_len": step_len, "steps": steps, "final": state.summary()}


def attention_analysis(model, ids: list[int], state=None, max_matrix: int = 64) -> dict[str, Any]:
    """Local attention of the last full segment (per head entropy and mean distance, head-mean matrix)
    and memory attention by level (mean mass on L0/L1/L2 and on the null slot), per layer."""
    logits, traces, state, _ = run_segments(model, ids, state)
    T = len(ids)
    layers = []
    for li, tr in enumerate(traces):
        entry: dict[str, Any] = {"layer": li, "local": None, "memory": None}
        if tr.get("local_attn"):  # the last full segment (the final chunk may be a few tokens)
            t0, n, probs = max(reversed(tr["local_attn"]), key=lambda c: c[1])
            p = probs[0].float()                                            # [H, t, p+t]
            past = p.shape[-1] - n
            qpos = torch.arange(n)[:, None] + past
            kpos = torch.arange(p.shape[-1])[None]
            dist = (qpos - kpos).clamp_min(0).float()                       # [t, p+t]
            ent = -(p.clamp_min(1e-12).log() * p).sum(-1)                   # [H, t]
            heads = [{"head": h, "entropy": float(ent[h].mean()), "mean_distance": float((p[h] * dist).sum(-1).mean())}
                     for h in range(p.shape[0])]
            mean = p.mean(0)
            m = min(max_matrix, n)
            entry["local"] = {"heads": heads, "segment_tokens": [token_text(i) for i in ids[t0:t0 + n]][-m:] if m else [],
                              "matrix": [[round(float(v), 4) for v in row] for row in mean[-m:, -m:]] if m else []}
        if li in _memory_layers(model):
            mass = _per_token(tr, "mem_level_mass", T, 3)
            null = 1.0 - mass.sum(-1)
            entry["memory"] = {"level_mass": dict(zip(LEVEL_NAMES, (round(float(v), 5) for v in mass.mean(0)))),
                               "null_mass": float(null.mean()),
                               "per_token": [[round(float(v), 4) for v in row] for row in mass]}
        layers.append(entry)
    return {"tokens": len(ids), "layers": layers, "state": state.summary()}


def information_flow(model, ids: list[int], state=None) -> dict[str, Any]:
    """Share of each layer's residual update that comes from the memory read vs local attention
    (norms of the updates, from the trace), per layer and per token."""
    _, traces, state, _ = run_segments(model, ids, state)
    T = len(ids)
    layers = []
    for li, tr in enumerate(traces):
        a, m, f = (_per_token(tr, k, T) for k in ("attn_update_norm", "mem_update_norm", "ffn_update_norm"))
        am = (a + m).clamp_min(1e-12)
        layers.append({"layer": li, "has_memory": li in _memory_layers(model),
                       "attn_norm": float(a.mean()), "mem_norm": float(m.mean()), "ffn_norm": float(f.mean()),
                       "memory_share": float((m / am).mean()), "local_share": float((a / am).mean()),
                       "memory_share_of_total": float((m / (a + m + f).clamp_min(1e-12)).mean()),
                       "per_token_memory_share": [round(float(v), 4) for v in m / am]})
    return {"tokens": len(ids), "layers": layers, "state": state.summary()}


def efficiency_metrics(model, context_tokens: int, new_tokens: int) -> dict[str, Any]:
    """Throughput measured now, and memory: the bank + local cache vs the KV cache a plain
    Transformer would hold for the same context."""
    text = b"The quick brown fox jumps over the lazy dog. "
    ids = [text[i % len(text)] for i in range(context_tokens)]
    state = model.init_state(1)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        t = time.perf_counter()
        model(torch.tensor([ids], device=model.device), state=state, last_logits_only=True)
        sync()
        prefill = time.perf_counter() - t
    t = time.perf_counter()
    out = model.generate(ids[-1:], state=state, max_new_tokens=new_tokens, temperature=0.0)
    sync()
    decode = time.perf_counter() - t
    ctx = state.tokens_seen
    bank, cache = state.nbytes(), state.cache_nbytes()
    elem = next(model.parameters()).element_size()
    base = kv_cache_bytes(model.config, ctx, elem)
    return {"device": str(model.device), "context_tokens": ctx, "new_tokens": len(out),
            "prefill_tokens_per_s": context_tokens / max(prefill, 1e-9),
            "decode_tokens_per_s": len(out) / max(decode, 1e-9),
            "decode_ms_per_token": decode * 1e3 / max(1, len(out)),
            "bank_bytes": bank, "local_cache_bytes": cache, "state_bytes": bank + cache,
            "baseline_kv_cache_bytes": base, "state_vs_kv_ratio": (bank + cache) / max(1, base),
            "bank_capacity_slots": model.config.bank_slots * len(_memory_layers(model)),
            "levels": levels_of(state.summary())}


def _slot_matrix(state) -> tuple[torch.Tensor, list[int], list[int], list[int]]:
    """Valid slot keys of every bank as rows [N, H*Dh], with their layer, level and index."""
    rows, layers, levels, index = [], [], [], []
    for li, bank in state.banks():
        for lv, level in enumerate(bank.levels):
            if level.n == 0:
                continue
            keys = level.keys[0].permute(1, 0, 2).reshape(level.n, -1).float().cpu()  # [n, H*Dh]
            valid = level.valid[0].cpu()
            for j in torch.nonzero(valid).flatten().tolist():
                rows.append(keys[j])
                layers.append(li)
                levels.append(lv)
                index.append(j)
    if not rows:
        return torch.zeros(0, 0), [], [], []
    return torch.stack(rows), layers, levels, index


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> tuple[torch.Tensor, float]:
    """k-means++ init + Lloyd iterations. x: [N, D] -> (labels [N], inertia)."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    centers = [x[int(torch.randint(n, (1,), generator=g))]]
    for _ in range(1, k):
        d = torch.cdist(x, torch.stack(centers)).min(1).values.pow(2)
        if float(d.sum()) <= 0:
            break
        centers.append(x[int(torch.multinomial(d / d.sum(), 1, generator=g))])
    c = torch.stack(centers)
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        labels_new = torch.cdist(x, c).argmin(1)
        for j in range(c.shape[0]):
            members = x[labels_new == j]
            if len(members):
                c[j] = members.mean(0)
        if torch.equal(labels_new, labels):
            break
        labels = labels_new
    inertia = float((x - c[labels]).pow(2).sum())
    return labels, inertia


def state_clustering(state, k: int = 4, max_points: int = 1024) -> dict[str, Any]:
    """Slot keys (normalised) clustered by k-means and projected to 2-D by PCA."""
    x, layers, levels, index = _slot_matrix(state)
    n = x.shape[0]
    if n < 2:
        return {"points": [], "labels": [], "levels": [], "layers": [], "k": 0, "n_points": n,
                "message": "the bank holds fewer than 2 slots: generate with this session (or give a longer text) first"}
    if n > max_points:  # keep an even subsample, deterministic
        keep = torch.linspace(0, n - 1, max_points).round().long().tolist()
        x = x[keep]
        layers, levels, index = ([v[i] for i in keep] for v in (layers, levels, index))
        n = max_points
    x = F.normalize(x, dim=-1)
    k = min(k, n)
    labels, inertia = kmeans(x, k)
    xc = x - x.mean(0, keepdim=True)
    _, s, v = torch.linalg.svd(xc, full_matrices=False)
    coords = xc @ v[:2].T if v.shape[0] >= 2 else torch.cat([xc @ v[:1].T, torch.zeros(n, 1)], 1)
    var = s.pow(2)
    explained = (var[:2] / var.sum().clamp_min(1e-12)).tolist()
    sizes = torch.bincount(labels, minlength=k).tolist()
    return {"points": [[round(float(a), 5), round(float(b), 5)] for a, b in coords], "labels": labels.tolist(),
            "levels": levels, "layers": layers, "slot_index": index, "k": k, "cluster_sizes": sizes,
            "inertia": inertia, "explained_variance": explained, "n_points": n}


def slot_cards(model, state, per_level: int = 32) -> dict[str, Any]:
    """Every valid slot's bookkeeping, per level over all memory layers, the ``per_level`` most salient
    first (the rest are counted, not listed: the response stays bounded).

    Per slot: layer, level, index (position in its level), salience (EMA of its attention share, 1.0 =
    uniform), age (segments since written), access (segments with an above-uniform share),
    last_access (bank clock, a segment index) and, when the model learns one
    (``DNCConfig.write_importance`` > 0), importance: the head mean of ``MemoryRead.slot_importance``
    of the slot's key/value, the score the keep decisions add times ``write_importance``."""
    levels: list[list[dict[str, Any]]] = [[] for _ in LEVEL_NAMES]
    has_importance = False
    for li, bank in state.banks():
        mem = model.blocks[li].mem
        imp = None
        if mem is not None and mem.importance_w is not None and sum(bank.sizes):
            with torch.no_grad():
                imp = mem.slot_importance(bank.kv)[0].mean(0).cpu()                   # [S] packed levels
            has_importance = True
        off = 0
        for lv, level in enumerate(bank.levels):
            valid = level.valid[0].cpu()
            meta = {f: getattr(level, f)[0].float().cpu() for f in ("salience", "age", "access", "last_access")}
            for j in torch.nonzero(valid).flatten().tolist():
                card = {"layer": li, "level": lv, "index": j, "salience": float(meta["salience"][j]),
                        "age": float(meta["age"][j]), "access": float(meta["access"][j]),
                        "last_access": float(meta["last_access"][j])}
                if imp is not None:
                    card["importance"] = float(imp[off + j])
                levels[lv].append(card)
            off += level.n
    summ = state.summary()
    cap = levels_of(summ)
    out_levels = []
    for lv, cards in enumerate(levels):
        cards.sort(key=lambda c: (-c["salience"], c["layer"], c["index"]))
        shown = cards[:per_level]
        out_levels.append({"level": lv, "name": LEVEL_NAMES[lv], "valid": len(cards), "capacity": cap[lv]["capacity"],
                           "shown": len(shown), "not_shown": len(cards) - len(shown), "slots": shown})
    return {"levels": out_levels, "per_level": per_level, "has_importance": has_importance,
            "total_slots": sum(len(c) for c in levels), "tokens_seen": summ["tokens_seen"], "segments": summ["segments"],
            "clock": max((b.clock for _, b in state.banks()), default=0),
            "fields": {"salience": "EMA of the slot's attention share (1.0 = uniform)",
                       "age": "segments since the content was written", "access": "segments with an above-uniform share",
                       "last_access": "bank clock (segment index) of the last access",
                       "importance": "learned write importance (head mean), present when the model has one"}}


def explain_decision(model, ids: list[int], state=None, position: int = -1, target_id: int | None = None,
                     top_k: int = 8) -> dict[str, Any]:
    """Which input tokens and memory slots most raised the logit of ``target_id`` for the token
    after ``position``.

    * tokens: gradient x input on the token embeddings over the whole text (tokens beyond the
      model's truncated-BPTT horizon get no gradient through memory: their score is 0);
    * memory slots: gradient x (key, value) on the bank the decision's segment reads, then each of
      the top slots is ablated (masked out) and the logit recomputed: ``ablation_delta`` is the drop.
    """
    cfg = model.config
    T = len(ids)
    p = position if position >= 0 else T + position
    if not 0 <= p < T:
        raise ValueError(f"position {position} is outside the text's {T} tokens")
    ids = ids[:p + 1]
    start = _copy_state(state, model)
    offset = start.seg_pos
    seg_start = max(0, ((offset + p) // cfg.segment_len) * cfg.segment_len - offset)

    # 1) tokens: one pass over the text with gradients, embeddings captured per chunk
    emb = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
    captured: list[torch.Tensor] = []

    def hook(_m, _i, out):
        out.retain_grad()
        captured.append(out)
    h = emb.register_forward_hook(hook)
    try:
        all_logits, _, _, _ = run_segments(model, ids, _copy_state(start, model), trace=False, grad=True)
        logits = all_logits[-1].float()
        tgt = int(logits.argmax()) if target_id is None else int(target_id)
        if not 0 <= tgt < logits.numel():
            raise ValueError(f"target_id must be in [0, {logits.numel()})")
        logits[tgt].backward()
    finally:
        h.remove()
    probs = logits.detach().softmax(-1)
    top_pred = probs.topk(5)
    tok_scores = torch.cat([(e.grad[0] * e.detach()[0]).sum(-1).cpu() if e.grad is not None
                            else torch.zeros(e.shape[1]) for e in captured])                 # [T]
    order = tok_scores.abs().argsort(descending=True)[:top_k].tolist()
    tokens = [{"position": j, "token": token_text(ids[j]), "score": float(tok_scores[j])} for j in order]

    # 2) memory slots: the bank the decision's segment reads (constant within a segment)
    base = start
    if seg_start:
        _, _, base, _ = run_segments(model, ids[:seg_start], _copy_state(start, model), trace=False)
    seg_ids = ids[seg_start:]
    work = _copy_state(base, model)
    # The bank stores all levels' keys and values packed in one leaf tensor kv [2, B, H, S, Dh]
    # (levels in order along S); per-level objects are views of it, so the gradient is taken there.
    leaves = []  # (layer, kv leaf, level sizes, per-level (valid, age, salience) copies)
    for li, bank in work.banks():
        if sum(bank.sizes):
            kv = bank.kv.detach().requires_grad_(True)
            bank.kv = kv
            leaves.append((li, kv, list(bank.sizes),
                           [(lvl.valid.clone(), lvl.age.clone(), lvl.salience.clone()) for lvl in bank.levels]))
    with torch.enable_grad():
        seg_logits = model(torch.tensor([seg_ids], device=model.device), state=work).logits[0, -1].float()
        if leaves:
            seg_logits[tgt].backward()
    # memory slots: gradient x (key, value), then ablation of the top ones
    slots = []
    for li, kv, sizes, meta in leaves:
        if kv.grad is None:
            continue
        sc = (kv.grad * kv.detach()).sum((0, 2, 4))[0]  # [S]: keys and values, all heads and dims
        off = 0
        for lv, (n, (valid, age, sal)) in enumerate(zip(sizes, meta)):
            for j in torch.nonzero(valid[0]).flatten().tolist():
                slots.append({"layer": li, "level": lv, "slot": j, "grad_score": float(sc[off + j]),
                              "age": float(age[0, j]), "salience": float(sal[0, j])})
            off += n
    slots.sort(key=lambda s: abs(s["grad_score"]), reverse=True)
    slots = slots[:top_k]
    base_logit = float(seg_logits[tgt].detach())
    with torch.no_grad():
        for s in slots:
            abl = _copy_state(base, model)
            bank = dict(abl.banks())[s["layer"]]
            bank.levels[s["level"]].valid[0, s["slot"]] = False
            lg = model(torch.tensor([seg_ids], device=model.device), state=abl, last_logits_only=True).logits[0, -1]
            s["ablation_delta"] = base_logit - float(lg.float()[tgt])
    return {"position": p, "segment_start": seg_start,
            "context": "".join(token_text(i) for i in ids[max(0, p - 40):p + 1]),
            "target": {"id": tgt, "text": token_text(tgt), "logit": base_logit, "prob": float(probs[tgt])},
            "top_predictions": [{"id": int(i), "text": token_text(int(i)), "prob": float(v)}
                                for v, i in zip(top_pred.values, top_pred.indices)],
            "input_attribution": tokens, "memory_attribution": slots,
            "memory_slots_available": sum(int(l.valid.sum()) for _, b in base.banks() for l in b.levels),
            "method": "tokens: gradient x input embedding (0 beyond the truncated-BPTT horizon); memory slots: "
                      "gradient x key/value, then ablation (slot masked out; ablation_delta = logit drop)"}


def probe(model, ids: list[int]) -> dict[str, Any]:
    """A forward pass on a fixed text: loss and the model's memory metrics (for /research/metrics)."""
    with torch.no_grad():
        t = time.perf_counter()
        x = torch.tensor([ids], device=model.device)
        out = model(x[:, :-1], targets=x[:, 1:])
        ms = (time.perf_counter() - t) * 1e3
    return {"loss": float(out.lm_loss), "forward_ms": ms, "tokens": len(ids) - 1, **out.metrics}
