"""The training segment step as one static-shape function, compiled once (``train.compile: segment``).

A training forward over T tokens is T / segment_len segment steps, each ~1,000 small ops launched
from Python (blocks, memory reads, the bank's write/compress/evict bookkeeping) plus their
backward. On a GPU the host cannot launch them as fast as the kernels run (issue 11: 27% busy at
B=2 x 32k). :func:`fixed_segment_step` computes one whole segment and its commit as a pure function
of tensors over a fixed-capacity bank (:mod:`dnc.memory.fixed_bank`), so ``torch.compile`` makes one
graph (forward and backward) that serves every segment: fresh bank, filling, full, compressing and
evicting, with no graph break and no recompile.

:class:`CompiledTrainSegments` is a *step runner* (``DNC.step_runner``): ``DNC.forward`` hands it
every whole segment of a training forward; it pads the state's banks to their capacity on first
use, runs the compiled step, and does the host bookkeeping (fill counts, clocks, BPTT cuts) that
the eager commit does. Apply it with :func:`dnc.parallel.compile_segments`. Everything else (eval,
partial segments, generation) runs as before, or through the runner it replaced.

State tensors that carry gradients across segments (bank keys/values, the token-shift inputs, the
carried KV window) always enter the graph requiring grad: at the first segment and after a BPTT
cut they are fresh leaves, so one graph serves all segments (the backward then also computes
gradients for those leaves, which the eager path skips).

Shapes and recompiles: the curriculum changes the batch size per stage (``batch_tokens`` / the
stage's longest sample: 128, 32, 16, 8 rows for the small preset's stages), and a static graph per
batch size costs a compile (seconds on a CPU, up to a minute on a GPU) at every stage change. With
``dynamic_batch`` every batch dim of the step's inputs is marked dynamic, so one graph can serve
every batch of two rows or more (a batch of one row gets its own: dynamo specialises sizes 0 and 1);
``aot_eager`` keeps one graph, inductor on CPU still specialised each batch size (off by default). Other shapes never change during training: the segment length, bank capacities and carried
window are fixed, partial segments and eval run eagerly. Each new graph is logged with its compile
seconds (``graphs``); past ``max_graphs`` a new shape runs the uncompiled step with a warning rather
than compiling again or falling back silently.
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any, Callable

import torch
import torch._dynamo
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dnc.attention import KVCache
from dnc.layers import rope_table_full
from dnc.memory import StateBank
from dnc.memory.fixed_bank import FixedLayout, apply_read_mass_fixed, drop_flags, pad_bank, write_fixed


@functools.lru_cache(maxsize=64)
def _shift_tables(shift: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``layers.rope_shift``'s full-width tables for moving keys back by ``shift`` positions
    ([Dh] float32 each; made once per shift and device)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = -float(shift) * freqs
    cos, sin = ang.cos().float(), ang.sin().float()
    return torch.cat([cos, cos]).to(device), torch.cat([-sin, sin]).to(device)


@functools.lru_cache(maxsize=64)
def _sample_positions(first: int, n: int, stride: int, device: torch.device) -> torch.Tensor:
    """LongTensor of positions first, first+stride, ... < n whose reads feed salience (made once)."""
    return torch.arange(first, n, stride, device=device)


def _bank(kv: torch.Tensor, meta: torch.Tensor, valid: torch.Tensor, layout: FixedLayout) -> StateBank:
    """A StateBank over fixed-capacity tensors, for the read path (``MemoryRead.build_view``)."""
    bank = StateBank.__new__(StateBank)
    bank.kv, bank.meta, bank.valid, bank.sizes = kv, meta, valid, list(layout.capacities)
    return bank


def fixed_segment_step(model, layout: FixedLayout | None, tokens: torch.Tensor, flags: torch.Tensor | None,
                       rope: tuple, sample: torch.Tensor, caches: tuple, prev_xs: tuple, banks: tuple,
                       prev_writes: tuple, want_recon: bool) -> tuple:
    """One whole segment ``tokens [B, L]`` through every block, then its commit, as a pure function.

    rope: (cos, sin) [L, Dh] of the segment's positions (after the carried window), and the carry's
    shift tables (cos, sin) [Dh] or None; sample: LongTensor of the positions whose reads feed
    salience; caches: per block (k, v) [B, H, w, Dh] (the carried window); prev_xs: per block
    [B, 1, D]; banks: per memory layer (kv, meta, valid, alpha, clock_t) in the fixed layout;
    prev_writes: per memory layer [B, 1, D]; flags: bool [3] (:meth:`FixedLayout.step`).

    Returns (logits [B, L, V], caches, prev_xs, banks, prev_writes (as the inputs, after the
    commit), recon loss 0-d float32)."""
    cfg = model.config
    cos, sin, shift_cos, shift_sin = rope
    x = model.embed(tokens)
    new_caches, new_prev_x, mem_in, masses = [], [], [], []
    self_kvs = []  # per memory layer with self_read: the segment's write slots, which the commit writes
    j = 0
    for blk, (k, v), px in zip(model.blocks, caches, prev_xs):
        view, kw = None, {}
        if blk.mem is not None:
            view = blk.mem.build_view(_bank(banks[j][0], banks[j][1], banks[j][2], layout))
            if blk.self_read:  # a whole segment: no earlier chunk, the first key shifts in prev_write
                kw = {"write_prev": prev_writes[j]}
            j += 1
        args = (x, k, v, cos, sin, view, sample, cfg.mem_topk, px)
        if cfg.grad_checkpointing and model.training and torch.is_grad_enabled():
            x, kk, vv, h, mass, _, px, skv = checkpoint(blk, *args, use_reentrant=False, **kw)
        else:
            x, kk, vv, h, mass, _, px, skv = blk(*args, **kw)
        if skv is not None:
            self_kvs.append(skv)
        # carry the last kv_window keys/values, moved into the next segment's position frame
        # (contiguous, and fresh empties without a window: the next step's inputs have one stride
        # pattern whatever made them, so they never trigger a recompile)
        w = min(cfg.kv_window, kk.shape[2])
        if w:
            kk, vv = kk[:, :, -w:], vv[:, :, -w:].contiguous()
            kk = _rope_apply(kk, shift_cos, shift_sin) if shift_cos is not None else kk.contiguous()
        else:  # in the input's dtype: under bf16 autocast kk is bf16, and a dtype change would recompile
            # (an empty cache is skipped by attention, so its dtype changes no number)
            kk, vv = k.new_zeros(k.shape), v.new_zeros(v.shape)
        new_caches.append((kk, vv))
        new_prev_x.append(px.contiguous())  # one stride pattern whatever made it (no recompile)
        if h is not None:
            mem_in.append(h)
            masses.append(mass)
    h = model.norm(x)
    logits = F.linear(h, model.embed.weight) if model.lm_head is None else model.lm_head(h)
    if not banks:
        return logits, tuple(new_caches), tuple(new_prev_x), (), (), torch.zeros((), device=x.device)

    # the commit: every memory layer's bank written as one bank of L*B rows (as the eager commit does)
    mems = [blk.mem for blk in model.blocks if blk.mem is not None]
    writes, queries, new_prev_w = [], [], []
    for i, (mem, h, hb) in enumerate(zip(mems, mem_in, prev_writes)):
        kv_w = self_kvs[i] if self_kvs else mem.write_kv_packed(h, h_before=hb)[0]
        writes.append(kv_w)
        new_prev_w.append(h[:, -1:].contiguous())
        if want_recon:
            stride = max(1, h.shape[1] // 16)
            queries.append(mem.queries(h[:, stride - 1::stride]).detach())
    n = len(banks)
    kv = torch.cat([bk[0] for bk in banks], 1)
    meta = torch.cat([bk[1] for bk in banks], 1)
    valid = torch.cat([bk[2] for bk in banks], 0)
    alpha = torch.cat([bk[3] for bk in banks], 0)
    clock_t = banks[0][4]
    meta, alpha = apply_read_mass_fixed(meta, valid, alpha, clock_t, torch.cat(masses, 0), cfg.salience_decay)
    imp = [mem.importance_rows(tokens.shape[0]) for mem in mems]
    kv, meta, valid, clock_t, recon = write_fixed(
        kv, meta, valid, alpha, clock_t, torch.cat(writes, 1), flags, layout, compressors=model.compressors,
        policy=model.policy, protect_salient=cfg.protect_salient,
        importance_w=None if imp[0] is None else torch.cat(imp, 0), importance_weight=cfg.write_importance,
        recon_queries=torch.cat(queries, 0) if want_recon else None, recon_groups=n)
    b = tokens.shape[0]
    # each layer's rows as contiguous tensors: a fresh bank's layout, so the next step's inputs have
    # one stride pattern whatever made them (a split view of the stacked rows would recompile)
    new_banks = tuple((kvi.contiguous(), mi.contiguous(), vi, ai, clock_t) for kvi, mi, vi, ai in
                      zip(kv.split(b, 1), meta.split(b, 1), valid.split(b, 0), alpha.split(b, 0)))
    return logits, tuple(new_caches), tuple(new_prev_x), new_banks, tuple(new_prev_w), recon


def _rope_apply(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    from dnc.layers import apply_rope_full

    return apply_rope_full(x, cos2, sin2)


class CompiledTrainSegments:
    """Step runner for training forwards: whole segments through one compiled graph.

    ``backend``/``mode`` go to ``torch.compile`` (``aot_eager`` runs on CPU without a C++ compiler;
    ``compile=False`` runs the same fixed-shape function eagerly, the reference the tests compare).
    ``fallback``: the runner this one replaced (e.g. inference CUDA graphs), used for what this one
    does not take. ``dynamic_batch``: one graph for every batch size >= 2 (batch dims marked
    dynamic) rather than one per batch size; ``max_graphs``: shape keys (:meth:`shape_key`) compiled
    at most, later ones run uncompiled with a warning. Counters: ``compiled_steps`` (segments through
    the graph), ``eager_steps`` (segments through the uncompiled function: the first of a run with a
    carried KV window, whose cache is still empty, and shapes past ``max_graphs``); ``graphs``: one
    dict per compile dynamo made (``key``, ``batch``, ``seconds`` of the call that compiled, ``at_step``
    = compiled_steps then)."""

    def __init__(self, model, *, backend: str = "inductor", mode: str | None = None, compile: bool = True,
                 fallback=None, dynamic_batch: bool = False, max_graphs: int = 8, log: bool = True):
        cfg = model.config
        if cfg.forward_read:
            # the fixed-capacity bank keeps each level padded to its capacity, so L0's last valid
            # slot (whose successor is the segment's first write) is not at a static index
            raise NotImplementedError("forward_read is not supported by the compiled training segment "
                                      "(train.compile: segment) yet; train with train.compile off or forward_read=false")
        self.model = model
        self.fallback = fallback
        self.layout = FixedLayout.for_bank((cfg.l0_slots, cfg.l1_slots, cfg.l2_slots),
                                           cfg.segment_len // cfg.write_pool, cfg.compress_group) if cfg.memory else None
        self.step_fn = (torch.compile(fixed_segment_step, backend=backend, mode=mode, fullgraph=True, dynamic=False)
                        if compile else fixed_segment_step)
        self.compile, self.dynamic_batch, self.max_graphs, self.log = compile, dynamic_batch, max_graphs, log
        self.compiled_steps = 0
        self.eager_steps = 0
        self.graphs: list[dict[str, Any]] = []
        self._keys: set = set()      # shape keys given to the compiled function
        self._refused: set = set()   # shape keys past max_graphs (run uncompiled)

    def clear(self) -> None:
        if self.fallback is not None and hasattr(self.fallback, "clear"):
            self.fallback.clear()

    # ------------------------------------------------------------------ eligibility
    def _mine(self, tokens: torch.Tensor, state) -> bool:
        m = self.model
        mine = (m.training and state.seg_pos == 0 and tokens.shape[1] == m.config.segment_len
                and all(not ls.write_buf and ls.mass is None for ls in state.layers))
        if not mine and _is_fixed(state) and state.seg_pos + tokens.shape[1] >= m.config.segment_len:
            raise RuntimeError("a state this runner padded to fixed capacity can only commit segments through it "
                               "(whole segments in training mode); start a fresh state for anything else")
        return mine

    def eligible(self, tokens: torch.Tensor, state) -> bool:
        return self._mine(tokens, state) or (self.fallback is not None and self.fallback.eligible(tokens, state))

    # ------------------------------------------------------------------ the step
    def step(self, tokens: torch.Tensor, state) -> tuple[torch.Tensor, dict[str, Any]]:
        """One whole segment ``tokens [B, segment_len]`` into ``state`` (updated in place, committed).

        Returns (logits [B, L, V], {"compressed", "evicted", "recon_terms"}) like ``DNC.segment_step``."""
        if not self._mine(tokens, state):
            return self.fallback.step(tokens, state)
        args, host = self.prepare(tokens, state)
        compiled = host["steady"] and self._admit(self.shape_key(tokens.shape[0]))
        if not compiled:
            self.eager_steps += 1
            return self._finish(state, fixed_segment_step(*args), host)
        if self.compile and self.dynamic_batch and tokens.shape[0] >= 2:
            mark_batch_dynamic(args)
        before = _graph_count()
        t0 = time.perf_counter()
        out = self.step_fn(*args)
        if _graph_count() > before:  # dynamo compiled a graph for this call (it was not in its cache)
            self._record_compile(tokens.shape[0], time.perf_counter() - t0)
        self.compiled_steps += 1
        return self._finish(state, out, host)

    # ------------------------------------------------------------------ shapes and compiles
    def shape_key(self, batch: int) -> tuple:
        """What decides whether a call can reuse a graph: the batch size (or "dynamic" for every
        size >= 2 with ``dynamic_batch``), grad mode and the autocast dtype (dynamo guards on both)."""
        b = "dynamic" if (self.dynamic_batch and batch >= 2) else batch
        dev = self.model.embed.weight.device.type
        cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        return (b, torch.is_grad_enabled(), cast)

    def _admit(self, key: tuple) -> bool:
        """Whether a steady segment of shape ``key`` goes through the compiled function: known keys
        and new ones up to ``max_graphs``; a new key past it runs uncompiled, with one warning."""
        return not self.compile or self._admit_bounded(key, lambda n: (
            f"compiled training segment: {n} shape keys compiled already (max_graphs={self.max_graphs}); "
            f"{key} runs uncompiled (slower, not wrong). Keep batch sizes >= 2 with dynamic_batch, or raise max_graphs"))

    def _admit_bounded(self, key: tuple, refusal: Callable[[int], str]) -> bool:
        """Known keys, and new ones while fewer than ``max_graphs`` are held; a new key past it is
        refused with one warning per key (``refusal(keys held)`` is its text)."""
        if key in self._keys:
            return True
        if len(self._keys) >= self.max_graphs:
            if key not in self._refused:
                self._refused.add(key)
                warnings.warn(refusal(len(self._keys)), stacklevel=4)
            return False
        self._keys.add(key)
        return True

    def _record_compile(self, batch: int, seconds: float) -> None:
        rec = {"key": repr(self.shape_key(batch)), "batch": batch, "seconds": round(seconds, 3),
               "at_step": self.compiled_steps}
        self.graphs.append(rec)
        if self.log:
            print(f"[dnc.training] compiled the training segment step for {rec['key']} (batch {batch}) in "
                  f"{seconds:.1f} s (graph {len(self.graphs)})", flush=True)

    def prepare(self, tokens: torch.Tensor, state) -> tuple[tuple, dict[str, Any]]:
        """The arguments of :func:`fixed_segment_step` for the next segment of ``state`` (its banks
        padded to fixed capacity on first use) and the host facts :meth:`step` applies after it.
        ``host["steady"]``: the state has the steady shape (False only for the first segment of a
        run with a carried KV window, whose cache is still empty)."""
        m, cfg = self.model, self.model.config
        dev = tokens.device
        n = tokens.shape[1]
        grad = torch.is_grad_enabled()

        def leaf(t: torch.Tensor) -> torch.Tensor:
            """A state tensor as the graph takes it: requiring grad whenever grad is on."""
            return t if (t.requires_grad or not grad or not t.is_floating_point()) else t.detach().requires_grad_()

        mem_layers = [ls for ls in state.layers if ls.bank is not None]
        flags, new_fill, compressed, evicted = None, None, 0, 0
        if mem_layers:
            if not _is_fixed(state):
                for ls in mem_layers:
                    ls.bank.fill = pad_bank(ls.bank, self.layout)
            flag_t, new_fill, compressed, evicted = self.layout.step(mem_layers[0].bank.fill)
            flags = drop_flags(flag_t, dev)
        b, d = tokens.shape[0], cfg.d_model
        carry = state.layers[0].cache.length
        cos, sin = rope_table_full(carry + n, cfg.head_dim, cfg.rope_theta, dev)
        w = min(cfg.kv_window, carry + n)
        shift = (carry + n) - w
        shift_tabs = _shift_tables(shift, cfg.head_dim, float(cfg.rope_theta), dev) if w and shift else (None, None)
        rope = (cos[carry:], sin[carry:], *shift_tabs)
        stride = max(1, cfg.segment_len // 64)
        sample = _sample_positions(stride - 1, n, stride, dev)  # as the eager path's (seg_pos 0)
        dtype = m.embed.weight.dtype
        zeros = lambda: torch.zeros(b, 1, d, device=dev, dtype=dtype)  # noqa: E731  (= no previous token)
        caches = tuple((leaf(ls.cache.k), leaf(ls.cache.v)) for ls in state.layers)
        prev_xs = tuple(leaf(_canonical(ls.prev_x if ls.prev_x is not None else zeros())) for ls in state.layers)
        banks = tuple((leaf(_canonical(ls.bank.kv)), _canonical(ls.bank.meta), ls.bank.valid, ls.bank.alpha,
                       ls.bank.clock_t) for ls in mem_layers)
        prev_ws = tuple(leaf(_canonical(ls.prev_write if ls.prev_write is not None else zeros())) for ls in mem_layers)
        want_recon = m.training and grad
        tokens = tokens.contiguous()  # a segment's slice of [B, T] rows: one stride for every T (no recompile)
        args = (m, self.layout, tokens, flags, rope, sample, caches, prev_xs, banks, prev_ws, want_recon)
        host = {"steady": carry == cfg.kv_window, "fill": new_fill, "compressed": compressed, "evicted": evicted,
                "want_recon": want_recon, "tokens": n}
        return args, host

    def _finish(self, state, out: tuple, host: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The host side of the commit (``DNC._commit_segment``): point ``state`` at the step's
        outputs, advance counters and clocks, cut BPTT every ``bptt_segments`` segments."""
        cfg = self.model.config
        logits, caches, prev_xs, banks, prev_ws, recon = out
        state.segments += 1
        cut = state.segments % cfg.bptt_segments == 0
        det = (lambda t: t.detach()) if cut else (lambda t: t)  # noqa: E731
        for ls, (k, v), px in zip(state.layers, caches, prev_xs):
            ls.cache = KVCache(det(k), det(v), k.shape[2])
            ls.prev_x = det(px)
            ls.write_buf, ls.mass, ls.view = [], None, None
        mem_layers = [ls for ls in state.layers if ls.bank is not None]
        for ls, (kv, meta, valid, alpha, clock_t), pw in zip(mem_layers, banks, prev_ws):
            bank = ls.bank
            bank.kv, bank.meta, bank.valid, bank.alpha, bank.clock_t = det(kv), meta, valid, alpha, clock_t
            bank.clock += 1
            bank.fill = list(host["fill"])
            bank._group = None
            ls.prev_write = det(pw)
        state.seg_pos = 0
        state.tokens_seen += host["tokens"]
        recon_terms = [recon] if (host["want_recon"] and host["compressed"]) else []
        k = len(mem_layers)
        return logits, {"compressed": host["compressed"] * k, "evicted": host["evicted"] * k, "recon_terms": recon_terms}


