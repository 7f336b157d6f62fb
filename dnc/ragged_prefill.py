"""Ragged prefill: rows of *any* layouts and prompt lengths take their prompts in one model call.

The one-token step of ``dnc.ragged`` generalised to up to ``T`` tokens per row: every row of a
:class:`dnc.ragged.RaggedBatch` (its state inserted as for decoding: bank views padded to the
model's capacity, KV caches to ``kv_window + segment_len``) consumes ``counts[i]`` tokens of
``tokens [C, T]`` (right padding; 0 = the row sits this call out), never past the end of its
segment. Each row gets exactly what prefilling it alone (``model(ids, state=...)``) gives, up to
float summation order, because every op is row-wise and padding adds only terms of weight exactly
0 (masked keys, masked write slots, read mass weighted by 0/1) or writes nothing a row reads:

- KV cache / ``length``, memory inputs ``write_h`` / ``seg_pos`` and, with ``self_read``, the
  view's write slots are written at the row's own positions only. A padded position writes to the
  row's *last valid* position the very values of that position (duplicate scatter indices with
  equal values: the result is the same whichever write lands last); a row with ``counts == 0``
  writes garbage at its next free position, which no read sees before a later step overwrites it.
- read mass (salience statistics, a sum over the segment's sampled positions): the sampled
  positions of each row are gathered and weighted by ``position < counts``;
- ``prev_x`` / ``write_prev`` (the token shift of the next key and write slot), the next-token
  logits and, with ``forward_read``, ``fwd_on``: the row's own last token; rows with
  ``counts == 0`` keep theirs;
- ``forward_read``: position ``i``'s forward read is the read of position ``i - 1`` (its query
  from the memory input before it), over the writes up to ``i - 1``; at the stream start position
  0 has none.

:func:`ragged_prefill_step` has static shapes and no host synchronisation (a CUDA graph per
(rows, tokens) bucket: ``dnc.cuda_graphs.DecodeGraphs.prefill_step``). :func:`prefill` is the
host loop: it cuts each row's prompt at its segment boundaries and at ``max_tokens``, and commits
the rows whose segment is full (the model's own commit, as ``RaggedBatch.after_step`` does). A
prompt within one segment is one call for all rows; a prompt across ``k`` boundaries takes
``k + 1`` or more. Through a graph runner a call is padded to a token bucket
(:data:`TOKEN_BUCKETS`) and spans every KV position and view slot; an eager call (CPU) takes the
longest row's tokens and only the KV positions and bank slots some row uses, all known on the
host: the same numbers with less padding, which on a CPU is compute.

Shapes: C rows (batch capacity), T tokens of a call, H heads, Dh head dim, D model dim,
Lmax = kv_window + segment_len, S' = view slots (Smax + 1, + segment_len with ``self_read``),
Dq augmented read width, V vocab, Ks sampled positions of a call.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F

from .layers import apply_rope_full, matmul_dtype, rope_table_full
from .memory import MemoryRead, ReadView
from .ragged import RaggedBatch, successor_index  # noqa: F401  (successor_index: same view layout)

TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256)
"""Tokens per row a prefill call is shaped (and captured) for; longer calls use powers of two."""

MAX_TOKENS = 256
"""Default cap on the tokens one row takes per call (longer prompts take several calls): the
call's masks and reads grow with rows x tokens x keys."""


def token_bucket(n: int) -> int:
    """The smallest token bucket holding ``n`` tokens (powers of two past :data:`TOKEN_BUCKETS`)."""
    for b in TOKEN_BUCKETS:
        if n <= b:
            return b
    return 1 << (max(n, 1) - 1).bit_length()


@functools.lru_cache(maxsize=64)
def _arange(n: int, device: torch.device) -> torch.Tensor:
    """LongTensor [n] 0..n-1 (cached: made outside a capture, during the warm-up; do not modify)."""
    return torch.arange(n, device=device)


