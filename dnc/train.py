"""Framework-free training: config, optimizer, schedule, train step, evaluation, checkpoints, loop.

No Ray here. ``ray_jobs/worker.py`` runs the same :class:`Trainer` inside Ray Train workers and
passes in the parallelism wrapper (DDP/FSDP) and a report callback; :func:`fit` runs it in one
process. Both write the same checkpoint layout::

    <ckpt>/model.safetensors, config.json, extra.json   dnc.checkpoint.save_checkpoint (load_checkpoint(<ckpt>) works)
    <ckpt>/optimizer.pt                                  full (unsharded) optimizer state, keyed by parameter name
    <ckpt>/train_state.json                              TrainState: step, schedule, plateau, curriculum, configs
    <ckpt>/rng/rank_00000.pt                             per-rank torch/CUDA/numpy/python RNG + data-source state

Shapes: B batch, T tokens, V vocab.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dnc.config import ConfigError, DNCConfig, preset

IGNORE_INDEX = -100


# ==============================================================================================
# Config
# ==============================================================================================
@dataclass
class TrainConfig:
    """Training hyperparameters and run switches (model shape lives in :class:`DNCConfig`)."""

    lr: float = 3e-3
    """Peak learning rate reached after warmup."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at ``lr * min_lr_ratio``."""
    warmup_steps: int = 20
    """Linear warmup from ~0 to ``lr`` over this many optimizer steps."""
    total_steps: int = 200
    """Optimizer steps the schedule spans (the run ends here unless ``max_steps`` is smaller)."""
    max_steps: int | None = None
    """Stop after this global step without changing the schedule (None = ``total_steps``);
    rerunning with a larger value resumes."""
    max_minutes: float | None = None
    """Wall-clock budget of one attempt (evaluation included): at the first log step past it the
    run checkpoints and stops, without changing the schedule. Rerunning resumes with a new budget."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices (norms, biases and embeddings get none)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    batch_size: int = 8
    """Sequences per micro-batch per worker (corpus text always; curriculum tasks unless
    ``batch_tokens`` is set)."""
    batch_tokens: int | None = None
    """Curriculum token budget per micro-batch per worker: a batch holds
    ``max(1, batch_tokens // stage.max_len)`` sequences, so short early stages train on many
    samples per step and long late ones on few (None = always ``batch_size``)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (global batch = batch_size*grad_accum*workers)."""
    max_len: int = 256
    """Longest training sequence in tokens; curriculum lengths above it are clamped."""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU, which trains in float32)."""
    compile: bool = False
    """``torch.compile`` each transformer block (CUDA; the segment loop stays eager)."""
    grad_checkpointing: bool = False
    """Recompute block activations in backward (sets ``DNCConfig.grad_checkpointing``)."""
    log_interval: int = 10
    """Steps between metric reports (JSONL/W&B, and ``ray.train.report`` under Ray)."""
    eval_interval: int = 50
    """Steps between curriculum evaluations (exact match, greedy generation) and promotion checks."""
    eval_samples: int = 16
    """Samples per task per evaluation."""
    checkpoint_interval: int = 50
    """Steps between checkpoints; must be a multiple of ``log_interval``. A final one is always written."""
    curriculum_dir: str = "configs/curriculum"
    """Folder with one YAML per curriculum stage (relative paths also resolve against the repo)."""
    curriculum_start: str | None = None
    """Stage to start a fresh run in (None = the first stage)."""
    init_from: str | None = None
    """Start a *fresh* run from the weights of this checkpoint (a ``step_*`` directory or a run
    directory, local or fsspec URI); optimizer, schedule and curriculum start anew. The model
    config is this run's own, and only its parameter shapes must match: a run can, e.g., learn the
    memory with 512-token segments and continue at 2048. Ignored when the run resumes."""
    curriculum_segment_len: int | None = None
    """Tokens per segment for stage lengths given in segments (None = the model's ``segment_len``).
    Set it to the DNC's to train the one-segment baseline on the same token lengths."""
    corpus_ratio: float = 0.0
    """Fraction of steps that train on corpus text instead of curriculum tasks (needs a corpus)."""
    corpus_eval_bytes: int = 65536
    """Held-out corpus bytes scored for bits per byte at each evaluation (0 = skip)."""
    seed: int = 0
    """Seed for init (identical on all ranks) and data (offset by rank)."""
    plateau_patience: int = 3
    """Evaluations without relative improvement of the smoothed loss before the LR is lowered
    (0 = off)."""
    plateau_factor: float = 0.5
    """Multiply the LR scale by this on a plateau."""
    plateau_threshold: float = 0.01
    """Relative improvement that counts as progress for the plateau detector."""
    plateau_min_scale: float = 0.05
    """The plateau never lowers the LR scale below this."""
    fail_at_step: int | None = None
    """Test fault switch: after this step, rank ``fail_rank`` dies once (only when ``fail_marker``
    does not exist yet; the marker is created first, so a restarted run does not fail again)."""
    fail_rank: int = -1
    """Rank that fails (-1 = the last rank)."""
    fail_mode: str = "exit"
    """``exit`` (process dies, like a lost worker) or ``raise`` (Python exception)."""
    fail_marker: str | None = None
    """Marker path (local or fsspec URI) that records that the fault has fired."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.total_steps >= 1, f"total_steps must be >= 1, got {self.total_steps}")
        need(0 <= self.warmup_steps <= self.total_steps,
             f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        need(self.max_minutes is None or self.max_minutes > 0, f"max_minutes must be > 0, got {self.max_minutes}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.batch_tokens is None or self.batch_tokens >= 1, f"batch_tokens must be >= 1, got {self.batch_tokens}")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(self.max_len >= 8, f"max_len must be >= 8, got {self.max_len}")
        for name in ("log_interval", "eval_interval", "checkpoint_interval"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.checkpoint_interval % self.log_interval == 0,
             f"checkpoint_interval ({self.checkpoint_interval}) must be a multiple of "
             f"log_interval ({self.log_interval}): checkpoints ride on metric reports")
        need(self.eval_samples >= 1, f"eval_samples must be >= 1, got {self.eval_samples}")
        need(self.curriculum_segment_len is None or self.curriculum_segment_len >= 1,
             f"curriculum_segment_len must be >= 1 (or null = the model's), got {self.curriculum_segment_len}")
        need(0.0 <= self.corpus_ratio <= 1.0, f"corpus_ratio must be in [0, 1], got {self.corpus_ratio}")
        need(self.corpus_eval_bytes >= 0, "corpus_eval_bytes must be >= 0")
        need(self.plateau_patience >= 0, f"plateau_patience must be >= 0 (0 = off), got {self.plateau_patience}")
        need(0 < self.plateau_factor <= 1, f"plateau_factor must be in (0, 1], got {self.plateau_factor}")
        need(self.plateau_threshold >= 0, "plateau_threshold must be >= 0")
        need(0 < self.plateau_min_scale <= 1, "plateau_min_scale must be in (0, 1]")
        need(self.fail_at_step is None or self.fail_at_step >= 1, "fail_at_step must be >= 1")
        need(self.fail_mode in ("exit", "raise"), f"fail_mode must be exit|raise, got {self.fail_mode!r}")

    @property
    def stop_step(self) -> int:
        return min(self.total_steps, self.max_steps) if self.max_steps else self.total_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown train config fields: {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def model_config_for(tcfg: TrainConfig, preset_name: str = "tiny", **overrides: Any) -> DNCConfig:
    """The model config for a run: a preset plus overrides plus the training-time switches."""
    overrides = dict(overrides)
    if tcfg.grad_checkpointing:
        overrides["grad_checkpointing"] = True
    return preset(preset_name, **overrides)


# ==============================================================================================
# Optimizer and schedule
# ==============================================================================================
def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under a DDP wrapper or ``torch.compile`` (FSDP2 shards in place)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


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
    produces step ``step + 1``."""

    def __init__(self, cfg: TrainConfig):
        self.base_lr, self.warmup, self.total = cfg.lr, cfg.warmup_steps, cfg.total_steps
        self.min_ratio = cfg.min_lr_ratio
        self.plateau = PlateauDetector(cfg.plateau_patience, cfg.plateau_factor, cfg.plateau_threshold,
                                       cfg.plateau_min_scale)

    def base_at(self, step: int) -> float:
        if self.warmup > 0 and step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, max(0.0, (step - self.warmup) / span))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.base_lr * (self.min_ratio + (1.0 - self.min_ratio) * cosine)

    def lr_at(self, step: int) -> float:
        return self.base_at(step) * self.plateau.scale

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"plateau": self.plateau.state_dict()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.plateau.load_state_dict(d["plateau"])


