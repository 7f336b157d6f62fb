"""The task registry (:data:`TASKS`) and :func:`generate`, the one entry point that also draws the
curriculum's per-sample mixtures (markers, filler source, phrasing)."""

from __future__ import annotations

from typing import Any

import numpy as np

from dnc.data.tasks.builder import Sample, TaskGenerator, as_rng
from dnc.data.tasks.reasoning import copy_task, fill_blank, relational
from dnc.data.tasks.retrieval import kv_retrieval, mqar, needle


TASKS: dict[str, TaskGenerator] = {
    "copy": copy_task,
    "kv_retrieval": kv_retrieval,
    "fill_blank": fill_blank,
    "needle": needle,
    "relational": relational,
    "mqar": mqar,
}
"""Task name -> generator ``(rng, length, difficulty=0.5, **kw) -> Sample``."""


def generate(task: str, rng: np.random.Generator | int | None, length: int,
             difficulty: float = 0.5, **kw: Any) -> Sample:
    """One sample of ``task`` with exactly ``length`` tokens; ``kw`` are the task's own knobs
    (e.g. ``depth=`` for needle, ``hops=`` for relational, ``prefix_len=`` for kv_retrieval).
    The retrieval tasks (needle, kv_retrieval, relational, mqar) also take ``phrasing``
    (``"train"``/``"heldout"``/``"mixed"``), ``markers`` or ``marker_prob``, and ``filler`` (a source of
    :mod:`dnc.data.filler_text`, or ``"mixed"``)."""
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    rng = as_rng(rng)
    kw = _resolve_mixtures(task, rng, kw)
    return TASKS[task](rng, int(length), float(difficulty), **kw)


def _resolve_mixtures(task: str, rng: np.random.Generator, kw: dict[str, Any]) -> dict[str, Any]:
    """Per-sample draws of the curriculum's mixtures (one rng draw each, only when asked for, so
    samples without them stay what they were): ``marker_prob`` -> ``markers`` (True with that
    probability), ``filler="mixed"`` -> ``"words"`` or ``"stdlib"``, ``phrasing="mixed"`` -> the
    original template (None) or ``"train"`` (even odds each). Nothing here ever picks a held-out
    phrasing or filler: those are only given explicitly, by evaluations."""
    if "marker_prob" in kw:
        kw = dict(kw)
        p = kw.pop("marker_prob")
        if "markers" in kw:
            raise ValueError(f"{task}: give markers or marker_prob, not both")
        if not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{task}: marker_prob must be a probability in [0, 1], got {p!r}")
        kw["markers"] = bool(rng.random() < float(p))
    if kw.get("filler") == "mixed":
        kw = dict(kw, filler="words" if rng.random() < 0.5 else "stdlib")
    if kw.get("phrasing") == "mixed":
        kw = dict(kw, phrasing=None if rng.random() < 0.5 else "train")
    return kw
