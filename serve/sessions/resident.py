"""Session states kept resident where they run (issue 14): a Generator replica keeps the state a
turn left on its device, so the session's next turn on this replica needs no bank from the shard.

An LRU map ``state_id -> ResidentState`` bounded in bytes. The shard stays the source of truth: a
resident copy is only used after the shard confirmed (``begin_turn(have=...)``) that its
incarnation, seq and digest are the session's, or are a point the session can replay from.
A turn *takes* its copy out (the decoder changes it in place) and puts it back only once the turn
was acknowledged, so a failed or cancelled turn never leaves a half-updated copy behind.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class ResidentState:
    state: Any          # a batch-1 dnc.state.DNCState on the model's device
    inc: str            # the session's incarnation
    seq: int            # the seq this state is the content of
    digest: str | None  # the session's digest at ``seq`` (as the shard reports it)
    nbytes: int         # bytes of the state's tensors

    def have(self) -> dict[str, Any]:
        """What ``begin_turn(have=...)`` checks."""
        return {"inc": self.inc, "seq": self.seq, "digest": self.digest}


class ResidentStates:
    """LRU of :class:`ResidentState` within ``budget_bytes`` (0 keeps nothing)."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self._items: OrderedDict[str, ResidentState] = OrderedDict()
        self.nbytes = 0
        self.counters = {"resident_hits": 0, "resident_misses": 0, "resident_evictions": 0}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, sid: str) -> bool:
        return sid in self._items

    def take(self, sid: str) -> ResidentState | None:
        """Remove and return ``sid``'s copy (None if not resident)."""
        r = self._items.pop(sid, None)
        if r is None:
            self.counters["resident_misses"] += 1
            return None
        self.nbytes -= r.nbytes
        self.counters["resident_hits"] += 1
        return r

    def put(self, sid: str, r: ResidentState) -> None:
        """Keep ``r`` as ``sid``'s copy (most recently used), dropping the least recently used copies
        beyond the budget. A state larger than the whole budget is not kept."""
        self.drop(sid)
        if r.nbytes > self.budget_bytes:
            return
        self._items[sid] = r
        self.nbytes += r.nbytes
        while self.nbytes > self.budget_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes
            self.counters["resident_evictions"] += 1

    def drop(self, sid: str) -> None:
        r = self._items.pop(sid, None)
        if r is not None:
            self.nbytes -= r.nbytes

    def stats(self) -> dict[str, int]:
        return {"resident_sessions": len(self._items), "resident_bytes": self.nbytes,
                "resident_budget_bytes": self.budget_bytes, **self.counters}
