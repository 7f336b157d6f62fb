"""MemoryRead: the memory layer of a block — reads the StateBank and produces its writes.

Read logit of query t for slot s (per head):
    tau * q_t . (k_s + level_emb[level_s] + age_emb[bucket(age_s)])     (q, k unit-norm)
      + router_logprob[t, level_s] + sal_scale * log(salience_s)
plus a learned *null slot* that lets a query read nothing. The router and salience terms are
folded into extra query/key channels (``q' = [tau*q, router, 1]``, ``k' = [k, onehot, bias]``)
so the dense read is one fused SDPA call with no [T, S] mask tensor. The top-k read computes the
logits explicitly and keeps each query's k best slots; with k >= S both are the same function.

With ``DNCConfig.self_read`` a read also sees the current segment's own write slots (the keys and
values the commit will write, augmented as raw L0 slots of age 0): query t attends over
``[null, bank slots, writes 0..t]`` in the same softmax, the writes masked causally.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import matmul_dtype
from .bank import LEVELS, StateBank
from .router import LevelRouter


@dataclass
class ReadView:
    """The bank as seen by reads during one segment (constant until the segment is committed)."""

    keys: torch.Tensor    # [B, H, S+1, Dq] augmented keys, slot 0 = null slot
    values: torch.Tensor  # [B, H, S+1, Dq] values zero-padded to Dq (slot 0 = zeros)
    levels: torch.Tensor  # [S] level id of each real slot
    n_slots: int          # S
    sizes: tuple[int, ...] | None = None  # slots per level (L0, L1, L2); the forward read needs them


@functools.lru_cache(maxsize=64)
def _all_valid(b: int, m: int, device: torch.device) -> torch.Tensor:
    return torch.ones(b, m, dtype=torch.bool, device=device)


@functools.lru_cache(maxsize=64)
def _query_tail(width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, 1, width]: the constant query channels after the router's: bias weight 1, zero pad."""
    return F.pad(torch.ones(1, 1, 1, 1), (0, width - 1)).to(device, dtype)


