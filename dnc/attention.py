"""Causal local attention and the per-layer KV cache used across a segment.

Kernels (``attn_impl``): ``sdpa`` uses ``torch.nn.functional.scaled_dot_product_attention``
(flash / cuDNN / memory-efficient kernels on GPU); ``flash`` uses the optional ``flash-attn``
package on CUDA; ``math`` is the reference einsum; ``auto`` picks flash-attn when it is installed
and the tensors are on CUDA in half precision, else SDPA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # optional extra `gpu`
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:  # pragma: no cover - not installed on CPU machines
    _flash_attn_func = None


def flash_available() -> bool:
    return _flash_attn_func is not None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Causal attention where the queries are the *last* ``Tq`` of ``Tk`` positions.

    q: [B, H, Tq, Dh]; k, v: [B, H, Tk, Dh] with Tk >= Tq. Query i sits at position Tk - Tq + i and
    sees keys 0 .. Tk - Tq + i (bottom-right aligned causal mask). Returns [B, H, Tq, Dh].
    """
    tq, tk = q.shape[-2], k.shape[-2]
    past = tk - tq
    if impl == "auto":
        impl = "flash" if (_flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)) else "sdpa"
    if impl == "flash":
        if _flash_attn_func is None or not q.is_cuda:
            raise RuntimeError("attn_impl='flash' needs the flash-attn package and a CUDA device; use 'sdpa'")
        # flash-attn's causal mask is bottom-right aligned, exactly our semantics.
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    if impl == "math":
        scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
        mask = _causal_mask(tq, tk, q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v.float()).to(q.dtype)
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if tq == 1:
        # A decode step: one query sees every cached key. Plain matmuls here, because fused
        # kernels (cuDNN SDPA) build a new plan for every new key length, i.e. every token.
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(q.shape[-1]))
        return torch.matmul(scores.softmax(-1).to(v.dtype), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(tq, tk, q.device))


