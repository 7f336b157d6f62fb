"""The graphed training segment step (``train.compile: graphs``, ``dnc.training.graphed_segment``).

Each segment's forward runs without grad and its backward recomputes it with grad (CUDA graphs on
a GPU, plain calls on a CPU). Reference comparisons against the eager training forward: loss,
recon loss and every parameter's gradient over segments that start from a fresh bank, fill it,
compress L0 -> L1 -> L2 and evict from L2, and over two optimizer steps in a row (the graphs hold
pointers to the parameters, which the optimizer updates in place). The ``gpu`` test checks the
captured graphs against eager the same way, in fp32 and under bf16 autocast.
"""

from __future__ import annotations

import pytest
import torch

from dnc.config import preset
from dnc.model import DNC
from dnc.parallel import compile_segments, graph_segments, unwrap
from dnc.training.graphed_segment import GraphedTrainSegments

# as tests/test_compile_segment.py: 6 segments of 32 tokens fill L0 (32), compress into L1 (16)
# and L2 (8), then evict from L2; two memory layers (written as one stacked bank)
SMALL_BANK = dict(l0_slots=32, l1_slots=16, l2_slots=8, memory_layers=(0, 1))
SEGMENTS = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _models(device="cpu", **overrides):
    torch.manual_seed(0)
    cfg = preset("tiny", **{**SMALL_BANK, **overrides})
    eager = DNC(cfg).train().to(device)
    other = DNC(cfg).train().to(device)
    other.load_state_dict(eager.state_dict())
    return cfg, eager, other


def _batch(cfg, device="cpu", rows=2, segments=SEGMENTS, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (rows, segments * cfg.segment_len), generator=g)
    y = torch.randint(0, 256, (rows, segments * cfg.segment_len), generator=g)
    return x.to(device), y.to(device)


