"""The Generator's decode scheduler: every active request of a replica decoded by one
``dnc.generate.BatchDecoder`` (sessionless and session requests, streamed or not).

Requests are submitted from the asyncio loop; one driver task runs *iterations* on the model
thread: admit the waiting rows (prefill), drop the cancelled ones, then decode steps until
``chunk_s`` of work is done (or at once after admitting rows, so their first token goes out
without delay, or when waiting requests are due for admission, or a request was cancelled: its
row then leaves after one step, not ``chunk_s`` of them). A request is cancelled when its consumer
closes its iterator, or with :meth:`DecodeScheduler.stop` (its session was deleted).

Arrivals are coalesced while rows are decoding: they are admitted together once ``admit_batch``
are waiting (or as many as there is room for) or the oldest has waited ``admit_delay_s``. Under
load each closed-loop client's next request arrives alone, and an admission has a host cost of
its own whatever its rows (a fresh decode batch, the prefill call, the join into the running
batch, a new sampling plan): admitted one by one, arrivals took a third of the model thread at
64 streams (issue 14). Coalescing alone still admitted arrivals one by one when they came
further apart than ``admit_delay_s`` (a closed loop at 64 streams on the H200: one every ~8 ms,
admissions 36% of the model thread), so admissions are also spaced by their measured cost
(``admit_share``, :meth:`DecodeScheduler.admit_gap_s`). With nothing decoding a request is
admitted at once (``admit_wait_s`` aside), so a lone request's first token is not delayed; nor is an iteration cut short for
arrivals that have no room to join. Each iteration's tokens are handed to the
requests' queues, at most one list per request every ``chunk_s``: a request's first tokens and its
last go out at once, the others are held until ``chunk_s`` has passed since its previous list.
Iterations cut short by arrivals (under load, nearly all of them) would otherwise send a list
per request and step, and every list is one streamed event through Ray, the ingress and the
proxy, which cost far more CPU than the step itself. Under load the gap grows with the running
requests (``events_per_s``): the replica hands out at most about that many lists a second in all,
so the CPU the event path takes stays bounded while more streams share the model (measured with
the timeline of bench/serve_load.py). Lists that pile up in a request's queue while the asyncio
loop is busy go out as one. Rows join and leave between steps; rows whose states share a layout
decode as one batch (``DNCState.layout``). Work that is not decoding (research, health) runs on
the same thread between iterations.

With ``keep_stepping_s`` (off by default) the model thread does not wait for the loop between
iterations: it runs them back to back, handing each one to the loop as it ends, and comes back
when arrivals are due or a request was cancelled (measured slower on a CPU, where the thread then
holds the GIL; docs/serving-performance.md, session 15).

After each iteration the driver hands its figures (tokens, rows per model call, step-to-step
times) to a :class:`serve.metrics.ServeMetrics` when one is given, and keeps recent ones for the
JSON view (:meth:`DecodeScheduler.recent`).
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from dnc.generate import BatchDecoder, DecodeRow, StepToken


@dataclass(eq=False)
class _Job:
    row: DecodeRow
    timing: dict
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # lists of StepToken, then None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    held: list[StepToken] = field(default_factory=list)  # made, not yet handed out (see _hand_out)
    sent_at: float | None = None  # when the last list went to the queue
    handed: collections.deque[float] = field(default_factory=collections.deque)  # perf_counter of each queued list

    def flush(self, now: float) -> None:
        if self.held:
            self.queue.put_nowait(self.held)
            t = time.perf_counter()  # not ``now``: that clock may be a test's hand-driven one
            self.handed.append(t)
            self.timing.setdefault("first_event", t)
            self.timing["last_event"] = t
            self.timing["events"] = self.timing.get("events", 0) + 1
            self.held, self.sent_at = [], now


@dataclass
class _Iteration:
    """What one iteration on the model thread did."""

    tokens: list[StepToken]
    failed: list[DecodeRow]
    batch_sizes: list[int] = field(default_factory=list)
    """Rows of each model call, in order."""
    inter_token_ms: list[float] = field(default_factory=list)
    """For each step whose rows had a token before: ms since the end of the previous step."""
    busy_s: float = 0.0
    """Seconds the model thread spent in this iteration (drop, prefill and steps)."""
    done: set[int] | None = None
    """``id`` of the rows that ended in this iteration (finished, failed, cancelled), read on the
    model thread at its end: with ``keep_stepping_s`` the loop hands it out while the next
    iteration runs, so ``row.done`` may already be true of a row that ends later (None: read
    ``row.done``)."""


ADMIT_BATCH = 8
"""Arrivals admitted together while rows decode (``DecodeScheduler.admit_batch``)."""
ADMIT_DELAY_S = 0.005
"""The shortest an arrival waits to be admitted with others while rows decode (s): small beside
the 100 ms time-to-first-token target (bench/decode_churn.py measures both)."""
ADMIT_SHARE = 0.0  # off: no gain at 64 streams on an H200 (docs/serving-performance.md#session-17)
"""While rows decode, admissions are spaced so that they take at most about this share of the
model thread (``DecodeScheduler.admit_share``; 0 = no spacing, as in session 14)."""
ADMIT_MAX_DELAY_S = 0.025
"""The longest the spacing holds an arrival back while rows decode (s)."""


class DecodeScheduler:
    """One decoder per model (see the module docstring).

    ``run(fn, *args)`` runs ``fn`` on the model thread and is awaited; ``max_batch`` caps the rows of
    one model call; ``max_running`` caps the rows decoding at once (later ones wait); ``admit_wait_s``: when nothing is decoding, how long the
    first arrival waits for others to arrive with it (they then prefill as one batch);
    ``admit_batch`` / ``admit_delay_s`` (rows, s): while rows are decoding, arrivals are admitted
    once that many wait (or as many as there is room for) or the oldest has waited that long
    (1 / 0: at the next step, as before issue 14's host-cost work); ``metrics``:
    a :class:`serve.metrics.ServeMetrics` (None = record nothing); ``clock``: seconds, for the pacing
    of token lists (tests drive it by hand); ``events_per_s``: lists handed out a second, about, in
    all: with ``n`` requests running, one request's lists are at least ``max(chunk_s, n / events_per_s)``
    apart (0 = ``chunk_s`` whatever the load); ``admit_share`` / ``admit_max_delay_s``: while rows
    decode, an admission that is not a full group (``admit_batch`` arrivals with room for them) waits
    until the model thread has decoded long enough since the previous one that admissions take at
    most ``admit_share`` of it (their measured cost, see :meth:`admit_gap_s`), but never past
    ``admit_max_delay_s`` after the oldest arrival (0: no spacing); ``keep_stepping_s``: the model
    thread runs iterations back to back for up to this long (s), handing each one's tokens to the
    loop without waiting for it (``call_soon_threadsafe``), and comes back to the loop early when
    arrivals are due or a request was cancelled (0: back to the loop after every iteration). Other
    work on the model thread (research, health) waits up to that long."""

    RECENT = 2048  # iterations / steps kept for the JSON view

    def __init__(self, model, run: Callable[..., Awaitable], chunk_s: float = 0.015, max_batch: int = 64,
                 max_running: int = 64, admit_wait_s: float = 0.0, metrics=None,
                 clock: Callable[[], float] = time.perf_counter, events_per_s: float = 0.0,
                 admit_batch: int = ADMIT_BATCH, admit_delay_s: float = ADMIT_DELAY_S,
                 admit_share: float = ADMIT_SHARE, admit_max_delay_s: float = ADMIT_MAX_DELAY_S,
                 keep_stepping_s: float = 0.0, kv_attention: str | None = None):
        self.decoder = BatchDecoder(model, max_batch, kv_attention=kv_attention)
        self.run = run
        self.chunk_s = chunk_s
        self.events_per_s = events_per_s
        self.max_running = max_running
        self.admit_wait_s = admit_wait_s
        self.admit_batch = max(1, int(admit_batch))
        self.admit_delay_s = max(0.0, float(admit_delay_s))
        self.admit_share = min(1.0, max(0.0, float(admit_share)))
        self.admit_max_delay_s = max(self.admit_delay_s, float(admit_max_delay_s))
        # model thread: seconds one admission took (running mean) and when the last one ended (perf_counter)
        self._admit_cost_s = 0.0
        self._last_admit: float | None = None
        self.keep_stepping_s = max(0.0, float(keep_stepping_s))
        self._cancels = 0  # requests cancelled so far (the loop counts, the model thread compares)
        self.clock = clock
        self.waiting: list[_Job] = []
        self.active: dict[int, _Job] = {}
        self._driver: asyncio.Task | None = None
        # busy_s: model thread inside iterations; step_s: of it in decode steps; prefill_s: in admissions;
        # hop_s: iterations' round trips loop -> model thread -> loop beyond busy_s (executor and loop delays)
        self.stats = {"steps": 0, "rows_stepped": 0, "max_batch": 0, "max_running": 0, "admitted": 0, "tokens": 0,
                      "iterations": 0, "busy_s": 0.0, "step_s": 0.0, "prefill_s": 0.0, "hop_s": 0.0,
                      "admissions": 0}
        self.metrics = metrics
        self._last_step_end: float | None = None  # model thread: when the previous decode step ended
        self._recent_tokens: collections.deque[tuple[float, int]] = collections.deque(maxlen=self.RECENT)
        self._recent_itl_ms: collections.deque[float] = collections.deque(maxlen=self.RECENT)

    # ------------------------------------------------------------------ requests
    async def submit(self, row: DecodeRow, timing: dict | None = None) -> AsyncIterator[list[StepToken]]:
        """Decode ``row`` with everything else running; yields its tokens as they are made (lists,
        one per iteration). When it ends, ``row.finish_reason`` (and ``row.error``) say how. Closing
        the iterator early cancels the row. ``timing["queue_s"]`` is set to the time the row waited
        for a place in the batch, and these ``time.perf_counter()`` stamps of this process (s) to
        the request's timeline: ``submitted``, ``admitted`` (given a place), ``prefilled`` (its
        prompt went through the model), ``first_token`` / ``last_token`` (the end of the step that
        made it), ``first_event`` / ``last_event`` (a list handed to the queue); ``events`` counts the
        lists and ``event_lag_s`` sums, over them, the time from the queue to this iterator."""
        job = _Job(row, timing if timing is not None else {})
        job.timing["submitted"] = job.submitted
        self.waiting.append(job)
        if self.metrics is not None:
            self.metrics.set_queue(len(self.waiting), len(self.active))
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        try:
            while True:
                item = await job.queue.get()
                if item is None:
                    return
                self._taken(job)
                ended = False
                while not job.queue.empty():  # lists that piled up while the loop was busy: one event
                    more = job.queue.get_nowait()
                    if more is None:
                        ended = True
                        break
                    self._taken(job)
                    item = item + more
                yield item
                if ended:
                    return
        finally:
            if not row.done:
                job.cancelled = True  # the driver drops it between steps
                self._cancels += 1

    def stop(self, row: DecodeRow) -> bool:
        """Take ``row`` out as if its consumer had left (``finish_reason`` "cancelled", its state
        untouched), and end its iterator from :meth:`submit` (its tokens made so far come first):
        for a request that can no longer be answered, e.g. its session was deleted. A running row
        leaves after the decode step under way (an iteration ends early for it), a waiting one at
        once. False when the row is not here (not submitted yet, or done)."""
        for job in self.waiting:
            if job.row is row:
                self.waiting.remove(job)
                row.finish_reason = "cancelled"
                job.queue.put_nowait(None)
                return True
        job = self.active.get(id(row))
        if job is None or row.done or job.cancelled:
            return False
        job.cancelled = True  # the driver drops it between steps and ends its iterator (_hand_out)
        self._cancels += 1
        return True

    @staticmethod
    def _taken(job: _Job) -> None:
        # how long the list sat in the queue: the asyncio loop's delay, not the model's
        job.timing["event_lag_s"] = job.timing.get("event_lag_s", 0.0) + time.perf_counter() - job.handed.popleft()

    # ------------------------------------------------------------------ the driver
    async def _drive(self) -> None:
        if self.admit_wait_s and not self.active:
            await asyncio.sleep(self.admit_wait_s)
        while self.waiting or self.active:
            room = max(0, self.max_running - len(self.active))
            if not self.due(time.perf_counter()):
                room = 0  # coalescing: decode on, the arrivals join together a little later
            admit, self.waiting = self.waiting[:room], self.waiting[room:]
            admit = [j for j in admit if not j.cancelled]
            cancelled = [j.row for j in self.active.values() if j.cancelled]
            cancels = self._cancels  # read with ``cancelled``: a cancel after this ends the iteration early
            now = time.perf_counter()
            for job in admit:
                self.active[id(job.row)] = job
                job.timing["queue_s"] = now - job.submitted
                job.timing["admitted"] = now
            busy0 = self.stats["busy_s"]  # (the model thread adds each iteration's busy_s)
            try:
                if self.keep_stepping_s > 0:
                    it = await self.run(self._iterate_on, [j.row for j in admit], cancelled,
                                        asyncio.get_running_loop(), cancels)
                else:
                    it = await self.run(self._iterate, [j.row for j in admit], cancelled, cancels)
                self.stats["hop_s"] += time.perf_counter() - now - (self.stats["busy_s"] - busy0)
            except BaseException as e:  # the model thread itself broke: fail everyone running
                for job in list(self.active.values()):
                    job.row.finish_reason, job.row.error = "error", e
                    job.flush(self.clock())
                    job.queue.put_nowait(None)
                self.active.clear()
                if not isinstance(e, Exception):
                    raise
                continue
            self._deliver(it)
        if self.metrics is not None:
            self.metrics.set_queue(len(self.waiting), len(self.active))

    def due(self, now: float) -> bool:
        """Whether the waiting requests are to be admitted now (``now``: ``time.perf_counter()``):
        some wait, there is room, and nothing is decoding, or a full group waits (``admit_batch``
        and room for them), or the oldest has waited ``admit_delay_s`` and the previous admission
        is :meth:`admit_gap_s` old, or the oldest has waited ``admit_max_delay_s``. Read on the
        model thread too (``waiting`` and ``active`` change on the loop's: a stale answer costs one
        step).

        Why the spacing (issue 14, session 15): an admission's cost on the model thread hardly
        depends on its rows (the prefill call, the join, a new sampling plan, the iteration it
        ends), and under a closed loop at 64 streams the arrivals come one by one, each ~8 ms
        apart on the H200: admitted as they came (``admit_delay_s`` alone), there was one admission
        per arrival and they took 36% of the model thread. When the batch is at ``max_running``
        one finishing row frees one place, which the old rule (``admit_share`` 0) filled at once,
        arrival by arrival."""
        waiting = self.waiting
        room = self.max_running - len(self.active)
        if not waiting or room <= 0:
            return False
        # a full group; without spacing (session 14) also as many as there is room for
        group = self.admit_batch if self.admit_share > 0 else min(self.admit_batch, room)
        if not self.active or (len(waiting) >= group and room >= group):
            return True
        waited = now - waiting[0].submitted
        if waited >= self.admit_max_delay_s:
            return True
        last = self._last_admit
        return waited >= self.admit_delay_s and (last is None or now - last >= self.admit_gap_s())

    def admit_gap_s(self) -> float:
        """The decode time wanted between two admissions while rows decode (s): an admission's
        measured cost (running mean over admissions) times ``(1 - admit_share) / admit_share``, so
        that admissions take about ``admit_share`` of the model thread; at most
        ``admit_max_delay_s``, 0 when ``admit_share`` is 0."""
        if self.admit_share <= 0:
            return 0.0
        return min(self.admit_max_delay_s, self._admit_cost_s * (1 - self.admit_share) / self.admit_share)

    def _deliver(self, it: _Iteration) -> None:
        """On the loop: hand out iteration ``it``'s tokens and record its figures."""
        self._hand_out(it)
        self._record(it)  # it.failed rows are done: handled in _hand_out

    def _hand_out(self, it: _Iteration) -> None:
        """Give each request its tokens of iteration ``it`` (paced, see the module docstring) and
        end the requests whose rows are done."""
        now = self.clock()
        for st in it.tokens:
            job = self.active.get(id(st.row))
            if job is not None:
                job.held.append(st)
        gap = self.pacing_s()
        for key, job in list(self.active.items()):
            done = job.row.done if it.done is None else key in it.done
            if job.held and (job.sent_at is None or done or now - job.sent_at >= gap):
                job.flush(now)
            if done:
                job.queue.put_nowait(None)
                del self.active[key]

    def pacing_s(self) -> float:
        """The shortest time between two lists of one request now (s): ``chunk_s``, or longer when
        so many requests run that lists every ``chunk_s`` would exceed ``events_per_s`` in all."""
        if self.events_per_s <= 0:
            return self.chunk_s
        return max(self.chunk_s, len(self.active) / self.events_per_s)

    def _record(self, it: _Iteration) -> None:
        self.stats["tokens"] += len(it.tokens)
        self._recent_tokens.append((time.perf_counter(), len(it.tokens)))
        self._recent_itl_ms.extend(it.inter_token_ms)
        if self.metrics is not None:
            self.metrics.record_tokens(len(it.tokens))
            self.metrics.record_decode_steps(it.batch_sizes, it.inter_token_ms)
            self.metrics.set_queue(len(self.waiting), len(self.active))

    def recent(self, window_s: float = 10.0) -> dict[str, Any]:
        """Figures of the last ``window_s`` seconds for the JSON view: ``tokens_per_s`` (tokens
        decoded over the window, 0 when idle) and ``inter_token_ms_p50`` / ``_p99`` over the last
        steps (None before any)."""
        now = time.perf_counter()
        n = sum(k for t, k in self._recent_tokens if now - t <= window_s)
        itl = sorted(self._recent_itl_ms)

        def q(f: float) -> float | None:
            return itl[min(len(itl) - 1, int(f * len(itl)))] if itl else None
        return {"tokens_per_s": n / window_s, "inter_token_ms_p50": q(0.5), "inter_token_ms_p99": q(0.99)}

    def _iterate(self, admit: list[DecodeRow], cancelled: list[DecodeRow], cancels: int | None = None) -> _Iteration:
        """On the model thread: drop, admit (prefill), then decode steps for up to ``chunk_s``, or
        until a request is cancelled beyond the ``cancels`` (a count of them) that ``cancelled``
        accounts for (None: now): its row then leaves at the next iteration, not after ``chunk_s``."""
        t_start = time.perf_counter()
        cancels = self._cancels if cancels is None else cancels
        dec = self.decoder
        dec.drop(cancelled)
        it = _Iteration([], dec.add(admit) if admit else [])
        t_prefilled = time.perf_counter()
        self.stats["admissions"] += bool(admit)
        for job in (self.active.get(id(r)) for r in admit):  # active: only the loop changes it, between iterations
            if job is not None:
                job.timing["prefilled"] = t_prefilled
        self.stats["admitted"] += len(admit)
        self.stats["prefill_s"] += t_prefilled - t_start
        if admit:
            cost = t_prefilled - t_start
            self._admit_cost_s = cost if self._last_admit is None else 0.8 * self._admit_cost_s + 0.2 * cost
            self._last_admit = t_prefilled
        t_end = t_prefilled + self.chunk_s
        while dec.running:
            sizes = dec.batch_sizes()
            self.stats["steps"] += len(sizes)
            self.stats["rows_stepped"] += sum(sizes)
            self.stats["max_batch"] = max(self.stats["max_batch"], max(sizes))
            self.stats["max_running"] = max(self.stats["max_running"], sum(sizes))
            it.batch_sizes += sizes
            t_step = time.perf_counter()
            step = dec.step()
            now = time.perf_counter()
            self.stats["step_s"] += now - t_step
            for st in step:
                if st.index == 0 or st.finish:
                    job = self.active.get(id(st.row))
                    if job is not None:
                        job.timing.setdefault("first_token", now)
                        if st.finish:
                            job.timing["last_token"] = now
            # every running row gets one token per step, so a row with an earlier token had it at
            # the end of the previous step (rows at index 0 got their first token: that is TTFT)
            if self._last_step_end is not None and any(st.index > 0 for st in step):
                it.inter_token_ms.append((now - self._last_step_end) * 1e3)
            self._last_step_end = now
            it.tokens += step
            if admit or now > t_end or self.due(now) or self._cancels != cancels:
                break
        it.busy_s = time.perf_counter() - t_start
        self.stats["busy_s"] += it.busy_s
        self.stats["iterations"] += 1
        it.done = {id(r) for r in [st.row for st in it.tokens] + list(admit) + list(cancelled) if r.done}
        return it

    def _iterate_on(self, admit: list[DecodeRow], cancelled: list[DecodeRow], loop,
                    cancels: int | None = None) -> _Iteration:
        """On the model thread: :meth:`_iterate`, then more iterations while rows run, for up to
        ``keep_stepping_s``, each handed to ``loop`` as it ends (callbacks run in order, before
        the driver sees the returned last one); back early when arrivals are due or a request
        was cancelled, which only the loop can act on."""
        cancels = self._cancels if cancels is None else cancels
        t_stop = time.perf_counter() + self.keep_stepping_s
        it = self._iterate(admit, cancelled, cancels)
        while (self.decoder.running and self._cancels == cancels and not self.due(time.perf_counter())
               and time.perf_counter() < t_stop):
            loop.call_soon_threadsafe(self._deliver, it)
            it = self._iterate([], [])
        return it


TIMELINE_STAMPS = ("admitted", "prefilled", "first_token", "first_event", "last_token", "last_event")
"""The stamps :meth:`DecodeScheduler.submit` leaves in a request's ``timing``, in order."""


def timeline_ms(timing: dict, origin: float) -> dict[str, float]:
    """A request's scheduler stamps as ``<stamp>_ms`` after ``origin`` (a ``time.perf_counter()`` of
    the same process, ms), plus ``events`` and ``event_lag_ms_mean`` (queue to consumer, per list);
    stamps the request never reached (cancelled, failed) are left out."""
    out = {f"{k}_ms": (timing[k] - origin) * 1e3 for k in TIMELINE_STAMPS if k in timing}
    n = timing.get("events", 0)
    out["events"] = n
    if n:
        out["event_lag_ms_mean"] = timing.get("event_lag_s", 0.0) * 1e3 / n
    return out
