"""AdamW with decay groups, and the LR schedule: warmup, cosine decay, plateau scale."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from dnc.training.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decay on >= 2-D weights except embeddings; fused kernels on CUDA."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and "emb" not in name.split(".")[-2 if "." in name else 0]:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = any(p.is_cuda for p in model.parameters())
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if on_cuda:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


class PlateauDetector:
    """Lowers an LR scale when a (smoothed) loss stops improving.

    ``update(value)`` is called once per evaluation; after ``patience`` calls without a relative
    improvement of ``threshold`` over the best value, ``scale *= factor`` (floored at
    ``min_scale``) and the counter restarts. ``reset()`` forgets the best value (used on a
    curriculum stage change, where the loss jumps for a reason that is not a plateau).
    """

    def __init__(self, patience: int, factor: float, threshold: float, min_scale: float):
        self.patience, self.factor, self.threshold, self.min_scale = patience, factor, threshold, min_scale
        self.best = math.inf
        self.bad = 0
        self.scale = 1.0
        self.num_reductions = 0

    def update(self, value: float) -> bool:
        if self.patience <= 0 or not math.isfinite(value):
            return False
        if value < self.best * (1.0 - self.threshold):
            self.best, self.bad = value, 0
            return False
        self.bad += 1
        if self.bad >= self.patience and self.scale > self.min_scale:
            self.scale = max(self.min_scale, self.scale * self.factor)
            self.bad = 0
            self.best = value
            self.num_reductions += 1
            return True
        return False

    def reset(self) -> None:
        self.best, self.bad = math.inf, 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best if math.isfinite(self.best) else None, "bad": self.bad,
                "scale": self.scale, "num_reductions": self.num_reductions}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.best = math.inf if d.get("best") is None else float(d["best"])
        self.bad, self.scale = int(d["bad"]), float(d["scale"])
        self.num_reductions = int(d.get("num_reductions", 0))


class LRSchedule:
    """Linear warmup to ``lr``, cosine decay to ``lr * min_lr_ratio`` at ``total_steps``,
    multiplied by the plateau detector's scale. ``lr_at(step)`` is the LR for the update that
    produces step ``step + 1``.

    ``rewarm(step)`` adds a second linear warmup over ``warmup_steps`` starting at ``step``: a
    run resumed without its optimizer state (a portable checkpoint, ``dnc.training.portable``)
    starts AdamW with zero moments, whose first updates at full LR are a shock to trained weights.
    The re-warm start is part of ``state_dict()``, so a checkpoint written mid-re-warm resumes it."""

    def __init__(self, cfg: TrainConfig):
        self.base_lr, self.warmup, self.total = cfg.lr, cfg.warmup_steps, cfg.total_steps
        self.min_ratio = cfg.min_lr_ratio
        self.plateau = PlateauDetector(cfg.plateau_patience, cfg.plateau_factor, cfg.plateau_threshold,
                                       cfg.plateau_min_scale)
        self.rewarm_from: int | None = None
        """Step at which a re-warm started (None = none)."""

    def base_at(self, step: int) -> float:
        if self.warmup > 0 and step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, max(0.0, (step - self.warmup) / span))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.base_lr * (self.min_ratio + (1.0 - self.min_ratio) * cosine)

    def rewarm(self, step: int) -> None:
        """Ramp the LR linearly from ~0 back to the schedule over ``warmup_steps`` from ``step``."""
        self.rewarm_from = step

    def rewarm_factor(self, step: int) -> float:
        """In (0, 1]: the re-warm's share of the scheduled LR at ``step`` (1 without a re-warm)."""
        if self.rewarm_from is None or self.warmup <= 0:
            return 1.0
        return min(1.0, max(1, step - self.rewarm_from + 1) / self.warmup)

    def lr_at(self, step: int) -> float:
        return self.base_at(step) * self.plateau.scale * self.rewarm_factor(step)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"plateau": self.plateau.state_dict()}
        if self.rewarm_from is not None:   # absent otherwise: checkpoints without a re-warm stay as they were
            d["rewarm_from"] = self.rewarm_from
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.plateau.load_state_dict(d["plateau"])
        self.rewarm_from = d.get("rewarm_from")
