"""Basic layers: RMSNorm, SwiGLU and rotary position embeddings (RoPE) as pure functions.

RoPE follows the gpt-fast style: a cos/sin table is precomputed once per (length, device, dtype)
and applied with :func:`apply_rope_full` (:func:`apply_rope` is its half-table reference, used by the
tests). :func:`rope_shift` re-rotates keys that were rotated at one
position so they sit at another, which lets a carried KV window move into the next segment's frame
without recomputing it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of ``x`` runs in: autocast's (e.g. bf16) where autocast is on for x's
    device, else x's own. Casting an input once to it gives the numbers autocast would make at
    every matmul that reads it, without a cast per matmul."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim: ``x / rms(x) * weight`` (computed in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    """Gated FFN: ``w2(silu(w1 x) * w3 x)``; w1 and w3 are fused into one matmul."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.dropout(self.w2(F.silu(gate) * up))


_ROPE_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_ROPE_FULL_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_table(length: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[length, head_dim/2]`` in float32, cached and grown by powers of two."""
    size = 1 << max(6, (max(length, 1) - 1).bit_length())
    key = (size, head_dim, float(theta), str(device))
    if key not in _ROPE_CACHE:
        freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
        pos = torch.arange(size, device=device, dtype=torch.float64)
        angles = torch.outer(pos, freqs)
        _ROPE_CACHE[key] = (angles.cos().float(), angles.sin().float())
    cos, sin = _ROPE_CACHE[key]
    return cos[:length], sin[:length]


def rope_table_full(length: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width tables for :func:`apply_rope_full`: ``[cos, cos]`` and ``[-sin, sin]``, each
    ``[length, head_dim]`` float32 (the :func:`rope_table` values, cached the same way)."""
    size = 1 << max(6, (max(length, 1) - 1).bit_length())
    key = (size, head_dim, float(theta), str(device))
    if key not in _ROPE_FULL_CACHE:
        cos, sin = rope_table(size, head_dim, theta, device)
        _ROPE_FULL_CACHE[key] = (torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1))
    cos2, sin2 = _ROPE_FULL_CACHE[key]
    return cos2[:length], sin2[:length]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of ``x [B, H, T, Dh]`` by ``cos/sin [T, Dh/2]``."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def apply_rope_full(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` with full-width tables from :func:`rope_table_full`: 4 ops instead of 7
    (``x * [cos, cos] + swap_halves(x) * [-sin, sin]`` is the same arithmetic, term for term).
    x: [..., T, Dh]; any leading dims (e.g. q and k stacked, [2, B, H, T, Dh]). Computed in float32;
    the result has x's dtype."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return _LowPrecisionRope.apply(x, cos2, sin2)
    xf = x.float()
    out = xf * cos2 + xf.roll(x.shape[-1] // 2, -1) * sin2
    return out.to(x.dtype)


class _LowPrecisionRope(torch.autograd.Function):
    """:func:`apply_rope_full` for a bf16/fp16 ``x`` (autocast): the products take x upcast inside
    the multiply (type promotion, exact), so the only cast is the result's; the backward rotates
    the gradient back the same way (the transpose of the rotation: ``g * cos2 + roll(g * sin2)``).
    The same numbers as ``x.float()`` ... ``.to(x.dtype)`` under plain autograd, forward and
    backward, with one cast each way instead of two (on a GPU a cast is a kernel over all of q, k)."""

    @staticmethod
    def forward(ctx, x, cos2, sin2):
        ctx.save_for_backward(cos2, sin2)
        return (x * cos2 + x.roll(x.shape[-1] // 2, -1) * sin2).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        cos2, sin2 = ctx.saved_tensors
        return (g * cos2 + (g * sin2).roll(-(g.shape[-1] // 2), -1)).to(g.dtype), None, None


_SHIFT_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_shift(x: torch.Tensor, shift: int, head_dim: int, theta: float) -> torch.Tensor:
    """Move already-rotated ``x [B, H, T, Dh]`` by ``-shift`` positions (rotation by -shift*freq)."""
    if shift == 0 or x.shape[-2] == 0:
        return x
    key = (shift, head_dim, float(theta), str(x.device))
    if key not in _SHIFT_CACHE:  # one entry per (segment length - window): a handful per run
        freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=x.device, dtype=torch.float64) / head_dim))
        ang = -float(shift) * freqs
        cos, sin = ang.cos().float(), ang.sin().float()
        _SHIFT_CACHE[key] = (torch.cat([cos, cos]), torch.cat([-sin, sin]))
    return apply_rope_full(x, *_SHIFT_CACHE[key])
