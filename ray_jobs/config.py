"""The job config: ``JobConfig(model, train, run)``, dataclasses with a docstring per field.

Read from YAML (``configs/train/*.yaml``) plus dotted overrides (``--train.lr 1e-3``,
``--model.overrides.d_model 64``) by jsonargparse, validated once here at the edge (each
dataclass's ``__post_init__`` raises :class:`dnc.config.ConfigError` naming the field), and passed
as this typed object to Ray workers and Tune trials. Nobody downstream re-parses a dict or a YAML.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from dnc.config import PRESETS, ConfigError, DNCConfig, preset
from dnc.training import TrainConfig, model_config_for

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
DEFAULT_CORPUS_RATIO = 0.5
"""Share of steps on corpus text when a corpus is given and ``train.corpus_ratio`` is 0."""


class JobConfigError(ConfigError):
    """The YAML or an override is invalid; the message names the field and what to use."""


@dataclass
class ModelSection:
    """Which model to build: a preset plus field overrides."""

    preset: Literal["tiny", "small", "base"] = "tiny"
    """A dnc.config preset: tiny (CPU tests, the demo), small or base."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """DNCConfig fields that replace the preset's values, e.g. {segment_len: 512}."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise JobConfigError(f"model.preset: unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        known = {f.name for f in dataclasses.fields(DNCConfig)}
        unknown = set(self.overrides) - known
        if unknown:
            raise JobConfigError(f"model.overrides: unknown DNCConfig fields {sorted(unknown)}; known: {sorted(known)}")
        try:
            preset(self.preset, **self.overrides)
        except (ConfigError, TypeError) as e:
            raise JobConfigError(f"model.overrides: {e}") from None


