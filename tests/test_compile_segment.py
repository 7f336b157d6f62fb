"""The compiled training segment step (``train.compile: segment``, ``dnc.training.compiled_segment``).

Reference comparisons against the eager training forward (loss, logits, every gradient, memory
counters) over segments that fill the bank, compress L0 -> L1 -> L2 and evict from L2; dynamo
checks that the step is one graph with no break, on a fresh bank and a full one, and that a
whole run of segments compiles once. CPU: the compiled runs use the ``aot_eager`` backend.
"""

from __future__ import annotations

import pytest
import torch

from dnc.config import preset
from dnc.memory.fixed_bank import FixedLayout
from dnc.model import DNC
from dnc.parallel import compile_segments, unwrap
from dnc.training.compiled_segment import CompiledTrainSegments, fixed_segment_step

# 6 segments of 32 tokens fill L0 (32), compress into L1 (16) and L2 (8), then evict from L2; two
# memory layers, as the presets above tiny have (their banks are written as one stacked bank)
SMALL_BANK = dict(l0_slots=32, l1_slots=16, l2_slots=8, memory_layers=(0, 1))
SEGMENTS = 6


def _models(**overrides):
    torch.manual_seed(0)
    cfg = preset("tiny", **{**SMALL_BANK, **overrides})
    eager = DNC(cfg).train()
    other = DNC(cfg).train()
    other.load_state_dict(eager.state_dict())
    return cfg, eager, other


def _loss_and_grads(model, x, y):
    out = model(x, targets=y)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def _assert_same_step(got, want, rtol=1e-4, atol=1e-5):
    (out, grads), (ref, ref_grads) = got, want
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.recon_loss, ref.recon_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    assert out.metrics["mem/compressions"] == ref.metrics["mem/compressions"] > 0
    assert out.metrics["mem/evictions"] == ref.metrics["mem/evictions"] > 0
    for level in range(3):  # the fixed bank holds the same number of valid slots per level
        assert out.metrics[f"mem/slots_l{level}"] == ref.metrics[f"mem/slots_l{level}"]
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=rtol, atol=atol, msg=name)


def test_fixed_layout_follows_the_bank_plan():
    """The drops per level come from the packed bank's own overflow plan; capacities a fixed-shape
    write cannot express are refused with a message that says what to change."""
    small = FixedLayout.for_bank((2048, 1024, 512), 2048, 8)
    assert small.drops == (2048, 1024, 512) and small.received == (2048, 1024, 512)
    tiny = FixedLayout.for_bank((128, 64, 32), 32, 8)
    assert tiny.drops == (32, 16, 8)
    fill, seen = (0, 0, 0), []
    for _ in range(14):
        flags, fill, compressed, evicted = tiny.step(fill)
        seen.append((flags, compressed, evicted))
    assert fill == (128, 64, 32)
    assert seen[3] == ((False, False, False), 0, 0) and seen[4] == ((True, False, False), 32, 0)
    assert seen[-1] == ((True, True, True), 48, 8)
    with pytest.raises(ValueError, match="multiple"):
        FixedLayout.for_bank((48, 40, 24), 32, 8)


@pytest.mark.parametrize("overrides", [{}, {"kv_window": 8, "write_importance": 50.0},
                                       {"eviction": "adaptive", "protect_salient": 2.0, "bptt_segments": 3},
                                       {"self_read": True, "write_importance": 50.0}],
                         ids=["tiny", "window+importance", "adaptive+bptt3", "self_read"])
def test_fixed_capacity_step_matches_eager(overrides):
    """The fixed-shape segment step, run eagerly, is the eager training forward: same loss,
    logits, gradients and memory counters through fill, compression and eviction."""
    cfg, eager, fixed = _models(**overrides)
    compile_segments(fixed, compile=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, SEGMENTS * cfg.segment_len), generator=g)
    y = torch.randint(0, 256, (2, SEGMENTS * cfg.segment_len), generator=g)
    _assert_same_step(_loss_and_grads(fixed, x, y), _loss_and_grads(eager, x, y))
    runner = fixed.step_runner
    first_eager = 1 if cfg.kv_window else 0  # the first segment of a run with a window: empty cache
    assert (runner.compiled_steps, runner.eager_steps) == (SEGMENTS - first_eager, first_eager)


