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

from .ragged import upload

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
    """One non-greedy draw from ``logits`` [V] float32 -> token id [1] long, on the device (no host sync).
    :func:`sample_next`'s draw, one row at a time; :class:`RowSampler` gives a seeded row the same token."""
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
    * sampled rows, seeded or not: one batched draw, per-row temperature, top-k and top-p as tensors
      [S] (the same cut as :func:`sample_next`: top-k keeps every logit >= the k-th, top-p the
      smallest set of mass >= p after top-k), then ``argmax(probs / q)`` with ``q ~ Exp(1)`` as in
      :func:`multinomial1`. The noise ``q`` [S, V] is the one per-row part: the rows without a
      generator fill theirs with one draw from the global RNG, each seeded row its own row from its
      own generator (the V draws ``multinomial1`` makes for it), so a seeded row's tokens are those
      of :func:`sample_next` with the same generator, alone and in any batch (every other op acts on
      each row alone).
    """

    def __init__(self, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                 vocab: int, device: torch.device | str):
        self.n, self.vocab = len(params), vocab
        norm = [p.normalized(vocab) for p in params]  # (greedy, temperature, top_k, top_p)
        unseeded = [i for i in range(self.n) if not norm[i][0] and generators[i] is None]
        seeded = [i for i in range(self.n) if not norm[i][0] and generators[i] is not None]
        rows = unseeded + seeded  # the sampled rows, unseeded first: their noise is one slice
        self.rows = None
        if not rows:
            return
        dev = torch.device(device)
        self.rows = upload(rows, dev)  # (no host sync: a composition change must not wait for queued steps)
        temps = [norm[i][1] for i in rows]
        if dev.type == "cuda":
            # CUDA computes ``logits / t`` (a Python number, as sample_next divides) as a multiply by
            # the reciprocal torch rounds to float32; dividing by a tensor would round differently
            # (1 ulp), so take torch's very reciprocal and multiply: seeded tokens stay sample_next's.
            self.scale = torch.mul, torch.cat([torch.ones(1, 1, device=dev) / t for t in temps])  # [S, 1]
        else:  # the CPU truly divides, by a tensor as by a number
            self.scale = torch.div, upload([[t] for t in temps], dev, torch.float32)                  # [S, 1]
        ks = [norm[i][2] for i in rows]
        ps = [norm[i][3] for i in rows]
        self.top_k = upload([[k - 1 if k else vocab - 1] for k in ks], dev) if any(ks) else None
        self.top_p = (upload([[p] for p in ps], dev, torch.float32), upload([[p < 1.0] for p in ps], dev, torch.bool)) \
            if any(p < 1.0 for p in ps) else None
        # Exp(1) noise [S, V], refilled every step; the views are made here so that a step's only
        # per-row op is a seeded row's exponential_ (the draw its generator must make on its own)
        self.noise = torch.empty(len(rows), vocab, device=dev)
        self.unseeded_noise = self.noise[:len(unseeded)] if unseeded else None
        self.seeded_noise = [(self.noise[j], generators[i]) for j, i in enumerate(seeded, len(unseeded))]

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [n, V] -> token ids [n] long on the logits' device."""
        x = logits.float()
        out = torch.nan_to_num(x, nan=float("-inf")).argmax(-1)  # every row: the greedy ones keep it
        if self.rows is None:
            return out
        if self.unseeded_noise is not None:
            self.unseeded_noise.exponential_(1)  # one draw from the global RNG for all of them
        for q, gen in self.seeded_noise:
            q.exponential_(1, generator=gen)
        return out.index_copy_(0, self.rows, self._draw_rows(x.index_select(0, self.rows)))

    def _draw_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[S, V] float32 logits of the sampled rows -> one draw each [S] long, with ``self.noise``."""
        op, t = self.scale
        x = op(x, t)
        if self.top_k is not None:  # rows without top-k cut at the V-th (smallest) logit: nothing
            kth = x.sort(-1, descending=True).values.gather(1, self.top_k)
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p is not None:
            p, on = self.top_p
            sorted_x, idx = x.sort(-1, descending=True)
            probs = sorted_x.softmax(-1)
            remove = (probs.cumsum(-1) - probs > p) & on  # rows with top_p off keep everything
            x = x.scatter(1, idx, sorted_x.masked_fill(remove, float("-inf")))
        return (_safe_probs(x) / self.noise).argmax(-1)  # multinomial1's draw, with the noise drawn above


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """The next token of every row of ``logits`` [B, V] with its own parameters and generator
    (:class:`RowSampler`; seeded rows each exactly as :func:`sample_next` draws them)."""
    b, vocab = logits.shape
    return RowSampler(params, generators, vocab, logits.device).sample(logits).tolist()
