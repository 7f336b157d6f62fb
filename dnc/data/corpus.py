"""Real text for language modelling: files on any fsspec filesystem (local, ``memory://``,
``s3://``, ``gs://``...), plain text and Parquet, packed into fixed-length token windows; and the
running interpreter's standard library as a corpus that needs no download, with a deterministic
held-out split by module.
"""

from __future__ import annotations

import math
import os
import sysconfig
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import fsspec
import numpy as np

from dnc.tokenizer import ByteTokenizer

TEXT_EXTENSIONS: tuple[str, ...] = (".txt", ".md", ".py", ".rst")
"""File name endings read as UTF-8 text, one document per file."""
PARQUET_EXTENSIONS: tuple[str, ...] = (".parquet", ".pq")
"""File name endings read as Parquet, one document per row of the text column."""


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def _supported(path: str, extensions: Sequence[str]) -> bool:
    return path.lower().endswith(tuple(extensions))


def resolve_paths(pattern_or_list: str | os.PathLike | Sequence[str | os.PathLike],
                  extensions: Sequence[str] = TEXT_EXTENSIONS + PARQUET_EXTENSIONS,
                  storage_options: dict[str, Any] | None = None) -> list[str]:
    """Expand paths, directories and globs on any fsspec filesystem into a sorted list of files.

    Each item may be a file (kept whatever its ending), a directory (searched recursively for
    ``extensions``) or a glob (``data/*.parquet``, ``s3://bucket/shards/**.parquet``; matches
    filtered by ``extensions``). Local files come back as plain paths, others as full URIs
    (``memory:///a/b.txt``) that :func:`iter_documents` and ``fsspec.open`` accept.
    Raises ``FileNotFoundError`` for an item that matches nothing."""
    if isinstance(pattern_or_list, (str, os.PathLike)):
        items = [pattern_or_list]
    else:
        items = list(pattern_or_list)
    out: list[str] = []
    for item in items:
        fs, path = fsspec.core.url_to_fs(os.fspath(item), **(storage_options or {}))
        if any(c in path for c in "*?["):
            found = [p for p in fs.glob(path) if not fs.isdir(p)]
            found = [p for p in found if _supported(p, extensions)]
        elif fs.isdir(path):
            found = [p for p in fs.find(path) if _supported(p, extensions)]
        elif fs.exists(path):
            found = [path]
        else:
            raise FileNotFoundError(f"{os.fspath(item)!r} matches no file; give an existing file, "
                                    f"directory or glob (any fsspec URI)")
        if not found:
            raise FileNotFoundError(f"{os.fspath(item)!r} matches no file ending in "
                                    f"{', '.join(extensions)}")
        local = _is_local(fs)
        out += [p if local else fs.unstrip_protocol(p) for p in sorted(found)]
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def iter_documents(paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                   text_column: str = "text", encoding: str = "utf-8", errors: str = "replace",
                   storage_options: dict[str, Any] | None = None,
                   parquet_batch_rows: int = 1024) -> Iterator[str]:
    """Yield documents: the whole text of each text file, each non-null value of ``text_column``
    of each Parquet file (streamed in row batches, never the whole file in memory).
    ``paths`` goes through :func:`resolve_paths` first. Undecodable bytes become U+FFFD."""
    for uri in resolve_paths(paths, storage_options=storage_options):
        low = uri.lower()
        if low.endswith(PARQUET_EXTENSIONS):
            yield from _iter_parquet(uri, text_column, storage_options, parquet_batch_rows)
        elif low.endswith(TEXT_EXTENSIONS):
            with fsspec.open(uri, "rb", **(storage_options or {})) as f:
                yield f.read().decode(encoding, errors=errors)
        else:
            raise ValueError(f"{uri}: unsupported file type; use one of "
                             f"{', '.join(TEXT_EXTENSIONS + PARQUET_EXTENSIONS)}")


def _iter_parquet(uri: str, text_column: str, storage_options: dict[str, Any] | None,
                  batch_rows: int) -> Iterator[str]:
    import pyarrow.parquet as pq  # heavy: imported only when Parquet is read

    with fsspec.open(uri, "rb", **(storage_options or {})) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if text_column not in names:
            raise ValueError(f"{uri}: no column {text_column!r}; columns are {names}; "
                             f"pass text_column=")
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_column]):
            for v in batch.column(0).to_pylist():
                if v is not None:
                    yield v if isinstance(v, str) else bytes(v).decode("utf-8", "replace")


