"""The Generator's decode scheduler: every active request of a replica decoded by one
``dnc.generate.BatchDecoder`` (sessionless and session requests, streamed or not).

Requests are submitted from the asyncio loop; one driver task runs *iterations* on the model
thread: admit the waiting rows (prefill), drop the cancelled ones, then decode steps until
``chunk_s`` of work is done (or at once after admitting rows, so their first token goes out
without delay, or when more requests are waiting). Each iteration's tokens are handed to the
requests' queues. Rows join and leave between steps; rows whose states share a layout decode as
one batch (``DNCState.layout``). Work that is not decoding (research, health) runs on the same
thread between iterations.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from dnc.generate import BatchDecoder, DecodeRow, StepToken


@dataclass(eq=False)
class _Job:
    row: DecodeRow
    timing: dict
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # lists of StepToken, then None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)


class DecodeScheduler:
    """One decoder per model (see the module docstring).

    ``run(fn, *args)`` runs ``fn`` on the model thread and is awaited; ``max_batch`` caps the rows of
    one model call; ``max_running`` caps the rows decoding at once (later ones wait); ``admit_wait_s``: when nothing is decoding, how long the
    first arrival waits for others to arrive with it (they then prefill as one batch)."""

    def __init__(self, model, run: Callable[..., Awaitable], chunk_s: float = 0.015, max_batch: int = 64,
                 max_running: int = 64, admit_wait_s: float = 0.0):
        self.decoder = BatchDecoder(model, max_batch)
        self.run = run
        self.chunk_s = chunk_s
        self.max_running = max_running
        self.admit_wait_s = admit_wait_s
        self.waiting: list[_Job] = []
        self.active: dict[int, _Job] = {}
        self._driver: asyncio.Task | None = None
        self.stats = {"steps": 0, "rows_stepped": 0, "max_batch": 0, "max_running": 0, "admitted": 0}

    # ------------------------------------------------------------------ requests
    async def submit(self, row: DecodeRow, timing: dict | None = None) -> AsyncIterator[list[StepToken]]:
        """Decode ``row`` with everything else running; yields its tokens as they are made (lists,
        one per iteration). When it ends, ``row.finish_reason`` (and ``row.error``) say how. Closing
        the iterator early cancels the row. ``timing["queue_s"]`` is set to the time the row waited
        for a place in the batch."""
        job = _Job(row, timing if timing is not None else {})
        self.waiting.append(job)
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        try:
            while True:
                item = await job.queue.get()
                if item is None:
                    return
                yield item
        finally:
            if not row.done:
                job.cancelled = True  # the driver drops it between steps

    # ------------------------------------------------------------------ the driver
    async def _drive(self) -> None:
        if self.admit_wait_s and not self.active:
            await asyncio.sleep(self.admit_wait_s)
        while self.waiting or self.active:
            room = max(0, self.max_running - len(self.active))
            admit, self.waiting = self.waiting[:room], self.waiting[room:]
            admit = [j for j in admit if not j.cancelled]
            cancelled = [j.row for j in self.active.values() if j.cancelled]
            now = time.perf_counter()
            for job in admit:
                self.active[id(job.row)] = job
                job.timing["queue_s"] = now - job.submitted
            try:
                tokens, failed = await self.run(self._iterate, [j.row for j in admit], cancelled)
            except BaseException as e:  # the model thread itself broke: fail everyone running
                for job in list(self.active.values()):
                    job.row.finish_reason, job.row.error = "error", e
                    job.queue.put_nowait(None)
                self.active.clear()
                if not isinstance(e, Exception):
                    raise
                continue
            per_row: dict[int, list[StepToken]] = {}
            for st in tokens:
                per_row.setdefault(id(st.row), []).append(st)
            for key, sts in per_row.items():
                job = self.active.get(key)
                if job is not None:
                    job.queue.put_nowait(sts)
            for key, job in list(self.active.items()):
                if job.row.done:
                    job.queue.put_nowait(None)
                    del self.active[key]
            del failed  # their rows are done: handled above

    def _iterate(self, admit: list[DecodeRow], cancelled: list[DecodeRow]) -> tuple[list[StepToken], list[DecodeRow]]:
        """On the model thread: drop, admit (prefill), then decode steps for up to ``chunk_s``."""
        dec = self.decoder
        dec.drop(cancelled)
        failed = dec.add(admit) if admit else []
        self.stats["admitted"] += len(admit)
        out: list[StepToken] = []
        t_end = time.perf_counter() + self.chunk_s
        while dec.running:
            sizes = dec.batch_sizes()
            self.stats["steps"] += len(sizes)
            self.stats["rows_stepped"] += sum(sizes)
            self.stats["max_batch"] = max(self.stats["max_batch"], max(sizes))
            self.stats["max_running"] = max(self.stats["max_running"], sum(sizes))
            out += dec.step()
            if admit or self.waiting or time.perf_counter() > t_end:
                break
        return out, failed
