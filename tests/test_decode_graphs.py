"""CUDA-graph decode steps (dnc.cuda_graphs.DecodeGraphs over dnc.ragged) compute what the eager
ragged step and each row alone compute, with no host synchronisation inside the step.

The GPU tests are marked ``gpu`` (run them on a CUDA machine: ``python -m pytest -m gpu
tests/test_decode_graphs.py``); on CPU the runner is the eager step, which the CPU test checks."""

from __future__ import annotations

import pytest
import torch

from dnc.config import preset
from dnc.cuda_graphs import DecodeGraphs
from dnc.generate import BatchDecoder, DecodeRow, SamplingParams
from dnc.model import DNC
from dnc.ragged import RaggedBatch, ragged_decode_step
from decode_helpers import assert_no_host_sync, history_state, prompt_ids

SEG = 16
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(device, **kw) -> DNC:
    torch.manual_seed(0)
    cfg = preset("tiny", segment_len=SEG, l0_slots=32, l1_slots=16, l2_slots=8, **kw)
    return DNC(cfg).to(device).eval()




def _rows(model, n_rows: int = 6, max_new: int = 50):
    return [DecodeRow(prompt_ids(10 + i, 2 + i), None if i == 0 else history_state(model, 20 + i, 9 * i + 3),
                      max_new - 3 * i, SamplingParams(0.0)) for i in range(n_rows)]


def _decode(model, rows):
    dec = BatchDecoder(model, shrink_after=1)  # shrink as soon as rows leave: buckets 8, 4, 2, 1 (their graphs)
    dec.add(rows)
    list(dec.run())
    return rows


def _assert_same_state(a, b, tol):
    ea, eb = a.export(), b.export()
    assert ea.keys() == eb.keys()
    for k in ea:
        torch.testing.assert_close(ea[k].float(), eb[k].float(), atol=tol, rtol=tol, msg=k)


def test_decode_graphs_are_the_eager_step_on_cpu():
    model = _model("cpu")
    want = _decode(model, _rows(model, 3, 20))
    model.enable_cuda_graphs()
    assert isinstance(model.decode_runner, DecodeGraphs)
    got = _decode(model, _rows(model, 3, 20))
    assert model.decode_runner.replays == 0 and not model.decode_runner.graphs
    assert [r.tokens for r in got] == [r.tokens for r in want]
    for a, b in zip(got, want):
        if a.state is not None:
            _assert_same_state(a.state, b.state, 1e-6)
    model.enable_cuda_graphs(False)
    assert model.decode_runner is None and model.step_runner is None


def _batch(model, rows_states, capacity, runner=None):
    rb = runner.acquire(capacity) if runner is not None else RaggedBatch(model, capacity)
    for i, (state, logits) in enumerate(rows_states):
        rb.insert(i, state.select([0]), logits, model)
    return rb


def _states(model, n):
    out = []
    for i in range(n):
        st = model.init_state(1) if i == 0 else history_state(model, 30 + i, 11 * i + 2)
        with torch.no_grad():
            lg = model(torch.tensor([prompt_ids(40 + i, 3)], device=model.device), state=st, last_logits_only=True,
                       metrics=False).logits[0, -1]
        out.append((st, lg))
    return out


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("capacity", [1, 8])
@pytest.mark.parametrize("self_read", [False, True], ids=["bank", "self-read"])
def test_graph_replay_equals_eager_ragged_step(autocast, capacity, self_read):
    """Graph and eager ragged steps over rows of different layouts, 60 tokens (segment commits,
    compressions and evictions between replays): the same logits every step and the same states."""
    model = _model("cuda", self_read=self_read)
    rows = _states(model, capacity if capacity < 8 else 6)
    runner = DecodeGraphs(model)
    rb_g, rb_e = _batch(model, rows, capacity, runner), _batch(model, rows, capacity)
    n = len(rows)
    tol = 3e-2 if autocast else 1e-4
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)
    with torch.no_grad(), amp:
        for t in range(60):
            toks = rb_e.logits[:n].argmax(-1)
            rb_g.tokens[:n] = toks
            rb_e.tokens[:n] = toks
            lg_g, lg_e = runner.step(rb_g), ragged_decode_step(model, rb_e)
            rb_g.logits.copy_(lg_g)
            rb_e.logits.copy_(lg_e)
            rb_g.after_step(model)
            rb_e.after_step(model)
            torch.testing.assert_close(lg_g[:n], lg_e[:n], atol=tol, rtol=tol, msg=f"step {t}")
    assert runner.replays >= 58 and runner.eager == 1 and len(runner.graphs) == 1
    for i in range(n):
        _assert_same_state(rb_g.extract(i), rb_e.extract(i), tol)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("self_read", [False, True], ids=["bank", "self-read"])