# ==============================================================================================
# Step
# ==============================================================================================
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


def _no_sync(model: nn.Module):
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


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train_step(model: nn.Module, batches: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]],
               optimizer: torch.optim.Optimizer, *, clip: float = 1.0, bf16: bool = True,
               device: torch.device | None = None) -> dict[str, Any]:
    """One optimizer step over one or more micro-batches (gradient accumulation).

    Each batch holds ``tokens`` [B, T] long, ``targets`` [B, T] long (-100 = ignore) and optionally
    ``loss_mask`` [B, T] bool. Returns floats ``loss``, ``lm_loss``, ``recon_loss``, ``grad_norm``,
    ``tokens`` (positions processed), the model's ``mem/*`` metrics of the last micro-batch, and
    ``sample_losses``: a [sum of B] float32 CPU tensor of per-sequence losses (curriculum feedback).
    """
    if isinstance(batches, dict):
        batches = [batches]
    device = device or next(model.parameters()).device
    model.train()
    optimizer.zero_grad(set_to_none=True)
    n = len(batches)
    tot = {"loss": 0.0, "lm_loss": 0.0, "recon_loss": 0.0}
    tokens = 0
    sample_losses: list[torch.Tensor] = []
    mem: dict[str, float] = {}
    for i, batch in enumerate(batches):
        batch = _to_device(batch, device)
        ctx = _no_sync(model) if i < n - 1 else contextlib.nullcontext()
        with ctx:
            with autocast_ctx(device, bf16):
                out = model(batch["tokens"], targets=batch["targets"], loss_mask=batch.get("loss_mask"))
            (out.loss / n).backward()
        tot["loss"] += float(out.loss.detach()) / n
        tot["lm_loss"] += float(out.lm_loss.detach()) / n if out.lm_loss is not None else 0.0
        tot["recon_loss"] += float(torch.as_tensor(out.recon_loss).detach()) / n if out.recon_loss is not None else 0.0
        tokens += int(batch["tokens"].numel())
        with torch.no_grad():
            sample_losses.append(per_sample_loss(out.logits.detach(), batch["targets"], batch.get("loss_mask")).cpu())
        mem = dict(getattr(out, "metrics", None) or {})
    if clip > 0:
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    else:
        gn = torch.sqrt(sum((p.grad.detach().float() ** 2).sum() for p in model.parameters() if p.grad is not None))
    if hasattr(gn, "full_tensor"):  # FSDP2 returns a DTensor norm
        gn = gn.full_tensor()
    optimizer.step()
    return {**tot, "grad_norm": float(gn), "tokens": tokens, **mem, "sample_losses": torch.cat(sample_losses)}


# ==============================================================================================
# Evaluation
# ==============================================================================================
def greedy_predict_fn(model: nn.Module, device: torch.device | None = None, bf16: bool = True):
    """``predict(prompt_ids, max_new_tokens) -> list[int]``: greedy generation from a fresh memory
    state, stopping only at ``max_new_tokens`` (so the number of forward passes is deterministic)."""
    m = unwrap(model)
    dev = device or next(m.parameters()).device

    def predict(prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        with torch.no_grad(), autocast_ctx(dev, bf16):
            ids = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=dev)
            return [int(t) for t in m.generate(ids, max_new_tokens=int(max_new_tokens), temperature=0.0,
                                               stop_tokens=())]
    return predict


