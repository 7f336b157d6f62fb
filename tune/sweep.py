"""Hyperparameter sweeps with Ray Tune (ASHA), over the same job config as ``ray_jobs.train``.

    python -m tune.sweep --config configs/sweep/asha.yaml [--num-samples N] [--name NAME]
        [--storage PATH_OR_URI] [--trial-mode inprocess|ray_train] [--wandb auto|on|off]

Two ways to run a trial (Ray 2.60: ``Tuner(trainer)`` is gone, Tune runs a function):

- ``inprocess`` (default): the trial function runs :class:`dnc.training.Trainer` itself and reports
  with ``ray.tune.report`` at every log step (fine-grained ASHA decisions; one process per trial).
- ``ray_train``: the trial function builds and fits a ``TorchTrainer`` (DDP/FSDP workers, exactly
  as ``ray_jobs.train``) with ``TuneReportCallback`` forwarding its reports (checkpoint steps) to Tune.

Associative recall is learned only inside a narrow learning-rate window (see DESIGN.md), so the
default space is the learning rate (log-uniform) and warmup.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Literal, Sequence

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ray_jobs.config import JobConfigError, deep_merge, format_validation_error, load_job_config

SAMPLERS = ("loguniform", "uniform", "choice", "randint", "grid")


class SchedulerSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["asha", "fifo"] = "asha"
    """``asha`` (asynchronous successive halving) or ``fifo`` (run every trial to the end)."""
    max_t: int | None = None
    """Largest ``step`` a trial runs to (default: the job's ``train.total_steps``)."""
    grace_period: int = 10
    """Steps every trial gets before ASHA may stop it."""
    reduction_factor: float = 2.0
    """ASHA keeps 1/reduction_factor of the trials at each rung."""


class SweepConfig(BaseModel):
    """A sweep: a base job config, overrides, a search space and a scheduler."""

    model_config = ConfigDict(extra="forbid")

    base: str = "configs/train/tiny.yaml"
    """The job YAML every trial starts from."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Nested overrides applied to the base job (e.g. ``{train: {total_steps: 40}}``)."""
    search_space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """``section.field`` -> ``{loguniform: [lo, hi]}``, ``{uniform: [lo, hi]}``, ``{choice: [...]}``,
    ``{randint: [lo, hi]}`` or ``{grid: [...]}``."""
    name: str = "asha-tiny"
    """Tune experiment name (a rerun with the same name and storage restores unfinished trials)."""
    storage: str = "runs/sweeps"
    """Local directory or fsspec URI for trial results and checkpoints."""
    num_samples: int = 2
    """Trials sampled from the search space (times the grid size)."""
    max_concurrent: int = 2
    """Trials running at once."""
    metric: str = "train/loss"
    """Metric ASHA compares and the best trial is picked by."""
    mode: Literal["min", "max"] = "min"
    trial_mode: Literal["inprocess", "ray_train"] = "inprocess"
    """How a trial trains (module docstring)."""
    cpus_per_trial: float = 1.0
    """CPUs reserved per in-process trial (ray_train trials reserve their workers' own)."""
    gpus_per_trial: float = 0.0
    """GPUs per in-process trial."""
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    wandb: Literal["auto", "on", "off"] = "off"
    """W&B: per-trial runs from the trainer (rank 0) in offline mode unless ``WANDB_MODE`` says otherwise."""
    seed: int = 0
    """Seed of the search algorithm's sampling."""

    @field_validator("search_space")
    @classmethod
    def _valid_space(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for key, spec in v.items():
            if "." not in key:
                raise ValueError(f"search_space key {key!r} must be section.field, e.g. train.lr")
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
                raise ValueError(f"search_space[{key!r}] must be one of {{sampler: args}} with sampler in "
                                 f"{SAMPLERS}, got {spec!r}")
            kind, args = next(iter(spec.items()))
            if kind in ("loguniform", "uniform", "randint") and (not isinstance(args, list) or len(args) != 2):
                raise ValueError(f"search_space[{key!r}].{kind} needs [low, high], got {args!r}")
            if kind == "loguniform" and not (0 < float(args[0]) < float(args[1])):
                raise ValueError(f"search_space[{key!r}].loguniform needs 0 < low < high, got {args!r}")
        return v

    @field_validator("num_samples", "max_concurrent")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v


def load_sweep_config(path: str | None, overrides: dict[str, Any] | None = None) -> SweepConfig:
    raw: dict[str, Any] = {}
    if path:
        if not os.path.exists(path):
            raise JobConfigError(f"sweep config not found: {path} (try configs/sweep/asha.yaml)")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    raw = deep_merge(raw, overrides or {})
    try:
        sweep = SweepConfig.model_validate(raw)
    except pydantic.ValidationError as e:
        raise JobConfigError(format_validation_error(e, path or "")) from None
    # The base job with overrides must itself be valid (fails before any trial starts).
    load_job_config(sweep.base, sweep.overrides)
    return sweep


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, val in flat.items():
        d = out
        parts = key.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = val
    return out


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune sample objects, nested like the job config (``{"train": {"lr": loguniform}}``)."""
    from ray import tune

    flat = {}
    for key, spec in sweep.search_space.items():
        kind, args = next(iter(spec.items()))
        if kind == "loguniform":
            flat[key] = tune.loguniform(float(args[0]), float(args[1]))
        elif kind == "uniform":
            flat[key] = tune.uniform(float(args[0]), float(args[1]))
        elif kind == "randint":
            flat[key] = tune.randint(int(args[0]), int(args[1]))
        elif kind == "choice":
            flat[key] = tune.choice(list(args))
        else:
            flat[key] = tune.grid_search(list(args))
    return _nest(flat)


def _trial_job(config: dict[str, Any]):
    """The trial's JobConfig: base YAML + sweep overrides + this trial's sampled values."""
    sampled = {k: v for k, v in config.items() if k in ("model", "train", "run")}
    return load_job_config(config["_base_path"], deep_merge(config["_overrides"], sampled))


def trial_inprocess(config: dict[str, Any]) -> None:
    """One trial in this process: ``dnc.training.Trainer`` reporting to Tune at each log step."""
    import torch
    from ray import tune

    from dnc.training import MetricsLogger, Trainer, read_train_state

    job = _trial_job(config)
    ctx = tune.get_context()
    trial_dir = ctx.get_trial_dir()
    tcfg = job.train_config
    device = "cuda" if torch.cuda.is_available() and config.get("_gpus", 0) > 0 else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, int(config.get("_cpus", 1))))
    ckpt = tune.get_checkpoint()

    def run(resume_dir: str | None) -> None:
        resume_step = read_train_state(resume_dir).step if resume_dir else None
        logger = MetricsLogger(trial_dir, ctx.get_trial_name(), {"model": job.model_cfg().to_dict(),
                                                                  "train": tcfg.to_dict()},
                               wandb=config.get("_wandb", "off"), resume_step=resume_step,
                               project=job.run.wandb_project)
        trainer = Trainer(tcfg, job.model_cfg(), run_name=ctx.get_trial_name(), device=device,
                          resume_from=resume_dir, logger=logger, progress=False)

        def report(step: int, metrics: dict[str, float], ckpt_dir: str | None) -> None:
            m = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            m["step"] = step
            if ckpt_dir:
                tune.report(m, checkpoint=tune.Checkpoint.from_directory(ckpt_dir))
            else:
                tune.report(m)
        try:
            trainer.run(report)
        finally:
            logger.close()

    if ckpt is not None:
        with ckpt.as_directory() as d:
            run(d)
    else:
        run(None)


def trial_ray_train(config: dict[str, Any]) -> None:
    """One trial as a Ray Train run (TorchTrainer), its reports forwarded to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_jobs.train import run_training

    job = _trial_job(config)
    ctx = tune.get_context()
    # Each trial is its own Ray Train run under the sweep's storage; a restored trial reruns
    # with the same name, which resumes the Ray Train run from its newest checkpoint.
    job = job.model_copy(update={"run": job.run.model_copy(update={
        "name": f"{config['_sweep_name']}-{ctx.get_trial_id()}", "storage": config["_storage"],
        "wandb": config.get("_wandb", "off"), "progress": False})})
    run_training(job, callbacks=[TuneReportCallback()])


def run_sweep(sweep: SweepConfig):
    """Run the sweep; returns the ``ResultGrid``."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    base_job = load_job_config(sweep.base, sweep.overrides)
    total = base_job.train_config.stop_step
    storage = sweep.storage if "://" in sweep.storage else os.path.abspath(sweep.storage)
    if sweep.scheduler.type == "asha":
        max_t = sweep.scheduler.max_t or total
        scheduler = ASHAScheduler(time_attr="step", max_t=max_t,
                                  grace_period=min(sweep.scheduler.grace_period, max_t),
                                  reduction_factor=sweep.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    space = param_space(sweep)
    space.update({"_base_path": os.path.abspath(sweep.base), "_overrides": sweep.overrides,
                  "_wandb": sweep.wandb, "_cpus": sweep.cpus_per_trial, "_gpus": sweep.gpus_per_trial,
                  "_sweep_name": sweep.name, "_storage": storage})
    if sweep.trial_mode == "inprocess":
        trainable = tune.with_resources(trial_inprocess, {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial})
    else:
        # The trial only drives; the TorchTrainer's workers reserve CPUs/GPUs themselves.
        trainable = tune.with_resources(trial_ray_train, {"cpu": 0.01})
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
                                    num_samples=sweep.num_samples, max_concurrent_trials=sweep.max_concurrent,
                                    # a fresh actor per trial: a reused one hangs starting its
                                    # second Ray Train run (ray_train mode), and holds memory
                                    reuse_actors=False),
        run_config=tune.RunConfig(name=sweep.name, storage_path=storage,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    return tuner.fit()


def summarize(results, sweep: SweepConfig) -> dict[str, Any]:
    rows = []
    for r in results:
        m = r.metrics or {}
        cfg = {k: v for k, v in (r.config or {}).items() if not k.startswith("_")}
        rows.append({"trial": r.path.rstrip("/").rsplit("/", 1)[-1] if r.path else "?",
                     "config": cfg, "step": m.get("step"), sweep.metric: m.get(sweep.metric),
                     "error": repr(r.error) if r.error else None})
    best = None
    try:
        b = results.get_best_result(metric=sweep.metric, mode=sweep.mode)
        best = {"config": {k: v for k, v in b.config.items() if not k.startswith("_")},
                sweep.metric: b.metrics.get(sweep.metric), "checkpoint": b.checkpoint.path if b.checkpoint else None}
    except Exception:
        pass
    return {"name": sweep.name, "metric": sweep.metric, "mode": sweep.mode, "trials": rows, "best": best}


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    metric = summary["metric"]
    t = Table(title=f"tune.sweep {summary['name']} ({metric}, {summary['mode']})")
    for col in ("trial", "config", "step", metric, "error"):
        t.add_column(col)
    for r in summary["trials"]:
        v = r[metric]
        t.add_row(r["trial"], json.dumps(r["config"]), str(r["step"]),
                  f"{v:.4f}" if isinstance(v, float) else str(v), r["error"] or "")
    Console().print(t)
    if summary["best"]:
        Console().print(f"best: {json.dumps(summary['best'])}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tune.sweep",
                                description="ASHA hyperparameter sweep of BWR-DNC training with Ray Tune.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="configs/sweep/asha.yaml", help="sweep YAML")
    p.add_argument("--num-samples", type=int, help="trials to sample")
    p.add_argument("--name", help="experiment name (same name + storage restores)")
    p.add_argument("--storage", help="results root: local dir or s3://, gs://...")
    p.add_argument("--trial-mode", choices=["inprocess", "ray_train"], help="how each trial trains")
    p.add_argument("--wandb", choices=["auto", "on", "off"], help="W&B per trial (offline by default)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sweep field, e.g. --set overrides.train.total_steps=20")
    p.add_argument("--out", help="write the summary JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    over: dict[str, Any] = {}
    for flag, key in (("num_samples", "num_samples"), ("name", "name"), ("storage", "storage"),
                      ("trial_mode", "trial_mode"), ("wandb", "wandb")):
        if getattr(args, flag) is not None:
            over[key] = getattr(args, flag)
    for item in args.sets:
        if "=" not in item:
            print(f"error: --set expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        k, v = item.split("=", 1)
        over = deep_merge(over, _nest({k: yaml.safe_load(v)}))
    try:
        sweep = load_sweep_config(args.config, over)
    except JobConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = run_sweep(sweep)
    summary = summarize(results, sweep)
    print_summary(summary)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1, default=str)
    return 0 if all(r["error"] is None for r in summary["trials"]) else 1


if __name__ == "__main__":
    sys.exit(main())
