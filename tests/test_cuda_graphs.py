"""CUDA-graph segment steps (dnc.cuda_graphs) compute what the eager model computes.

The GPU tests run on a CUDA machine (``python -m pytest tests/test_cuda_graphs.py``); on CPU
the graphs are never used, which the CPU test checks."""

import pytest
import torch

from dnc.config import preset
from dnc.model import DNC

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _model(device, **kw) -> DNC:
    torch.manual_seed(0)
    # small levels so a few segments fill L0, compress into L1/L2 and evict from L2
    cfg = preset("tiny", segment_len=32, l0_slots=32, l1_slots=16, l2_slots=8, **kw)
    return DNC(cfg).to(device).eval()


def _segments(model, x, state):
    seg = model.config.segment_len
    return [model(x[:, i:i + seg], state=state, metrics=False).logits for i in range(0, x.shape[1], seg)]


def _assert_same_state(a, b):
    ea, eb = a.export(), b.export()
    assert ea.keys() == eb.keys()
    for k in ea:
        assert torch.allclose(ea[k].float(), eb[k].float(), atol=1e-5, rtol=1e-5), k


def test_bank_clock_on_the_device_follows_the_host_clock():
    model = _model("cpu")
    state = model.init_state(2)
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 32 * 5)), state=state)
    for _, bank in state.banks():
        assert bank.clock == 5 and float(bank.clock_t) == 5.0


def test_enabled_graphs_leave_cpu_inference_unchanged():
    model = _model("cpu")
    x = torch.randint(0, 256, (1, 32 * 4))
    with torch.no_grad():
        want = _segments(model, x, model.init_state(1))
        model.enable_cuda_graphs()
        got = _segments(model, x, model.init_state(1))
    assert model.step_runner.replays == 0
    for w, g in zip(want, got):
        assert torch.equal(w, g)


@cuda
@pytest.mark.parametrize("autocast,write_importance,self_read", [(False, 0.0, False), (True, 0.0, False),
                                                                  (False, 50.0, False), (False, 50.0, True),
                                                                  (True, 0.0, True)])
def test_graph_replay_matches_eager_segments_and_state(autocast, write_importance, self_read):
    model = _model("cuda", write_importance=write_importance, self_read=self_read)
    if write_importance:  # non-zero importance weights, so the keep scores really use them
        with torch.no_grad():
            for blk in model.blocks:
                if blk.mem is not None:
                    blk.mem.importance_w.normal_(0.0, 1.0)
    x = torch.randint(0, 256, (2, 32 * 12), device="cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)
    with torch.no_grad(), amp:
        eager_state = model.init_state(2)
        want = _segments(model, x, eager_state)
        model.enable_cuda_graphs()
        graph_state = model.init_state(2)
        got = _segments(model, x, graph_state)
    graphs = model.step_runner
    assert graphs.replays > 0 and graphs.graphs, "no segment was replayed from a graph"
    tol = 3e-2 if autocast else 1e-4
    for w, g in zip(want, got):
        assert torch.allclose(w.float(), g.float(), atol=tol, rtol=tol)
    _assert_same_state(eager_state, graph_state)
    assert eager_state.tokens_seen == graph_state.tokens_seen and eager_state.segments == graph_state.segments
    # decoding after a graphed prefill continues from the same state
    tok = torch.randint(0, 256, (2, 1), device="cuda")
    with torch.no_grad(), amp:
        a = model(tok, state=eager_state).logits
        b = model(tok, state=graph_state).logits
    assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


@cuda
def test_states_sharing_graphs_do_not_see_each_other():
    model = _model("cuda")
    xa = torch.randint(0, 256, (1, 32 * 8), device="cuda")
    xb = torch.randint(0, 256, (1, 32 * 8), device="cuda")
    with torch.no_grad():
        ref_a = _segments(model, xa, model.init_state(1))  # eager
        ref_b = _segments(model, xb, model.init_state(1))
        model.enable_cuda_graphs()
        _segments(model, xa, model.init_state(1))  # sees every layout once or more: captures
        sa, sb = model.init_state(1), model.init_state(1)
        for i in range(0, xa.shape[1], 32):  # interleaved, segment by segment
            ga = model(xa[:, i:i + 32], state=sa, metrics=False).logits
            gb = model(xb[:, i:i + 32], state=sb, metrics=False).logits
            assert torch.allclose(ga, ref_a[i // 32], atol=1e-4) and torch.allclose(gb, ref_b[i // 32], atol=1e-4)
    assert model.step_runner.replays > 0


def test_cuda_graphs_module_does_not_import_the_model():
    """The import cycle is gone: the graphs build on dnc.state and the public segment_step."""
    import ast
    import inspect

    import dnc.cuda_graphs as cg

    imported = {n.module for n in ast.walk(ast.parse(inspect.getsource(cg))) if isinstance(n, ast.ImportFrom)}
    assert "model" not in imported and "dnc.model" not in imported
    model_src = inspect.getsource(__import__("dnc.model", fromlist=["x"]))
    top_level = [n for n in ast.parse(model_src).body if isinstance(n, ast.ImportFrom)]
    assert all(n.module != "cuda_graphs" for n in top_level)


def test_a_step_runner_from_outside_runs_whole_segments():
    """forward hands eligible chunks to the runner; a runner that calls segment_step gives the
    eager result (what SegmentGraphs does on CUDA, checked above on GPU)."""
    class CountingRunner:
        def __init__(self, model):
            self.model, self.steps = model, 0

        def eligible(self, tokens, state):
            return state.seg_pos == 0 and tokens.shape[1] == self.model.config.segment_len

        def step(self, tokens, state):
            self.steps += 1
            return self.model.segment_step(tokens, state)

    model = _model("cpu")
    x = torch.randint(0, 256, (2, 32 * 5 + 7))
    with torch.no_grad():
        s_eager = model.init_state(2)
        want = model(x, state=s_eager).logits
        runner = CountingRunner(model)
        model.set_step_runner(runner)
        s_run = model.init_state(2)
        got = model(x, state=s_run).logits
    assert runner.steps == 5  # five whole segments; the 7-token tail runs eagerly
    torch.testing.assert_close(got, want)
    _assert_same_state(s_eager, s_run)
    model.set_step_runner(None)
    with pytest.raises(ValueError, match="segment step takes"):
        model.segment_step(torch.zeros(1, 33, dtype=torch.long), model.init_state(1))



@cuda
def test_a_capture_survives_a_garbage_collection_of_older_graphs():
    """The collector freeing a dead cycle that holds an older graph during a capture used to
    invalidate the capture (a CUDAGraph reset is forbidden while a stream captures): the GPU replay
    test failed this way after the decode-graph tests. Here the cycle becomes garbage inside the
    capture, with a collection due on nearly every allocation."""
    import gc

    from dnc.cuda_graphs import capturing

    src = torch.ones(8, device="cuda")
    old = torch.cuda.CUDAGraph()
    with capturing(old, None):
        old_out = src * 3
    old.replay()
    cycle = [old, old_out]
    cycle.append(cycle)
    box = [cycle]
    del old, old_out, cycle
    thresholds = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    try:
        graph = torch.cuda.CUDAGraph()
        with capturing(graph, None):
            box.clear()  # the old graph's cycle is garbage from here on
            junk = [[i] for i in range(2000)]  # container allocations: collections come due
            out = src * 2
        assert gc.isenabled()
    finally:
        gc.set_threshold(*thresholds)
    del junk
    src.fill_(5.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, torch.full_like(out, 10.0))
