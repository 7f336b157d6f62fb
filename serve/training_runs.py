"""Training runs under a storage root, read from their ``metrics.jsonl`` (pure functions over fsspec).

A run is a folder holding ``metrics.jsonl`` (written by ``dnc.training.MetricsLogger``: one JSON row
per logged step, ``{"step": int, "time": unix_s, "train/loss": ..., ...}``) at depth 1 or 2 under
the root: ``runs/demo/metrics.jsonl`` (``make run``, Ray Train), ``runs/sweeps/trial_3/metrics.jsonl``.
The server follows a run while it trains by re-reading the file from the last step a client has
(``after_step``); a half-written last line is skipped until it is complete.

Used by ``serve/routers/training.py``; never imports Ray or the model.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

import fsspec

from .errors import NotFound, Unprocessable

METRICS_FILE = "metrics.jsonl"
MAX_DEPTH = 2
"""How deep under the root a run folder may sit (``root/a/metrics.jsonl``, ``root/a/b/metrics.jsonl``)."""
LIVE_WINDOW_S = 120.0
"""A run whose metrics file changed this recently is shown as training."""
RUN_PART = re.compile(r"^[A-Za-z0-9_.=-]{1,128}$")
RUN_PATTERN = "one or two folder names of letters, digits and _ . = - (e.g. demo or sweep/trial_1)"
SKIP_DIRS = {"checkpoints", "serve-storage", "ui-screenshots", "wandb", ".git"}
"""Folders that are never runs themselves and may be large (session banks, checkpoints)."""


@dataclass(frozen=True)
class RunsRoot:
    """A storage root (local dir or fsspec URI) as a filesystem and a path inside it."""

    uri: str

    def fs(self) -> tuple[Any, str]:
        fs, path = fsspec.core.url_to_fs(self.uri)
        return fs, path.rstrip("/")


def check_run_name(run: str) -> str:
    """``run`` as a path relative to the root, refusing anything that could leave it (422)."""
    parts = run.strip("/").split("/")
    if not run or len(parts) > MAX_DEPTH or not all(RUN_PART.match(p) and p not in (".", "..") for p in parts):
        shown = run if len(run) <= 60 else run[:57] + "..."
        raise Unprocessable(f"run must be {RUN_PATTERN} (got {shown!r}); list the runs with GET /v1/runs",
                            "invalid_run", "run")
    return "/".join(parts)


def _metrics_files(fs, root: str) -> list[str]:
    """Paths of ``metrics.jsonl`` at depth 1..MAX_DEPTH under ``root`` (no deep walk: a root can hold
    session banks and checkpoints with many files)."""
    found: list[str] = []
    frontier = [root]
    for _depth in range(MAX_DEPTH):
        nxt = []
        for d in frontier:
            try:
                entries = fs.ls(d, detail=True)
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue
            for e in entries:
                name = e["name"].rstrip("/").rsplit("/", 1)[-1]
                if e.get("type") != "directory" or name in SKIP_DIRS or name.startswith("."):
                    continue
                candidate = f"{e['name'].rstrip('/')}/{METRICS_FILE}"
                if fs.exists(candidate):
                    found.append(candidate)
                else:
                    nxt.append(e["name"].rstrip("/"))
        frontier = nxt
    return found


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "updated", "last_modified", "created"):
        v = info.get(key)
        if isinstance(v, (int, float)):
            return float(v)
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
    return None


def _tail_rows(fs, path: str, size: int, want: int = 1, chunk: int = 65536) -> list[dict[str, Any]]:
    """The last ``want`` complete JSON rows of a file, reading only its tail."""
    with fs.open(path, "rb") as f:
        start = max(0, size - chunk)
        f.seek(start)
        data = f.read()
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first line of a tail chunk is likely cut
    rows = []
    for line in reversed(lines):
        row = _parse(line)
        if row is not None:
            rows.append(row)
            if len(rows) >= want:
                break
    return rows[::-1]


def _parse(line: bytes | str) -> dict[str, Any] | None:
    line = line.strip()
    if not line:
        return None
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a line still being written, or damage: skip it
    return row if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) else None


def list_runs(root_uri: str, now: float | None = None) -> list[dict[str, Any]]:
    """Every run under the root, newest change first::

        [{"run": "demo", "path": ".../runs/demo/metrics.jsonl", "bytes": 12345, "modified": unix_s,
          "live": bool, "last_step": 600, "last": {...last row...}, "stage": "foundation"}]
    """
    fs, root = RunsRoot(root_uri).fs()
    now = time.time() if now is None else now
    runs = []
    for path in _metrics_files(fs, root):
        try:
            info = fs.info(path)
        except FileNotFoundError:
            continue  # removed while listing
        size = int(info.get("size") or 0)
        last = _tail_rows(fs, path, size)[-1:] if size else []
        mtime = _mtime(info)
        row = last[0] if last else {}
        runs.append({"run": path[len(root) + 1:-len(METRICS_FILE) - 1], "path": path, "bytes": size,
                     "modified": mtime, "live": bool(mtime and now - mtime < LIVE_WINDOW_S),
                     "last_step": row.get("step"), "stage": row.get("stage"),
                     "last": row})
    runs.sort(key=lambda r: r["modified"] or 0, reverse=True)
    return runs


def read_metrics(root_uri: str, run: str, after_step: int | None = None, limit: int = 5000) -> dict[str, Any]:
    """Rows of ``<root>/<run>/metrics.jsonl`` with ``step > after_step``, oldest first, at most ``limit``.

    Returns ``{"run", "rows", "count", "total", "last_step", "more", "modified"}``; ``more`` says that
    ``limit`` cut the answer (ask again with ``after_step=last_step``). A restarted run rewrites its
    file from an earlier step: a client that sees ``last_step < after_step`` starts over.
    """
    name = check_run_name(run)
    fs, root = RunsRoot(root_uri).fs()
    path = f"{root}/{name}/{METRICS_FILE}"
    try:
        info = fs.info(path)
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise NotFound(f"run {name!r} has no {METRICS_FILE} under the runs root; list the runs with GET /v1/runs",
                       "run_not_found", "run") from None
    rows = [r for r in (_parse(line) for line in data.split(b"\n")) if r is not None]
    newer = [r for r in rows if after_step is None or r["step"] > after_step]
    out = newer[:limit]
    last = out[-1]["step"] if out else (rows[-1]["step"] if rows else None)
    return {"run": name, "rows": out, "count": len(out), "total": len(rows), "last_step": last,
            "more": len(newer) > limit, "modified": _mtime(info)}
