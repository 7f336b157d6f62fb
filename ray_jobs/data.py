"""Ray Data glue for ``--corpus``: files (local or fsspec, text or Parquet) -> byte windows -> workers.

The driver expands the globs, holds a deterministic fraction of files out for bits-per-byte
evaluation, and builds a streaming ``ray.data.Dataset`` of fixed-length byte windows
(``{"tokens": uint8 [max_len + 1]}``). ``TorchTrainer(datasets={"train": ds})`` splits it across
workers; each worker turns ``ray.train.get_dataset_shard("train")`` into endless LM batches with
:func:`shard_batches`.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Sequence

import numpy as np
import torch

def expand_corpus(patterns: Sequence[str], holdout: float = 0.05) -> tuple[list[str], list[str]]:
    """``--corpus`` patterns -> (training files, held-out files).

    Each pattern is a path, directory or glob on any fsspec filesystem
    (:func:`dnc.data.corpus.resolve_paths`), or ``stdlib``: this interpreter's standard library
    source, split by top-level module (:func:`dnc.data.corpus.stdlib_source_files`, about one
    module in ten held out). Other files are held out by a stable hash (:func:`split_holdout`).
    Raises ``FileNotFoundError`` naming a pattern that matches nothing."""
    from dnc.data.corpus import resolve_paths, stdlib_source_files

    train: list[str] = []
    held: list[str] = []
    other: list[str] = []
    for pat in patterns:
        pat = pat.strip()
        if pat == "stdlib":
            train += stdlib_source_files("train")
            held += stdlib_source_files("eval")
        elif pat:
            other += resolve_paths(pat)
    tr, he = split_holdout(sorted(dict.fromkeys(other)), holdout)
    return sorted(dict.fromkeys(train + tr)), sorted(dict.fromkeys(held + he))


def split_holdout(files: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic train/held-out split by a hash of each path (stable across machines and runs).
    At least one file is held out when ``fraction > 0`` and there are two or more files."""
    if fraction <= 0 or len(files) < 2:
        return list(files), []

    def h(f: str) -> float:
        return int(hashlib.sha1(f.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    held = [f for f in files if h(f) < fraction]
    if not held:
        held = [min(files, key=h)]
    keep = set(held)
    return [f for f in files if f not in keep], held


def read_bytes(files: Sequence[str], max_bytes: int, text_column: str = "text") -> bytes:
    """Up to ``max_bytes`` of the files' text, concatenated (Parquet: the text column)."""
    import fsspec

    out = bytearray()
    for f in files:
        if len(out) >= max_bytes:
            break
        if f.endswith(".parquet"):
            import pyarrow.parquet as pq

            with fsspec.open(f, "rb") as fh:
                table = pq.read_table(fh, columns=[text_column])
            for t in table.column(text_column).to_pylist():
                out += (t or "").encode("utf-8") + b"\n\n"
        else:
            with fsspec.open(f, "rb") as fh:
                out += fh.read() + b"\n\n"
    return bytes(out[:max_bytes])


def _windows(batch: dict[str, np.ndarray], window: int, column: str) -> dict[str, np.ndarray]:
    parts = []
    for v in batch[column]:
        if v is None:
            continue
        parts.append(v.encode("utf-8") if isinstance(v, str) else bytes(v))
        parts.append(b"\n\n")
    buf = np.frombuffer(b"".join(parts), dtype=np.uint8)
    n = len(buf) // window
    return {"tokens": buf[: n * window].reshape(n, window).copy()}


DATA_TASK_CPUS = 0.25
"""CPUs each Ray Data read/window task asks for. Ray Data's default is one whole CPU, and beside
the training workers and Serve a whole CPU is often not free: ``make run`` on 2 cores (two workers
at 0.5 CPU and the served model at 0.5) left 0.5, so the corpus read was never scheduled and
training waited for its first batch forever. The tasks only read and slice bytes."""


def build_dataset(files: Sequence[str], max_len: int, text_column: str = "text"):
    """A streaming Ray Dataset of ``{"tokens": uint8[max_len + 1]}`` byte windows.

    Text-like files go through ``ray.data.read_binary_files`` (bytes, so any encoding survives the
    byte tokenizer), Parquet through ``ray.data.read_parquet``; both are cut into windows in
    ``map_batches``."""
    import ray.data

    window = max_len + 1
    parquet = [f for f in files if f.endswith(".parquet")]
    text = [f for f in files if not f.endswith(".parquet")]
    sets = []
    if text:
        ds = ray.data.read_binary_files(text, ray_remote_args={"num_cpus": DATA_TASK_CPUS})
        sets.append(ds.map_batches(_windows, fn_kwargs={"window": window, "column": "bytes"},
                                   batch_format="numpy", batch_size=64, num_cpus=DATA_TASK_CPUS))
    if parquet:
        ds = ray.data.read_parquet(parquet, columns=[text_column], ray_remote_args={"num_cpus": DATA_TASK_CPUS})
        sets.append(ds.map_batches(_windows, fn_kwargs={"window": window, "column": text_column},
                                   batch_format="numpy", batch_size=256, num_cpus=DATA_TASK_CPUS))
    if not sets:
        raise ValueError("no corpus files to read")
    return sets[0] if len(sets) == 1 else sets[0].union(*sets[1:])


def shard_batches(shard: Any, batch_size: int, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless LM batches from a worker's dataset shard: ``tokens``/``targets`` LongTensor [B, L]
    (next-byte prediction). Each pass over the shard is one epoch with its own shuffle seed."""
    epoch = 0
    while True:
        n = 0
        for b in shard.iter_torch_batches(batch_size=batch_size, dtypes={"tokens": torch.long}, drop_last=True,
                                          local_shuffle_buffer_size=max(4 * batch_size, 64),
                                          local_shuffle_seed=seed * 1000 + epoch):
            w = b["tokens"]
            n += 1
            yield {"tokens": w[:, :-1].contiguous(), "targets": w[:, 1:].contiguous()}
        if n == 0:
            raise RuntimeError(f"the corpus shard yielded no batch of {batch_size} windows: "
                               "use more corpus files, a smaller batch_size or fewer workers")
        epoch += 1
