"""The served decode step's local attention is a setting (``AppArgs.kv_attention``, session 18):
"masked" (the default) or "flex" (each row's own KV length; dnc/attention.py). It travels from the
app's arguments to every Generator replica's scheduler and its batches; both give the same tokens.
In-process on the tiny model, with a real model thread (the GPU timing is bench/profile_model.py's)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dnc.generate import DecodeRow, SamplingParams
from dnc.model import DNC
from serve.scheduler import DecodeScheduler


def test_the_setting_reaches_the_scheduler_and_is_checked(tmp_path):
    from pydantic import ValidationError

    from serve.app import AppArgs
    from serve.generator import Generator

    with pytest.raises(ValidationError, match="kv_attention"):
        AppArgs(kv_attention="sparse")
    assert AppArgs().kv_attention == "masked"
    settings = AppArgs(storage=str(tmp_path), device="cpu", kv_attention="flex").generator_settings()
    g = Generator.func_or_class(settings)
    assert g.scheduler.decoder.kv_attention == "flex"


def test_flex_and_masked_schedulers_give_the_same_tokens():
    """Four requests of different prompts, lengths (past a segment boundary of the tiny preset) and
    sampling, decoded together by a scheduler of each kind: the same tokens, and the flex scheduler's
    batches did run flex."""
    from dnc.config import preset

    torch.manual_seed(0)
    model = DNC(preset("tiny").replace(kv_window=8)).eval()
    specs = [(list(b"row %d says" % i) * (1 + i), n, seed, temp)
             for i, (n, seed, temp) in enumerate([(70, None, 0.0), (9, 3, 0.9), (40, None, 0.0), (25, 7, 1.0)])]

    async def decode(kind: str):
        pool = ThreadPoolExecutor(1)

        async def run(fn, *args):
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        sch = DecodeScheduler(model, run, chunk_s=0.002, kv_attention=kind)
        rows = [DecodeRow(p, None, n, SamplingParams(t), seed=s) for p, n, s, t in specs]
        kinds: set[str] = set()  # the attention of the batches seen decoding, at every token event

        async def client(row):
            async for _ in sch.submit(row):
                kinds.update(b.rb.kv_attention for b in sch.decoder.batches)
        await asyncio.gather(*(client(r) for r in rows))
        pool.shutdown()
        return [r.tokens for r in rows], kinds

    masked, _ = asyncio.run(decode("masked"))
    flex, kinds = asyncio.run(decode("flex"))
    assert flex == masked
    assert kinds == {"flex"}
    assert [len(t) for t in flex] == [n for _, n, _, _ in specs]