def ragged_prefill_step(model, batch: RaggedBatch, tokens: torch.Tensor, counts: torch.Tensor,
                        key_len: int | None = None, slot_len: int | None = None) -> torch.Tensor:
    """Row ``i`` of ``batch`` takes ``tokens[i, :counts[i]]`` (``tokens [C, T]`` long, ``counts [C]``
    long on the batch's device, ``counts[i] <= segment_len - seg_pos`` of the row, 0 for a free or
    idle slot) through every block, into the batch's tensors in place (see the module docstring);
    ``length`` / ``seg_pos`` += counts, ``batch.logits`` of the rows with tokens := their next-token
    logits. Static shapes, no host synchronisation. Returns logits [C, V] float32 (a new tensor;
    rows without tokens: garbage). The host side (:func:`after_prefill`) must follow.

    ``key_len`` / ``slot_len`` (eager calls, where shapes need not be static; see :func:`prefill`):
    attend over the first ``key_len`` KV positions only (at least every row's ``length`` + max(counts,
    1)) and, without ``self_read``, read the first ``slot_len`` bank slots only (at least every row's
    bank size): the padding they cut carries weight 0, so the result is the same, with less work."""
    cfg = model.config
    c, t = tokens.shape
    h, dh = cfg.n_heads, cfg.head_dim
    dev = tokens.device
    j = _arange(t, dev)                                                            # [T]
    has = counts > 0                                                               # [C]
    last = (counts - 1).clamp_min(0)                                               # [C] each row's last token
    # where each position writes: itself, or (padding) the row's last token again, with its values
    src = torch.minimum(j.view(1, t), last.view(c, 1))                             # [C, T]
    x = model.embed(tokens)                                                        # [C, T, D]
    d = x.shape[-1]
    key_len = batch.max_len if key_len is None else key_len
    views = batch.views()
    smax = batch.smax
    if slot_len is not None and not batch.self_read:  # the view's first slot_len bank slots (+ the null slot)
        views = [None if v is None else ReadView(v.keys[:, :, :slot_len + 1], v.values[:, :, :slot_len + 1],
                                                  v.levels[:slot_len], slot_len) for v in views]
        smax = slot_len
    pos = batch.length.view(c, 1) + j.view(1, t)                                   # [C, T] RoPE / KV positions
    cos_t, sin_t = rope_table_full(batch.max_len, dh, cfg.rope_theta, dev)
    at = pos.clamp_max(batch.max_len - 1).reshape(-1)                              # (padding may run past Lmax)
    cos = cos_t.index_select(0, at).view(c, 1, t, dh)
    sin = sin_t.index_select(0, at).view(c, 1, t, dh)
    visible = batch.key_pos[:key_len].view(1, 1, 1, -1) <= pos.view(c, 1, t, 1)   # [C, 1, T, Lmax] causal
    kv_at = (batch.length.view(c, 1) + src).view(c, 1, t, 1).expand(c, h, t, dh)
    src_kv = src.view(c, 1, t, 1).expand(c, h, t, dh)
    seg_at = batch.seg_pos.view(c, 1) + src                                        # [C, T] segment position written
    write_at = seg_at.view(c, t, 1).expand(c, t, d)
    src_d = src.view(c, t, 1).expand(c, t, d)
    last_d = last.view(c, 1, 1).expand(c, 1, d)
    # salience statistics: the positions p with p % stride == stride - 1 (as DNC._forward_chunk), per row
    stride = batch.stride
    ks = -(-t // stride)
    first = (stride - 1 - batch.seg_pos % stride) % stride                         # [C]
    samp = first.view(c, 1) + stride * _arange(ks, dev).view(1, ks)                # [C, Ks]
    samp_w = (samp < counts.view(c, 1)).float().view(c, 1, ks, 1)                  # 1 for a real token
    samp = samp.clamp_max(t - 1)
    samp_d = samp.view(c, ks, 1).expand(c, ks, d)
    self_mask = samp_mask = self_at = prev_mask = on = None
    if batch.self_read:
        # query i reads the bank and the row's writes up to its own segment position
        q_slot = (batch.smax + 1 + batch.seg_pos).view(c, 1) + j.view(1, t)        # [C, T] its own write slot
        view_pos = batch.view_pos.view(1, 1, 1, -1)
        self_mask = view_pos <= q_slot.view(c, 1, t, 1)                            # [C, 1, T, S']
        samp_mask = view_pos <= q_slot.gather(1, samp).view(c, 1, ks, 1)           # [C, 1, Ks, S']
        self_at = (batch.smax + 1 + seg_at).view(c, 1, t, 1).expand(c, h, t, batch.aug_dim)
        src_aug = src.view(c, 1, t, 1).expand(c, h, t, batch.aug_dim)
        if batch.fwd_on is not None:  # forward_read: position i repeats the read of i - 1
            prev_mask = view_pos < q_slot.view(c, 1, t, 1)
            on = torch.cat([batch.fwd_on.view(c, 1), batch.fwd_on.new_ones(1, 1).expand(c, t - 1)], 1)  # [C, T]
    for blk, lb, view in zip(model.blocks, batch.layers, views):
        xn = blk.attn_norm(x)
        x = x + _attend_chunk(blk.attn, xn, lb.k[:, :, :key_len], lb.v[:, :, :key_len], lb.prev_x, cos, sin,
                              visible, kv_at, src_kv)
        if blk.mem is not None:
            mem_in = blk.mem_norm(x)                                               # [C, T, D]
            if self_mask is not None:  # the chunk's write slots, as the commit will write them
                kv, _ = blk.mem.write_kv_packed(mem_in, h_before=lb.write_prev)     # [2, C, H, T, Dh]
                keys, vals = blk.mem.self_slots(kv, lb.view_k.dtype)                 # [C, H, T, Dq]
                lb.view_k.scatter_(2, self_at, keys.gather(2, src_aug))
                lb.view_v.scatter_(2, self_at, vals.gather(2, src_aug))
            fwd_view = h_prev = None
            if prev_mask is not None:  # successors gathered once the chunk's slots are in the view
                n_view = lb.view_v.shape[2]
                succ = lb.view_v.gather(2, lb.succ_idx.view(c, 1, n_view, 1).expand(c, h, n_view, batch.aug_dim))
                h_prev = torch.cat([lb.write_prev.to(mem_in.dtype), mem_in[:, :-1]], 1)  # [C, T, D] input before each
                fwd_view = (succ, prev_mask, on)
            if self_mask is not None:
                lb.write_prev.copy_(torch.where(has.view(c, 1, 1), mem_in.gather(1, last_d), lb.write_prev))
            m, _, _ = blk.mem(mem_in, view, None, cfg.mem_topk, mask=self_mask, h_prev=h_prev, fwd_view=fwd_view)
            x = x + m
            if smax:
                lb.mass[:, :smax].add_(_sampled_mass(blk.mem, mem_in.gather(1, samp_d), view, samp_mask, samp_w,
                                                     cfg.mem_topk, smax))
            lb.write_h.scatter_(1, write_at, mem_in.gather(1, src_d).to(lb.write_h.dtype))
        x = x + blk.ffn(blk.ffn_norm(x))
        lb.prev_x.copy_(torch.where(has.view(c, 1, 1), xn.gather(1, last_d), lb.prev_x))
    batch.length.add_(counts)
    batch.seg_pos.add_(counts)
    if batch.fwd_on is not None:
        batch.fwd_on.copy_(torch.where(has, 1.0, batch.fwd_on))
    logits = model._logits(x.gather(1, last_d))[:, 0].float()                     # [C, V]
    batch.logits.copy_(torch.where(has.view(c, 1), logits, batch.logits))
    return logits


def _sampled_mass(mem: MemoryRead, hs: torch.Tensor, view, mask, weight: torch.Tensor, topk: int,
                  smax: int) -> torch.Tensor:
    """The read mass the sampled positions put on each bank slot, as ``MemoryRead.forward``
    computes it for its ``sample`` positions (the same query and probability ops), but with
    per-row positions: hs [C, Ks, D] their memory inputs, mask [C, 1, Ks, S'] or None, weight
    [C, 1, Ks, 1] (0 for a padding position). Returns [C, Smax] float32."""
    hm = hs.to(matmul_dtype(hs))
    q = mem.augment_queries(hm, mem.queries(hm, out_dtype=hs.dtype))               # [C, H, Ks, Dq]
    probs = MemoryRead.probs(q, view.keys.to(q.dtype), topk, mask)                 # [C, H, Ks, S']
    return (probs[..., 1:smax + 1].float() * weight).sum((1, 2))


def _attend_chunk(attn, xn: torch.Tensor, keys, values, prev_x, cos, sin, visible, kv_at, src_kv) -> torch.Tensor:
    """``LocalAttention.forward`` for T tokens per row over the padded cache ``keys`` / ``values``
    [C, H, L, Dh] (views of the batch's, written in place): the chunk's keys and values are written
    at the rows' positions first, then each query sees the keys up to its own position.
    xn [C, T, D], prev_x [C, 1, D] (the input before each row's first token) -> update [C, T, D]."""
    b, t, d = xn.shape
    q, k, v = attn.qkv(xn).view(b, t, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # [C, H, T, Dh]
    if attn.key_shift:  # tied token shift: key i += query projection of token i - 1 (the row's last one for i = 0)
        first = attn.qkv(prev_x)[..., :d].view(b, 1, attn.n_heads, attn.head_dim).transpose(1, 2).to(q.dtype)
        k = k + (first if t == 1 else torch.cat([first, q[:, :, :-1]], 2))
    q, k = apply_rope_full(torch.stack([q, k]), cos, sin).unbind(0)
    keys.scatter_(2, kv_at, k.gather(2, src_kv).to(keys.dtype))
    values.scatter_(2, kv_at, v.gather(2, src_kv).to(values.dtype))
    y = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=visible)  # [C, H, T, Dh]
    return attn.dropout(attn.out(y.transpose(1, 2).reshape(b, t, d)))


def after_prefill(model, batch: RaggedBatch, counts: Sequence[int]) -> dict:
    """Host bookkeeping of one :func:`ragged_prefill_step` (``counts``: tokens per slot, as given
    to it): advance each row's counters, then commit the rows whose segment is now full
    (``RaggedBatch.commit_rows``). Returns {"compressed", "evicted", "committed"}."""
    full = []
    stride = batch.stride
    for slot, n in enumerate(counts):
        if not n:
            continue
        meta = batch.rows[slot]
        if not meta.settled:
            sampled = (stride - 1 - meta.seg_pos % stride) % stride < n  # a salience position among them
            for i in range(len(batch.layers)):
                meta.has_prev_x[i] = True
                if sampled and meta.slots[i]:
                    meta.has_mass[i] = True
            meta.settled = all(h or not s for h, s in zip(meta.has_mass, meta.slots))
        meta.seg_pos += n
        meta.tokens_seen += n
        if meta.seg_pos == batch.segment_len:
            full.append(slot)
    return batch.commit_rows(model, full)


@torch.no_grad()
def prefill(model, batch: RaggedBatch, prompts: dict[int, Sequence[int]], max_tokens: int = MAX_TOKENS,
            runner=None) -> dict:
    """Feed ``prompts`` (slot -> token ids, each slot occupied) into ``batch``'s rows, all rows in
    each call: a row takes at most ``max_tokens`` tokens per call and never crosses its segment's
    end (the commit runs between calls). ``runner``: an object with ``prefill_step(batch, tokens,
    counts)`` computing :func:`ragged_prefill_step` (``dnc.cuda_graphs.DecodeGraphs``), or None
    (eager). Afterwards ``batch.logits[slot]`` holds each row's next-token logits.
    Returns {"calls", "tokens" (prompt tokens), "padded" (tokens computed, padding included),
    "committed", "compressed", "evicted"}."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    seg, c = batch.segment_len, batch.capacity
    fed = {slot: 0 for slot in prompts}
    stats = {"calls": 0, "tokens": 0, "padded": 0, "committed": 0, "compressed": 0, "evicted": 0}
    while True:
        counts = [0] * c
        for slot, ids in prompts.items():
            left = len(ids) - fed[slot]
            if left:
                counts[slot] = min(left, seg - batch.rows[slot].seg_pos, max_tokens)
        longest = max(counts)
        if not longest:
            return stats
        t = token_bucket(longest) if runner is not None else longest  # static shapes only where graphs need them
        rows = [[0] * t for _ in range(c)]
        for slot, n in enumerate(counts):
            if n:
                rows[slot][:n] = prompts[slot][fed[slot]:fed[slot] + n]
        tokens = torch.tensor(rows, dtype=torch.long).to(batch.device, non_blocking=True)
        counts_t = torch.tensor(counts, dtype=torch.long).to(batch.device, non_blocking=True)
        if runner is not None:
            runner.prefill_step(batch, tokens, counts_t)
        else:  # eager: no static shapes needed, so the keys and slots no row uses are cut (the host knows them)
            occupied = [(meta, counts[i]) for i, meta in enumerate(batch.rows) if meta is not None]
            key_len = min(batch.max_len, max([1] + [meta.carry_len[0] + meta.seg_pos + max(n, 1) for meta, n in occupied]))
            slot_len = max([0] + [s for meta, _ in occupied for s in meta.slots])
            ragged_prefill_step(model, batch, tokens, counts_t, key_len, slot_len)
        committed = after_prefill(model, batch, counts)
        for slot, n in enumerate(counts):
            if n:
                fed[slot] += n
        stats["calls"] += 1
        stats["tokens"] += sum(counts)
        stats["padded"] += t * c
        for k in ("committed", "compressed", "evicted"):
            stats[k] += committed[k]
