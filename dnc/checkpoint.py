"""Save/load a model through fsspec: ``model.safetensors`` + ``config.json`` (+ ``extra.json``).

Works for any fsspec URI (local dir, ``s3://``, ``gs://``, ``memory://``). ``config.json`` holds
the format version and the full :class:`DNCConfig`, so the model can be rebuilt from the
checkpoint alone. Wrong or corrupt files raise :class:`CheckpointError` naming the problem.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load, save as st_save

from .config import ConfigError, DNCConfig

CHECKPOINT_FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
EXTRA = "extra.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, of the wrong kind or version, or corrupt."""


def _join(path: str, name: str) -> str:
    return path.rstrip("/") + "/" + name


def save_checkpoint(path: str, model, extra: dict[str, Any] | None = None) -> str:
    """Write ``model`` (a DNC, possibly wrapped by DDP/compile) to ``path``. Returns ``path``."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}
    meta = {"format": "bwr-dnc", "format_version": CHECKPOINT_FORMAT_VERSION,
            "model_config": inner.config.to_dict(), "num_params": sum(t.numel() for t in tensors.values())}
    # weights first, config last: a reader that finds config.json finds complete weights
    with fs.open(_join(root, WEIGHTS), "wb") as f:
        f.write(st_save(tensors, metadata={"format": "bwr-dnc"}))
    if extra is not None:
        with fs.open(_join(root, EXTRA), "w") as f:
            json.dump(extra, f, indent=2, default=str)
    with fs.open(_join(root, CONFIG), "w") as f:
        json.dump(meta, f, indent=2)
    return path


def read_config(path: str) -> DNCConfig:
    """The model config stored in a checkpoint directory."""
    fs, root = fsspec.core.url_to_fs(path)
    cfg_path = _join(root, CONFIG)
    if not fs.exists(cfg_path):
        raise CheckpointError(f"{path!r} is not a BWR-DNC checkpoint: {CONFIG} is missing")
    try:
        with fs.open(cfg_path, "r") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is corrupt (not valid JSON): {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != "bwr-dnc":
        raise CheckpointError(f"{cfg_path} is not a BWR-DNC checkpoint config (format field missing)")
    ver = meta.get("format_version")
    if ver != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path!r} has checkpoint format version {ver}; this code reads version "
                              f"{CHECKPOINT_FORMAT_VERSION}")
    try:
        return DNCConfig.from_dict(meta["model_config"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path} holds an invalid model config: {e}") from e


def load_checkpoint(path: str, map_location: str | torch.device = "cpu"):
    """Rebuild the model stored at ``path``. Returns ``(model, extra_dict)``."""
    from .model import DNC

    cfg = read_config(path)
    fs, root = fsspec.core.url_to_fs(path)
    wpath = _join(root, WEIGHTS)
    if not fs.exists(wpath):
        raise CheckpointError(f"{path!r} has a config but no {WEIGHTS}")
    with fs.open(wpath, "rb") as f:
        blob = f.read()
    try:
        tensors = st_load(blob)
    except Exception as e:
        raise CheckpointError(f"{wpath} is corrupt or truncated ({len(blob)} bytes): {e}") from e
    with torch.device("meta"):
        model = DNC(cfg)
    missing = set(model.state_dict()) - set(tensors)
    unexpected = set(tensors) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(f"{wpath} does not match its config: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    for name, t in model.state_dict().items():
        if tuple(tensors[name].shape) != tuple(t.shape):
            raise CheckpointError(f"{wpath}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                  f"config expects {tuple(t.shape)}")
    model.load_state_dict(tensors, assign=True)
    model = model.to(map_location)
    extra: dict = {}
    epath = _join(root, EXTRA)
    if fs.exists(epath):
        try:
            with fs.open(epath, "r") as f:
                extra = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{epath} is corrupt (not valid JSON): {e}") from e
    return model, extra


def resolve_checkpoint(path: str) -> str:
    """A checkpoint dir as given, or the newest ``step_*`` (then ``checkpoints/step_*``) inside a run dir."""
    fs, root = fsspec.core.url_to_fs(path)
    if fs.exists(f"{root}/config.json"):
        return path
    for sub in ("", "checkpoints/"):
        base = f"{root}/{sub}".rstrip("/")
        if not fs.exists(base):
            continue
        steps = sorted(d for d in fs.ls(base, detail=False)
                       if d.rstrip("/").rsplit("/", 1)[-1].startswith("step_") and fs.exists(f"{d}/config.json"))
        if steps:
            return steps[-1] if "://" not in path else fs.unstrip_protocol(steps[-1])
    raise FileNotFoundError(f"{path} is neither a checkpoint (config.json) nor a run dir with step_* checkpoints")
