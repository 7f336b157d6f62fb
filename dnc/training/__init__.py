"""Framework-free training of a DNC, one job per module (no Ray here):

- :mod:`~dnc.training.config`      ``TrainConfig``, ``model_config_for``
- :mod:`~dnc.training.optim`       ``build_optimizer``, ``LRSchedule``, ``PlateauDetector``
- :mod:`~dnc.training.step`        ``train_step``, ``per_sample_loss``, ``autocast_ctx``
- :mod:`~dnc.training.evaluate`    ``evaluate`` (task accuracy + bits per byte of text)
- :mod:`~dnc.training.exact_match` ``TeacherForcedScorer`` (greedy exact match by batched teacher forcing)
- :mod:`~dnc.training.data`        ``TaskSource`` (curriculum batches), ``corpus_windows``
- :mod:`~dnc.training.checkpoint`  ``TrainState``, training checkpoints and RNG
- :mod:`~dnc.training.metrics`     ``MetricsLogger``, ``read_metrics``
- :mod:`~dnc.training.trainer`     ``Trainer`` (the loop Ray workers run too), ``fit`` (one process)

Parallelism (FSDP2, the bf16 DDP hook, compile) is applied from outside: :mod:`dnc.parallel`.
The names below are the public API (``dnc/API.md``); import them from ``dnc.training``.
"""

from dnc.training.checkpoint import (TrainState, latest_checkpoint, load_weights_from, read_train_state)
from dnc.training.config import TrainConfig, model_config_for
from dnc.training.data import TaskSource, corpus_windows
from dnc.training.evaluate import evaluate, greedy_predict_fn, task_accuracy, text_bits_per_byte
from dnc.training.exact_match import TeacherForcedScorer
from dnc.training.metrics import MetricsLogger, read_metrics
from dnc.training.optim import LRSchedule, PlateauDetector, build_optimizer
from dnc.training.step import IGNORE_INDEX, autocast_ctx, per_sample_loss, train_step
from dnc.training.trainer import InjectedFault, ReportFn, Trainer, fit

__all__ = [
    "TrainConfig", "model_config_for",
    "build_optimizer", "LRSchedule", "PlateauDetector",
    "train_step", "per_sample_loss", "autocast_ctx", "IGNORE_INDEX",
    "evaluate", "task_accuracy", "text_bits_per_byte", "greedy_predict_fn", "TeacherForcedScorer",
    "TaskSource", "corpus_windows",
    "TrainState", "read_train_state", "latest_checkpoint", "load_weights_from",
    "MetricsLogger", "read_metrics",
    "pack", "unpack", "PortableError",
    "Trainer", "fit", "ReportFn", "InjectedFault",
]


def __getattr__(name: str):
    # portable's names load on first use, not at package import: `python -m dnc.training.portable`
    # (the README's pack/unpack command) would otherwise find the module already imported by this
    # package and print runpy's "found in sys.modules" RuntimeWarning on every call.
    if name in ("pack", "unpack", "PortableError"):
        from dnc.training import portable

        return getattr(portable, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
