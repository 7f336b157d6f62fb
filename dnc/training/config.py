"""The training config (:class:`TrainConfig`), the model config a run uses, and repo-relative paths."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

from dnc.config import ConfigError, DNCConfig, preset


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
    min_batch_rows: int = 1
    """With ``batch_tokens``: at least this many sequences per curriculum batch. A late stage's
    samples span 8-64 segments that run one after another, and a segment of a few rows is too small
    to keep a GPU busy (issue 11: the segment loop is bound by host work), so more rows per segment
    cost little wall time."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (global batch = batch_size*grad_accum*workers)."""
    max_len: int = 256
    """Longest training sequence in tokens; curriculum lengths above it are clamped."""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU, which trains in float32)."""
    compile: bool | Literal["blocks", "segment", "graphs"] = False
    """What ``torch.compile`` captures: ``false`` nothing (eager, the default); ``blocks`` (or
    ``true``) each transformer block, the segment loop staying eager; ``segment`` the whole training
    segment step (blocks, memory reads and the bank's write/compress/evict) as one graph over
    fixed-capacity banks, reused by every segment of every step (``dnc.training.compiled_segment``:
    ~1,000 ops per segment become one launch sequence; needs bank capacities that are multiples of
    what each level receives, as the presets' are); ``graphs`` the same step as CUDA graphs, no
    ``torch.compile`` (``dnc.training.graphed_segment``: a no-grad forward graph per segment and
    one backward graph that recomputes it with grad; one pair per batch size, each captured in
    about two eager segments' time rather than a compile's minutes; not with FSDP or dropout)."""
    compile_mode: str | None = None
    """``torch.compile`` mode of ``compile: segment`` (None = the default; e.g.
    ``max-autotune-no-cudagraphs``)."""
    compile_dynamic_batch: bool = False
    """``compile: segment`` with the batch dim marked dynamic (``maybe_mark_dynamic``), so that one
    graph could serve every batch size >= 2 (the curriculum's stages change it: 128/32/16/8 rows for
    small) instead of one static graph per batch size. Off by default: ``aot_eager`` keeps one graph,
    but inductor on CPU still specialised every batch size and took 198 s for the first (dynamic)
    compile; measure it on the GPU (``bench/train_loop_gap_compile.py``) before turning it on."""
    graphs_min_segments: int = 32
    """``compile: graphs`` only for sequences of at least this many segments; shorter ones run the
    eager step (one log line says so). Default from an H200 (small preset, session 17): graphs ran
    0.46x eager at 2k tokens B32 (4 segments of 512), 0.69x at 8k B8 (16) and 2.36x at 32k B2 (64):
    below the crossover (somewhere in 16-64, not measured between) the recompute in backward costs
    more than the launches it saves. 0 = graphs for every length."""
    time_accounting: bool = False
    """Split each log interval's wall time into data, host-to-device, step, curriculum feedback,
    evaluation, checkpoint, logging and other (``time/<part>_s``, ``time/<part>_share`` and run
    totals ``time/total/<part>_s``). On CUDA it synchronises at the part boundaries, which costs a
    little overlap: off by default, on in ``bench/long_context.py``."""
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
        need(self.min_batch_rows >= 1, f"min_batch_rows must be >= 1, got {self.min_batch_rows}")
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
        need(self.compile in (False, True, "blocks", "segment", "graphs"),
             f"compile must be false, true/blocks, segment or graphs, got {self.compile!r}")
        need(self.graphs_min_segments >= 0, f"graphs_min_segments must be >= 0, got {self.graphs_min_segments}")
        need(self.fail_mode in ("exit", "raise"), f"fail_mode must be exit|raise, got {self.fail_mode!r}")

    @property
    def compile_target(self) -> str | None:
        """What ``compile`` captures: None, ``"blocks"``, ``"segment"`` or ``"graphs"``."""
        return None if self.compile is False else ("blocks" if self.compile is True else self.compile)

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


def resolve_path(path: str) -> str:
    """A relative path as given if it exists from the cwd, else relative to the repository root
    (Ray workers may run in another directory)."""
    if "://" in path or os.path.isabs(path) or os.path.exists(path):
        return path
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cand = os.path.join(root, path)
    return cand if os.path.exists(cand) else path