def _train_steps(model, batches, steps=2, amp=None):
    """``steps`` SGD steps, one per batch; per step (loss, recon loss, {name: grad}, metrics). SGD,
    not Adam: Adam's normalised update turns a 1e-7 difference of a near-zero grad into a full step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = []
    for x, y in batches[:steps]:
        with amp or torch.autocast("cpu", enabled=False):
            res = model(x, targets=y)
        res.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out.append((res.loss.detach(), res.recon_loss.detach(), grads, res.metrics))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


def _assert_same_steps(got, want, rtol=1e-5, atol=1e-5):
    for step, ((loss, recon, grads, metrics), (rloss, rrecon, rgrads, rmetrics)) in enumerate(zip(got, want)):
        torch.testing.assert_close(loss, rloss, rtol=rtol, atol=atol, msg=f"loss of step {step}")
        torch.testing.assert_close(recon, rrecon, rtol=rtol, atol=atol, msg=f"recon loss of step {step}")
        assert metrics["mem/compressions"] == rmetrics["mem/compressions"] > 0
        assert metrics["mem/evictions"] == rmetrics["mem/evictions"] > 0
        assert grads.keys() == rgrads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, rgrads[name], rtol=rtol, atol=atol, msg=f"{name} (step {step})")


@pytest.mark.parametrize("overrides", [{}, {"kv_window": 8, "write_importance": 50.0, "bptt_segments": 3},
                                       {"eviction": "adaptive", "protect_salient": 2.0, "self_read": True}],
                         ids=["tiny", "window+importance+bptt3", "adaptive+self_read"])
def test_recomputed_segments_match_eager(overrides):
    """Forward without grad, backward recomputed with grad (plain calls on a CPU): the losses and
    every parameter's grad equal the eager forward's over a fresh bank, compression and eviction,
    for two optimizer steps in a row (the second from updated parameters and a new batch)."""
    cfg, eager, graphed = _models(**overrides)
    graph_segments(graphed)
    batches = [_batch(cfg, seed=1), _batch(cfg, seed=2)]
    _assert_same_steps(_train_steps(graphed, batches), _train_steps(eager, batches))
    runner = unwrap(graphed).step_runner
    first_eager = 1 if cfg.kv_window else 0  # a run with a window: the first segment's cache is empty
    assert (runner.compiled_steps, runner.eager_steps) == (2 * (SEGMENTS - first_eager), 2 * first_eager)
    assert len(runner.entries) == 1 and len(runner.graphs) == 1  # one key serves every segment of both steps


def test_partial_last_segment_reads_the_graphed_state():
    """A sequence that ends inside a segment: its whole segments go through the Function, the
    partial one reads their (saved) outputs eagerly; loss and every grad as the eager forward."""
    cfg, eager, graphed = _models()
    graph_segments(graphed)
    x, y = _batch(cfg, segments=4)
    x, y = x[:, :3 * cfg.segment_len + 11], y[:, :3 * cfg.segment_len + 11]
    got, want = graphed(x, targets=y), eager(x, targets=y)
    got.loss.backward()
    want.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(graphed.named_parameters(), eager.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)
    assert graphed.step_runner.compiled_steps == 3


def test_one_key_per_batch_size_and_max_graphs():
    """A new batch size is a new key (a new pair of graphs on CUDA); past ``max_graphs`` a new key
    runs the eager step with one warning, and still gives the eager numbers."""
    cfg, eager, graphed = _models()
    graphed.set_step_runner(GraphedTrainSegments(graphed, max_graphs=2, log=False))
    runner = graphed.step_runner
    for rows in (2, 3):
        x, y = _batch(cfg, rows=rows, segments=2)
        graphed(x, targets=y).loss.backward()
    assert [g["batch"] for g in runner.graphs] == [2, 3] and runner.eager_steps == 0
    x, y = _batch(cfg, rows=1, segments=2)
    with pytest.warns(UserWarning, match="max_graphs=2"):
        out = graphed(x, targets=y)
    torch.testing.assert_close(out.loss, eager(x, targets=y).loss, rtol=1e-5, atol=1e-6)
    assert runner.eager_steps == 2 and len(runner.entries) == 2


def test_without_grad_and_in_eval_the_step_runs_eagerly():
    """No backward to recompute for: a training-mode forward under ``no_grad`` runs the eager
    fixed-shape step, and eval mode never reaches the runner; both give the eager numbers."""
    cfg, eager, graphed = _models()
    graph_segments(graphed)
    x, _ = _batch(cfg, segments=2)
    with torch.no_grad():
        torch.testing.assert_close(graphed(x).logits, eager(x).logits)
        runner = graphed.step_runner
        assert (runner.compiled_steps, runner.eager_steps, len(runner.entries)) == (0, 2, 0)
        graphed.eval()
        eager.eval()
        torch.testing.assert_close(graphed(x).logits, eager(x).logits)
    assert runner.eager_steps == 2


def test_dropout_is_refused():
    """The recompute would draw new dropout masks: refused, with what to do instead."""
    _, _, model = _models(dropout=0.1)
    with pytest.raises(NotImplementedError, match="dropout"):
        graph_segments(model)


def test_train_config_and_trainer_install_the_graphed_runner():
    """``train.compile: graphs`` is a config value; a Trainer puts the graphed runner on the bare
    model and trains with it: the same losses as the eager Trainer from the same seed (two steps,
    so the second loss also checks the first step's gradients); the default stays eager."""
    from dnc.config import ConfigError
    from dnc.training import Trainer, TrainConfig

    assert TrainConfig(compile="graphs").compile_target == "graphs"
    assert TrainConfig().compile is False
    with pytest.raises(ConfigError, match="graphs"):
        TrainConfig(compile="graph")
    common = dict(max_steps=2, batch_size=2, max_len=64, corpus_ratio=0.0, eval_interval=1000,
                  checkpoint_interval=1000, log_interval=1)
    losses: dict[str, list[float]] = {}
    runners = {}
    for mode in ("graphs", False):
        # graphs_min_segments=0: these 64-token sequences are 2 segments, under the default gate
        trainer = Trainer(TrainConfig(compile=mode, graphs_min_segments=0, **common), preset("tiny"),
                          device="cpu", progress=False)
        runners[mode] = unwrap(trainer.model).step_runner
        trainer.run(lambda step, metrics, _ckpt, mode=mode: losses.setdefault(str(mode), []).append(metrics["train/loss"]))
    assert isinstance(runners["graphs"], GraphedTrainSegments) and runners[False] is None
    assert runners["graphs"].compiled_steps > 0 and len(losses["graphs"]) == 2
    torch.testing.assert_close(losses["graphs"], losses["False"], rtol=1e-5, atol=1e-6)


def test_length_gate_sends_short_sequences_to_the_eager_step(capsys):
    """``graphs_min_segments``: ``train_step`` asks the graphed runner to pick a path per forward;
    sequences of fewer segments run the model's eager step (the runner takes no segment and says
    so once), others go through the graphed Function; both give the eager numbers."""
    from dnc.training import train_step

    cfg, eager, graphed = _models()
    graph_segments(graphed)
    runner = unwrap(graphed).step_runner
    runner.min_segments = 4
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.0)  # lr 0: both models keep their weights
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.0)
    for segments, path in ((2, "eager"), (3, "eager"), (4, "graphs"), (6, "graphs")):
        x, y = _batch(cfg, segments=segments, seed=segments)
        before = (runner.compiled_steps, runner.eager_steps)
        got = train_step(graphed, {"tokens": x, "targets": y}, opt_g, bf16=False)
        want = train_step(eager, {"tokens": x, "targets": y}, opt_e, bf16=False)
        assert runner.last_path == path, segments
        took = runner.compiled_steps - before[0]
        assert took == (segments if path == "graphs" else 0) and runner.eager_steps == before[1]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        torch.testing.assert_close(got["sample_losses"], want["sample_losses"], rtol=1e-5, atol=1e-6)
    assert runner.paths == {"graphs": 2, "eager": 2}
    # a partial last segment counts as a segment: 3 whole + 11 tokens = 4 segments
    x, y = _batch(cfg, segments=4)
    n = 3 * cfg.segment_len + 11
    train_step(graphed, {"tokens": x[:, :n], "targets": y[:, :n]}, opt_g, bf16=False)
    assert runner.last_path == "graphs"
    said = [ln for ln in capsys.readouterr().out.splitlines() if "graphs_min_segments=4" in ln]
    assert len(said) == 1 and "(this one: 2)" in said[0]


