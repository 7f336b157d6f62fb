"""Level router: per token and head, a softmax over the three memory levels.

Its log-probabilities are added to the read logits of every slot of that level, so a head can
learn to prefer raw recent detail (L0) or compressed older gist (L1/L2) depending on the query.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .bank import LEVELS


class LevelRouter(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.proj = nn.Linear(d_model, n_heads * LEVELS)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)  # uniform over levels at init

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, T, D] -> log-probabilities over levels [B, H, T, 3]."""
        b, t, _ = h.shape
        # log_softmax before the transpose (the same rows): the CPU kernel's backward returns strides
        # its meta function does not predict, which breaks the compiled backward (aot_eager)
        logits = self.proj(h).view(b, t, self.n_heads, LEVELS)
        return logits.float().log_softmax(-1).transpose(1, 2)
