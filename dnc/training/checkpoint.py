"""Training checkpoints: train state, per-rank RNG, full (unsharded) model and optimizer state.

Layout of one checkpoint directory (local or fsspec URI)::

    <ckpt>/model.safetensors, config.json, extra.json   dnc.checkpoint.save_checkpoint (load_checkpoint(<ckpt>) works)
    <ckpt>/optimizer.pt                                  full (unsharded) optimizer state, keyed by parameter name
                                                         (absent in one unpacked by dnc.training.portable:
                                                         the Trainer resumes with a fresh optimizer)
    <ckpt>/train_state.json                              TrainState: step, schedule, plateau, curriculum, configs
    <ckpt>/rng/rank_00000.pt                             per-rank torch/CUDA/numpy/python RNG + data-source state
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from dnc.config import ConfigError, DNCConfig
from dnc.parallel import is_fsdp, unwrap
from dnc.training.config import resolve_path


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


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict (collective under FSDP: every rank must call; rank 0 gets it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if is_fsdp(model):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Unsharded optimizer state keyed by parameter name (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(model) if not is_fsdp(model) else model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, osd: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if is_fsdp(model):
        set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
    else:
        set_optimizer_state_dict(unwrap(model), optimizer, osd)


def fs_and_path(uri: str):
    """``(filesystem, path)`` of a local path or fsspec URI."""
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

    fs, p = fs_and_path(path)
    fs.makedirs(p, exist_ok=True)
    fs.makedirs(f"{p}/rng", exist_ok=True)
    if rank == 0:
        assert model_state is not None and optimizer_state is not None and state is not None
        bare = model if model is not None and not is_fsdp(model) else None
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
    fs, p = fs_and_path(path)
    with fs.open(f"{p}/train_state.json", "r") as f:
        return TrainState.from_json(f.read())


def read_rank_state(path: str, rank: int) -> dict[str, Any] | None:
    fs, p = fs_and_path(path)
    f = f"{p}/rng/rank_{rank:05d}.pt"
    return _torch_load(fs, f) if fs.exists(f) else None


def has_optimizer_state(path: str) -> bool:
    """Whether checkpoint ``path`` holds ``optimizer.pt`` (a portable one does not)."""
    fs, p = fs_and_path(path)
    return fs.exists(f"{p}/optimizer.pt")


def read_optimizer_state(path: str) -> dict[str, Any]:
    fs, p = fs_and_path(path)
    return _torch_load(fs, f"{p}/optimizer.pt")


# ==============================================================================================


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


def latest_checkpoint(run_dir: str) -> str | None:
    """Newest ``<run_dir>/checkpoints/step_XXXXXXXX`` holding a ``train_state.json``."""
    fs, p = fs_and_path(run_dir)
    root = f"{p}/checkpoints"
    if not fs.exists(root):
        return None
    cands = sorted(d for d in fs.ls(root, detail=False) if os.path.basename(d.rstrip("/")).startswith("step_"))
    for d in reversed(cands):
        if fs.exists(f"{d}/train_state.json"):
            return d if "://" not in run_dir else f"{run_dir.split('://')[0]}://{d}"
    return None