def mark_batch_dynamic(args: tuple) -> None:
    """Mark the batch dim of every batched input of :func:`fixed_segment_step` dynamic
    (``torch._dynamo.mark_dynamic``): tokens, caches, prev_xs, prev_writes [B, ...]; bank kv and
    meta [., B, ...], valid and alpha [B, ...]. The rope tables, sample positions, flags and the
    bank clock have no batch dim. ``maybe_mark_dynamic``, not ``mark_dynamic``: inductor on CPU
    (torch 2.13, first batch 2) specialised the batch size, which ``mark_dynamic`` turns into a
    ConstraintViolationError; this way such a backend compiles per batch size again (each compile
    is in ``CompiledTrainSegments.graphs``) instead of stopping the run."""
    mark = torch._dynamo.maybe_mark_dynamic
    _, _, tokens, _, _, _, caches, prev_xs, banks, prev_ws, _ = args
    mark(tokens, 0)
    for k, v in caches:
        mark(k, 0)
        mark(v, 0)
    for t in (*prev_xs, *prev_ws):
        mark(t, 0)
    for kv, meta, valid, alpha, _ in banks:
        mark(kv, 1)
        mark(meta, 1)
        mark(valid, 0)
        mark(alpha, 0)


def _canonical(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides ``torch.empty(t.shape)`` has. A contiguous tensor with a size-1 dim
    can carry any stride there (``h[:, -1:].contiguous()`` of one row keeps the row stride), and
    dynamo guards on strides: with a batch of one row the second segment would recompile. A view
    (no copy) where the strides differ, ``t`` itself otherwise."""
    if not t.is_contiguous():
        return t
    want, acc = [], 1
    for n in reversed(t.shape):
        want.append(acc)
        acc *= max(int(n), 1)
    want = tuple(reversed(want))
    return t if t.stride() == want else t.as_strided(t.shape, want)


def _graph_count() -> int:
    """Graphs dynamo has compiled in this process (all functions)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _is_fixed(state) -> bool:
    return any(getattr(ls.bank, "fill", None) is not None for ls in state.layers if ls.bank is not None)