def test_partial_last_segment_and_eval_stay_eager():
    """A sequence that ends inside a segment reads the fixed bank eagerly; eval mode never uses
    the runner; both give the eager numbers."""
    cfg, eager, fixed = _models()
    compile_segments(fixed, compile=False)
    x = torch.randint(0, 256, (2, 3 * cfg.segment_len + 11))
    out, ref = fixed(x, targets=x), eager(x, targets=x)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert fixed.step_runner.compiled_steps == 3
    fixed.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(fixed(x).logits, eager(x).logits)
    assert fixed.step_runner.compiled_steps == 3


def test_compiled_segment_matches_eager_with_one_graph():
    """``torch.compile`` (aot_eager) of the segment step: one graph serves every segment (no
    recompile from a fresh bank to a full, evicting one), and loss and gradients match eager."""
    import torch._dynamo

    torch._dynamo.reset()
    cfg, eager, compiled = _models()
    compile_segments(compiled, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, SEGMENTS * cfg.segment_len), generator=g)
    y = torch.randint(0, 256, (2, SEGMENTS * cfg.segment_len), generator=g)
    want = _loss_and_grads(eager, x, y)
    with torch._dynamo.config.patch(error_on_recompile=True):  # compiled once, on the first segment
        first = _loss_and_grads(compiled, x, y)
        second = _loss_and_grads(compiled, x, y)  # the same graph for all segments of another step
        # rows of another length (the curriculum's buckets): its segments are slices of other strides
        xs, ys = x[:, :-cfg.segment_len].contiguous(), y[:, :-cfg.segment_len].contiguous()
        short = _loss_and_grads(compiled, xs, ys)
    _assert_same_step(first, want)
    _assert_same_step(second, want)
    _assert_same_step(short, _loss_and_grads(eager, xs, ys))
    assert compiled.step_runner.compiled_steps == 3 * SEGMENTS - 1


def test_segment_step_has_no_graph_break_fresh_or_full():
    """``torch._dynamo.explain``: the whole segment step (blocks, reads, write, compression,
    eviction) is one graph with no break, on a fresh bank and on a full one that compresses and
    evicts."""
    import torch._dynamo

    cfg, _, model = _models()
    compile_segments(model, compile=False)
    runner: CompiledTrainSegments = unwrap(model).step_runner
    state = model.init_state(2)
    x = torch.randint(0, 256, (2, cfg.segment_len))
    for seg in range(SEGMENTS):
        args, host = runner.prepare(x, state)
        if seg in (0, SEGMENTS - 1):
            torch._dynamo.reset()
            report = torch._dynamo.explain(fixed_segment_step)(*args)
            assert (report.graph_count, report.graph_break_count) == (1, 0), report.break_reasons
        runner._finish(state, fixed_segment_step(*args), host)
    bank = state.layers[1].bank
    assert bank.fill == [32, 16, 8] and host["compressed"] == 48 and host["evicted"] == 8


def test_train_config_compile_values():
    """``train.compile`` takes false, true/blocks, segment or graphs (tests/test_graphed_segment.py);
    anything else is refused by name."""
    from dnc.config import ConfigError
    from dnc.training import TrainConfig

    assert TrainConfig().compile_target is None
    assert TrainConfig(compile=True).compile_target == "blocks"
    assert TrainConfig(compile="segment").compile_target == "segment"
    with pytest.raises(ConfigError, match="compile"):
        TrainConfig(compile="inductor")


def test_trainer_installs_the_segment_runner():
    """``train.compile: segment`` in a Trainer puts the compiled runner on the bare model (under any
    wrapper); the eager default installs none."""
    from dnc.training import Trainer, TrainConfig

    common = dict(max_steps=1, batch_size=2, max_len=64, corpus_ratio=0.0, eval_interval=1000,
                  checkpoint_interval=1000, log_interval=1)
    trainer = Trainer(TrainConfig(compile="segment", **common), preset("tiny"), device="cpu", progress=False)
    runner = unwrap(trainer.model).step_runner
    assert isinstance(runner, CompiledTrainSegments) and runner.layout.drops == (32, 16, 8)
    eager = Trainer(TrainConfig(**common), preset("tiny"), device="cpu", progress=False)
    assert unwrap(eager.model).step_runner is None
