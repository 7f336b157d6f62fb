"""Filler cut from real text: the running interpreter's standard library (code, comments, docstrings),
read once per process into one byte buffer per split, so a filler of N tokens is one slice.

Sources (the ``filler=`` argument of the retrieval tasks in :mod:`dnc.data.tasks`):

- ``"words"``: the synthetic word filler of :func:`dnc.data.tasks.filler` (no digits, no capitals);
- ``"stdlib"``: slices of the stdlib *train* modules (:func:`dnc.data.corpus.stdlib_source_files`);
- ``"stdlib_heldout"``: slices of the stdlib *eval* modules, never used in training;
- ``"mixed"``: ``"words"`` or ``"stdlib"`` with equal probability, drawn per sample by
  :func:`dnc.data.tasks.generate`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TRAIN_FILLERS = ("words", "stdlib", "mixed")
"""Filler sources that may reach training."""
HELDOUT_FILLERS = ("stdlib_heldout",)
"""Filler sources kept for evaluation only."""
FILLERS = TRAIN_FILLERS + HELDOUT_FILLERS

_CORPUS_SPLIT = {"stdlib": "train", "stdlib_heldout": "eval"}
_BUFFERS: dict[str, np.ndarray] = {}

LINE_SNAP = 256
"""A slice starts at the first line start within this many bytes of its random offset (whole
lines read like text; a 2k-token slice then costs no more than a search of 256 bytes)."""


def check_filler(source: str) -> str:
    if source not in FILLERS:
        raise ValueError(f"filler must be one of {FILLERS}, got {source!r}")
    return source


def corpus_bytes(source: str) -> np.ndarray:
    """``[N]`` uint8: every file of the source's stdlib split, each followed by a newline. Read on
    first use and kept for the life of the process (about 10 MB for ``stdlib``)."""
    if source not in _BUFFERS:
        from dnc.data.corpus import stdlib_source_files

        files = stdlib_source_files(_CORPUS_SPLIT[source])
        if not files:
            raise RuntimeError(f"filler {source!r}: this interpreter's stdlib split "
                               f"{_CORPUS_SPLIT[source]!r} has no .py files")
        blob = b"".join(Path(f).read_bytes() + b"\n" for f in files)
        _BUFFERS[source] = np.frombuffer(blob, dtype=np.uint8)
    return _BUFFERS[source]


def text_filler(rng: np.random.Generator, n: int, source: str) -> np.ndarray:
    """Exactly ``n`` tokens ``[n]`` int32 (UTF-8 bytes) of consecutive text from ``source``
    (``stdlib`` or ``stdlib_heldout``), starting at a line start near a random offset; wraps to the
    start of the buffer when the slice runs past its end."""
    if n <= 0:
        return np.zeros(0, dtype=np.int32)
    buf = corpus_bytes(source)
    start = int(rng.integers(0, len(buf)))
    nl = np.flatnonzero(buf[start:start + LINE_SNAP] == 10)
    start = (start + int(nl[0]) + 1) % len(buf) if len(nl) else start
    if start + n <= len(buf):
        return buf[start:start + n].astype(np.int32)
    reps = -(-(start + n) // len(buf))
    return np.tile(buf, reps)[start:start + n].astype(np.int32)


__all__ = ["FILLERS", "TRAIN_FILLERS", "HELDOUT_FILLERS", "check_filler", "corpus_bytes", "text_filler"]
