"""The Generator's decode scheduler (serve/scheduler.py) in-process on the tiny model: how a
request's tokens are handed out while other requests keep arriving (each arrival cuts the
scheduler's iteration short so that it is admitted at the next step)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dnc.generate import BatchDecoder, DecodeRow, SamplingParams
from dnc.model import DNC
from decode_helpers import solo
from serve.scheduler import DecodeScheduler

CHUNK_S = 0.1  # long beside a tiny-model step (a few ms), so pacing shows against many short iterations


@pytest.fixture(scope="module")
def model():
    from dnc.config import preset

    torch.manual_seed(0)
    return DNC(preset("tiny")).eval()


def test_tokens_are_paced_per_request_while_arrivals_cut_iterations_short(model):
    """A long stream while eight short requests arrive, one every ~15 ms: its first token goes out
    alone and at once, then at most one list per ``chunk_s`` (not one per cut-short iteration), and every
    token arrives exactly once, in order, equal to the same row decoded alone."""
    pool = ThreadPoolExecutor(1)

    async def run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    prompt, n = list(b"a long stream among short requests"), 24

    async def main():
        sch = DecodeScheduler(model, run, chunk_s=CHUNK_S)
        long_row = DecodeRow(prompt, None, n, SamplingParams(0.0))
        lists: list[tuple[float, list[int]]] = []
        finished = asyncio.Event()

        async def consume_long():
            t0 = time.perf_counter()
            async for steps in sch.submit(long_row):
                lists.append((time.perf_counter() - t0, [st.index for st in steps]))
            finished.set()

        async def arrivals():
            shorts = []
            await asyncio.sleep(0.01)
            while not finished.is_set() and len(shorts) < 8:
                row = DecodeRow(list(b"short %02d" % len(shorts)), None, 2, SamplingParams(0.0))
                shorts.append(asyncio.ensure_future(_drain(sch.submit(row))))
                await asyncio.sleep(0.015)
            return await asyncio.gather(*shorts)
        _, shorts = await asyncio.gather(consume_long(), arrivals())
        return long_row, lists, shorts
    long_row, lists, shorts = asyncio.run(main())
    pool.shutdown()

    assert shorts and all(s == 2 for s in shorts)  # the short requests ran beside it
    indices = [i for _, idx in lists for i in idx]
    assert indices == list(range(n))  # every token once, in order
    assert lists[0][1] == [0]  # the first token alone, as soon as it was made (TTFT)
    gaps = [b - a for (a, _), (b, _) in zip(lists, lists[1:-1])]  # the last list goes out at once
    # producer-side gaps are >= CHUNK_S; the consumer may see one late by a loop tick
    assert all(g >= 0.5 * CHUNK_S for g in gaps), gaps
    alone = BatchDecoder(model, 1)
    ref = DecodeRow(prompt, None, n, SamplingParams(0.0))
    alone.add([ref])
    while alone.running:
        alone.step()
    assert long_row.tokens == ref.tokens and long_row.finish_reason == "length"


def test_hand_out_holds_tokens_until_chunk_s_has_passed(model):
    """Iterations of one step each, 4 ms apart (arrivals cut them short), on a hand-driven clock:
    a request gets its first token at once, then one list per ``chunk_s`` (10 ms) holding every
    token made since, and whatever is held when it ends; the queue ends with None."""
    from dnc.generate import StepToken
    from serve.scheduler import _Iteration, _Job

    now = [0.0]
    sch = DecodeScheduler(model, run=None, chunk_s=0.010, clock=lambda: now[0])
    row = DecodeRow(list(b"paced"), None, 12, SamplingParams(0.0))
    job = _Job(row, {})
    sch.active[id(row)] = job
    handed: list[tuple[int, list[int] | None]] = []  # (ms, token indices or the end)
    for i in range(12):
        now[0] = 0.004 * i
        if i == 11:
            row.finish_reason = "length"
        sch._hand_out(_Iteration([StepToken(row, 100 + i, i, row.finish_reason)], []))
        while not job.queue.empty():
            item = job.queue.get_nowait()
            handed.append((round(now[0] * 1e3), None if item is None else [st.index for st in item]))
    # t=0: token 0; t=12 ms: 1-3 (>= 10 ms after 0); t=24 ms: 4-6; t=36 ms: 7-9; t=44 ms: the end
    assert handed == [(0, [0]), (12, [1, 2, 3]), (24, [4, 5, 6]), (36, [7, 8, 9]), (44, [10, 11]), (44, None)]
    assert id(row) not in sch.active


def test_a_lone_request_is_admitted_without_waiting(model):
    """With ``admit_wait_s=0`` (the served default) an idle scheduler prefills a request at once:
    its queue time is what it takes the driver task to start, far below the old fixed 20 ms wait
    that the other case here keeps."""
    pool = ThreadPoolExecutor(1)

    async def run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def queue_s(wait: float) -> float:
        sch = DecodeScheduler(model, run, admit_wait_s=wait)
        timing: dict = {}
        await _drain(sch.submit(DecodeRow(list(b"alone"), None, 2, SamplingParams(0.0)), timing))
        return timing["queue_s"]
    no_wait, waited = asyncio.run(queue_s(0.0)), asyncio.run(queue_s(0.2))
    pool.shutdown()
    assert waited >= 0.2 and no_wait < 0.1, (no_wait, waited)


def test_a_lone_request_is_admitted_at_once_whatever_the_coalescing(model):
    """Coalescing waits only while rows decode: with ``admit_delay_s`` of 10 s and ``admit_batch``
    of 8, an idle scheduler still prefills a lone request at once (and its first token follows)."""
    pool = ThreadPoolExecutor(1)

    async def run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def main():
        sch = DecodeScheduler(model, run, admit_batch=8, admit_delay_s=10.0)
        timing: dict = {}
        n = await _drain(sch.submit(DecodeRow(list(b"alone"), None, 3, SamplingParams(0.0)), timing))
        return n, timing, sch.stats
    n, timing, stats = asyncio.run(main())
    pool.shutdown()
    assert n == 3 and stats["admissions"] == 1
    assert timing["queue_s"] < 0.5 and timing["first_token"] - timing["submitted"] < 1.0, timing


def test_arrivals_while_rows_decode_are_admitted_together(model):
    """While a long request decodes, four requests arrive 30 ms apart: with coalescing (admit when
    4 wait, or the oldest waited 5 s) they prefill as one admission; admitted at the next step
    (``admit_batch=1``, the old way) they take one each (on a loaded machine a step may outlast a
    gap: two may then share one). Every request gets its solo tokens."""
    pool = ThreadPoolExecutor(1)

    async def run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    prompts = [list(b"arrival %d" % i) for i in range(4)]

    async def main(**kw):
        sch = DecodeScheduler(model, run, chunk_s=0.005, **kw)
        long_row = DecodeRow(list(b"the long one"), None, 400, SamplingParams(0.0))
        rows = [DecodeRow(p, None, 3, SamplingParams(0.0)) for p in prompts]
        long_task = asyncio.ensure_future(_drain(sch.submit(long_row)))
        while len(long_row.tokens) < 10:  # decoding, past the first (slower) steps
            await asyncio.sleep(0.002)
        tasks = []
        for r in rows:
            tasks.append(asyncio.ensure_future(_drain(sch.submit(r))))
            await asyncio.sleep(0.03)
        await asyncio.gather(*tasks)
        long_task.cancel()
        try:
            await long_task
        except asyncio.CancelledError:
            pass
        return sch.stats["admissions"], [r.tokens for r in rows]
    together, tokens = asyncio.run(main(admit_batch=4, admit_delay_s=5.0))
    one_by_one, tokens_old = asyncio.run(main(admit_batch=1, admit_delay_s=0.0))
    pool.shutdown()
    assert together == 2, together  # the long request, then the four
    assert one_by_one >= 4, one_by_one
    assert tokens == tokens_old
    for p, got in zip(prompts, tokens):  # every row's tokens are those it gets alone
        assert got == solo(model, dict(prompt_ids=p, max_new_tokens=3, sampling=SamplingParams(0.0))).tokens


def test_admission_is_due_by_count_age_or_an_idle_batch_and_never_without_room(model):
    from serve.scheduler import _Job

    # (no spacing: the session-14 rule; tests/test_scheduler_spacing.py covers admit_share)
    sch = DecodeScheduler(model, run=None, max_running=4, admit_batch=3, admit_delay_s=0.05, admit_share=0.0)

    def job(age: float) -> _Job:
        j = _Job(DecodeRow([1], None, 1), {})
        j.submitted = 100.0 - age
        return j
    assert not sch.due(100.0)  # nothing waits
    sch.waiting = [job(0.0)]
    assert sch.due(100.0)  # nothing decodes: at once
    sch.active = {1: job(1.0)}
    assert not sch.due(100.0)  # one waits, briefly: decoding goes on
    assert sch.due(100.06)  # the oldest has waited admit_delay_s
    sch.waiting = [job(0.0), job(0.0), job(0.0)]
    assert sch.due(100.0)  # admit_batch wait
    sch.active = {i: job(1.0) for i in range(2)}
    sch.waiting = [job(0.0), job(0.0)]
    assert sch.due(100.0)  # as many wait as there is room for
    sch.active = {i: job(1.0) for i in range(4)}
    assert not sch.due(1e9)  # no room: no admission, and no iteration cut short for it


def test_iterations_are_not_cut_short_by_arrivals_without_room(model):
    """``max_running=1``: a second request waits for the first to end. Its arrival used to end
    every iteration after one step (an empty admission each time); now iterations run ``chunk_s``."""
    pool = ThreadPoolExecutor(1)

    async def run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def main():
        sch = DecodeScheduler(model, run, chunk_s=0.2, max_running=1)
        first = DecodeRow(list(b"first"), None, 40, SamplingParams(0.0))
        second = DecodeRow(list(b"second"), None, 2, SamplingParams(0.0))
        t1 = asyncio.ensure_future(_drain(sch.submit(first)))
        while not first.tokens:
            await asyncio.sleep(0.001)
        t2 = asyncio.ensure_future(_drain(sch.submit(second)))
        await asyncio.gather(t1, t2)
        return sch.stats, first, second
    stats, first, second = asyncio.run(main())
    pool.shutdown()
    assert len(first.tokens) == 40 and len(second.tokens) == 2
    assert stats["admissions"] == 2
    # 41 decode steps in all; one iteration per step would be ~42
    assert stats["iterations"] < 20, stats


async def _drain(stream) -> int:
    return sum([len(steps) async for steps in stream])