def evaluate_tasks(model: nn.Module, tasks: Sequence[str] | Any, lengths: Sequence[int], n: int = 16, *,
                   seed: int = 1234, difficulty: float | None = None, device: torch.device | None = None,
                   bf16: bool = True, task_kwargs: dict[str, dict[str, Any]] | None = None,
                   progress: Callable[[str, int, float], None] | None = None) -> dict[str, dict[int, float]]:
    """Exact-match accuracy per task and length with greedy ``model.generate``.

    ``tasks``: task names of :data:`dnc.data.tasks.TASKS`, or a ``Curriculum`` (its current
    stage's tasks, difficulties and task knobs). Each sample is answered span by span through
    :func:`dnc.data.tasks.predict_answer` and scored with :func:`dnc.data.tasks.score`.
    Samples depend only on ``(seed, task, length)``. Returns ``{task: {length: accuracy}}``."""
    from dnc.data import tasks as task_lib

    diffs: dict[str, float] = {}
    if not isinstance(tasks, (list, tuple)):
        cur = tasks
        task_kwargs = task_kwargs or cur.stage.task_kwargs
        diffs = dict(cur.difficulty)
        tasks = cur.stage.active_tasks
    predict = greedy_predict_fn(model, device, bf16)
    m = unwrap(model)
    was_training = m.training
    m.eval()
    results: dict[str, dict[int, float]] = {}
    try:
        for task in tasks:
            results[task] = {}
            d = difficulty if difficulty is not None else diffs.get(task, 0.5)
            for length in lengths:
                rng = np.random.default_rng([seed, _stable_hash(task), int(length)])
                correct = 0
                for _ in range(n):
                    sample = task_lib.generate(task, rng, int(length), d, **(task_kwargs or {}).get(task, {}))
                    correct += int(task_lib.score(sample, task_lib.predict_answer(sample, predict)))
                results[task][int(length)] = correct / n
                if progress:
                    progress(task, int(length), results[task][int(length)])
    finally:
        m.train(was_training)
    return results


def bits_per_byte(model: nn.Module, data: bytes | str | Iterable[bytes | str], context_len: int, *,
                  max_bytes: int | None = None, batch_size: int = 4, device: torch.device | None = None,
                  bf16: bool = True) -> float:
    """Bits per byte of text under the byte tokenizer: non-overlapping windows of
    ``context_len + 1`` bytes, each position predicting the next byte from a fresh memory state;
    ``sum(CE nats) / (ln 2 * bytes scored)`` (``dnc.data.corpus.bits_per_byte``)."""
    from dnc.data.corpus import bits_per_byte as bpb

    m = unwrap(model)
    dev = device or next(m.parameters()).device
    if isinstance(data, (bytes, str)):
        data = [data]
    buf = b"".join(d.encode("utf-8") if isinstance(d, str) else bytes(d) for d in data)
    if max_bytes:
        buf = buf[:max_bytes]
    ids = torch.frombuffer(bytearray(buf), dtype=torch.uint8).long()
    win = context_len + 1
    n_win = len(ids) // win
    if n_win == 0:
        raise ValueError(f"need at least {win} bytes to score bits per byte, got {len(ids)}")
    windows = ids[: n_win * win].view(n_win, win)
    nats, count = 0.0, 0
    was_training = m.training
    m.eval()
    try:
        with torch.no_grad():
            for i in range(0, n_win, batch_size):
                w = windows[i:i + batch_size].to(dev)
                with autocast_ctx(dev, bf16):
                    out = m(w[:, :-1])
                nats += float(F.cross_entropy(out.logits.float().transpose(1, 2), w[:, 1:], reduction="sum"))
                count += int(w[:, 1:].numel())
    finally:
        m.train(was_training)
    return bpb(nats, count)


# ==============================================================================================
# Data sources (curriculum tasks; corpus token windows)
# ==============================================================================================
def _stable_hash(s: str) -> int:
    return int.from_bytes(s.encode("utf-8")[:8].ljust(8, b"\0"), "little") % (2**31)


def resolve_path(path: str) -> str:
    """A relative path as given if it exists from the cwd, else relative to the repository root
    (Ray workers may run in another directory)."""
    if "://" in path or os.path.isabs(path) or os.path.exists(path):
        return path
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cand = os.path.join(root, path)
    return cand if os.path.exists(cand) else path


