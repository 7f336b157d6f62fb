"""Issue 14 on a GPU: a session turn decoded inside a batch of other sessions' rows (CUDA-graph
decode steps) and later replayed alone must give back the acknowledged state, within the fingerprint
tolerance of its dtype, on the GPU (recovery on a replica) and on the CPU (the shard's compaction
replays there), in float32 and in bfloat16 (the serving dtype on CUDA: the CPU replay then runs a
CPU bfloat16 model, as the shard does for a bfloat16 turn).

On the CPU the replay is bit-exact (tests/test_sessions_turns.py, tests/test_serve_dtype.py). On a
GPU the batched kernels round differently from a one-row replay; a divergence large enough to fail
the fingerprint would make the session answer ``state_damaged`` after a crash or compaction, so this
is measured for real: turns long enough to commit segments, compress and evict. Run with ``-s`` to
see the largest drift per dtype and device next to its tolerance (``FINGERPRINT_RTOL*``)."""

from __future__ import annotations

import pytest
import torch

from dnc.generate import BatchDecoder, DecodeRow, SamplingParams
from serve.modeling import ModelSpec, load_model
from serve.sessions.turn_log import (feed_turn, fingerprint_drift, fingerprint_mismatch, fingerprint_rtol,
                                     state_fingerprint)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("new_tokens", [64, 700])
def test_batched_gpu_turns_replay_alone_within_the_fingerprint(new_tokens, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    spec = ModelSpec(preset="tiny", seed=0, dtype=dtype)
    gpu = load_model(spec, "cuda").model
    cpu = load_model(spec, "cpu").model
    assert next(gpu.parameters()).dtype == next(cpu.parameters()).dtype == getattr(torch, dtype)
    prompts = [list(f"session {i}: {'the memory keeps what the window forgets. ' * (1 + i % 3)}".encode())
               for i in range(8)]
    rows = [DecodeRow(p, gpu.init_state(1), new_tokens, SamplingParams(0.9), seed=100 + i)
            for i, p in enumerate(prompts)]
    dec = BatchDecoder(gpu, max_batch=8)
    dec.add(rows)
    while dec.running:
        dec.step()
    dec.close()
    failures, drift = [], {"cuda": 0.0, "cpu": 0.0}
    for i, (p, row) in enumerate(zip(prompts, rows)):
        assert row.error is None and len(row.tokens) == new_tokens
        acked = state_fingerprint(row.state)
        for model in (gpu, cpu):
            state = model.init_state(1)
            feed_turn(model, state, p + row.tokens, len(p))
            got = state_fingerprint(state)
            drift[model.device.type] = max(drift[model.device.type], fingerprint_drift(acked, got))
            bad = fingerprint_mismatch(acked, got, fingerprint_rtol(dtype))
            if bad:
                failures.append(f"row {i} replayed on {model.device}: {bad}")
    print(f"\n{dtype}, {new_tokens} new tokens, 8 rows: largest drift replayed on cuda {drift['cuda']:.3g}, "
          f"on cpu {drift['cpu']:.3g} (tolerance {fingerprint_rtol(dtype):g})")
    assert not failures, failures
