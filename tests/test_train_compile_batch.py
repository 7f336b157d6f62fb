"""The compiled training segment step across batch-size changes (the curriculum's stages change it).

With ``dynamic_batch`` (aot_eager) one graph serves every batch of two rows or more, and its losses and
gradients are the eager ones for each size; without it each batch size is a graph, and past
``max_graphs`` a new size runs uncompiled with a warning (same numbers). CPU: ``aot_eager``.
"""

from __future__ import annotations

import pytest
import torch

from dnc.config import preset
from dnc.model import DNC
from dnc.parallel import compile_segments, unwrap

# a bank that fills, compresses and evicts within the 5 segments below (as test_compile_segment's), in a
# one-block model of half tiny's width: what these tests check (graphs per batch size, recompiles, the
# eager fallback, eager-equal numbers) does not depend on depth or width, and tracing and running one
# narrow memory block costs less than half the CPU of tiny's two (88 s -> 40 s of CPU for the two compile tests)
SMALL_BANK = dict(l0_slots=32, l1_slots=16, l2_slots=8, n_layers=1, d_model=64, memory_layers=(0,),
                  write_importance=50.0)
SEGMENTS = 5


def _pair():
    torch.manual_seed(0)
    cfg = preset("tiny", **SMALL_BANK)
    eager, other = DNC(cfg).train(), DNC(cfg).train()
    other.load_state_dict(eager.state_dict())
    return cfg, eager, other


def _step(model, x):
    out = model(x, targets=x)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def _assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert got[1].keys() == want[1].keys()
    for name, g in got[1].items():
        torch.testing.assert_close(g, want[1][name], rtol=1e-4, atol=1e-5, msg=name)


def _batch(cfg, b: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, SEGMENTS * cfg.segment_len + 5), generator=g)  # + a partial segment


def test_dynamic_batch_one_graph_for_every_batch_size():
    """Batch 3, then 2 and 5 (a stage change each): one graph, compiled at the first segment, no
    recompile after it; every step's loss and gradients match eager."""
    import torch._dynamo

    torch._dynamo.reset()
    cfg, eager, compiled = _pair()
    compile_segments(compiled, backend="aot_eager", dynamic_batch=True)
    runner = unwrap(compiled).step_runner
    _assert_same(_step(compiled, _batch(cfg, 3, 1)), _step(eager, _batch(cfg, 3, 1)))
    assert [g["batch"] for g in runner.graphs] == [3] and runner.graphs[0]["at_step"] == 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        for b, seed in ((2, 2), (5, 3)):
            _assert_same(_step(compiled, _batch(cfg, b, seed)), _step(eager, _batch(cfg, b, seed)))
    assert len(runner.graphs) == 1 and runner.graphs[0]["seconds"] > 0
    assert (runner.compiled_steps, runner.eager_steps) == (3 * SEGMENTS, 0)


def test_static_batch_past_max_graphs_runs_uncompiled_with_a_warning():
    """Static shapes: a graph per batch size; with max_graphs=1 the second size is not compiled
    but runs the same fixed-shape step eagerly, says so once, and still gives the eager numbers."""
    import torch._dynamo

    torch._dynamo.reset()
    cfg, eager, compiled = _pair()
    compile_segments(compiled, backend="aot_eager", dynamic_batch=False)
    runner = unwrap(compiled).step_runner
    runner.max_graphs = 1
    _assert_same(_step(compiled, _batch(cfg, 2, 1)), _step(eager, _batch(cfg, 2, 1)))
    assert [g["key"] for g in runner.graphs] == [repr((2, True, None))]
    with pytest.warns(UserWarning, match="max_graphs=1"):
        _assert_same(_step(compiled, _batch(cfg, 3, 2)), _step(eager, _batch(cfg, 3, 2)))
    assert len(runner.graphs) == 1 and runner.eager_steps == SEGMENTS
    _step(compiled, _batch(cfg, 2, 4))  # the compiled size still runs its graph
    assert (len(runner.graphs), runner.compiled_steps) == (1, 2 * SEGMENTS)


def test_shape_keys():
    """Every batch >= 2 shares one key with dynamic_batch; size 1, grad mode and autocast part it."""
    _, _, model = _pair()
    compile_segments(model, compile=False, dynamic_batch=True)
    runner = unwrap(model).step_runner
    assert runner.shape_key(2) == runner.shape_key(128) == ("dynamic", True, None)
    assert runner.shape_key(1) == (1, True, None)
    with torch.no_grad():
        assert runner.shape_key(4) == ("dynamic", False, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert runner.shape_key(4) == ("dynamic", True, torch.bfloat16)
    runner.dynamic_batch = False
    assert runner.shape_key(4) == (4, True, None)


def test_train_config_sets_dynamic_batch():
    """``train.compile_dynamic_batch`` reaches the runner the Trainer installs (default off)."""
    from dnc.training import Trainer, TrainConfig

    common = dict(max_steps=1, batch_size=2, max_len=64, corpus_ratio=0.0, eval_interval=1000,
                  checkpoint_interval=1000, log_interval=1, compile="segment")
    on = Trainer(TrainConfig(compile_dynamic_batch=True, **common), preset("tiny"), device="cpu", progress=False)
    off = Trainer(TrainConfig(**common), preset("tiny"), device="cpu", progress=False)
    assert unwrap(on.model).step_runner.dynamic_batch and not unwrap(off.model).step_runner.dynamic_batch


def _signature(x):
    """(shape, stride, dtype, requires_grad) of every tensor in a nest of tuples: what dynamo guards."""
    if torch.is_tensor(x):
        return tuple(x.shape), x.stride(), x.dtype, x.requires_grad
    if isinstance(x, (tuple, list)):
        return tuple(_signature(y) for y in x)
    return None


@pytest.mark.parametrize("batch", [1, 3])
def test_step_inputs_keep_one_signature_under_autocast(batch):
    """From the first segment on, the step's inputs have the same shapes, strides, dtypes and grad
    flags (so the graph of the first segment serves the rest): under bf16 autocast the empty carried
    caches stay in their dtype, and with one row the [1, 1, D] carries keep canonical strides."""
    cfg, _, model = _pair()
    compile_segments(model, compile=False)
    runner = unwrap(model).step_runner
    state = model.init_state(batch)
    seen = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for seg in range(SEGMENTS):
            args, host = runner.prepare(torch.randint(0, 256, (batch, cfg.segment_len)), state)
            seen.append(_signature(args[2:]))
            runner._finish(state, runner.step_fn(*args), host)
    assert all(s == seen[0] for s in seen[1:])