def write_parquet(docs: Iterable[str], uri: str, *, text_column: str = "text",
                  storage_options: dict[str, Any] | None = None) -> int:
    """Write documents as one Parquet file (a ``text_column`` string column) through fsspec.
    Returns the number of rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({text_column: pa.array(list(docs), type=pa.string())})
    with fsspec.open(uri, "wb", **(storage_options or {})) as f:
        pq.write_table(table, f)
    return table.num_rows


def _encode(text: str, tokenizer: Any) -> np.ndarray:
    if isinstance(tokenizer, ByteTokenizer):
        # Byte ids are the UTF-8 bytes: one vectorised view instead of a Python list per byte.
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
    ids = tokenizer.encode(text)
    ids = getattr(ids, "ids", ids)  # a `tokenizers` Encoding
    return np.asarray(ids, dtype=np.int32)


def chunk_documents(docs: Iterable[str], seq_len: int, tokenizer: Any = None, *,
                    add_eos: bool = True, drop_last: bool = True) -> Iterator[np.ndarray]:
    """Pack documents into contiguous windows of exactly ``seq_len`` tokens (``[seq_len]``
    int32), each document followed by ``<eos>`` so the model sees where documents end.
    Windows do not overlap; for next-token training take ``seq_len = T + 1`` and shift.
    With ``drop_last=False`` the final partial window is yielded, right-padded with ``<pad>``."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    tok = tokenizer if tokenizer is not None else ByteTokenizer()
    eos = np.array([tok.eos_id if hasattr(tok, "eos_id") else tok.token_to_id("<eos>")],
                   dtype=np.int32)
    buf: list[np.ndarray] = []
    have = 0
    for doc in docs:
        ids = _encode(doc, tok)
        buf.append(ids)
        have += len(ids)
        if add_eos:
            buf.append(eos)
            have += 1
        if have >= seq_len:
            flat = np.concatenate(buf)
            n = len(flat) // seq_len
            yield from flat[: n * seq_len].reshape(n, seq_len)
            rest = flat[n * seq_len:]
            buf, have = [rest], len(rest)
    if have and not drop_last:
        pad = tok.pad_id if hasattr(tok, "pad_id") else tok.token_to_id("<pad>")
        flat = np.concatenate(buf)
        yield np.concatenate([flat, np.full(seq_len - len(flat), pad, dtype=np.int32)])


def _module_name(rel: Path) -> str:
    """Top-level module of a stdlib file (``asyncio/tasks.py`` -> ``asyncio``), so a package is
    never split between train and eval."""
    return rel.parts[0][:-3] if len(rel.parts) == 1 else rel.parts[0]


def is_eval_module(name: str, eval_mod: int = 10) -> bool:
    """Deterministic held-out rule: ``crc32(name) % eval_mod == 0`` (crc32, unlike ``hash``, is
    the same in every process)."""
    return zlib.crc32(name.encode("utf-8")) % eval_mod == 0


def stdlib_source_files(split: str = "train", *, include_tests: bool = False,
                        eval_mod: int = 10) -> list[str]:
    """The running interpreter's standard-library ``.py`` files (``sysconfig`` ``stdlib``),
    sorted, split by top-level module with :func:`is_eval_module`: ``"eval"`` holds about one
    module in ``eval_mod``, ``"train"`` the rest, ``"all"`` both. ``site-packages`` is never
    included; the ``test``/``idlelib`` packages (huge, atypical, some files deliberately broken)
    only with ``include_tests``."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    if not include_tests:
        skip |= {"test", "tests", "idlelib", "lib2to3"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for fn in filenames:
            if not fn.endswith(".py"):
                continue
            p = Path(dirpath) / fn
            ev = is_eval_module(_module_name(p.relative_to(root)), eval_mod)
            if split == "all" or ev == (split == "eval"):
                out.append(str(p))
    return sorted(out)


def bits_per_byte(total_nll_nats: float, n_bytes: int) -> float:
    """Bits per UTF-8 byte from a summed negative log-likelihood in nats over text of
    ``n_bytes`` bytes (tokenizer-independent, so byte and BPE models compare)."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be > 0, got {n_bytes}")
    return float(total_nll_nats) / (n_bytes * math.log(2))


__all__ = [
    "resolve_paths", "iter_documents", "write_parquet", "chunk_documents", "stdlib_source_files",
    "is_eval_module", "bits_per_byte", "TEXT_EXTENSIONS", "PARQUET_EXTENSIONS",
]
