"""The decode scheduler's model thread stepping on without waiting for the asyncio loop
(serve/scheduler.py, ``keep_stepping_s``, issue 14 session 15): iterations run back to back and
their tokens are handed to the loop as they end; the thread comes back to the loop for arrivals
and cancellations. In-process on the tiny model, with a real model thread."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dnc.generate import BatchDecoder, DecodeRow, SamplingParams
from dnc.model import DNC
from serve.scheduler import DecodeScheduler


@pytest.fixture(scope="module")
def model():
    from dnc.config import preset

    torch.manual_seed(0)
    return DNC(preset("tiny")).eval()


def _solo(model, prompt: list[int], n: int, seed: int | None = None, temperature: float = 0.0) -> list[int]:
    row = DecodeRow(prompt, None, n, SamplingParams(temperature), seed=seed)
    dec = BatchDecoder(model)
    dec.add([row])
    list(dec.run())
    return row.tokens


def _runner():
    pool = ThreadPoolExecutor(1)
    calls = [0]

    async def run(fn, *args):
        calls[0] += 1
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    return pool, run, calls


def test_rows_ending_while_the_thread_steps_on_get_every_token_once(model):
    """Five requests of 3..40 tokens (greedy and seeded sampling) submitted together, the model
    thread stepping on for up to 10 s: each gets exactly its solo tokens, each once and in order,
    its stream ends, and the thread came back to the loop far less often than it ran iterations
    (with ``keep_stepping_s`` 0 it comes back after every one)."""
    specs = [(list(b"first %d" % i), n, seed, temp)
             for i, (n, seed, temp) in enumerate([(3, None, 0.0), (40, None, 0.0), (7, 11, 0.9), (19, 5, 1.0),
                                                  (12, None, 0.0)])]

    async def main(keep: float):
        pool, run, calls = _runner()
        sch = DecodeScheduler(model, run, chunk_s=0.002, keep_stepping_s=keep)
        got: list[list[int]] = [[] for _ in specs]
        ends = [0] * len(specs)

        async def client(i):
            p, n, seed, temp = specs[i]
            row = DecodeRow(p, None, n, SamplingParams(temp), seed=seed)
            async for items in sch.submit(row):
                got[i] += [st.token for st in items]
                assert [st.index for st in items] == list(range(len(got[i]) - len(items), len(got[i])))
            ends[i] += 1
            assert row.tokens == got[i] and row.finish_reason == "length"
        await asyncio.gather(*(client(i) for i in range(len(specs))))
        pool.shutdown()
        return got, ends, calls[0], sch.stats["iterations"]
    got, ends, runs, iterations = asyncio.run(main(10.0))
    assert ends == [1] * len(specs)
    for (p, n, seed, temp), toks in zip(specs, got):
        assert toks == _solo(model, p, n, seed, temp)
    assert iterations >= 20 and runs <= iterations // 4, (runs, iterations)
    _, _, runs0, iterations0 = asyncio.run(main(0.0))
    assert runs0 == iterations0, (runs0, iterations0)


def test_a_cancelled_stream_and_an_arrival_bring_the_thread_back_at_once(model):
    """A long request decodes with ``keep_stepping_s`` of 30 s. A second request arrives: it is
    admitted within about ``admit_max_delay_s`` (the thread comes back for it), not 30 s later,
    and gets its solo tokens. Then the long request's consumer goes away: its row is cancelled
    at the next step and the scheduler goes idle."""
    pool, run, _ = _runner()

    async def main():
        sch = DecodeScheduler(model, run, chunk_s=0.002, keep_stepping_s=30.0, admit_max_delay_s=0.05)
        long_row = DecodeRow(list(b"the long one"), None, 100_000, SamplingParams(0.0))
        it = sch.submit(long_row)
        n = 0
        async for items in it:
            n += len(items)
            if n >= 10:
                break  # consumed a few; keep the stream open
        timing: dict = {}
        short = DecodeRow(list(b"a late arrival"), None, 5, SamplingParams(0.0))
        t0 = time.perf_counter()
        async for _ in sch.submit(short, timing):
            pass
        waited = time.perf_counter() - t0
        await it.aclose()  # the client goes away
        t1 = time.perf_counter()
        while sch.active or (sch._driver is not None and not sch._driver.done()):
            await asyncio.sleep(0.01)
            assert time.perf_counter() - t1 < 10, "the cancelled row was not dropped"
        return short.tokens, timing["queue_s"], waited, long_row.finish_reason
    tokens, queue_s, waited, reason = asyncio.run(main())
    pool.shutdown()
    assert queue_s < 5.0 and waited < 10.0, (queue_s, waited)
    assert tokens == _solo(model, list(b"a late arrival"), 5)
    assert reason == "cancelled"


def test_keep_stepping_setting_reaches_the_scheduler(tmp_path):
    from pydantic import ValidationError

    from serve.app import AppArgs
    from serve.generator import Generator

    with pytest.raises(ValidationError, match="keep_stepping_ms"):
        AppArgs(keep_stepping_ms=-1)
    settings = AppArgs(storage=str(tmp_path), device="cpu", keep_stepping_ms=40).generator_settings()
    g = Generator.func_or_class(settings)
    assert g.scheduler.keep_stepping_s == pytest.approx(0.04)
    assert AppArgs().keep_stepping_ms == 0.0
