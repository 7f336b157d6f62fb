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