def test_decode_step_has_no_host_sync(self_read):
    """The step a graph captures must not synchronise with the host (sync debug mode raises)."""
    model = _model("cuda", self_read=self_read)
    rb = _batch(model, _states(model, 3), 4)
    assert_no_host_sync(model, rb)


@pytest.mark.gpu
@needs_cuda
def test_decoder_with_graphs_equals_eager_and_sequential():
    """BatchDecoder on CUDA with decode graphs (buckets 8, 4, 2, 1 as rows leave): the tokens and final
    states of the eager decoder and of each row decoded alone."""
    model = _model("cuda")
    eager = _decode(model, _rows(model))
    alone = [_decode(model, [r])[0] for r in _rows(model)]
    model.enable_cuda_graphs()
    graphed = _decode(model, _rows(model))
    graphed_again = _decode(model, _rows(model))  # batches and graphs are reused by the next decoder
    runner = model.decode_runner
    assert runner.replays > 50 and len(runner.graphs) >= 3
    for g, e, a, g2 in zip(graphed, eager, alone, graphed_again):
        assert g.tokens == e.tokens == a.tokens == g2.tokens
        if g.state is not None:
            _assert_same_state(g.state, e.state, 1e-4)
            _assert_same_state(g.state, a.state, 1e-4)
    seg_rows = [r for r in graphed if r.state is not None and r.state.segments >= 4]
    assert seg_rows and any(b.sizes[2] > 0 for _, b in seg_rows[-1].state.banks())


@pytest.mark.gpu
@needs_cuda
def test_rows_sharing_a_graph_never_mix():
    """One row's state changed between two graphed runs: the other rows' logits are bitwise the same."""
    model = _model("cuda").enable_cuda_graphs()
    runner = model.decode_runner
    results = []
    for other in (59, 60, 61):  # the first run warms up and captures: the last two are replays throughout
        rows = _states(model, 4)
        rows[1] = (history_state(model, other, 30), rows[1][1])
        rb = _batch(model, rows, 4, runner)
        seen = []
        with torch.no_grad():
            for t in range(40):
                rb.tokens[:4] = torch.tensor(prompt_ids(70 + t, 4), device="cuda")
                seen.append(runner.step(rb))
                rb.after_step(model)
        runner.release(rb)
        results.append(torch.stack(seen))
    _, a, b = results
    assert torch.equal(a[:, [0, 2, 3]], b[:, [0, 2, 3]])
    assert not torch.allclose(a[:, 1], b[:, 1])


@pytest.mark.gpu
@needs_cuda
def test_chunked_prefill_with_graphs_equals_one_shot():
    """On CUDA with graphs: a long prompt prefilled a segment per step (whole segments replay as
    segment graphs) while another row decodes from decode graphs; both get their eager tokens."""
    model = _model("cuda")

    def rows():
        return (DecodeRow(prompt_ids(90, 12 * SEG + 5), history_state(model, 91, 7), 20, SamplingParams(0.0)),
                DecodeRow(prompt_ids(92, 4), history_state(model, 93, 30), 40, SamplingParams(0.0)))
    want = [_decode(model, [r])[0] for r in rows()]
    model.enable_cuda_graphs()
    long, running = rows()
    dec = BatchDecoder(model)
    dec.add([running])
    dec.add([long], prefill_chunk=SEG)
    while not long.tokens:
        n = len(running.tokens)
        dec.step()
        assert len(running.tokens) == n + 1
    list(dec.run())
    assert long.tokens == want[0].tokens and running.tokens == want[1].tokens
    _assert_same_state(long.state, want[0].state, 1e-4)
    assert model.step_runner.replays > 0 and model.decode_runner.replays > 0