class TaskSource:
    """Curriculum batches for one rank: wraps :class:`dnc.data.curriculum.Curriculum`.

    Every rank keeps an identical curriculum: losses from all ranks are gathered before
    ``record``, and the evaluation (rank 0) result is broadcast. Each rank draws its samples from
    its own numpy generator (``sample_batch(rng=...)`` leaves the curriculum's rng untouched), so
    ranks see different data. Stage lengths given in segments become tokens of
    ``TrainConfig.curriculum_segment_len`` or else the model's ``segment_len``; stages whose lengths
    exceed ``TrainConfig.max_len`` are clamped."""

    def __init__(self, cfg: TrainConfig, rank: int, pad_to_multiple: int, segment_len: int):
        from dnc.data.curriculum import Curriculum, load_stages

        self.cfg, self.rank = cfg, rank
        stages = load_stages(resolve_path(cfg.curriculum_dir), segment_len=cfg.curriculum_segment_len or segment_len)
        for st in stages:
            if st.max_len > cfg.max_len:
                st.max_len = cfg.max_len
                st.min_len = min(st.min_len, cfg.max_len)
                st.validate()
        self.curriculum = Curriculum(stages, seed=cfg.seed, pad_to_multiple=pad_to_multiple)
        if cfg.curriculum_start:
            names = [st.name for st in stages]
            if cfg.curriculum_start not in names:
                raise ConfigError(f"curriculum_start {cfg.curriculum_start!r} is not a stage; stages: {names}")
            self.curriculum._enter_stage(names.index(cfg.curriculum_start), step=0)
        self.rng = np.random.default_rng([cfg.seed, 1 + rank])

    # -- batches ---------------------------------------------------------------------------------
    def batch_size(self) -> int:
        """Sequences per batch in the current stage (``batch_tokens`` / the stage's longest sample)."""
        if self.cfg.batch_tokens is None:
            return self.cfg.batch_size
        return max(1, self.cfg.batch_tokens // self.curriculum.stage.max_len)

    def next_batch(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        b = self.curriculum.sample_batch(self.batch_size(), rng=self.rng)
        return {k: b[k] for k in ("tokens", "targets", "loss_mask")}, list(b["tasks"])

    def record(self, tasks: Sequence[str], losses: Sequence[float], step: int) -> None:
        """Per-sample losses of all ranks -> per-task means -> the curriculum's loss EMA."""
        sums: dict[str, list[float]] = {}
        for t, v in zip(tasks, losses):
            sums.setdefault(t, []).append(float(v))
        self.curriculum.record_losses({t: sum(v) / len(v) for t, v in sums.items()}, step=step)

    def evaluate(self, predict: Callable, n: int, step: int) -> dict[str, float]:
        """Exact-match eval of the current stage (its min/max lengths), adaptive difficulty and
        promotion. Returns flat metrics: ``eval/acc`` (mean), ``eval/acc/<task>``,
        ``curriculum/difficulty/<task>``, ``curriculum/promoted``, ``curriculum/stage_index``."""
        stage = self.curriculum.stage.name
        acc = self.curriculum.evaluate(predict, n_per_task=n, seed=self.cfg.seed + 1234)
        mean = float(np.mean(list(acc.values()))) if acc else 0.0
        diff = self.curriculum.adjust_difficulty(acc)
        promoted = self.curriculum.maybe_promote(acc, step)
        out = {"eval/acc": mean, **{f"eval/acc/{t}": float(a) for t, a in acc.items()},
               **{f"curriculum/difficulty/{t}": float(d) for t, d in diff.items()},
               "curriculum/promoted": float(promoted)}
        out["eval/stage_acc/" + stage] = mean
        return out

    # -- state -----------------------------------------------------------------------------------
    @property
    def stage_name(self) -> str:
        return self.curriculum.stage.name

    @property
    def stage_index(self) -> int:
        return int(self.curriculum.stage_index)

    def state_dict(self) -> dict[str, Any]:
        return self.curriculum.state_dict()

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.curriculum.load_state_dict(d)

    def rng_state(self) -> dict[str, Any]:
        return {"task_rng": self.rng.bit_generator.state}

    def load_rng_state(self, d: dict[str, Any]) -> None:
        if "task_rng" in d:
            self.rng.bit_generator.state = d["task_rng"]


def corpus_windows(texts: Iterable[bytes | str], seq_len: int, batch_size: int, *, seed: int = 0,
                   rank: int = 0, world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Endless LM batches from raw text (no Ray): byte windows of ``seq_len + 1``, shuffled per
    epoch, strided by rank. Yields ``tokens``/``targets`` [B, seq_len]."""
    buf = b"".join(t.encode("utf-8") if isinstance(t, str) else bytes(t) for t in texts)
    ids = torch.frombuffer(bytearray(buf), dtype=torch.uint8).long()
    win = seq_len + 1
    n = len(ids) // win
    if n < batch_size * world_size:
        raise ValueError(f"corpus too small: {len(ids)} bytes make {n} windows of {win}, "
                         f"need >= {batch_size * world_size}")
    windows = ids[: n * win].view(n, win)
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(n, generator=g)[rank::world_size]
        for i in range(0, len(order) - batch_size + 1, batch_size):
            w = windows[order[i:i + batch_size]]
            yield {"tokens": w[:, :-1].contiguous(), "targets": w[:, 1:].contiguous()}
        epoch += 1


# ==============================================================================================
# Train state and checkpoints
# ==============================================================================================
@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs (JSON in ``train_state.json``)."""

    step: int = 0
    """Optimizer steps done."""
    tokens_seen: int = 0
    """Tokens processed across all ranks."""
    schedule: dict[str, Any] = field(default_factory=dict)
    """``LRSchedule.state_dict()`` (plateau scale, best loss, counter)."""
    data: dict[str, Any] = field(default_factory=dict)
    """Curriculum state of rank 0 (identical on all ranks); ``stage`` / ``stage_index`` for readers."""
    train_config: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    run_name: str = ""
    elapsed_s: float = 0.0
    """Training wall time accumulated over all attempts."""
    loss_ema: float | None = None
    """Smoothed training loss (plateau detector input)."""
    last_metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        d = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if torch.is_tensor(o):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """torch CPU/CUDA, numpy global and python ``random`` states."""
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                          "python": random.getstate()}
    if device is not None and device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def restore_rng(st: dict[str, Any], device: torch.device | None = None) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(st["cuda"], device)


def _is_fsdp(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict (collective under FSDP: every rank must call; rank 0 gets it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if _is_fsdp(model):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Unsharded optimizer state keyed by parameter name (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(model) if not _is_fsdp(model) else model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, osd: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if _is_fsdp(model):
        set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
    else:
        set_optimizer_state_dict(unwrap(model), optimizer, osd)


def _fs_and_path(uri: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def save_train_checkpoint(path: str, *, rank: int, model: nn.Module | None, model_config: DNCConfig,
                          model_state: dict[str, torch.Tensor] | None, optimizer_state: dict[str, Any] | None,
                          state: TrainState | None, rank_state: dict[str, Any]) -> None:
    """Write this rank's part of a checkpoint into ``path`` (a local directory or fsspec URI).

    Rank 0 writes model (via ``dnc.checkpoint.save_checkpoint``), optimizer and ``train_state.json``;
    every rank writes ``rng/rank_XXXXX.pt``. Ray Train merges the ranks' directories."""
    from dnc.checkpoint import save_checkpoint
    from dnc.model import DNC

    fs, p = _fs_and_path(path)
    fs.makedirs(p, exist_ok=True)
    fs.makedirs(f"{p}/rng", exist_ok=True)
    if rank == 0:
        assert model_state is not None and optimizer_state is not None and state is not None
        bare = model if model is not None and not _is_fsdp(model) else None
        if bare is None:
            bare = DNC(model_config)
            bare.load_state_dict(model_state)
        save_checkpoint(path, unwrap(bare), extra={"step": state.step, "stage": state.data.get("stage"),
                                                   "run_name": state.run_name})
        _torch_save(optimizer_state, fs, f"{p}/optimizer.pt")
        with fs.open(f"{p}/train_state.json", "w") as f:
            f.write(state.to_json())
    _torch_save(rank_state, fs, f"{p}/rng/rank_{rank:05d}.pt")


def _torch_save(obj: Any, fs, path: str) -> None:
    bio = io.BytesIO()
    torch.save(obj, bio)
    with fs.open(path, "wb") as f:
        f.write(bio.getvalue())


def _torch_load(fs, path: str) -> Any:
    with fs.open(path, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)


def read_train_state(path: str) -> TrainState:
    fs, p = _fs_and_path(path)
    with fs.open(f"{p}/train_state.json", "r") as f:
        return TrainState.from_json(f.read())


def read_rank_state(path: str, rank: int) -> dict[str, Any] | None:
    fs, p = _fs_and_path(path)
    f = f"{p}/rng/rank_{rank:05d}.pt"
    return _torch_load(fs, f) if fs.exists(f) else None


def read_optimizer_state(path: str) -> dict[str, Any]:
    fs, p = _fs_and_path(path)
    return _torch_load(fs, f"{p}/optimizer.pt")


# ==============================================================================================
# Metrics log (JSONL + optional W&B), written by rank 0
# ==============================================================================================
class MetricsLogger:
    """Appends ``{"step": ..., "time": ..., **metrics}`` rows to ``<run_dir>/metrics.jsonl`` and
    mirrors them to W&B (``wandb="auto"``: when installed; mode from ``WANDB_MODE``, offline by
    default; run id = run name with ``resume="allow"`` so a resumed run continues the same W&B run).

    On resume from step ``s`` rows with ``step > s`` (written after the checkpoint by the failed
    attempt) are dropped so the file reads as one clean history. Remote run dirs (``s3://``...)
    get the file uploaded on ``flush()``."""

    def __init__(self, run_dir: str, run_name: str, config: dict[str, Any] | None = None,
                 wandb: str = "auto", resume_step: int | None = None, project: str = "bwr-dnc"):
        self.run_dir, self.run_name = run_dir, run_name
        self.remote = "://" in run_dir and not run_dir.startswith("file://")
        local_dir = tempfile.mkdtemp(prefix="dnc-metrics-") if self.remote else run_dir.removeprefix("file://")
        os.makedirs(local_dir, exist_ok=True)
        self.path = os.path.join(local_dir, "metrics.jsonl")
        if self.remote:
            self._download()
        self._truncate_after(resume_step)
        self.wandb = None
        if wandb != "off":
            self._init_wandb(wandb, config or {}, project, local_dir)

    def _download(self) -> None:
        fs, p = _fs_and_path(self.run_dir)
        if fs.exists(f"{p}/metrics.jsonl"):
            fs.get(f"{p}/metrics.jsonl", self.path)

    def _truncate_after(self, step: int | None) -> None:
        if step is None or not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if int(row.get("step", 0)) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        with open(self.path, "w") as f:
            f.writelines(keep)

    def _init_wandb(self, mode: str, config: dict[str, Any], project: str, local_dir: str) -> None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            if mode == "on":
                raise ImportError("wandb logging requested but wandb is not installed: pip install wandb")
            return
        import re

        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        run_id = re.sub(r"[^A-Za-z0-9_-]", "-", self.run_name)[:64]
        try:
            self.wandb = wandb.init(project=project, id=run_id, name=self.run_name, resume="allow",
                                    config=config, dir=local_dir, reinit="finish_previous")
        except Exception as e:  # never let a logging backend kill training
            if mode == "on":
                raise
            print(f"[dnc.train] W&B disabled: {type(e).__name__}: {e}")
            self.wandb = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": int(step), "time": time.time(),
               **{k: _scalar(v) for k, v in metrics.items() if k not in ("step", "time") and _scalar(v) is not None}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in row.items() if k not in ("step", "time")}, step=int(step))
            except Exception as e:
                print(f"[dnc.train] W&B log failed: {e}")

    def flush(self) -> None:
        if self.remote and os.path.exists(self.path):
            fs, p = _fs_and_path(self.run_dir)
            fs.makedirs(p, exist_ok=True)
            fs.put(self.path, f"{p}/metrics.jsonl")

    def close(self) -> None:
        self.flush()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:
                pass
            self.wandb = None


def _scalar(v: Any) -> Any:
    if isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (np.floating, np.integer)):
        return _scalar(v.item())
    if torch.is_tensor(v) and v.numel() == 1:
        return _scalar(v.item())
    return None


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """Rows of ``<run_dir>/metrics.jsonl`` (local or fsspec URI); empty when missing."""
    fs, p = _fs_and_path(run_dir)
    f = f"{p}/metrics.jsonl"
    if not fs.exists(f):
        return []
    with fs.open(f, "r") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ==============================================================================================
# The loop
# ==============================================================================================
ReportFn = Callable[[int, dict[str, float], "str | None"], None]
"""``report(step, metrics, checkpoint_dir_or_None)``: called on every rank at the same steps."""


class InjectedFault(RuntimeError):
    """Raised (or the process exits) by the ``fail_at_step`` test switch."""


class Trainer:
    """The training loop shared by :func:`fit` (one process) and Ray Train workers.

    Distributed-aware through ``torch.distributed`` only: pass ``rank``/``world_size`` and a
    ``parallelize(model) -> model`` that applies DDP or FSDP2. Every rank calls ``report`` at the
    same steps (every ``log_interval`` and at the end), with a local checkpoint directory holding
    this rank's part every ``checkpoint_interval`` steps.
    """

    def __init__(self, cfg: TrainConfig, model_config: DNCConfig, *, run_name: str = "run",
                 device: torch.device | str | None = None, rank: int = 0, world_size: int = 1,
                 parallelize: Callable[[nn.Module], nn.Module] | None = None,
                 resume_from: str | None = None,
                 corpus_batches: Iterator[dict[str, torch.Tensor]] | None = None,
                 eval_text: bytes | None = None,
                 logger: MetricsLogger | None = None,
                 progress: bool = True, progress_factory: Callable[..., Any] | None = None):
        from dnc.model import DNC
        from dnc.tokenizer import get_tokenizer

        self.cfg, self.model_config, self.run_name = cfg, model_config, run_name
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.logger = logger
        self.corpus_batches, self.eval_text = corpus_batches, eval_text
        self.tokenizer = get_tokenizer("byte")
        self._progress_on = progress and rank == 0
        self._progress_factory = progress_factory

        resume_state = read_train_state(resume_from) if resume_from else None
        rank_state = read_rank_state(resume_from, rank) if resume_from else None

        # Model: identical init on every rank (FSDP2 shards each rank's local copy).
        torch.manual_seed(cfg.seed)
        if resume_from:
            from dnc.checkpoint import load_checkpoint

            model, _ = load_checkpoint(resume_from, map_location="cpu")
            if model.config.to_dict() != model_config.to_dict():
                print(f"[dnc.train] resuming with the checkpoint's model config (differs from the requested one)")
                self.model_config = model.config
        else:
            model = DNC(model_config)
            if cfg.init_from:
                used = load_weights_from(model, cfg.init_from)
                if rank == 0:
                    print(f"[dnc.train] fresh run initialised from the weights of {used}")
        model.to(self.device)
        if cfg.compile:
            _compile_blocks(model)
        self.model = parallelize(model) if parallelize else model
        self.optimizer = build_optimizer(self.model, cfg)
        self.schedule = LRSchedule(cfg)
        # Pad task batches to a multiple of 64 tokens, not of a segment: a 256-token sample padded
        # to a 2048-token segment would spend 8x the compute on padding.
        self.data = TaskSource(cfg, rank, min(64, self.model_config.segment_len), self.model_config.segment_len) \
            if cfg.corpus_ratio < 1.0 else None
        self.state = TrainState(train_config=cfg.to_dict(), model_config=self.model_config.to_dict(),
                                world_size=world_size, run_name=run_name)
        # Chooses corpus vs task batches. Identical on every rank: Ray Data's streaming split
        # expects all ranks to pull corpus batches in step.
        self.data_rng = np.random.default_rng([cfg.seed, 10_000])
        self.resumed_from_step: int | None = None

        if resume_state is not None:
            load_optimizer_state(self.model, self.optimizer, read_optimizer_state(resume_from))
            self.schedule.load_state_dict(resume_state.schedule)
            if self.data is not None and resume_state.data.get("source"):
                self.data.load_state_dict(resume_state.data["source"])
            self.state.step, self.state.tokens_seen = resume_state.step, resume_state.tokens_seen
            self.state.elapsed_s, self.state.loss_ema = resume_state.elapsed_s, resume_state.loss_ema
            self.resumed_from_step = resume_state.step
            if resume_state.data.get("mix_rng"):
                self.data_rng.bit_generator.state = resume_state.data["mix_rng"]
            if rank_state is not None:
                restore_rng(rank_state["rng"], self.device)
                if self.data is not None:
                    self.data.load_rng_state(rank_state.get("source", {}))
            elif rank == 0 or world_size > 1:
                print(f"[dnc.train] rank {rank}: no RNG state in the checkpoint "
                      f"(was written by {resume_state.world_size} ranks); data RNG reseeded")
                torch.manual_seed(cfg.seed + 7919 * (rank + 1) + resume_state.step)
                if self.data is not None:
                    self.data.rng = np.random.default_rng([cfg.seed, 1 + rank, resume_state.step])
        self._update_stage_fields()

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.state.step

    def _update_stage_fields(self) -> None:
        if self.data is not None:
            self.state.data = {"stage": self.data.stage_name, "stage_index": self.data.stage_index,
                               "source": self.data.state_dict()}
        else:
            self.state.data = {"stage": "corpus", "stage_index": -1}
        self.state.data["mix_rng"] = self.data_rng.bit_generator.state

    def _dist(self) -> bool:
        return self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def _all_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Mean over ranks per key (ranks may report different keys, e.g. memory metrics that
        exist only once a bank holds slots; a key's mean is over the ranks that have it)."""
        if not self._dist():
            return values
        acc: dict[str, list[float]] = {}
        for d in self._gather(values):
            for k, v in d.items():
                acc.setdefault(k, []).append(float(v))
        return {k: sum(v) / len(v) for k, v in acc.items()}

    def _gather(self, obj: Any) -> list[Any]:
        if not self._dist():
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def _broadcast(self, obj: Any) -> Any:
        if not self._dist():
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _pad_to_common_length(self, micro: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Right-pad every micro-batch to the longest one across ranks (FSDP runs one all-gather
        per unit per segment, so all ranks must run the same number of segments). Padding is
        ``<pad>`` with target -100 after the content: it changes no loss."""
        lens = torch.tensor([b["tokens"].shape[1] for b in micro], dtype=torch.long)
        torch.distributed.all_reduce(lens, op=torch.distributed.ReduceOp.MAX)
        out = []
        for b, T in zip(micro, lens.tolist()):
            extra = T - b["tokens"].shape[1]
            if extra > 0:
                b = dict(b)
                b["tokens"] = F.pad(b["tokens"], (0, extra), value=self.tokenizer.pad_id)
                b["targets"] = F.pad(b["targets"], (0, extra), value=IGNORE_INDEX)
                if b.get("loss_mask") is not None:
                    b["loss_mask"] = F.pad(b["loss_mask"], (0, extra), value=False)
            out.append(b)
        return out

    def _next_batch(self) -> tuple[dict[str, torch.Tensor], list[str] | None]:
        use_corpus = self.corpus_batches is not None and (
            self.data is None or self.data_rng.random() < self.cfg.corpus_ratio)
        if use_corpus:
            return next(self.corpus_batches), None
        return self.data.next_batch()

    def _eval_model(self) -> nn.Module | None:
        """A model rank 0 can run alone: the bare module (plain/DDP) or, under FSDP, an unsharded
        copy (building it is a collective all ranks join). None on other ranks."""
        if not _is_fsdp(self.model):
            return unwrap(self.model) if self.rank == 0 else None
        from dnc.model import DNC

        sd = full_model_state(self.model)
        if self.rank != 0:
            return None
        if getattr(self, "_eval_copy", None) is None:
            self._eval_copy = DNC(self.model_config).to(self.device)
        self._eval_copy.load_state_dict(sd)
        return self._eval_copy

    def _maybe_fail(self) -> None:
        cfg = self.cfg
        if cfg.fail_at_step is None or self.step != cfg.fail_at_step:
            return
        fail_rank = cfg.fail_rank if cfg.fail_rank >= 0 else self.world_size - 1
        if self.rank != fail_rank:
            return
        if cfg.fail_marker:
            fs, p = _fs_and_path(cfg.fail_marker)
            if fs.exists(p):
                return
            fs.makedirs(os.path.dirname(p) or ".", exist_ok=True)
            with fs.open(p, "w") as f:
                f.write(json.dumps({"step": self.step, "rank": self.rank, "time": time.time()}))
        msg = f"injected fault at step {self.step} on rank {self.rank} (fail_at_step)"
        print(f"[dnc.train] {msg}", flush=True)
        if cfg.fail_mode == "exit":
            os._exit(17)
        raise InjectedFault(msg)

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Curriculum eval (+ promotion) and corpus bits per byte. Rank 0 evaluates; the result and
        the curriculum state are broadcast so every rank agrees on the stage."""
        m = self._eval_model()
        result: dict[str, Any] = {}
        if self.rank == 0:
            t0 = time.time()
            if self.data is not None:
                predict = greedy_predict_fn(m, self.device, self.cfg.bf16)
                m.eval()
                try:
                    result.update(self.data.evaluate(predict, self.cfg.eval_samples, self.step))
                finally:
                    m.train()
                result["_source"] = self.data.state_dict()
            if self.eval_text and self.cfg.corpus_eval_bytes:
                ctx = min(self.cfg.max_len, 4 * self.model_config.segment_len)
                result["eval/bpb"] = bits_per_byte(m, self.eval_text, ctx, max_bytes=self.cfg.corpus_eval_bytes,
                                                   device=self.device, bf16=self.cfg.bf16)
            result["eval/seconds"] = time.time() - t0
        result = self._broadcast(result)
        src = result.pop("_source", None)
        if src is not None and self.rank != 0:
            self.data.load_state_dict(src)
        if result.get("curriculum/promoted"):
            self.schedule.plateau.reset()
        return result

    # -- checkpoint --------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write this rank's part of a checkpoint to ``path`` (collective: all ranks call)."""
        self._update_stage_fields()
        self.state.schedule = self.schedule.state_dict()
        ms = full_model_state(self.model) if _is_fsdp(self.model) else None
        osd = full_optimizer_state(self.model, self.optimizer) if (_is_fsdp(self.model) or self.rank == 0) else None
        rank_state = {"rng": capture_rng(self.device),
                      "source": self.data.rng_state() if self.data is not None else {}}
        if self.rank == 0:
            bare = unwrap(self.model) if ms is None else None
            save_train_checkpoint(path, rank=0, model=bare, model_config=self.model_config,
                                  model_state=ms if ms is not None else {}, optimizer_state=osd,
                                  state=self.state, rank_state=rank_state)
        else:
            save_train_checkpoint(path, rank=self.rank, model=None, model_config=self.model_config,
                                  model_state=None, optimizer_state=None, state=None, rank_state=rank_state)

    # -- loop --------------------------------------------------------------------------------------
    def run(self, report: ReportFn | None = None) -> dict[str, float]:
        cfg = self.cfg
        stop = cfg.stop_step
        last: dict[str, float] = {}
        if self.step >= stop:
            return dict(self.state.last_metrics)
        bar = self._make_progress(stop)
        window: dict[str, float] = {}
        pending: dict[str, float] = {}
        n_window = 0
        t_window = time.time()
        attempt_start = time.time()
        tokens_window = 0
        while self.step < stop:
            lr = self.schedule.apply(self.optimizer, self.step)
            micro, task_lists = [], []
            for _ in range(cfg.grad_accum):
                b, tasks = self._next_batch()
                micro.append(b)
                task_lists.append(tasks)
            if self._dist() and _is_fsdp(self.model):
                micro = self._pad_to_common_length(micro)
            m = train_step(self.model, micro, self.optimizer, clip=cfg.grad_clip, bf16=cfg.bf16, device=self.device)
            self.state.step += 1
            losses = m.pop("sample_losses")
            if self.data is not None:
                self._record_task_losses(task_lists, losses)
            for k, v in m.items():
                if isinstance(v, (int, float)):
                    window[k] = window.get(k, 0.0) + float(v)
            n_window += 1
            tokens_window += m["tokens"]
            ema = self.state.loss_ema
            self.state.loss_ema = m["loss"] if ema is None else 0.9 * ema + 0.1 * m["loss"]
            if bar is not None:
                bar.update(1)
            self._maybe_fail()

            is_last = self.step >= stop
            if cfg.max_minutes is not None and self.step % cfg.log_interval == 0 and not is_last:
                # Every rank must stop at the same step (collectives), so the ranks agree on the clock.
                over = float(time.time() - attempt_start > 60.0 * cfg.max_minutes)
                is_last = self._all_mean({"over": over})["over"] > 0
                stop = self.step if is_last else stop
            metrics = pending   # evaluation results wait for the next log step
            # Evaluate on the interval and at the end of the schedule, not at an early --max-steps
            # stop: evaluation adapts the curriculum, so an extra one would make a stopped-and-resumed
            # run differ from an uninterrupted one.
            if self.step % cfg.eval_interval == 0 or self.step >= cfg.total_steps:
                t_eval = time.time()
                metrics.update(self.evaluate())
                if self.schedule.plateau.update(self.state.loss_ema):
                    metrics["lr/plateau_reduced"] = 1.0
                self._update_stage_fields()
                t_window += time.time() - t_eval   # throughput counts training time only
            if self.step % cfg.log_interval == 0 or is_last:
                avg = {k: v / n_window for k, v in window.items() if k != "tokens"}
                avg = self._all_mean(avg)
                dt = max(1e-9, time.time() - t_window)
                tok = sum(self._gather(tokens_window))
                self.state.tokens_seen += tok
                self.state.elapsed_s += dt
                metrics.update({f"train/{k}" if not k.startswith("mem/") else k: v for k, v in avg.items()})
                metrics.update({"lr": lr, "lr/scale": self.schedule.plateau.scale,
                                "throughput/tokens_per_s": tok / dt,
                                "throughput/tokens_per_s_per_worker": tok / dt / self.world_size,
                                "tokens_seen": float(self.state.tokens_seen), "step": float(self.step),
                                "epoch_time_s": self.state.elapsed_s,
                                "curriculum/stage_index": float(self.state.data.get("stage_index", -1))})
                self.state.last_metrics = {k: v for k, v in metrics.items() if isinstance(v, float)}
                window, n_window, tokens_window, t_window = {}, 0, 0, time.time()
                pending = {}
                ckpt_dir = None
                if self.step % cfg.checkpoint_interval == 0 or is_last:
                    ckpt_dir = tempfile.mkdtemp(prefix=f"dnc-ckpt-{self.step:06d}-r{self.rank}-")
                    self.save(ckpt_dir)
                if self.rank == 0 and self.logger is not None:
                    self.logger.log({**metrics, "stage": self.state.data.get("stage", "")}, self.step)
                    if ckpt_dir:
                        self.logger.flush()
                if self.rank == 0 and bar is not None:
                    bar.set_postfix_str(f"loss={metrics.get('train/loss', float('nan')):.3f} "
                                        f"stage={self.state.data.get('stage', '')}")
                if report is not None:
                    report(self.step, metrics, ckpt_dir)
                if ckpt_dir:
                    shutil.rmtree(ckpt_dir, ignore_errors=True)
                last = metrics
        if bar is not None:
            bar.close()
        last = dict(last)
        last["attempt_time_s"] = time.time() - attempt_start
        return last

    def _record_task_losses(self, task_lists: list[list[str] | None], losses: torch.Tensor) -> None:
        tasks: list[str] = []
        vals: list[float] = []
        i = 0
        for tl in task_lists:
            n = self.cfg.batch_size
            if tl is not None:
                tasks.extend(tl)
                vals.extend(losses[i:i + len(tl)].tolist())
                n = len(tl)
            i += n
        gathered = self._gather((tasks, vals))
        all_tasks = [t for ts, _ in gathered for t in ts]
        all_vals = [v for _, vs in gathered for v in vs]
        if all_tasks:
            self.data.record(all_tasks, all_vals, self.step)

    def _make_progress(self, stop: int):
        if not self._progress_on:
            return None
        if self._progress_factory is not None:
            return self._progress_factory(total=stop, initial=self.step, desc=f"train {self.run_name}")
        from tqdm.auto import tqdm

        return tqdm(total=stop, initial=self.step, desc=f"train {self.run_name}", dynamic_ncols=True,
                    mininterval=1.0)


def _compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each transformer block in place (the segment/memory loop stays eager).

    Blocks see a few shape families (segment length, bank size as it fills, memory/no-memory
    blocks), so the recompile limit is raised above dynamo's default of 8."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(getattr(torch._dynamo.config, "recompile_limit", 8), 64)
    for blocks in _block_lists(model):
        for b in blocks:
            b.compile()


def _block_lists(model: nn.Module) -> list[nn.ModuleList]:
    m = unwrap(model)
    for name in ("blocks", "layers", "h"):
        if isinstance(getattr(m, name, None), nn.ModuleList):
            return [getattr(m, name)]
    return [c for c in m.children() if isinstance(c, nn.ModuleList)]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a DNC (what FSDP shards and ``compile`` wraps one by one)."""
    return [b for bl in _block_lists(model) for b in bl]


def reduce_grads_in_bf16(ddp_model: nn.Module) -> nn.Module:
    """All-reduce a DDP model's gradients in bf16: half the bytes of fp32 on the wire, cast back
    into the fp32 buckets after the sum (DDP's ``bf16_compress_hook``). Worth it when the
    all-reduce is bandwidth-bound (PCIe, cross-node); NCCL only. Returns the model."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if not isinstance(ddp_model, nn.parallel.DistributedDataParallel):
        raise TypeError(f"reduce_grads_in_bf16 needs a DistributedDataParallel model, got {type(ddp_model).__name__}")
    ddp_model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return ddp_model


def apply_fsdp(model: nn.Module, reshard_after_forward: bool = True, mp_bf16: bool = False,
               reduce_bf16: bool = False) -> nn.Module:
    """FSDP2 (``fully_shard``) per block, in place; needs an initialised process group.

    Each block's local attention and SwiGLU (most of its weights) is one FSDP unit, all-gathered
    right before it runs. The memory-read module stays in the root unit with the embeddings and
    compressors: the segment loop calls ``MemoryRead.build_view``/``write_kv``/``queries`` outside
    ``Block.forward``, where a block-level unit would still be sharded. Ranks must run the same
    number of segments per step (FSDP all-gathers per call): :class:`Trainer` pads batches to a
    common length under FSDP. ``mp_bf16``: parameters all-gathered and computed in bf16 (half the
    bytes), gradients reduced in fp32, or in bf16 too with ``reduce_bf16``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {}
    if mp_bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                               reduce_dtype=torch.bfloat16 if reduce_bf16 else torch.float32)
    for block in transformer_blocks(model):
        units = [getattr(block, n) for n in ("attn", "ffn") if isinstance(getattr(block, n, None), nn.Module)]
        for u in units or [block]:
            fully_shard(u, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, **kw)
    return model


def load_weights_from(model: nn.Module, source: str) -> str:
    """Copy the weights of checkpoint ``source`` (a ``step_*`` dir, or a run dir of Ray Train or
    :func:`fit`: its newest checkpoint) into ``model``. Raises ConfigError naming the mismatching
    parameters when the shapes differ. Returns the checkpoint path used."""
    from dnc.checkpoint import load_checkpoint, resolve_checkpoint

    try:
        path = resolve_checkpoint(resolve_path(source))
    except FileNotFoundError:
        raise ConfigError(f"init_from {source!r} is neither a checkpoint nor a run directory with "
                          f"checkpoints") from None
    src, _ = load_checkpoint(path, map_location="cpu")
    try:
        model.load_state_dict(src.state_dict())  # strict: torch names every missing/mismatching tensor
    except RuntimeError as e:
        raise ConfigError(f"init_from {source!r}: parameter shapes differ from this model's config "
                          f"(keep d_model, n_layers, n_heads, memory_layers, ...): {e}") from None
    return path


# ==============================================================================================
# Single-process fit
# ==============================================================================================
def latest_checkpoint(run_dir: str) -> str | None:
    """Newest ``<run_dir>/checkpoints/step_XXXXXXXX`` holding a ``train_state.json``."""
    fs, p = _fs_and_path(run_dir)
    root = f"{p}/checkpoints"
    if not fs.exists(root):
        return None
    cands = sorted(d for d in fs.ls(root, detail=False) if os.path.basename(d.rstrip("/")).startswith("step_"))
    for d in reversed(cands):
        if fs.exists(f"{d}/train_state.json"):
            return d if "://" not in run_dir else f"{run_dir.split('://')[0]}://{d}"
    return None


def fit(cfg: TrainConfig, model_config: DNCConfig | None = None, *, run_dir: str = "runs/fit",
        run_name: str | None = None, device: str | None = None, resume: bool = True,
        corpus_texts: Sequence[bytes | str] | None = None, eval_text: bytes | None = None,
        wandb: str = "off", keep_checkpoints: int = 3, progress: bool = True) -> dict[str, float]:
    """Train in this process without Ray. Checkpoints go to ``<run_dir>/checkpoints/step_N``;
    rerunning with the same ``run_dir`` resumes from the newest one. Returns the last metrics."""
    model_config = model_config or model_config_for(cfg)
    run_name = run_name or os.path.basename(run_dir.rstrip("/"))
    resume_from = latest_checkpoint(run_dir) if resume else None
    resume_step = read_train_state(resume_from).step if resume_from else None
    logger = MetricsLogger(run_dir, run_name, {"train": cfg.to_dict(), "model": model_config.to_dict()},
                           wandb=wandb, resume_step=resume_step)
    corpus = corpus_windows(corpus_texts, cfg.max_len, cfg.batch_size, seed=cfg.seed) if corpus_texts else None
    trainer = Trainer(cfg, model_config, run_name=run_name, device=device, resume_from=resume_from,
                      corpus_batches=corpus, eval_text=eval_text, logger=logger, progress=progress)
    fs, p = _fs_and_path(run_dir)

    def report(step: int, metrics: dict[str, float], ckpt: str | None) -> None:
        if ckpt is None:
            return
        dest = f"{p}/checkpoints/step_{step:08d}"
        if fs.exists(dest):
            fs.rm(dest, recursive=True)
        fs.put(ckpt.rstrip("/") + "/", dest, recursive=True)
        old = sorted(d for d in fs.ls(f"{p}/checkpoints", detail=False))
        for d in old[:-keep_checkpoints] if keep_checkpoints > 0 else []:
            fs.rm(d, recursive=True)

    try:
        return trainer.run(report)
    finally:
        logger.close()
