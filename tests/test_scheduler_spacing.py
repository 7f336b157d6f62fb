"""Admission spacing of the Generator's decode scheduler (serve/scheduler.py, ``admit_share`` /
``admit_max_delay_s``, issue 14 session 15): while rows decode, arrivals that come one by one are
admitted together once the model thread has decoded long enough since the previous admission,
never later than ``admit_max_delay_s``. In-process on the tiny model, with a real model thread."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dnc.generate import DecodeRow, SamplingParams
from dnc.model import DNC
from decode_helpers import solo
from serve.scheduler import DecodeScheduler, _Job


@pytest.fixture(scope="module")
def model():
    from dnc.config import preset

    torch.manual_seed(0)
    return DNC(preset("tiny")).eval()


def _job(now: float, age: float) -> _Job:
    j = _Job(DecodeRow([1], None, 1), {})
    j.submitted = now - age
    return j


def test_the_gap_is_the_admission_cost_scaled_by_the_share_and_capped(model):
    sch = DecodeScheduler(model, run=None, admit_share=0.2, admit_max_delay_s=0.025)
    sch._admit_cost_s = 0.004
    assert sch.admit_gap_s() == pytest.approx(0.016)  # 4 ms of admission per 16 ms of decoding: 20%
    sch._admit_cost_s = 0.010
    assert sch.admit_gap_s() == pytest.approx(0.025)  # capped
    assert DecodeScheduler(model, run=None, admit_share=0.0).admit_gap_s() == 0.0


def test_a_lone_arrival_waits_for_the_gap_while_rows_decode(model):
    """One arrival, rows decoding, the last admission 2 ms ago at 4 ms a time (share 0.2: a 16 ms
    gap): not due after ``admit_delay_s`` (session 14 admitted it then), due once the gap has
    passed since the last admission, and due anyway once it has waited ``admit_max_delay_s``."""
    sch = DecodeScheduler(model, run=None, max_running=64, admit_batch=8, admit_delay_s=0.005,
                          admit_share=0.2, admit_max_delay_s=0.025)
    now = 100.0
    sch.active = {i: _job(now, 1.0) for i in range(40)}
    sch._admit_cost_s, sch._last_admit = 0.004, now - 0.002
    sch.waiting = [_job(now, 0.006)]
    assert not sch.due(now)  # waited past admit_delay_s, but the last admission was 2 ms ago
    assert sch.due(now + 0.0141)  # 16 ms since the last admission
    sch._admit_cost_s = 1.0  # a gap of admit_max_delay_s
    assert not sch.due(now + 0.0141)
    assert sch.due(now + 0.0191)  # the arrival has waited admit_max_delay_s
    sch.waiting = [_job(now, 0.0) for _ in range(8)]
    assert sch.due(now)  # a full group goes at once
    sch.active = {i: _job(now, 1.0) for i in range(60)}
    assert not sch.due(now)  # 8 wait but only 4 places: not a full group, it waits for the gap


def test_no_spacing_admits_as_in_session_14(model):
    sch = DecodeScheduler(model, run=None, max_running=64, admit_batch=8, admit_delay_s=0.005, admit_share=0.0)
    now = 100.0
    sch.active = {i: _job(now, 1.0) for i in range(40)}
    sch._admit_cost_s, sch._last_admit = 0.004, now - 0.002
    sch.waiting = [_job(now, 0.006)]
    assert sch.due(now)


def test_arrivals_one_by_one_are_admitted_together_and_decode_as_alone(model):
    """A long request decodes while four short ones arrive 80 ms apart. With spacing (a share so
    small that the gap is ``admit_max_delay_s``, 1 s) they are admitted as one admission, 1 s
    after the previous one; without (``admit_share=0``, and ``admit_batch``
    8 never reached) each is admitted on its own after ``admit_delay_s`` (unless a slow step
    merges some). Every request gets the
    tokens it gets decoded alone."""
    pool = ThreadPoolExecutor(1)

    async def run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    prompts = [list(b"arrival number %d" % i) for i in range(4)]

    async def main(**kw):
        sch = DecodeScheduler(model, run, chunk_s=0.005, admit_batch=8, admit_delay_s=0.001, **kw)
        long_row = DecodeRow(list(b"the long one"), None, 100_000, SamplingParams(0.0))
        rows = [DecodeRow(p, None, 3, SamplingParams(0.0)) for p in prompts]
        timings = [{} for _ in rows]
        long_timing: dict = {}
        long_task = asyncio.ensure_future(_drain(sch.submit(long_row, long_timing)))
        while len(long_row.tokens) < 10:  # decoding, past the first (slower) steps
            await asyncio.sleep(0.002)
        tasks = []
        for r, t in zip(rows, timings):
            tasks.append(asyncio.ensure_future(_drain(sch.submit(r, t))))
            await asyncio.sleep(0.08)
        await asyncio.gather(*tasks)
        long_task.cancel()
        try:
            await long_task
        except asyncio.CancelledError:
            pass
        return sch.stats["admissions"], [r.tokens for r in rows], [t["admitted"] - long_timing["prefilled"]
                                                                    for t in timings]
    spaced, tokens, after_last = asyncio.run(main(admit_share=1e-6, admit_max_delay_s=1.0))
    unspaced, tokens_old, _ = asyncio.run(main(admit_share=0.0))
    pool.shutdown()
    assert spaced == 2, spaced  # the long request, then the four together
    # the four went in 1 s (the gap) after the long request's admission, not before, and not much
    # later (a few steps: the wait is checked between steps)
    assert 1.0 <= after_last[0] < 1.5, after_last
    # one admission each when steps are fast; on a loaded 2-core machine a step or prefill can
    # outlast the 80 ms between arrivals (seen: 0.5 s) and merge some: at least two apart
    assert unspaced >= 3, unspaced
    assert tokens == tokens_old
    for p, got in zip(prompts, tokens):  # every row's tokens are those it gets alone
        assert got == solo(model, dict(prompt_ids=p, max_new_tokens=3, sampling=SamplingParams(0.0))).tokens


def test_spacing_settings_reach_the_scheduler(tmp_path):
    """AppArgs.admit_share / admit_max_delay_ms are validated at the edge and travel, typed,
    through GeneratorSettings to the replica's scheduler (ms -> s)."""
    from pydantic import ValidationError

    from serve.app import AppArgs
    from serve.generator import Generator

    with pytest.raises(ValidationError, match="admit_share"):
        AppArgs(admit_share=1.5)
    with pytest.raises(ValidationError, match="admit_max_delay_ms"):
        AppArgs(admit_max_delay_ms=-1)
    settings = AppArgs(storage=str(tmp_path), device="cpu", admit_share=0.1, admit_max_delay_ms=40).generator_settings()
    g = Generator.func_or_class(settings)
    assert g.scheduler.admit_share == pytest.approx(0.1) and g.scheduler.admit_max_delay_s == pytest.approx(0.04)
    assert (AppArgs().admit_share, AppArgs().admit_max_delay_ms) == (0.0, 25.0)   # off by default until the H200 A/B


async def _drain(it) -> int:
    n = 0
    async for items in it:
        n += len(items)
    return n