def test_trainer_sets_the_gate_from_the_config():
    """The Trainer gives the runner ``TrainConfig.graphs_min_segments`` (default 32, from the H200
    figures); with a sequence under it, training runs entirely through the eager step."""
    from dnc.training import Trainer, TrainConfig

    assert TrainConfig().graphs_min_segments == 32
    common = dict(max_steps=1, batch_size=2, max_len=64, corpus_ratio=0.0, eval_interval=1000,
                  checkpoint_interval=1000, log_interval=1, compile="graphs")
    trainer = Trainer(TrainConfig(**common), preset("tiny"), device="cpu", progress=False)
    runner = unwrap(trainer.model).step_runner
    assert runner.min_segments == 32
    trainer.run()
    assert runner.paths == {"graphs": 0, "eager": 1} and runner.compiled_steps == 0


def test_recompute_under_bf16_autocast():
    """Under bf16 autocast (the CPU's here) the segment runs and is recomputed in the caller's
    autocast, without the weight-cast cache as a graph must: equal to the fixed-shape step run
    eagerly under the same autocast. (With the cache on, eager sums a weight's bf16 grads over
    its uses in a segment before casting them; the recompute sums fp32 grads: 0.7% of the largest
    grad apart on this model.)"""
    cfg, ref, graphed = _models()
    compile_segments(ref, compile=False)
    graph_segments(graphed)
    batches = [_batch(cfg, seed=1)]
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)  # noqa: E731
    _assert_same_steps(_train_steps(graphed, batches, 1, amp()), _train_steps(ref, batches, 1, amp()))
    key = next(iter(graphed.step_runner.entries))
    assert key[3] == torch.bfloat16 and len(graphed.step_runner.entries) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graphs_match_eager(amp):
    """On CUDA: captured graphs (one pair for the run) against the eager forward in fp32 (the
    reference), and under bf16 autocast (weight-cast cache off, as the graphs run) against the
    same fixed-shape step run eagerly (``compile_segments(compile=False)``: the same ops, so only
    the graphs differ), over two optimizer steps through fill, compression and eviction."""
    cfg, ref, graphed = _models("cuda")
    if amp is not None:
        compile_segments(ref, compile=False)
    graph_segments(graphed)
    batches = [_batch(cfg, "cuda", seed=1), _batch(cfg, "cuda", seed=2)]
    ctx = (lambda: torch.autocast("cuda", dtype=amp, cache_enabled=False)) if amp is not None else (lambda: None)
    got = _train_steps(graphed, batches, amp=ctx())
    want = _train_steps(ref, batches, amp=ctx())
    tol = dict(rtol=1e-4, atol=1e-5) if amp is None else dict(rtol=1e-3, atol=1e-4)
    _assert_same_steps(got, want, **tol)
    runner = graphed.step_runner
    assert runner.compiled_steps == 2 * SEGMENTS and runner.eager_steps == 0
    assert len(runner.entries) == 1 and all(e.cuda and e.bwd_graph is not None for e in runner.entries.values())
