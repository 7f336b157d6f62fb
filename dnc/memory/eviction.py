"""Eviction policies: which slots of a full level to drop (L2) or to compress first (L0/L1).

Every policy maps a level's metadata to a *keep score* ``[B, n]`` (higher = keep). Invalid slots
are always dropped first by the caller. Scores are computed batched: no Python loop over slots.
"""

from __future__ import annotations

import torch

from .bank import BankLevel


def _z(x: torch.Tensor) -> torch.Tensor:
    """Standardise along the slot dim so differently scaled signals can be summed."""
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True, unbiased=False) + 1e-6)


class EvictionPolicy:
    """Base interface. ``now`` is the bank's segment counter (the clock of ``last_access``): an int
    or a 0-d tensor on the level's device."""

    name = "base"

    def keep_scores(self, level: BankLevel, now: int | torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class LRUPolicy(EvictionPolicy):
    """Least recently used: drop the slot whose last access is oldest."""

    name = "lru"

    def keep_scores(self, level, now, alpha=None):
        return level.last_access.clone()


class LFUPolicy(EvictionPolicy):
    """Least frequently used: drop the slot with the fewest accesses (recency breaks ties)."""

    name = "lfu"

    def keep_scores(self, level, now, alpha=None):
        return level.access + 1e-3 * torch.tanh(level.last_access - now)


class SaliencePolicy(EvictionPolicy):
    """Drop the slot with the lowest salience (EMA of received attention mass)."""

    name = "salience"

    def keep_scores(self, level, now, alpha=None):
        return torch.log(level.salience.clamp_min(1e-6))


class HybridPolicy(EvictionPolicy):
    """LRU + salience: standardised recency plus standardised log-salience."""

    name = "hybrid"

    def keep_scores(self, level, now, alpha=None):
        return _z(level.last_access) + _z(torch.log(level.salience.clamp_min(1e-6)))


class AdaptivePolicy(EvictionPolicy):
    """Mixes recency and frequency with a per-sequence weight ``alpha`` in [0, 1] that the bank
    learns online (ARC-like): alpha rises when attention goes to recently written slots and falls
    when it goes to old, often-used ones. Salience is added as a tie-breaker."""

    name = "adaptive"

    def keep_scores(self, level, now, alpha=None):
        a = (alpha if alpha is not None else torch.full_like(level.access[:, 0], 0.5)).unsqueeze(-1)
        sal = torch.log(level.salience.clamp_min(1e-6))
        return a * _z(level.last_access) + (1 - a) * _z(level.access) + 0.25 * _z(sal)


POLICIES: dict[str, type[EvictionPolicy]] = {
    p.name: p for p in (LRUPolicy, LFUPolicy, SaliencePolicy, HybridPolicy, AdaptivePolicy)
}


def get_policy(name: str) -> EvictionPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]()