@functools.lru_cache(maxsize=512)
def _view_constants(sizes: tuple[int, ...], buckets: int, pad: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Constants of a read view for a bank with level ``sizes`` (cached: do not modify).

    onehot_lvl [S, 3] (level of each slot), onehot_lvl_null [1, 1, S+1, 3] (with the null slot's
    zero row first), pad [1, 1, 1, pad] zeros, age_lo/age_hi [A] float32 bucket edges of age + 1."""
    level_ids = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
    onehot = F.one_hot(level_ids, LEVELS).to(dtype)
    lo = 2.0 ** torch.arange(buckets, dtype=torch.float32)
    hi = torch.cat([lo[1:], torch.tensor([float("inf")])])
    return {"onehot_lvl": onehot.to(device), "onehot_lvl_null": F.pad(onehot, (0, 0, 1, 0)).view(1, 1, -1, LEVELS).to(device),
            "pad": torch.zeros(1, 1, 1, pad, dtype=dtype, device=device), "age_lo": lo.to(device), "age_hi": hi.to(device)}


@functools.lru_cache(maxsize=256)
def _self_mask(n_view: int, past: int, t: int, device: torch.device) -> torch.Tensor:
    """Bool [1, 1, t, n_view + past + t] (True = read): query i, at segment position ``past + i``,
    reads every one of the view's ``n_view`` slots (null slot and bank) and the segment's write
    slots ``j <= past + i`` (cached: do not modify)."""
    j = torch.arange(past + t, device=device)
    i = torch.arange(past, past + t, device=device)
    mask = torch.cat([torch.ones(t, n_view, dtype=torch.bool, device=device), j[None] <= i[:, None]], 1)
    return mask.view(1, 1, t, -1)


@functools.lru_cache(maxsize=256)
def _prev_mask(n_view: int, past: int, t: int, device: torch.device) -> torch.Tensor:
    """Bool [1, 1, t, n_view + past + t] (True = read): the read of the *previous* position
    (``DNCConfig.forward_read``) for query i at segment position ``past + i``: the view's slots and
    the write slots ``j <= past + i - 1`` (none at the segment's first position; cached)."""
    j = torch.arange(past + t, device=device)
    i = torch.arange(past, past + t, device=device)
    mask = torch.cat([torch.ones(t, n_view, dtype=torch.bool, device=device), j[None] < i[:, None]], 1)
    return mask.view(1, 1, t, -1)


def successor_values(vals: torch.Tensor, sizes: tuple[int, ...], n_self: int) -> torch.Tensor:
    """The forward read's values: ``out[:, :, i]`` = the value of the slot written after slot i.

    vals: [B, H, 1 + S + n_self, Dq] in the read's key order ``[null | L0 | L1 | L2 | own writes
    0..n_self-1]`` (level sizes ``sizes``, S = their sum) -> [B, H, 1 + S + n_self, Dq]:
    - the null slot has no successor (zero);
    - within a level (and within the segment's writes) the next slot: every level is kept in write
      order (oldest first), so L0's next slot is the next token written (with ``write_pool == 1``);
    - L0's last slot is the previous segment's last token (the commit appends a whole segment to L0
      and compresses only older slots), so its successor is the segment's first write slot. It
      would be the first L1 slot in the key order, which holds far older, compressed content;
    - the last slot of L1, L2 and of the writes has none (zero): a compressed level's next content
      sits in a younger level in compressed form, and the write after the last is not made yet.
    ``DNC.compact_state`` (the memory manager's compaction, off the request path) compresses L0
    slots by keep score, possibly the newest: until the next commit L0's last link then skips the
    compressed tokens, as every L0 link across a compressed slot does. With L0 empty nothing points
    into the writes."""
    zero = vals.new_zeros(1, 1, 1, 1).expand(vals.shape[0], vals.shape[1], 1, vals.shape[3])
    parts = [zero]                                                    # null slot
    a = 1
    for i, n in enumerate(sizes or ()):
        if n:
            parts.append(vals[:, :, a + 1:a + n])
            parts.append(vals[:, :, 1 + sum(sizes):2 + sum(sizes)] if i == 0 and n_self else zero)
        a += n
    if n_self:
        parts += [vals[:, :, a + 1:a + n_self], zero]
    out = torch.cat(parts, 2)
    assert out.shape == vals.shape, (out.shape, vals.shape, sizes, n_self)
    return out


@functools.lru_cache(maxsize=64)
def _l0_channels(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, 1, LEVELS]: the level one-hot channels of a raw (L0) slot."""
    return F.one_hot(torch.tensor(0), LEVELS).view(1, 1, 1, LEVELS).to(device, dtype)


def _age_onehot(age: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Bool [..., A]: the age bucket ``min(floor(log2(age + 1)), A - 1)`` one-hot, found by comparing
    ``age + 1`` with the power-of-two bucket edges (exact, and no index scatter)."""
    x = (age.clamp_min(0) + 1).unsqueeze(-1)
    return (x >= lo) & (x < hi)


class MemoryRead(nn.Module):
    def __init__(self, d_model: int, n_heads: int, max_age_buckets: int, write_pool: int, init_std: float = 0.02,
                 temperature: float = 8.0, importance: bool = False, forward: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.write_pool = write_pool
        self.max_age_buckets = max_age_buckets
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_write = nn.Linear(d_model, d_model, bias=False)
        # keys and queries are unit-normalised per head; a learned per-head temperature sets sharpness
        # (initialised from the bank size: DNCConfig.mem_temperature)
        self.q_scale = nn.Parameter(torch.full((n_heads,), float(temperature)))
        self.v_write = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.router = LevelRouter(d_model, n_heads)
        self.level_emb = nn.Parameter(torch.zeros(LEVELS, n_heads, self.head_dim))
        self.age_emb = nn.Parameter(torch.zeros(max_age_buckets, n_heads, self.head_dim))
        self.null_key = nn.Parameter(torch.randn(n_heads, self.head_dim) * init_std)
        self.sal_scale = nn.Parameter(torch.full((n_heads,), 0.1))
        # learned slot importance (DNCConfig.write_importance): weights on a slot's [key; value] per
        # head, added to its read logit (which trains them) and used by the bank's keep scores
        self.importance_w = nn.Parameter(torch.zeros(2, n_heads, self.head_dim)) if importance else None
        # forward read (DNCConfig.forward_read): gate g_t = fwd_scale_h * sigmoid(fwd_gate(h_t)_h); the
        # scale starts at 0 so a fresh model reads exactly as without it, and the sigmoid lets a
        # position switch the copy on (inside a fact) or off (elsewhere)
        self.fwd_gate = nn.Linear(d_model, n_heads) if forward else None
        self.fwd_scale = nn.Parameter(torch.zeros(n_heads)) if forward else None
        # augmented width: Dh + LEVELS router channels + 1 bias channel, padded to a multiple of 8
        self.aug_dim = ((self.head_dim + LEVELS + 1 + 7) // 8) * 8

    # ------------------------------------------------------------------ writes
    def write_kv(self, h: torch.Tensor, valid: torch.Tensor | None = None, h_before: torch.Tensor | None = None):
        """h: [B, T, D] normed inputs of the segment -> keys/values [B, H, T/p, Dh], valid [B, T/p]."""
        kv, valid = self.write_kv_packed(h, valid, h_before)
        return kv[0], kv[1], valid

    def write_kv_packed(self, h: torch.Tensor, valid: torch.Tensor | None = None, h_before: torch.Tensor | None = None):
        """h: [B, T, D] -> (kv [2, B, H, T/p, Dh] keys and values, valid [B, T/p]) as the bank stores them.

        h_before: [B, 1, D] the normed input of the token before ``h[:, 0]`` (the previous
        segment's last), or None at the stream start (zeros)."""
        b, t, _ = h.shape
        p = self.write_pool
        hm = h.to(matmul_dtype(h))  # one cast for the three projections below (autocast would make three)
        # Token shift with a tied projection: a slot's key also carries the *query* projection of
        # the previous token, so a later query "like token t-1" finds the slot of what followed it.
        # This is the induction prior associative recall needs, built into the write path. The
        # segment's first slot takes the previous segment's last token, so a key does not depend on
        # where a segment ends (zeros only at the stream start).
        if h_before is None:
            h_prev = F.pad(hm[:, :-1], (0, 0, 1, 0))
        else:
            h_prev = torch.cat([h_before.to(hm.dtype), hm[:, :-1]], 1)
        k = (self.k_write(hm) + self.q_proj(h_prev)).view(b, t, self.n_heads, self.head_dim)
        k = F.normalize(k.float(), dim=-1).to(h.dtype)
        v = self.v_write(hm).view(b, t, self.n_heads, self.head_dim)
        kv = torch.stack([k, v])                                                # [2, B, T, H, Dh]
        if p > 1:
            if valid is None:  # every token valid: the masked mean is a plain mean (same numbers)
                kv = kv.view(2, b, t // p, p, self.n_heads, self.head_dim).sum(3) / p
            else:
                w = valid.view(1, b, t // p, p, 1, 1).to(kv.dtype)
                kv = (kv.view(2, b, t // p, p, self.n_heads, self.head_dim) * w).sum(3) / w.sum(3).clamp_min(1.0)
                valid = valid.view(b, t // p, p).any(-1)
        if valid is None:
            valid = _all_valid(b, t // p, h.device)
        return kv.transpose(2, 3), valid

    def slot_importance(self, kv: torch.Tensor) -> torch.Tensor:
        """kv [2, B, H, S, Dh] (a bank's packed keys and values) -> importance [B, H, S] float32."""
        return torch.einsum("tbhsd,thd->bhs", kv.float(), self.importance_w.float())

    def importance_rows(self, batch: int) -> torch.Tensor | None:
        """The importance weights for each of ``batch`` bank rows as the bank's keep scores take them,
        ``[B, 2, H, Dh]`` float32 and detached (the keep decision is not differentiable); None when off."""
        if self.importance_w is None:
            return None
        return self.importance_w.detach().float().unsqueeze(0).expand(batch, -1, -1, -1)

    def queries(self, h: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """h: [B, T, D] -> read queries [B, H, T, Dh], unit norm times the per-head temperature,
        in ``out_dtype`` (default h's)."""
        b, t, _ = h.shape
        q = self.q_proj(h).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        q = F.normalize(q.float(), dim=-1) * self.q_scale.view(1, -1, 1, 1).float()
        return q.to(out_dtype or h.dtype)

    # ------------------------------------------------------------------ reads
    def build_view(self, bank: StateBank) -> ReadView:
        """The augmented keys/values every read of this segment uses (see the module docstring).

        Constant parts (level one-hot channels, zero padding, the value of the null slot) are cached
        tensors; the rest is a handful of ops whatever the number of levels."""
        flat, level_ids = bank.flat()
        b, h, s, d = flat.keys.shape
        dtype = self.null_key.dtype if s == 0 else flat.keys.dtype
        const = _view_constants(tuple(bank.sizes), self.max_age_buckets, self.aug_dim - d - LEVELS - 1,
                                flat.keys.device, dtype)
        null = self.null_key.to(dtype).view(1, h, 1, d).expand(b, -1, -1, -1)
        if s:
            # embeddings looked up as one-hot matmuls: the backward of advanced indexing into a
            # handful of rows is a slow serialised scatter on GPU (18% of a training step)
            onehot_age = _age_onehot(flat.age, const["age_lo"], const["age_hi"]).to(dtype)          # [B,S,A]
            emb = onehot_age @ self.age_emb.view(self.max_age_buckets, -1).to(dtype) \
                + (const["onehot_lvl"] @ self.level_emb.view(LEVELS, -1).to(dtype)).unsqueeze(0)   # [B,S,H*Dh]
            k = flat.keys + emb.view(b, s, h, d).transpose(1, 2)                                    # [B,H,S,Dh]
            bias = self.sal_scale.view(1, h, 1) * torch.log(flat.salience.clamp_min(1e-4)).unsqueeze(1)  # [B,H,S]
            if self.importance_w is not None:
                bias = bias + self.slot_importance(bank.kv)
            bias = torch.where(flat.valid.unsqueeze(1), bias, -1e4).to(dtype)
            # slot 0 is the null slot: key null_key, zero bias/one-hot channels, zero value
            keys = torch.cat([null, k], 2)
            bias = F.pad(bias, (1, 0))
        else:
            keys, bias = null, torch.zeros(b, h, 1, device=null.device, dtype=dtype)
        kaug = torch.cat([keys, const["onehot_lvl_null"].expand(b, h, -1, -1), bias.unsqueeze(-1),
                          const["pad"].expand(b, h, s + 1, -1)], -1)                            # [B,H,S+1,Dq]
        vals = F.pad(flat.values.to(dtype), (0, self.aug_dim - d, 1, 0))
        return ReadView(kaug, vals, level_ids, s, tuple(bank.sizes))

    def self_slots(self, kv: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The segment's own write slots as reads see them (``DNCConfig.self_read``).

        kv [2, B, H, n, Dh] (``write_kv_packed`` of the segment's positions so far) -> augmented
        (keys, values) [B, H, n, Dq] in ``dtype``: exactly what :meth:`build_view` makes of the same
        slots once committed (level 0, age bucket 0, salience 1 so no salience term, the learned
        importance in the bias channel when on), so the router and the query see them as the
        newest raw slots."""
        _, b, h, n, d = kv.shape
        # the same sum as build_view's one-hot embedding lookup for (age bucket 0, level 0)
        emb = (self.age_emb[0].to(dtype) + self.level_emb[0].to(dtype)).view(1, h, 1, d)
        k = kv[0].to(dtype) + emb
        if self.importance_w is not None:
            bias = self.slot_importance(kv).to(dtype).unsqueeze(-1)                      # [B,H,n,1]
        else:
            bias = k.new_zeros(1, 1, 1, 1).expand(b, h, n, 1)
        pad = self.aug_dim - d - LEVELS - 1
        keys = torch.cat([k, _l0_channels(k.device, dtype).expand(b, h, n, -1), bias,
                          k.new_zeros(1, 1, 1, pad).expand(b, h, n, -1)], -1)
        vals = F.pad(kv[1].to(dtype), (0, self.aug_dim - d))
        return keys, vals

    def augment_queries(self, h: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """[q, router log-probs, 1, 0-pad] -> [B, H, T, Dq] (q already carries its temperature)."""
        b, hh, t, d = q.shape
        route = self.router(h).to(q.dtype)                                      # [B,H,T,3]
        tail = _query_tail(self.aug_dim - d - LEVELS, q.device, q.dtype)       # [1, 0, ..., 0]
        return torch.cat([q, route, tail.expand(b, hh, t, -1)], -1)

    def forward(self, h: torch.Tensor, view: ReadView, sample: torch.Tensor | None = None, topk: int = 0,
                trace: bool = False, self_kv: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                h_prev: torch.Tensor | None = None, fwd_view: tuple | None = None,
                mass_rows: torch.Tensor | None = None):
        """Read the bank (and, with ``self_kv``, the segment's own writes).

        h: [B, T, D] normed hidden states; ``sample``: LongTensor of chunk positions whose
        attention mass feeds the salience statistics (None = none); ``self_kv`` [2, B, H, P+T, Dh]:
        the raw write slots of the segment's positions 0..P+T-1, this chunk's T last (``h[:, i]``
        is at segment position P+i and reads writes 0..P+i). ``mask`` [B or 1, 1, T, S+1+...] bool:
        which of ``view``'s slots each query may read (None = all), for a view that already holds
        the write slots after the bank's (``dnc.ragged``). ``h_prev`` [B, 1, D]: the normed memory
        input of the token before ``h[:, 0]`` (None at the stream start), the query of the first
        position's forward read (``DNCConfig.forward_read``, see :meth:`forward_read`); ``fwd_view``:
        its (successor values, mask, rows on) for a view that holds the writes (``dnc.ragged``).
        ``mass_rows`` LongTensor [M]: compute the mass of these batch rows only (``dnc.ragged``: a
        decode step's rows at a salience position; the mass reads every slot of a row's view in
        float32, so computing it for rows that drop it was the step's largest avoidable read).
        Returns (update [B, T, D], mass [B, S] ([M, S] with ``mass_rows``) or None, trace dict); the mass counts the bank's S slots only (salience is a bank statistic).
        """
        b, t, dm = h.shape
        hm = h.to(matmul_dtype(h))  # one cast for the query and router projections
        q = self.augment_queries(hm, self.queries(hm, out_dtype=h.dtype))
        kv_k, kv_v = view.keys.to(q.dtype), view.values.to(q.dtype)
        if self_kv is not None:
            if mask is not None:
                raise ValueError("pass self_kv (the write slots, masked here) or a mask over a view that holds them, not both")
            sk, sv = self.self_slots(self_kv, q.dtype)
            mask = _self_mask(kv_k.shape[2], self_kv.shape[3] - t, t, q.device)
            kv_k, kv_v = torch.cat([kv_k, sk], 2), torch.cat([kv_v, sv], 2)
        s_tot = kv_k.shape[2]
        if topk and topk < s_tot:
            out = self._read_topk(q, kv_k, kv_v, topk, mask)
        else:
            out = F.scaled_dot_product_attention(q, kv_k, kv_v, attn_mask=mask, scale=1.0)
        if self.fwd_gate is not None:
            if fwd_view is None and (self_kv is None or view.sizes is None):
                raise ValueError("forward_read needs the segment's write slots (self_kv) and a view built by "
                                 "build_view (its level sizes), or fwd_view for a view that holds the writes")
            past = 0 if self_kv is None else self_kv.shape[3] - t
            fwd = self.forward_read(hm, h_prev, q, kv_k, kv_v, view, past, topk, fwd_view)
            gate = torch.sigmoid(self.fwd_gate(hm).float()) * self.fwd_scale.float()      # [B,T,H]
            out = out + gate.transpose(1, 2).unsqueeze(-1).to(out.dtype) * fwd
        out = out[..., : self.head_dim].transpose(1, 2).reshape(b, t, dm)
        update = self.out(out)
        mass = None
        info: dict = {}
        s = view.n_slots
        if s and (sample is not None or trace):
            with torch.no_grad():
                qs = q if sample is None else q[:, :, sample]
                ms = None if mask is None or sample is None else mask[:, :, sample]
                ks = kv_k
                if mass_rows is not None:  # the same per-row ops on M rows
                    qs, ks = qs.index_select(0, mass_rows), kv_k.index_select(0, mass_rows)
                    if ms is not None and ms.shape[0] > 1:
                        ms = ms.index_select(0, mass_rows)
                probs = self.probs(qs, ks, topk, ms)                             # [B,H,Ts,S+1(+P+T)]
                mass = probs[..., 1:s + 1].float().sum((1, 2))                    # [B,S]
                if trace:
                    pfull = self.probs(q, kv_k, topk, mask).float()
                    pall = pfull[..., 1:s + 1]                                    # [B,H,T,S]
                    lvl_mass = torch.stack([pall[..., view.levels == i].sum(-1) for i in range(LEVELS)], -1)
                    k = min(4, s)
                    top = pall.mean(1).topk(k, dim=-1)
                    info = {"mem_level_mass": lvl_mass.mean(1),
                            "mem_top_slots": (top.indices, top.values, view.levels[top.indices])}
                    if self_kv is not None:  # [B, T] read share of the segment's own writes
                        info["mem_self_mass"] = pfull[..., s + 1:].sum(-1).mean(1)
        return update, mass, info

    def forward_read(self, hm: torch.Tensor, h_prev: torch.Tensor | None, q: torch.Tensor, keys: torch.Tensor,
                     vals: torch.Tensor, view: ReadView, past: int, topk: int = 0,
                     fwd_view: tuple | None = None) -> torch.Tensor:
        """The forward (temporal-link) read (``DNCConfig.forward_read``): at position t, the previous
        position's read over the same keys, returning each slot's *successor's* value,
        ``sum_s softmax(q_{t-1} . K)[s] * V[succ(s)]`` (:func:`successor_values`).

        hm: [B, T, D] the chunk's memory inputs (matmul dtype); h_prev: [B, 1, D] the input before
        ``hm[:, 0]`` or None at the stream start, where position 0 gets no forward read (zeros);
        q: [B, H, T, Dq] the chunk's augmented queries; keys/vals: [B, H, 1+S+P+T, Dq] the content
        read's (view, then the segment's write slots 0..P+T-1); past: P, the segment position of
        ``hm[:, 0]``. ``fwd_view`` (``dnc.ragged`` and ``dnc.ragged_prefill``, a view that holds the
        write slots after its padded bank; ``h_prev`` is then [B, T, D], the input before each
        position): (successor values [B, H, S', Dq], mask [B, 1, T, S'] of the previous position's
        read, on [B] or [B, T] float: 0 where a position has no previous token) in place of what is
        built here from ``view.sizes`` and ``past``. Returns [B, H, T, Dq]."""
        t = q.shape[2]
        if fwd_view is not None:
            succ, mask, on = fwd_view
            qp = self.augment_queries(h_prev.to(hm.dtype), self.queries(h_prev.to(hm.dtype), out_dtype=q.dtype))
            if topk and topk < keys.shape[2]:
                fwd = self._read_topk(qp, keys, succ.to(q.dtype), topk, mask)
            else:
                fwd = F.scaled_dot_product_attention(qp, keys, succ.to(q.dtype), attn_mask=mask, scale=1.0)
            return fwd * on.view(on.shape[0], 1, -1, 1).to(fwd.dtype)  # on [B] or [B, T]
        n_self = keys.shape[2] - 1 - view.n_slots
        if h_prev is None:  # any query for position 0: its result is zeroed below
            q_first = q[:, :, :1]
        else:
            hp = h_prev.to(hm.dtype)
            q_first = self.augment_queries(hp, self.queries(hp, out_dtype=q.dtype))
        qp = q_first if t == 1 else torch.cat([q_first, q[:, :, :-1]], 2)       # [B,H,T,Dq] of t-1
        succ = successor_values(vals, view.sizes, n_self)
        mask = _prev_mask(1 + view.n_slots, past, t, q.device)
        if topk and topk < keys.shape[2]:
            fwd = self._read_topk(qp, keys, succ, topk, mask)
        else:
            fwd = F.scaled_dot_product_attention(qp, keys, succ, attn_mask=mask, scale=1.0)
        if h_prev is None:
            fwd = torch.cat([torch.zeros_like(fwd[:, :, :1]), fwd[:, :, 1:]], 2)
        return fwd

    @staticmethod
    def probs(q: torch.Tensor, k: torch.Tensor, topk: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Explicit read probabilities [B, H, T, S+1] float32 (top-k: zero outside each query's top k;
        ``mask`` [B or 1, 1, T, S+1] bool: zero where False).

        They feed the bank's salience statistics, which stay float32 (DESIGN): autocast is off here,
        as it otherwise casts the float32 operands to bf16 (two casts, and bf16 logits)."""
        with torch.autocast(q.device.type, enabled=False):
            logits = torch.einsum("bhtd,bhsd->bhts", q.float(), k.float())
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        if topk and topk < k.shape[2]:
            thresh = logits.topk(topk, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < thresh, float("-inf"))
        return logits.softmax(-1)

    @staticmethod
    def _read_topk(q, k, v, topk: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Each query attends to its ``topk`` highest-logit slots only (``mask`` [B or 1, 1, T, S+1] bool:
        slots a query may not read, where False, are never among them). Returns [B, H, T, Dq]."""
        logits = torch.einsum("bhtd,bhsd->bhts", q, k)
        if mask is not None:  # the null slot is always readable, so every query keeps a finite logit
            logits = logits.masked_fill(~mask, float("-inf"))
        top = logits.topk(topk, dim=-1)                                          # [B,H,T,k]
        w = top.values.float().softmax(-1).to(v.dtype)
        b, h, t, kk = top.indices.shape
        gathered = v.gather(2, top.indices.reshape(b, h, t * kk, 1).expand(-1, -1, -1, v.shape[-1]))
        return torch.einsum("bhtk,bhtkd->bhtd", w, gathered.view(b, h, t, kk, v.shape[-1]))
