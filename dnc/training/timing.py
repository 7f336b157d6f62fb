"""Where a training loop's wall time goes (``TrainConfig.time_accounting``, issue 11).

:class:`PartClock` charges the time between two marks to a named part (data, h2d, step, ...). On
CUDA the host runs ahead of the device, so a plain clock would charge the step's kernels to
whatever part next waits for them (the loss ``.tolist()``, the next batch's copy); the clock
therefore synchronises the device at every mark. That is what makes the split honest, and also
why it is off by default: the synchronisations remove a little host/device overlap.
"""

from __future__ import annotations

import time

import torch

PARTS = ("data", "h2d", "step", "record", "eval", "checkpoint", "log", "other")
"""The parts of a training interval: next batch; host-to-device copy; forward + backward +
optimizer; per-sample loss feedback to the curriculum; evaluation; checkpoint save and report;
metrics and logging; the rest (wall time no mark charged)."""


class PartClock:
    """Seconds per part since the last :meth:`take` (an interval) and since creation (totals).

    ``mark(part)`` charges the time since the previous mark to ``part``; ``skip()`` restarts the
    stopwatch without charging (time it leaves out lands in ``other``)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.interval = dict.fromkeys(PARTS, 0.0)
        self.totals = dict.fromkeys(PARTS, 0.0)
        self._t_interval = self._t_total = self._last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def skip(self) -> None:
        self._last = self._now()

    def mark(self, part: str) -> None:
        now = self._now()
        self.interval[part] += now - self._last
        self._last = now

    def take(self) -> dict[str, float]:
        """This interval's metrics (``time/<part>_s``, ``time/<part>_share`` of the interval's wall
        time, ``time/interval_s``) and the run's totals (``time/total/<part>_s``); starts a new
        interval. ``other`` is the interval's wall time that no mark charged."""
        now = self._now()
        wall = max(1e-9, now - self._t_interval)
        self.interval["other"] = max(0.0, wall - sum(v for k, v in self.interval.items() if k != "other"))
        out = {"time/interval_s": wall}
        for k, v in self.interval.items():
            self.totals[k] += v
            out[f"time/{k}_s"] = v
            out[f"time/{k}_share"] = v / wall
        total_wall = max(1e-9, now - self._t_total)
        out["time/total/wall_s"] = total_wall
        out.update({f"time/total/{k}_s": v for k, v in self.totals.items()})
        self.interval = dict.fromkeys(PARTS, 0.0)
        self._t_interval = self._last = now
        return out


def time_split(rows: list[dict[str, float]]) -> dict[str, dict[str, float]] | None:
    """A run's split from its metrics rows: each part's ``time/<part>_s`` summed over the rows that
    carry one (so a resumed run's attempts all count; ``metrics.jsonl`` drops rows past a resume
    point), as ``{part: {"seconds", "share"}}`` plus ``wall`` (the intervals' summed wall time) and
    ``intervals``. None when no row has them (accounting was off)."""
    timed = [r for r in rows if "time/interval_s" in r]
    if not timed:
        return None
    wall = max(1e-9, sum(float(r["time/interval_s"]) for r in timed))
    out = {}
    for k in PARTS:
        sec = sum(float(r.get(f"time/{k}_s", 0.0)) for r in timed)
        out[k] = {"seconds": sec, "share": sec / wall}
    out["wall"] = {"seconds": wall, "share": 1.0}
    out["intervals"] = len(timed)
    return out