def _causal_mask(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """Bool [Tq, Tk], True where query i (at position tk - tq + i) may see key j."""
    past = tk - tq
    return torch.arange(tk, device=device)[None, :] <= (torch.arange(tq, device=device)[:, None] + past)


class KVCache:
    """Keys/values of one layer for the current segment, plus the window carried from the last.

    ``k``/``v``: [B, H, n, Dh], rotated with segment-frame positions 0..n-1 (the carried window
    occupies the first ``carry_len`` positions). Grows by concatenation within a segment and is
    cut back to the carried window when the segment is committed.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, carry_len: int = 0):
        self.k = k
        self.v = v
        self.carry_len = carry_len

    @classmethod
    def empty(cls, batch: int, heads: int, head_dim: int, device, dtype) -> "KVCache":
        z = torch.zeros(batch, heads, 0, head_dim, device=device, dtype=dtype)
        return cls(z, z.clone(), 0)

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k = torch.cat([self.k, k], dim=2) if self.length else k
        self.v = torch.cat([self.v, v], dim=2) if self.v.shape[2] else v

    def detach_(self) -> None:
        self.k, self.v = self.k.detach(), self.v.detach()


# ---------------------------------------------------------------------- decode: each row's own KV length
# Why flex_attention (torch >= 2.5; checked on 2.13): the ragged decode step (dnc.ragged) keeps each
# row's KV in a static [C, H, Lmax, Dh] buffer, and SDPA with a boolean mask reads all Lmax keys of
# every row. What reads only a row's own length, inside a captured CUDA graph (fixed shapes, lengths in
# device tensors, no host sync):
# - flex_attention + a BlockMask built on the device from the lengths (below): torch.compile lowers a
#   one-token query to its FlashDecoding kernel, which visits only the listed KV blocks of each row
#   (split over the KV axis). Compiled once per shape, then capturable. ``create_block_mask`` is not
#   used: it evaluates mask_mod over the whole [C, 1, 1, Lmax] grid and is meant to run once, not per
#   step; BlockMask.from_kv_blocks takes block counts/indices that are a few device ops.
# - torch.nn.attention.varlen.varlen_attn(seqused_k=..., block_table=...): the flash kernel with
#   per-row lengths, but it wants a [pages, page_size, H, Dh] (tokens-major) cache; ours is heads-major
#   and the prefill writes it too, so that is a layout change, left for later.
# - SDPA backends: flash takes no mask and no per-row lengths; the efficient/cuDNN kernels take a
#   dense mask and still read every key. flash-attn's flash_attn_with_kvcache(cache_seqlens=...) is
#   the reference behaviour but is an optional package, absent on the GPU image.
_FLEX_COMPILED = None


def _flex():
    """flex_attention: compiled on first use where it runs on CUDA (the fused kernel; eager flex
    materialises the whole score matrix, correct but no cheaper than the mask), eager on CPU."""
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import flex_attention
    if _FLEX_COMPILED is None:
        # one compiled graph per (bucket capacity, dtype, mask_mod object): more than dynamo's default
        # limit of 8 once every bucket of a server and a few models have run
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), 64))
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _FLEX_COMPILED, flex_attention


class LengthMask:
    """Builds, per decode step, the flex BlockMask "row ``b`` sees keys ``0 .. length[b]``" from the
    device tensor ``length [C]`` (long), with no host sync and fixed shapes (capturable).

    Blocks of ``block`` keys: ``(length+1) // block`` wholly visible ("full": no mask_mod applied)
    and at most one partly visible (the one holding key ``length``: mask_mod ``kv_idx <= length[b]``);
    the kernel skips the rest. The BlockMask has batch C, one head (broadcast over heads), one query
    block, ``ceil(Lmax / block)`` KV blocks. ``mask_mod`` is made once and reads ``length`` when the
    kernel runs, so one object serves every step (a compiled flex_attention guards on it)."""

    Q_BLOCK = 128  # flex's default sparse Q block: a one-token query is one block whatever its size

    def __init__(self, length: torch.Tensor, max_len: int, block: int = 128, q_blocks: bool = False):
        self.length, self.max_len, self.block = length, int(max_len), int(block)
        self.n_blocks = nb = -(-self.max_len // self.block)
        c = length.shape[0]
        self.q_blocks = q_blocks
        """Also build the transposed (Q) indices (``from_kv_blocks(compute_q_blocks=True)``): only
        a backward reads them (inductor's flex_decoding lowering ignores them), and they cost ~30
        more small ops per step (8 without), so a decode step leaves them out."""
        self.block_ids = torch.arange(nb, dtype=torch.int32, device=length.device)       # [NB]
        self.full_idx = self.block_ids.view(1, 1, 1, nb).expand(c, 1, 1, nb).contiguous()  # [C, 1, 1, NB]

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= length[b]
        self.mask_mod = mask_mod

    def block_mask(self):
        from torch.nn.attention.flex_attention import BlockMask
        c, nb, blk = self.length.shape[0], self.n_blocks, self.block
        n = self.length.to(torch.int32) + 1                                   # [C] visible keys
        full = n // blk                                                       # [C] wholly visible blocks
        part = (n % blk != 0).to(torch.int32)                                # [C] 1: a partly visible block
        # partial blocks: block ``full`` first (the one that counts), then the others (never read)
        idx = (self.block_ids.view(1, nb) + full.view(c, 1)) % nb            # [C, NB]
        return BlockMask.from_kv_blocks(
            part.view(c, 1, 1), idx.view(c, 1, 1, nb).to(torch.int32),
            full.view(c, 1, 1), self.full_idx,
            BLOCK_SIZE=(self.Q_BLOCK, blk), mask_mod=self.mask_mod,
            seq_lengths=(1, self.max_len), compute_q_blocks=self.q_blocks)

    def dense(self) -> torch.Tensor:
        """The mask the block mask stands for, key by key: bool [C, Lmax] (tests; reads the blocks
        back, applying mask_mod inside partial blocks only, as the kernel does)."""
        bm = self.block_mask()
        c, nb, blk = self.length.shape[0], self.n_blocks, self.block
        kv = torch.arange(nb * blk, device=self.length.device)
        blk_of = kv // blk                                                    # [NB*blk]
        listed = lambda num, ind: (torch.arange(nb, device=kv.device).view(1, nb) < num.view(c, 1)).unsqueeze(-1) \
            & (ind.view(c, nb, 1) == blk_of.view(1, 1, -1))                   # [C, NB, NB*blk]
        full = listed(bm.full_kv_num_blocks, bm.full_kv_indices).any(1)
        part = listed(bm.kv_num_blocks, bm.kv_indices).any(1)
        mm = torch.stack([self.mask_mod(torch.tensor(b), 0, 0, kv) for b in range(c)])
        return (full | (part & mm))[:, :self.max_len]


def kv_length_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """Decode attention of one query per row over the row's own KV length.
    q: [C, H, 1, Dh]; k, v: [C, H, Lmax, Dh] (same dtype); block_mask: ``LengthMask.block_mask()``
    -> [C, H, 1, Dh]. Scale 1/sqrt(Dh), as SDPA's."""
    compiled, eager = _flex()
    fn = compiled if q.is_cuda else eager
    return fn(q, k, v, block_mask=block_mask)
