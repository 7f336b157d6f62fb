"""Training for the long-context record (``bench/long_context.py``): the TrainConfig a run uses
(the preset's YAML plus the command line), the Transformer baseline's model config, one
``dnc.training.fit`` per model in this process, and the summary of a trained (or given) run
that the result records.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from common import ROOT, parse_pairs, stderr_logger

from dnc.config import DNCConfig
from dnc.model import DNC

log = stderr_logger("long_context")


def train_config(args, ds: dict[str, Any]) -> tuple[Any, dict[str, Any], str | None]:
    """TrainConfig from the YAML's train section + this run's overrides; also the YAML's model
    overrides and the YAML path used (None without one)."""
    import yaml

    from dnc.training import TrainConfig

    path = Path(args.config) if args.config else ROOT / "configs" / "train" / f"{args.preset}.yaml"
    section: dict[str, Any] = {}
    model_overrides: dict[str, Any] = {}
    if path.exists():
        raw = yaml.safe_load(path.read_text()) or {}
        section = dict(raw.get("train") or {})
        model_overrides = dict((raw.get("model") or {}).get("overrides") or {})
    elif args.config:
        raise FileNotFoundError(f"--config {path} does not exist")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    section["max_len"] = ds["max_len"]
    section["corpus_ratio"] = args.corpus_ratio
    if args.max_steps:
        section["max_steps"] = args.max_steps
    if "max_minutes" in fields:
        section["max_minutes"] = args.train_minutes
    if "time_accounting" in fields:
        section["time_accounting"] = True  # the record says where the training minutes went (--set to turn off)
    section.update(parse_pairs("--set", args.overrides))
    model_overrides.update(parse_pairs("--model-set", args.model_overrides))
    return TrainConfig.from_dict(section), model_overrides, str(path) if path.exists() else None


def baseline_config(cfg: DNCConfig, seq_len: int) -> DNCConfig:
    """The Transformer baseline of ``cfg`` covering ``seq_len`` tokens in one segment (rounded up
    so that ``write_pool`` divides it, which config validation requires)."""
    return cfg.baseline(-(-seq_len // cfg.write_pool) * cfg.write_pool)


def stdlib_texts() -> tuple[list[bytes], bytes]:
    """(train files' bytes, held-out files' bytes joined) of the interpreter's standard library."""
    from dnc.data.corpus import stdlib_source_files

    train = [Path(f).read_bytes() for f in stdlib_source_files("train")]
    held = b"".join(Path(f).read_bytes() for f in stdlib_source_files("eval"))
    return train, held


def train_one(label: str, tcfg, mcfg: DNCConfig, run_dir: Path, corpus: list[bytes] | None, eval_text: bytes,
              device: torch.device, resume: bool) -> tuple[str, float]:
    """Run ``dnc.training.fit``; returns (newest checkpoint dir, wall seconds)."""
    from dnc.training import fit, latest_checkpoint

    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # this script's own run dir: a fresh run per invocation
    budget = f"{tcfg.max_minutes} min" if getattr(tcfg, "max_minutes", None) else f"{tcfg.stop_step} steps"
    log(f"training {label}: {DNC(mcfg).num_params() / 1e6:.1f}M params, budget {budget}, "
        f"max_len {tcfg.max_len}, corpus_ratio {tcfg.corpus_ratio} -> {run_dir}")
    t0 = time.time()
    fit(tcfg, mcfg, run_dir=str(run_dir), run_name=f"long_context-{label}", device=str(device), resume=resume,
        corpus_texts=corpus if tcfg.corpus_ratio > 0 else None, eval_text=eval_text, wandb="off",
        keep_checkpoints=1, progress=True)
    wall = time.time() - t0
    ckpt = latest_checkpoint(str(run_dir))
    if ckpt is None:
        raise RuntimeError(f"training {label} wrote no checkpoint under {run_dir}/checkpoints")
    return ckpt, wall


def resolve_checkpoint(path: str) -> tuple[str, str | None]:
    """(checkpoint dir, run dir holding metrics.jsonl or None) for a run dir or a checkpoint dir."""
    from dnc.checkpoint import resolve_checkpoint as resolve

    ckpt = resolve(path)
    for cand in (path, os.path.dirname(ckpt.rstrip("/")), os.path.dirname(os.path.dirname(ckpt.rstrip("/")))):
        if os.path.exists(os.path.join(cand, "metrics.jsonl")):
            return ckpt, cand
    return ckpt, None


def training_summary(ckpt: str, run_dir: str | None, wall_s: float | None) -> dict[str, Any]:
    """Steps, time, tokens, final stage (``train_state.json``) and the curriculum evaluations of
    ``metrics.jsonl`` grouped by the stage they evaluated."""
    from dnc.training import read_metrics, read_train_state

    out: dict[str, Any] = {"checkpoint": ckpt, "run_dir": run_dir,
                           "wall_minutes": None if wall_s is None else wall_s / 60}
    if os.path.exists(os.path.join(ckpt, "train_state.json")):
        st = read_train_state(ckpt)
        out.update(steps=st.step, tokens_seen=st.tokens_seen, train_minutes=st.elapsed_s / 60,
                   final_stage=st.data.get("stage"), world_size=st.world_size, train_config=st.train_config)
    rows = read_metrics(run_dir) if run_dir else []
    stages: dict[str, dict[str, Any]] = {}
    for r in rows:
        acc = {k[len("eval/acc/"):]: v for k, v in r.items() if k.startswith("eval/acc/")}
        if not acc:
            continue
        # the row's "stage" is the stage after a promotion; eval/stage_acc/<name> names the evaluated one
        name = next((k[len("eval/stage_acc/"):] for k in r if k.startswith("eval/stage_acc/")), r.get("stage", "?"))
        mean = float(r.get("eval/acc", sum(acc.values()) / len(acc)))
        s = stages.setdefault(name, {"stage": name, "evals": 0, "first_step": r["step"], "best_mean": mean})
        s.update(evals=s["evals"] + 1, last_step=r["step"], last_mean=mean, last_acc=acc,
                 best_mean=max(s["best_mean"], mean))
    out["stages"] = list(stages.values())
    bpb = [r["eval/bpb"] for r in rows if "eval/bpb" in r]
    out["last_eval_bpb"] = bpb[-1] if bpb else None
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    out["last_train_loss"] = losses[-1] if losses else None
    # where the training wall time went (TrainConfig.time_accounting): the last row's run totals
    from dnc.training.timing import time_split

    out["time_split"] = time_split(rows)
    return out
