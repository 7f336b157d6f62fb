"""The job config: one YAML (``configs/train/*.yaml``) validated with pydantic at the edge.

Three sections::

    model: {preset: tiny, overrides: {...DNCConfig fields...}}
    train: {...dnc.training.TrainConfig fields...}
    run:   {name, storage, num_workers, gpu, strategy, ...}   (RunSection below)

Errors name the field and what is allowed (``train.lr: lr must be a positive number, got -1``).
Command-line flags and ``--set section.field=value`` overrides are applied before validation.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dnc.config import PRESETS, ConfigError, DNCConfig, preset
from dnc.training import TrainConfig

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ModelSection(BaseModel):
    """Which model to build."""

    model_config = ConfigDict(extra="forbid")

    preset: str = "tiny"
    """A ``dnc.config`` preset: tiny, small or base."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """``DNCConfig`` fields that replace the preset's values."""

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of {sorted(PRESETS)}")
        return v

    @model_validator(mode="after")
    def _valid_overrides(self) -> "ModelSection":
        known = {f.name for f in dataclasses.fields(DNCConfig)}
        unknown = set(self.overrides) - known
        if unknown:
            raise ValueError(f"unknown model.overrides fields {sorted(unknown)}; known: {sorted(known)}")
        try:
            preset(self.preset, **self.overrides)
        except (ConfigError, TypeError) as e:
            raise ValueError(str(e)) from None
        return self

    def build(self, grad_checkpointing: bool = False) -> DNCConfig:
        o = dict(self.overrides)
        if grad_checkpointing:
            o["grad_checkpointing"] = True
        return preset(self.preset, **o)


class RunSection(BaseModel):
    """Where and how the job runs (Ray Train settings)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "dnc-tiny"
    """Run name = Ray Train ``RunConfig.name`` = W&B run id; rerunning with the same name resumes."""
    storage: str = "runs"
    """Local directory or fsspec URI (``s3://bucket/runs``, ``gs://...``) for checkpoints and logs.
    Must be shared by all nodes in a multi-node cluster."""
    num_workers: int = 2
    """Ray Train workers (one process each; one GPU each with ``gpu``)."""
    gpu: bool = False
    """One GPU per worker, NCCL; otherwise CPU workers with gloo."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """``ddp`` (``ray.train.torch.prepare_model``) or ``fsdp`` (FSDP2 ``fully_shard`` per block)."""
    ddp_find_unused: bool = False
    """DDP ``find_unused_parameters`` (the DNC keeps every parameter in the graph, so off)."""
    grad_reduce: Literal["fp32", "bf16"] = "fp32"
    """Gradient all-reduce dtype on GPUs: ``bf16`` halves the bytes (DDP comm hook; FSDP then also
    all-gathers bf16 parameters). CPU workers (gloo) always reduce in fp32."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker (lower it to leave CPUs for Ray Data on small machines)."""
    max_failures: int = 2
    """Worker-group restarts from the latest checkpoint before the run fails (-1 = unlimited)."""
    keep_checkpoints: int = 3
    """Checkpoints kept in storage (oldest deleted first)."""
    wandb: Literal["auto", "on", "off"] = "auto"
    """W&B on rank 0: auto = when installed (``WANDB_MODE`` defaults to offline)."""
    wandb_project: str = "bwr-dnc"
    """W&B project name."""
    corpus: list[str] | None = None
    """Text (.txt/.py/.md...) or Parquet files by path or glob (local or fsspec), streamed to the
    workers through Ray Data; ``stdlib`` = this Python's standard library source."""
    corpus_text_column: str = "text"
    """Column holding the text in Parquet files."""
    corpus_holdout: float = 0.05
    """Fraction of corpus files held out for bits-per-byte evaluation (never trained on)."""
    progress: bool = True
    """Progress bar on rank 0."""

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not RUN_NAME_RE.match(v):
            raise ValueError(f"run name must match {RUN_NAME_RE.pattern} (letters, digits, _ . -), got {v!r}")
        return v

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"num_workers must be >= 1, got {v}")
        return v

    @field_validator("cpus_per_worker")
    @classmethod
    def _cpus(cls, v: float) -> float:
        if v < 0:
            raise ValueError("cpus_per_worker must be >= 0")
        return v

    @field_validator("corpus", mode="before")
    @classmethod
    def _corpus_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [s for s in v.split(",") if s.strip()]
        return v

    @field_validator("corpus_holdout")
    @classmethod
    def _holdout(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"corpus_holdout must be in [0, 1), got {v}")
        return v


class JobConfig(BaseModel):
    """A whole training job: model + train + run."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSection = Field(default_factory=ModelSection)
    train: dict[str, Any] = Field(default_factory=dict)
    run: RunSection = Field(default_factory=RunSection)

    @field_validator("train")
    @classmethod
    def _valid_train(cls, v: dict[str, Any]) -> dict[str, Any]:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = set(v) - known
        if unknown:
            raise ValueError(f"unknown train fields {sorted(unknown)}; known: {sorted(known)}")
        tc = pydantic.TypeAdapter(TrainConfig).validate_python(v)
        return tc.to_dict()

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.train)

    def model_cfg(self) -> DNCConfig:
        return self.model.build(grad_checkpointing=self.train_config.grad_checkpointing)

    @property
    def storage_path(self) -> str:
        """Storage as Ray Train wants it: absolute local path or URI."""
        s = self.run.storage
        if "://" in s:
            return s
        return os.path.abspath(os.path.expanduser(s))

    @property
    def run_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.run.name}"


class JobConfigError(ValueError):
    """The YAML or an override is invalid; the message lists every problem as ``field: reason``."""


def format_validation_error(e: pydantic.ValidationError, source: str = "") -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc or '<root>'}: {msg}")
    head = f"invalid job config{f' ({source})' if source else ''}:"
    return "\n".join([head, *lines])


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-3", "run.gpu=true"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise JobConfigError(f"--set expects section.field=value, got {item!r}")
        key, val = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2:
            raise JobConfigError(f"--set key must be section.field (e.g. train.lr), got {key!r}")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = yaml.safe_load(val)
    return out


def deep_merge(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_job_config(path: str | None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Read a YAML job config, apply nested overrides, validate. Raises :class:`JobConfigError`."""
    raw: dict[str, Any] = {}
    if path:
        if not os.path.exists(path):
            raise JobConfigError(f"config file not found: {path} (try configs/train/tiny.yaml)")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise JobConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise JobConfigError(f"{path} must hold a mapping with model/train/run sections")
    raw = deep_merge(raw, overrides or {})
    try:
        return JobConfig.model_validate(raw)
    except pydantic.ValidationError as e:
        raise JobConfigError(format_validation_error(e, path or "")) from None
