"""Sampling: the next token from logits, per row with its own parameters and generator.

:func:`sample_next` / :func:`sample_rows` never raise for any argument value: a temperature below
:data:`MIN_TEMPERATURE` (or not finite) is greedy, ``top_k`` outside ``1..V-1`` is off, ``top_p`` not
finite or ``>= 1`` is off and ``<= 0`` keeps the top token, and rows whose logits are not finite fall
back to their argmax. (Moved out of ``dnc.generate``, which re-exports every name.) Shapes: B rows,
V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

MIN_TEMPERATURE = 1e-4
"""Temperatures below this (and non-finite ones) mean greedy decoding."""


# ================================================================================== sampling
@dataclass(frozen=True)
class SamplingParams:
    """How a row picks its next token. Any values are accepted; :meth:`normalized` says what they mean."""

    temperature: float = 1.0
    """Softmax temperature; below ``MIN_TEMPERATURE`` (or NaN/inf) = greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0, negative or >= vocab = all."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of tokens with mass >= top_p; >= 1 or NaN = all, <= 0 = the top one."""

    def normalized(self, vocab: int) -> tuple[bool, float, int, float]:
        """(greedy, temperature, top_k (0 = off), top_p (1.0 = off)) with every edge case resolved."""
        t = _finite(self.temperature, 0.0)
        greedy = t < MIN_TEMPERATURE
        k = int(_finite(self.top_k, 0)) if not isinstance(self.top_k, bool) else 0
        k = k if 0 < k < vocab else 0
        p = _finite(self.top_p, 1.0)
        p = 1.0 if p >= 1.0 else max(p, 0.0)
        return greedy, t, k, p

    def plain(self, vocab: int) -> bool:
        """Temperature sampling without top-k/top-p (several rows share one multinomial)."""
        greedy, _, k, p = self.normalized(vocab)
        return not greedy and k == 0 and p >= 1.0


def _finite(x, default: float) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return default
    return x if math.isfinite(x) else default


def _filtered_logits(logits: torch.Tensor, t: float, k: int, p: float) -> torch.Tensor:
    """logits [V] float32 -> temperature-scaled logits with top-k / top-p cut to -inf."""
    logits = logits / t
    if k:
        kth = logits.topk(k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p < 1.0:
        sorted_logits, idx = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        remove = probs.cumsum(-1) - probs > p  # keep the smallest set with mass >= top_p (never the top one)
        logits = logits.scatter(0, idx, sorted_logits.masked_fill(remove, float("-inf")))
    return logits


def _safe_probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of [B, V] logits; rows that are not a distribution (NaN/inf
    logits) become one-hot on their argmax, on the device (no host sync, no device assert)."""
    clean = torch.nan_to_num(logits.float(), nan=float("-inf"))
    probs = clean.softmax(-1)
    ok = torch.isfinite(probs).all(-1, keepdim=True) & (probs.sum(-1, keepdim=True) > 0)
    onehot = torch.zeros_like(probs).scatter_(-1, torch.nan_to_num(logits.float(), nan=0.0).argmax(-1, keepdim=True), 1.0)
    return torch.where(ok, torch.nan_to_num(probs, nan=0.0), onehot)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> int:
    """One token id from ``logits`` [V] or [1, V] (greedy when temperature < MIN_TEMPERATURE).
    ``generator`` (on the logits' device) makes the draw reproducible."""
    logits = logits.float().reshape(-1)
    greedy, t, k, p = SamplingParams(temperature, top_k, top_p).normalized(logits.numel())
    if greedy:
        return int(torch.nan_to_num(logits, nan=float("-inf")).argmax())
    probs = _safe_probs(_filtered_logits(logits, t, k, p)[None])
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """The next token of every row of ``logits`` [B, V] with its own parameters and generator.
    Greedy rows share one argmax, unseeded plain-temperature rows one multinomial; the others
    (top-k/top-p or seeded) are drawn row by row, each exactly as :func:`sample_next` draws it."""
    b, vocab = logits.shape
    out = [0] * b
    norm = [p.normalized(vocab) for p in params]  # (greedy, temperature, top_k, top_p), once per row
    greedy = [i for i in range(b) if norm[i][0]]
    plain = [i for i in range(b) if generators[i] is None and not norm[i][0] and norm[i][2] == 0 and norm[i][3] >= 1.0]
    if greedy:
        # all rows greedy (the common case): the logits themselves, no index tensor to send to the device
        g = logits if len(greedy) == b else logits[greedy]
        g = torch.nan_to_num(g.float(), nan=float("-inf")).argmax(-1)
        for i, tok in zip(greedy, g.tolist()):
            out[i] = tok
    if plain:
        temp = torch.tensor([norm[i][1] for i in plain], device=logits.device)
        probs = _safe_probs(logits[plain].float() / temp[:, None])
        for i, tok in zip(plain, torch.multinomial(probs, 1).squeeze(1).tolist()):
            out[i] = tok
    done = set(greedy) | set(plain)
    for i in range(b):
        if i not in done:
            sp = params[i]
            out[i] = sample_next(logits[i], sp.temperature, sp.top_k, sp.top_p, generators[i])
    return out
