"""Training progress on the driver, read from the run's ``metrics.jsonl`` and checkpoint folders.

Ray Train workers print through the driver's log stream, where a per-worker ``tqdm_ray`` bar is
repeated line after line in a log file. So the workers show no progress at all, and the driver
follows what rank 0 writes anyway (``dnc.training.MetricsLogger``: one row per log step):

- under a terminal: one tqdm bar (step / total, loss, stage);
- otherwise (a log file, a pipe): one line per log step, at most one every ``line_every_s``
  seconds (the last step always gets its line);
- each new checkpoint: one short line (step, loss, stage, path).

A remote run dir (``s3://``...) has its ``metrics.jsonl`` uploaded at checkpoints only, so there
the progress moves in checkpoint steps.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO, Any

PREFIX = "[dnc]"


def _fmt_loss(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "?"


class RunProgress:
    """Follows ``<run_dir>/metrics.jsonl`` and ``<run_dir>/step_*`` in a thread until :meth:`close`.

    Args:
        run_dir: The run directory (local path or fsspec URI).
        total: The step the run stops at.
        stream: Where progress goes (default stdout).
        tty: Draw a bar (True) or print lines (False); None = ``stream.isatty()``.
        line_every_s: Least seconds between two progress lines when not a TTY.
        poll_s: Seconds between two reads of the run dir.
    """

    def __init__(self, run_dir: str, total: int, *, stream: IO[str] | None = None, tty: bool | None = None,
                 line_every_s: float = 5.0, poll_s: float = 0.5):
        import fsspec

        self.run_dir, self.total = run_dir.rstrip("/"), int(total)
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.line_every_s, self.poll_s = line_every_s, poll_s
        self.fs, self.root = fsspec.core.url_to_fs(self.run_dir)
        self.rows: dict[int, dict[str, Any]] = {}       # step -> the row that holds train/loss
        self.shown_step = self._max_step()                # rows of earlier runs are not shown again
        self.seen_checkpoints = set(self._checkpoint_dirs())
        self._last_line_t = 0.0
        self._pending: dict[str, Any] | None = None      # newest row not yet printed (throttled)
        self._bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.shown_step, desc="train", unit="step",
                             file=self.stream, dynamic_ncols=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dnc-progress", daemon=True)

    # -- reading -----------------------------------------------------------------------------------
    def _read_rows(self) -> None:
        path = f"{self.root}/metrics.jsonl"
        try:
            with self.fs.open(path, "r") as f:
                text = f.read()
        except (FileNotFoundError, OSError):
            return
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue   # a line being written
            if "train/loss" in row:
                self.rows[int(row.get("step", 0))] = row

    def _max_step(self) -> int:
        self._read_rows()
        return max(self.rows, default=0)

    def _checkpoint_dirs(self) -> list[str]:
        try:
            names = self.fs.ls(self.root, detail=False)
        except (FileNotFoundError, OSError):
            return []
        return sorted(d.rstrip("/") for d in names
                      if d.rstrip("/").rsplit("/", 1)[-1].startswith("step_")
                      and d.rstrip("/").rsplit("/", 1)[-1][5:].isdigit())

    def _complete(self, d: str) -> bool:
        return all(self.fs.exists(f"{d}/{n}") for n in ("train_state.json", "model.safetensors", "config.json"))

    # -- output --------------------------------------------------------------------------------------
    def _write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def _line(self, row: dict[str, Any]) -> str:
        step = int(row["step"])
        parts = [f"{PREFIX} step {step}/{self.total}", f"loss {_fmt_loss(row.get('train/loss'))}"]
        if row.get("stage"):
            parts.append(f"stage {row['stage']}")
        tps = row.get("throughput/tokens_per_s")
        if isinstance(tps, (int, float)):
            parts.append(f"{tps:,.0f} tok/s")
        return "  ".join(parts)

    def poll(self, final: bool = False) -> None:
        """Read the run dir once and show what is new (``final``: flush a throttled line)."""
        self._read_rows()
        new = sorted(s for s in self.rows if s > self.shown_step)
        for step in new:
            row = self.rows[step]
            if self._bar is not None:
                self._bar.update(step - self.shown_step)
                self._bar.set_postfix_str(f"loss={_fmt_loss(row.get('train/loss'))} stage={row.get('stage', '')}",
                                          refresh=True)
            else:
                self._pending = row
            self.shown_step = step
        now = time.monotonic()
        if self._pending is not None and (final or now - self._last_line_t >= self.line_every_s
                                          or int(self._pending["step"]) >= self.total):
            self._write(self._line(self._pending))
            self._pending, self._last_line_t = None, now
        for d in self._checkpoint_dirs():
            if d in self.seen_checkpoints or not self._complete(d):
                continue
            self.seen_checkpoints.add(d)
            step = int(d.rsplit("/", 1)[-1][5:])
            row = self.rows.get(step, {})
            path = self.fs.unstrip_protocol(d) if "://" in self.run_dir else d
            stage = f"  stage {row['stage']}" if row.get("stage") else ""
            self._write(f"{PREFIX} checkpoint step {step}  loss {_fmt_loss(row.get('train/loss'))}{stage}  {path}")

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception as e:  # progress must never stop training
                self._write(f"{PREFIX} progress: {type(e).__name__}: {e}")
                return

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> "RunProgress":
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop following and show the rest (the final step and checkpoint)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        try:
            self.poll(final=True)
        finally:
            if self._bar is not None:
                self._bar.close()

    def __enter__(self) -> "RunProgress":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
