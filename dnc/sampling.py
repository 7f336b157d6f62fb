"""Sampling: the next token from logits, per row with its own parameters and generator.

:class:`RowSampler` samples a whole batch as device ops (what the decode loop uses);
:func:`multinomial1` is ``torch.multinomial(probs, 1)`` without its host syncs.

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


def multinomial1(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of ``probs`` [B, V] (valid distributions) -> token ids [B] long.

    ``torch.multinomial(probs, 1, generator=g)`` without its validity checks: its draw is this very
    algorithm (``q ~ Exp(1)`` from the generator, ``argmax(probs / q)``), so a seeded generator gives
    the same tokens, but the checks read the device (``.item()``: two host syncs per call on CUDA in
    the torch versions that have them). ``_safe_probs`` already makes every row a distribution."""
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(-1)


def _draw(logits: torch.Tensor, t: float, k: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """One non-greedy draw from ``logits`` [V] float32 -> token id [1] long, on the device (no host sync)."""
    return multinomial1(_safe_probs(_filtered_logits(logits, t, k, p)[None]), generator)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> int:
    """One token id from ``logits`` [V] or [1, V] (greedy when temperature < MIN_TEMPERATURE).
    ``generator`` (on the logits' device) makes the draw reproducible."""
    logits = logits.float().reshape(-1)
    greedy, t, k, p = SamplingParams(temperature, top_k, top_p).normalized(logits.numel())
    if greedy:
        return int(torch.nan_to_num(logits, nan=float("-inf")).argmax())
    return int(_draw(logits, t, k, p, generator))


class RowSampler:
    """The next token of every row of a batch, each with its own :class:`SamplingParams` and
    generator, as device ops only (no host sync; the caller reads the tokens once).

    Built once per batch composition (the per-row parameters become tensors then), used every step:

    * greedy rows: one argmax over the batch;
    * rows without a generator: one batched draw, per-row temperature, top-k and top-p as tensors
      [R] (the same cut as :func:`sample_next`: top-k keeps every logit >= the k-th, top-p the
      smallest set of mass >= p after top-k);
    * rows with a generator (seeded): row by row, exactly the ops of :func:`sample_next`, so a seeded
      row's tokens are the same alone and in any batch (one generator stream per row cannot be
      drawn in one op without changing which tokens a seed gives).
    """

    def __init__(self, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                 vocab: int, device: torch.device | str):
        self.n, self.vocab = len(params), vocab
        norm = [p.normalized(vocab) for p in params]  # (greedy, temperature, top_k, top_p)
        self.all_greedy = all(g for g, *_ in norm)
        self.seeded = [(i, *norm[i][1:], generators[i]) for i in range(self.n)
                       if not norm[i][0] and generators[i] is not None]
        batched = [i for i in range(self.n) if not norm[i][0] and generators[i] is None]
        self.batched = None
        if batched:
            dev = torch.device(device)
            self.batched = torch.tensor(batched, device=dev)
            self.temp = torch.tensor([[norm[i][1]] for i in batched], device=dev)                # [R, 1]
            ks = [norm[i][2] for i in batched]
            ps = [norm[i][3] for i in batched]
            self.top_k = torch.tensor([[k - 1 if k else vocab - 1] for k in ks], device=dev) if any(ks) else None
            self.top_p = (torch.tensor([[p] for p in ps], device=dev), torch.tensor([[p < 1.0] for p in ps], device=dev)) \
                if any(p < 1.0 for p in ps) else None

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [n, V] -> token ids [n] long on the logits' device."""
        x = logits.float()
        out = torch.nan_to_num(x, nan=float("-inf")).argmax(-1)  # every row: the greedy ones keep it
        if self.all_greedy:
            return out
        if self.batched is not None:
            out.index_copy_(0, self.batched, self._draw_batched(x.index_select(0, self.batched)))
        for i, t, k, p, gen in self.seeded:
            out[i:i + 1] = _draw(x[i], t, k, p, gen)
        return out

    def _draw_batched(self, x: torch.Tensor) -> torch.Tensor:
        """[R, V] float32 logits of the unseeded rows -> one draw each [R] (global RNG)."""
        x = x / self.temp
        if self.top_k is not None:  # rows without top-k cut at the V-th (smallest) logit: nothing
            kth = x.sort(-1, descending=True).values.gather(1, self.top_k)
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p is not None:
            p, on = self.top_p
            sorted_x, idx = x.sort(-1, descending=True)
            probs = sorted_x.softmax(-1)
            remove = (probs.cumsum(-1) - probs > p) & on  # rows with top_p off keep everything
            x = x.scatter(1, idx, sorted_x.masked_fill(remove, float("-inf")))
        return multinomial1(_safe_probs(x))


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """The next token of every row of ``logits`` [B, V] with its own parameters and generator
    (:class:`RowSampler`; seeded rows each exactly as :func:`sample_next` draws them)."""
    b, vocab = logits.shape
    return RowSampler(params, generators, vocab, logits.device).sample(logits).tolist()
