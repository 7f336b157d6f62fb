"""The metrics log of a run (JSONL + optional W&B), written by rank 0, and its reader."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from dnc.training.checkpoint import fs_and_path


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
        fs, p = fs_and_path(self.run_dir)
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
            print(f"[dnc.training] W&B disabled: {type(e).__name__}: {e}")
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
                print(f"[dnc.training] W&B log failed: {e}")

    def flush(self) -> None:
        if self.remote and os.path.exists(self.path):
            fs, p = fs_and_path(self.run_dir)
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
    fs, p = fs_and_path(run_dir)
    f = f"{p}/metrics.jsonl"
    if not fs.exists(f):
        return []
    with fs.open(f, "r") as fh:
        return [json.loads(line) for line in fh if line.strip()]
