"""Hyperparameter sweeps with Ray Tune (ASHA or PBT), over the same job config as ``ray_jobs.train``.

    dnc sweep --config configs/sweep/asha.yaml|pbt.yaml [--num_samples N] [--name NAME]
        [--storage PATH_OR_URI] [--trial_mode inprocess|ray_train] [--wandb auto|on|off]
        [--overrides.train.total_steps 20] [--out summary.json]
    (python -m tune.sweep ... is the same command)

The base job is read and validated once, on the driver, and every trial gets the typed
``JobConfig`` (``tune.with_parameters``) with its sampled values applied (``JobConfig.replace``).

Two ways to run a trial (Ray 2.60: ``Tuner(trainer)`` is gone, Tune runs a function):

- ``inprocess`` (default): the trial function runs :class:`dnc.training.Trainer` itself and reports
  with ``ray.tune.report`` at every log step (fine-grained ASHA decisions; one process per trial).
- ``ray_train``: the trial function builds and fits a ``TorchTrainer`` (DDP/FSDP workers, exactly
  as ``ray_jobs.train``) with ``TuneReportCallback`` forwarding its reports (checkpoint steps) to Tune.

Schedulers: ``asha`` stops weak trials early; ``pbt`` (population based training) copies the
checkpoint of a strong trial into a weak one at every ``perturbation_interval`` steps and mutates
its hyperparameters (the search space's samplers), so it needs a checkpoint at those steps
(``train.checkpoint_interval`` divides the interval) and in-process trials (they resume from the
checkpoint Tune hands them, ``tune.get_checkpoint()``); ``fifo`` runs every trial to the end.

The best trial's job is written as a training YAML (``<storage>/<name>/best_job.yaml``, or
``best_config``) that ``dnc train --config`` takes as it is.

Associative recall is learned only inside a narrow learning-rate window (see DESIGN.md), so the
default space is the learning rate (log-uniform) and warmup.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from ray_jobs.config import JobConfig, JobConfigError, load_job_config
from ray_jobs.signals import stop_on_sigterm

PBT_CHECKPOINTS_KEPT = 4
"""Checkpoints kept per PBT trial (Tune warns that 2 or fewer can be deleted before a clone)."""
SAMPLERS = ("loguniform", "uniform", "choice", "randint", "grid")


@dataclass
class SchedulerSection:
    """How trials are stopped early."""

    type: Literal["asha", "pbt", "fifo"] = "asha"
    """asha (asynchronous successive halving), pbt (population based training: exploit a better
    trial's checkpoint, explore by mutating its hyperparameters) or fifo (every trial to the end)."""
    max_t: int | None = None
    """Largest step a trial runs to (None = the job's train.total_steps)."""
    grace_period: int = 10
    """Steps every trial gets before ASHA may stop it."""
    reduction_factor: float = 2.0
    """ASHA keeps 1/reduction_factor of the trials at each rung."""
    perturbation_interval: int | None = None
    """PBT: steps between exploit/explore decisions (None = the job's train.checkpoint_interval);
    a multiple of train.checkpoint_interval, since a trial is cloned from its checkpoint."""
    quantile_fraction: float = 0.25
    """PBT: the bottom fraction of trials that clone one of the top fraction."""
    resample_probability: float = 0.25
    """PBT: chance that a mutated value is drawn afresh from its sampler instead of scaled
    by 0.8 or 1.2 (or moved to a neighbouring choice)."""


@dataclass
class SweepConfig:
    """A sweep: a base job config, overrides, a search space and a scheduler."""

    base: str = "configs/train/tiny.yaml"
    """The job YAML every trial starts from."""
    overrides: dict[str, Any] | list[dict[str, Any]] = field(default_factory=dict)
    """Nested overrides applied to the base job, e.g. {train: {total_steps: 40}}; a list of such
    mappings is applied in order (each merges into the job, field by field)."""
    search_space: dict[str, dict[str, Any]] = field(default_factory=dict)
    """section.field -> {loguniform: [lo, hi]}, {uniform: [lo, hi]}, {choice: [...]},
    {randint: [lo, hi]} or {grid: [...]}."""
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
    """Whether the metric is minimised or maximised."""
    trial_mode: Literal["inprocess", "ray_train"] = "inprocess"
    """How a trial trains: in the trial's process, or as a Ray Train run (module docstring)."""
    cpus_per_trial: float = 1.0
    """CPUs reserved per in-process trial (ray_train trials reserve their workers' own)."""
    gpus_per_trial: float = 0.0
    """GPUs per in-process trial."""
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    """How trials are stopped early."""
    wandb: Literal["auto", "on", "off"] = "off"
    """W&B: per-trial runs from the trainer (rank 0), offline unless WANDB_MODE says otherwise."""
    seed: int = 0
    """Seed of the search algorithm's sampling."""
    best_config: str | None = None
    """Where the best trial's job is written as a training YAML (None = <storage>/<name>/best_job.yaml)."""

    def __post_init__(self) -> None:
        if isinstance(self.scheduler, dict):
            self.scheduler = SchedulerSection(**self.scheduler)
        for key, spec in self.search_space.items():
            section, _, name = key.partition(".")
            if section not in ("model", "train", "run") or not name or "." in name:
                raise JobConfigError(f"search_space key {key!r} must be section.field, e.g. train.lr")
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
                raise JobConfigError(f"search_space[{key!r}] must be one of {{sampler: args}} with sampler in "
                                     f"{SAMPLERS}, got {spec!r}")
            kind, args = next(iter(spec.items()))
            if kind in ("loguniform", "uniform", "randint") and (not isinstance(args, list) or len(args) != 2):
                raise JobConfigError(f"search_space[{key!r}].{kind} needs [low, high], got {args!r}")
            if kind == "loguniform" and not (0 < float(args[0]) < float(args[1])):
                raise JobConfigError(f"search_space[{key!r}].loguniform needs 0 < low < high, got {args!r}")
        for name in ("num_samples", "max_concurrent"):
            if getattr(self, name) < 1:
                raise JobConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if "://" not in self.storage:
            self.storage = os.path.abspath(os.path.expanduser(self.storage))   # on the driver
        if self.scheduler.type == "pbt":
            if self.trial_mode != "inprocess":
                raise JobConfigError("scheduler.type pbt needs trial_mode inprocess (a PBT trial resumes from the "
                                     "checkpoint Tune hands it; a ray_train trial resumes from its own run)")
            if not self.search_space:
                raise JobConfigError("scheduler.type pbt needs a search_space to mutate")
            grid = [k for k, spec in self.search_space.items() if "grid" in spec]
            if grid:
                raise JobConfigError(f"scheduler.type pbt cannot mutate grid values {grid}; use choice")
            if not 0 < self.scheduler.quantile_fraction <= 0.5:
                raise JobConfigError(f"scheduler.quantile_fraction must be in (0, 0.5], got "
                                     f"{self.scheduler.quantile_fraction}")

    def perturbation_interval(self, job: JobConfig) -> int:
        """PBT's interval in steps, checked against the job's checkpoint interval."""
        every = job.train.checkpoint_interval
        interval = self.scheduler.perturbation_interval or every
        if interval < 1 or interval % every:
            raise JobConfigError(f"scheduler.perturbation_interval ({interval}) must be a positive multiple of "
                                 f"train.checkpoint_interval ({every}): PBT clones trials from checkpoints")
        return interval

    def base_job(self) -> JobConfig:
        """The validated base job (base YAML + overrides) every trial starts from."""
        layers = self.overrides if isinstance(self.overrides, list) else [self.overrides]
        return load_job_config(self.base, *layers)


def sweep_parser():
    """``dnc sweep``: ``--config SWEEP_YAML`` plus a flag per SweepConfig field."""
    from jsonargparse import ActionConfigFile

    from ray_jobs.parsing import new_parser

    p = new_parser(prog="dnc sweep", description="ASHA or PBT hyperparameter sweep of BWR-DNC training with Ray Tune.")
    p.add_argument("--config", action=ActionConfigFile, help="sweep YAML (configs/sweep/asha.yaml or pbt.yaml)")
    p.add_class_arguments(SweepConfig, as_group=False)
    p.add_argument("--out", type=str | None, default=None, help="write the summary JSON here")
    return p


def split_override_flags(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Take ``--overrides.SECTION.FIELD VALUE`` (or ``=VALUE``) flags out of ``argv``.

    Left to jsonargparse, ``overrides`` (a dict) would be replaced by each such flag, dropping the
    sweep YAML's overrides and the earlier flags, with the value kept as a string. Here each value
    is read as YAML (``20`` -> 20) and the flags merge, field by field, into one nested mapping that
    :func:`sweep_from_namespace` applies after the YAML's (``extra_overrides``)."""
    import yaml

    rest: list[str] = []
    extra: dict[str, Any] = {}
    i = 0
    args = list(argv)
    while i < len(args):
        a = args[i]
        if a.startswith("--overrides.") and a.count(".") >= 2:
            key, eq, value = a[len("--overrides."):].partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise JobConfigError(f"{a} needs a value")
                value, i = args[i + 1], i + 1
            section, _, name = key.partition(".")
            if section not in ("model", "train", "run") or not name:
                raise JobConfigError(f"{a}: use --overrides.SECTION.FIELD with SECTION model, train or run")
            node = extra.setdefault(section, {})
            *parents, leaf = name.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = yaml.safe_load(value)
        else:
            rest.append(a)
        i += 1
    return rest, extra


def sweep_from_namespace(parser, ns, extra_overrides: dict[str, Any] | None = None) -> SweepConfig:
    from jsonargparse import ArgumentError

    from ray_jobs.parsing import error_line

    fields = {f.name for f in dataclasses.fields(SweepConfig)}
    try:
        init = parser.instantiate(ns)
        values = {k: v for k, v in init.as_dict().items() if k in fields}
        if extra_overrides:
            layers = values.get("overrides") or {}
            values["overrides"] = [*(layers if isinstance(layers, list) else [layers]), extra_overrides]
        sweep = SweepConfig(**values)
    except JobConfigError:
        raise
    except (ArgumentError, TypeError, ValueError) as e:
        raise JobConfigError(error_line(e)) from None
    job = sweep.base_job()   # the base job with overrides must itself be valid (fails before any trial starts)
    if sweep.scheduler.type == "pbt":
        sweep.perturbation_interval(job)
    return sweep


def load_sweep_config(path: str | None, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """A sweep YAML plus nested overrides, validated (the base job too). Raises JobConfigError."""
    from jsonargparse import ArgumentError

    from ray_jobs.parsing import error_line

    if path and not os.path.exists(path):
        raise JobConfigError(f"sweep config not found: {path} (try configs/sweep/asha.yaml)")
    p = sweep_parser()
    overrides = dict(overrides or {})
    try:
        ns = p.parse_path(path) if path else p.get_defaults()
        if "overrides" in overrides:   # job overrides merge into the YAML's, field by field
            yaml_layers = ns.overrides if isinstance(ns.overrides, list) else [ns.overrides]
            overrides["overrides"] = [*yaml_layers, overrides["overrides"]]
        if overrides:
            ns = p.parse_object(overrides, cfg_base=ns)
    except ArgumentError as e:
        raise JobConfigError(error_line(e)) from None
    return sweep_from_namespace(p, ns)


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune sample objects, nested like the job config (``{"train": {"lr": loguniform}}``)."""
    from ray import tune

    space: dict[str, dict[str, Any]] = {}
    for key, spec in sweep.search_space.items():
        kind, args = next(iter(spec.items()))
        if kind == "loguniform":
            sampler = tune.loguniform(float(args[0]), float(args[1]))
        elif kind == "uniform":
            sampler = tune.uniform(float(args[0]), float(args[1]))
        elif kind == "randint":
            sampler = tune.randint(int(args[0]), int(args[1]))
        elif kind == "choice":
            sampler = tune.choice(list(args))
        else:
            sampler = tune.grid_search(list(args))
        section, _, name = key.partition(".")
        space.setdefault(section, {})[name] = sampler
    return space


def pbt_mutations(sweep: SweepConfig) -> dict[str, Any]:
    """PBT's ``hyperparam_mutations``: the search space, with each ``choice`` as a plain list.

    Given a ``tune.choice`` PBT scales the value like a number (a weight decay of 0.1 became 0.12);
    given a list it moves to a neighbouring entry or draws one, so the value stays one of the choices."""
    space = param_space(sweep)
    for key, spec in sweep.search_space.items():
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            section, _, name = key.partition(".")
            space[section][name] = list(args)
    return space


def trial_job(base_job: JobConfig, config: dict[str, Any]) -> JobConfig:
    """The trial's JobConfig: the typed base job with this trial's sampled values (validated again)."""
    return base_job.replace(**{k: v for k, v in config.items() if k in ("model", "train", "run")})


def trial_inprocess(config: dict[str, Any], base_job: JobConfig, settings: dict[str, Any]) -> None:
    """One trial in this process: ``dnc.training.Trainer`` reporting to Tune at each log step."""
    import torch
    from ray import tune

    from dnc.training import MetricsLogger, Trainer, read_train_state

    job = trial_job(base_job, config)
    ctx = tune.get_context()
    trial_dir = ctx.get_trial_dir()
    tcfg = job.train
    device = "cuda" if torch.cuda.is_available() and settings["gpus"] > 0 else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, int(settings["cpus"])))
    ckpt = tune.get_checkpoint()

    def run(resume_dir: str | None) -> None:
        resume_step = read_train_state(resume_dir).step if resume_dir else None
        logger = MetricsLogger(trial_dir, ctx.get_trial_name(), {"model": job.model_config().to_dict(),
                                                                  "train": tcfg.to_dict()},
                               wandb=settings["wandb"], resume_step=resume_step,
                               project=job.run.wandb_project)
        trainer = Trainer(tcfg, job.model_config(), run_name=ctx.get_trial_name(), device=device,
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


def trial_ray_train(config: dict[str, Any], base_job: JobConfig, settings: dict[str, Any]) -> None:
    """One trial as a Ray Train run (TorchTrainer), its reports forwarded to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_jobs.train import run_training

    ctx = tune.get_context()
    # Each trial is its own Ray Train run under the sweep's storage; a restored trial reruns
    # with the same name, which resumes the Ray Train run from its newest checkpoint.
    job = trial_job(base_job, config).replace(run={
        "name": f"{settings['sweep_name']}-{ctx.get_trial_id()}", "storage": settings["storage"],
        "wandb": settings["wandb"], "progress": False})
    run_training(job, callbacks=[TuneReportCallback()])


def run_sweep(sweep: SweepConfig):
    """Run the sweep; returns the ``ResultGrid``."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local")  # not a stale `ray start` (ray_jobs.train.init_ray)
        stop_on_sigterm()  # ray.init replaced it with Ray's (ray_jobs.signals)
    base_job = sweep.base_job()
    total = base_job.train.stop_step
    storage = sweep.storage
    if sweep.scheduler.type == "asha":
        max_t = sweep.scheduler.max_t or total
        scheduler = ASHAScheduler(time_attr="step", max_t=max_t,
                                  grace_period=min(sweep.scheduler.grace_period, max_t),
                                  reduction_factor=sweep.scheduler.reduction_factor)
    elif sweep.scheduler.type == "pbt":
        # Mutations come from the same samplers as the initial values (nested like the config).
        scheduler = PopulationBasedTraining(time_attr="step", perturbation_interval=sweep.perturbation_interval(base_job),
                                            hyperparam_mutations=pbt_mutations(sweep),
                                            quantile_fraction=sweep.scheduler.quantile_fraction,
                                            resample_probability=sweep.scheduler.resample_probability)
    else:
        scheduler = FIFOScheduler()
    space = param_space(sweep)
    settings = {"wandb": sweep.wandb, "cpus": sweep.cpus_per_trial, "gpus": sweep.gpus_per_trial,
                "sweep_name": sweep.name, "storage": storage}
    if sweep.trial_mode == "inprocess":
        trainable = tune.with_resources(tune.with_parameters(trial_inprocess, base_job=base_job, settings=settings),
                                        {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial})
    else:
        # The trial only drives; the TorchTrainer's workers reserve CPUs/GPUs themselves.
        trainable = tune.with_resources(tune.with_parameters(trial_ray_train, base_job=base_job, settings=settings),
                                        {"cpu": 0.01})
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
                                    num_samples=sweep.num_samples, max_concurrent_trials=sweep.max_concurrent,
                                    # a fresh actor per trial: a reused one hangs starting its
                                    # second Ray Train run (ray_train mode), and holds memory
                                    reuse_actors=False),
        run_config=tune.RunConfig(name=sweep.name, storage_path=storage,
                                  # PBT clones a trial from a checkpoint another trial may
                                  # have written a few steps earlier: keep more than the newest
                                  checkpoint_config=tune.CheckpointConfig(
                                      num_to_keep=PBT_CHECKPOINTS_KEPT if sweep.scheduler.type == "pbt" else 1)),
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


def best_job(sweep: SweepConfig, best_config: dict[str, Any]) -> JobConfig:
    """The best trial's job: the base job with the trial's (final, for PBT) values, run as
    ``<name>-best`` under the base job's storage."""
    return trial_job(sweep.base_job(), best_config).replace(run={"name": f"{sweep.name}-best"})


def write_best_job(sweep: SweepConfig, best_config: dict[str, Any]) -> str:
    """Write :func:`best_job` as a training YAML (``dnc train --config`` takes it as it is); returns its path."""
    import fsspec
    import yaml

    path = sweep.best_config or f"{sweep.storage.rstrip('/')}/{sweep.name}/best_job.yaml"
    job = best_job(sweep, best_config)
    fs, p = fsspec.core.url_to_fs(path)
    fs.makedirs(os.path.dirname(p), exist_ok=True)
    header = (f"# The best trial of sweep {sweep.name!r} ({sweep.metric}, {sweep.mode}), as a training job:\n"
              f"#   dnc train --config {path}\n")
    with fs.open(p, "w") as f:
        f.write(header + yaml.safe_dump(job.to_dict(), sort_keys=False))
    return path


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


def run_sweep_command(parser, ns, extra_overrides: dict[str, Any] | None = None) -> int:
    """``dnc sweep``: run the parsed sweep, print and optionally write the summary
    (``extra_overrides``: the ``--overrides.*`` flags, :func:`split_override_flags`)."""
    sweep = sweep_from_namespace(parser, ns, extra_overrides)
    results = run_sweep(sweep)
    summary = summarize(results, sweep)
    if summary["best"]:
        summary["best"]["job_yaml"] = write_best_job(sweep, summary["best"]["config"])
    print_summary(summary)
    if ns.out:
        os.makedirs(os.path.dirname(os.path.abspath(ns.out)), exist_ok=True)
        with open(ns.out, "w") as f:
            json.dump(summary, f, indent=1, default=str)
    return 0 if all(r["error"] is None for r in summary["trials"]) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tune.sweep`` = ``dnc sweep``."""
    from ray_jobs.cli import main as dnc_main

    return dnc_main(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