@dataclass
class RunSection:
    """Where and how the job runs (Ray Train settings)."""

    name: str = "dnc-tiny"
    """Run name = Ray Train RunConfig.name = W&B run id; rerunning with the same name resumes."""
    storage: str = "runs"
    """Local directory or fsspec URI (s3://bucket/runs, gs://...) for checkpoints and logs; a
    relative directory is made absolute on the driver. Must be shared by all nodes of a cluster."""
    num_workers: int = 2
    """Ray Train workers (one process each; one GPU each with gpu)."""
    gpu: bool = False
    """One GPU per worker, NCCL; otherwise CPU workers with gloo."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp (ray.train.torch.prepare_model) or fsdp (FSDP2 fully_shard per block)."""
    ddp_find_unused: bool = False
    """DDP find_unused_parameters (the DNC keeps every parameter in the graph, so off)."""
    grad_reduce: Literal["fp32", "bf16"] = "fp32"
    """Gradient all-reduce dtype on GPUs: bf16 halves the bytes (DDP comm hook; FSDP then also
    all-gathers bf16 parameters). CPU workers (gloo) always reduce in fp32."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker (lower it to leave CPUs for Ray Data on small machines)."""
    max_failures: int = 2
    """Worker-group restarts from the latest checkpoint before the run fails (-1 = unlimited)."""
    keep_checkpoints: int = 3
    """Checkpoints kept in storage (oldest deleted first)."""
    wandb: Literal["auto", "on", "off"] = "auto"
    """W&B on rank 0: auto = when installed (WANDB_MODE defaults to offline)."""
    wandb_project: str = "bwr-dnc"
    """W&B project name."""
    corpus: list[str] | str | None = None
    """Text (.txt/.py/.md...) or Parquet files by path or glob (local or fsspec; a list, or one
    string with commas), streamed to the workers through Ray Data; stdlib = this Python's standard
    library source. With train.corpus_ratio 0, half the steps train on it."""
    corpus_text_column: str = "text"
    """Column holding the text in Parquet files."""
    corpus_holdout: float = 0.05
    """Fraction of corpus files held out for bits-per-byte evaluation (never trained on)."""
    progress: bool = True
    """Progress on the driver: a bar under a terminal, else one line per log step (and one line
    per checkpoint), read from the run's metrics.jsonl (ray_jobs/progress.py)."""

    def __post_init__(self) -> None:
        if isinstance(self.corpus, str):
            self.corpus = [s.strip() for s in self.corpus.split(",") if s.strip()]
        if not RUN_NAME_RE.match(self.name):
            raise JobConfigError(f"run.name must match {RUN_NAME_RE.pattern} (letters, digits, _ . -), got {self.name!r}")
        if self.num_workers < 1:
            raise JobConfigError(f"run.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker < 0:
            raise JobConfigError(f"run.cpus_per_worker must be >= 0, got {self.cpus_per_worker}")
        if not 0.0 <= self.corpus_holdout < 1.0:
            raise JobConfigError(f"run.corpus_holdout must be in [0, 1), got {self.corpus_holdout}")
        if "://" not in self.storage:
            # Resolved here, on the driver: a relative path would otherwise resolve in each Ray
            # worker's working directory (a session temp dir).
            self.storage = os.path.abspath(os.path.expanduser(self.storage))


@dataclass
class JobConfig:
    """A whole training job: model + train + run."""

    model: ModelSection = field(default_factory=ModelSection)
    """Which model to build."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training hyperparameters (dnc.training.TrainConfig)."""
    run: RunSection = field(default_factory=RunSection)
    """Where and how the job runs."""

    def __post_init__(self) -> None:
        if self.run.corpus and self.train.corpus_ratio == 0:
            self.train = self.train.replace(corpus_ratio=DEFAULT_CORPUS_RATIO)
        if self.train.corpus_ratio > 0 and not self.run.corpus:
            raise JobConfigError("train.corpus_ratio > 0 needs a corpus: set run.corpus (e.g. --run.corpus stdlib)")

    def model_config(self) -> DNCConfig:
        """The DNCConfig this job trains (preset + overrides + training-time switches)."""
        return model_config_for(self.train, self.model.preset, **self.model.overrides)

    @property
    def run_dir(self) -> str:
        """``<storage>/<name>``: Ray Train's run directory (checkpoints, metrics.jsonl, job.json)."""
        return f"{self.run.storage.rstrip('/')}/{self.run.name}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: dict[str, Any]) -> "JobConfig":
        """A copy with fields of sections replaced (and validated again), e.g.
        ``job.replace(train={"lr": 1e-3}, run={"name": "x"})``."""
        kw = {}
        for name, changes in sections.items():
            if name not in ("model", "train", "run"):
                raise JobConfigError(f"unknown job section {name!r}; use model, train or run")
            kw[name] = dataclasses.replace(getattr(self, name), **changes)
        return dataclasses.replace(self, **kw)


# ------------------------------------------------------------------------------------- loading
SECTIONS = {"model": ModelSection, "train": TrainConfig, "run": RunSection}


def job_parser(prog: str = "dnc train", description: str | None = None):
    """The jsonargparse parser of a job: ``--config YAML`` and ``--model.* / --train.* / --run.*``."""
    from jsonargparse import ActionConfigFile

    from ray_jobs.parsing import new_parser

    p = new_parser(prog=prog, description=description or "A training job: model + train + run.")
    p.add_argument("--config", action=ActionConfigFile, help="job YAML with model/train/run sections")
    p.add_class_arguments(JobConfig, as_group=False)
    return p


def job_from_namespace(parser, ns) -> JobConfig:
    """The typed JobConfig of a parsed namespace; building it validates every section."""
    from jsonargparse import ArgumentError

    from ray_jobs.parsing import error_line

    try:
        init = parser.instantiate(ns)
        return JobConfig(model=init.model, train=init.train, run=init.run)
    except JobConfigError:
        raise
    except (ConfigError, ArgumentError, TypeError, ValueError) as e:
        raise JobConfigError(error_line(e)) from None


def parse_job(argv: Sequence[str], prog: str = "dnc train") -> JobConfig:
    """``["--config", "configs/train/tiny.yaml", "--train.lr", "1e-3"]`` -> JobConfig.
    Raises :class:`JobConfigError` with one line naming the field."""
    from jsonargparse import ArgumentError

    from ray_jobs.parsing import error_line

    p = job_parser(prog)
    try:
        ns = p.parse_args(list(argv))
    except ArgumentError as e:
        raise JobConfigError(error_line(e)) from None
    return job_from_namespace(p, ns)


def load_job_config(path: str | None, *overrides: dict[str, Any] | None) -> JobConfig:
    """A YAML job config plus layers of nested overrides (``{"train": {"lr": 1e-3}}``), each merged
    into the job field by field, validated; every invalid override is listed (``train.lr: ...``,
    one per line). Raises :class:`JobConfigError`."""
    from jsonargparse import ArgumentError

    from ray_jobs.parsing import error_line

    if path and not os.path.exists(path):
        raise JobConfigError(f"config file not found: {path} (try configs/train/tiny.yaml)")
    p = job_parser()
    try:
        base = p.parse_path(path) if path else p.get_defaults()
    except ArgumentError as e:
        raise JobConfigError(f"{path}: {error_line(e)}") from None
    layers = [o for o in overrides if o]
    ns = base.clone()
    try:
        for layer in layers:
            ns = p.parse_object(layer, cfg_base=ns)
        return job_from_namespace(p, ns)
    except (JobConfigError, ArgumentError) as e:
        first = error_line(e)
    # Name every bad override, not just the first: check them one at a time on the base.
    problems = []
    for layer in layers:
        for section, values in layer.items():
            if section not in SECTIONS or not isinstance(values, dict):
                problems.append(f"{section}: not a job section (use model, train or run with a mapping)")
                continue
            known = {f.name for f in dataclasses.fields(SECTIONS[section])}
            unknown = sorted(set(values) - known)
            if unknown:
                problems.append(f"unknown {section} fields {unknown}; known: {sorted(known)}")
            for key in sorted(set(values) & known):
                try:
                    job_from_namespace(p, p.parse_object({section: {key: values[key]}}, cfg_base=base.clone()))
                except (JobConfigError, ArgumentError) as e:
                    line = error_line(e)
                    problems.append(line if line.startswith(f"{section}.") else f"{section}.{key}: {line}")
    raise JobConfigError("invalid job config" + (f" ({path})" if path else "") + ":\n  "
                         + "\n  ".join(problems or [first]))
