"""One optimizer step (micro-batches, autocast, clipping) and the per-sequence loss.

Shapes: B batch, T tokens, V vocab."""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Target id that no loss counts (padding, prompt positions)."""


def autocast_ctx(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU trains in float32)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy per sequence over counted positions -> [B] float32 (0 where none count).

    logits [B, T, V], targets [B, T] (-100 = ignore), loss_mask [B, T] bool or None."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp_min(0), reduction="none")  # [B, T]
    mask = targets != IGNORE_INDEX
    if loss_mask is not None:
        mask = mask & loss_mask.bool()
    mask = mask.float()
    return (ce * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def no_sync(model: nn.Module):
    """Context that skips the gradient all-reduce for a non-final micro-batch (DDP and FSDP2)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        @contextlib.contextmanager
        def ctx():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return ctx()
    return contextlib.nullcontext()


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def select_step_path(model: nn.Module, tokens: int) -> str | None:
    """Let the model's step runner pick its path for a training forward over ``tokens`` tokens per
    sequence (``GraphedTrainSegments.select_for_length``: the ``graphs_min_segments`` gate).
    Returns the path, or None when the runner has no such choice."""
    from dnc.parallel import unwrap

    runner = getattr(unwrap(model), "step_runner", None)
    select = getattr(runner, "select_for_length", None)
    return select(tokens) if select is not None else None


def train_step(model: nn.Module, batches: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]],
               optimizer: torch.optim.Optimizer, *, clip: float = 1.0, bf16: bool = True,
               device: torch.device | None = None) -> dict[str, Any]:
    """One optimizer step over one or more micro-batches (gradient accumulation).

    Each batch holds ``tokens`` [B, T] long, ``targets`` [B, T] long (-100 = ignore) and optionally
    ``loss_mask`` [B, T] bool. Returns floats ``loss``, ``lm_loss``, ``recon_loss``, ``grad_norm``,
    ``tokens`` (positions processed), the model's ``mem/*`` metrics of the last micro-batch, and
    ``sample_losses``: a [sum of B] float32 CPU tensor of per-sequence losses (curriculum feedback).

    The scalars and the per-sequence losses stay on the device until one copy to the host after
    the optimizer step: one synchronisation per step (plus the model's ``mem/*`` statistics, one
    per forward) rather than five per micro-batch.
    """
    if isinstance(batches, dict):
        batches = [batches]
    device = device or next(model.parameters()).device
    model.train()
    optimizer.zero_grad(set_to_none=True)
    n = len(batches)
    tokens = 0
    scalars: list[torch.Tensor] = []   # per micro-batch: [loss, lm_loss, recon_loss] float32, on the device
    has_lm: list[bool] = []
    sample_losses: list[torch.Tensor] = []
    mem: dict[str, float] = {}
    for i, batch in enumerate(batches):
        batch = batch_to_device(batch, device)
        select_step_path(model, batch["tokens"].shape[1])
        ctx = no_sync(model) if i < n - 1 else contextlib.nullcontext()
        with ctx:
            with autocast_ctx(device, bf16):
                out = model(batch["tokens"], targets=batch["targets"], loss_mask=batch.get("loss_mask"))
            (out.loss / n).backward()
        zero = out.loss.new_zeros((), dtype=torch.float32)
        lm = out.lm_loss.detach().float() if out.lm_loss is not None else zero
        recon = torch.as_tensor(out.recon_loss, device=zero.device).detach().float() \
            if out.recon_loss is not None else zero
        scalars.append(torch.stack([out.loss.detach().float(), lm, recon]))
        has_lm.append(out.lm_loss is not None)
        tokens += int(batch["tokens"].numel())
        with torch.no_grad():
            sample_losses.append(per_sample_loss(out.logits.detach(), batch["targets"], batch.get("loss_mask")))
        mem = dict(getattr(out, "metrics", None) or {})
    if clip > 0:
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    else:
        gn = torch.sqrt(sum((p.grad.detach().float() ** 2).sum() for p in model.parameters() if p.grad is not None))
    if hasattr(gn, "full_tensor"):  # FSDP2 returns a DTensor norm
        gn = gn.full_tensor()
    optimizer.step()
    # the one host sync of the step: every scalar and per-sequence loss in a single copy
    host = torch.cat([*scalars, torch.as_tensor(gn, device=scalars[0].device).float().reshape(1),
                      *sample_losses]).cpu()
    vals = host[:3 * n + 1].tolist()
    tot = {"loss": 0.0, "lm_loss": 0.0, "recon_loss": 0.0}
    for i in range(n):  # the same float arithmetic, in the same order, as one float() per value did
        tot["loss"] += vals[3 * i] / n
        tot["lm_loss"] += vals[3 * i + 1] / n if has_lm[i] else 0.0
        tot["recon_loss"] += vals[3 * i + 2] / n
    return {**tot, "grad_norm": vals[3 * n], "tokens": tokens, **mem, "sample_losses": host[3 * n + 1:]}
