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


def time_split(metrics: dict[str, float]) -> dict[str, dict[str, float]] | None:
    """A run's totals from its last metrics row: ``{part: {"seconds", "share"}}`` plus ``wall``
    (None when the row has no ``time/total/*`` keys, i.e. accounting was off)."""
    wall = metrics.get("time/total/wall_s")
    if not wall:
        return None
    out = {k: {"seconds": float(metrics.get(f"time/total/{k}_s", 0.0)),
               "share": float(metrics.get(f"time/total/{k}_s", 0.0)) / wall} for k in PARTS}
    out["wall"] = {"seconds": float(wall), "share": 1.0}
    return out
