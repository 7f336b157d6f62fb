"""LearnedCompressor: Perceiver-style 2:1 compression of groups of memory slots.

A group of ``G`` raw slots (keys and values, per head) becomes ``G/2`` slots. Each output slot's
query is the mean of a pair of adjacent raw slots plus a learned per-position query; it
cross-attends over the whole group. Output = pooled pair + a learned correction whose projection
starts at zero, so an untrained compressor is exactly mean pooling (a sane prior) and training only
has to learn what pooling loses.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class LearnedCompressor(nn.Module):
    def __init__(self, head_dim: int, group: int):
        super().__init__()
        self.head_dim = head_dim
        self.group = group
        self.n_out = group // 2
        self.query = nn.Parameter(torch.zeros(self.n_out, head_dim))
        self.q_proj = nn.Linear(head_dim, head_dim, bias=False)
        self.k_proj = nn.Linear(head_dim, head_dim, bias=False)
        self.out_k = nn.Linear(head_dim, head_dim, bias=False)
        self.out_v = nn.Linear(head_dim, head_dim, bias=False)
        nn.init.zeros_(self.out_k.weight)
        nn.init.zeros_(self.out_v.weight)

    def forward(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys/values: [B, H, ng, G, Dh]; valid: [B, ng, G] bool.

        Returns compressed keys/values [B, H, ng, G/2, Dh].
        """
        out = self.compress_groups(torch.stack([keys, values]), valid)
        return out[0], out[1]

    def compress_packed(self, kv: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """kv: [2, B, H, r, Dh] keys and values of r raw slots in write order (r a multiple of
        ``group``), valid [B, r] -> [2, B, H, r/2, Dh]: adjacent groups of ``group`` slots, 2:1."""
        two, b, h, r, d = kv.shape
        ng = r // self.group
        out = self.compress_groups(kv.reshape(2, b, h, ng, self.group, d), valid.reshape(b, ng, self.group))
        return out.reshape(2, b, h, r // 2, d)

    def compress_groups(self, kv: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """kv: [2, B, H, ng, G, Dh] (keys, values), valid [B, ng, G] -> [2, B, H, ng, G/2, Dh].

        Keys and values go through pooling and the attention read-out together (one op each
        instead of two)."""
        _, b, h, ng, g, d = kv.shape
        keys = kv[0]
        pair_w = valid.view(b, 1, ng, g // 2, 2, 1).to(kv.dtype)
        denom = pair_w.sum(-2).clamp_min(1.0)
        pooled = (kv.view(2, b, h, ng, g // 2, 2, d) * pair_w).sum(-2) / denom      # [2,B,H,ng,G/2,Dh]
        q = self.q_proj(pooled[0] + self.query)                                     # [B,H,ng,G/2,Dh]
        k = self.k_proj(keys)                                                       # [B,H,ng,G,Dh]
        logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)                # [B,H,ng,G/2,G]
        attn = torch.where(valid[:, None, :, None, :], logits, -1e4).softmax(-1)
        ctx = torch.matmul(attn, kv)                                                # [2,B,H,ng,G/2,Dh]
        ctx_k, ctx_v = ctx.unbind(0)  # (unbind's backward is one stack; two selects' are 2 x 2 ops)
        return pooled + torch.stack([self.out_k(ctx_k), self.out_v(ctx_v)])


def reconstruction_loss(
    queries: torch.Tensor,
    raw_k: torch.Tensor,
    raw_v: torch.Tensor,
    raw_valid: torch.Tensor,
    comp_k: torch.Tensor,
    comp_v: torch.Tensor,
    comp_valid: torch.Tensor,
    groups: int = 1,
) -> torch.Tensor:
    """Attention over compressed slots should reproduce attention over the raw ones.

    queries: [B, H, Tq, Dh] (detached: this loss trains the compressor only);
    raw_k/raw_v: [B, H, R, Dh] with raw_valid [B, R]; comp_*: [B, H, R/2, Dh], comp_valid [B, R/2].
    Returns the mean squared error of the two read-outs, normalised by the target's power;
    with ``groups`` > 1 the batch is that many equal blocks (stacked banks) and the result is the
    sum of their losses.
    """
    scale = 1.0 / math.sqrt(queries.shape[-1])

    def read(k, v, valid):
        logits = torch.einsum("bhqd,bhsd->bhqs", queries.float(), k.float()) * scale
        logits = torch.where(valid[:, None, None, :], logits, -1e4)
        return torch.einsum("bhqs,bhsd->bhqd", logits.softmax(-1), v.float())

    with torch.no_grad():
        target = read(raw_k.detach(), raw_v.detach(), raw_valid)
    pred = read(comp_k, comp_v, comp_valid)
    if groups == 1:
        return ((pred - target) ** 2).mean() / (target.pow(2).mean() + 1e-6)
    err = ((pred - target) ** 2).reshape(groups, -1).mean(1)
    return (err / (target.pow(2).reshape(groups, -1).mean(1) + 1e-6)).sum()
