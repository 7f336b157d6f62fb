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


async def _drain(stream) -> int:
    return sum([len(steps) async for steps in stream])
