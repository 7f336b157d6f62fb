"""Model invariants: causality, incremental == full forward, dense == top-k, gradients, baseline."""

from __future__ import annotations

import math

import pytest
import torch

from dnc.config import ConfigError, DNCConfig, preset
from dnc.model import DNC, DNCState


def make(seed=0, **kw) -> DNC:
    torch.manual_seed(seed)
    cfg = preset("tiny", **{"segment_len": 16, "l0_slots": 32, "l1_slots": 16, "l2_slots": 8, **kw})
    return DNC(cfg).eval()


@pytest.mark.parametrize("kv_window", [0, 8])
def test_causality(kv_window):
    """Changing token j never changes logits at positions < j (within and across segments)."""
    m = make(kv_window=kv_window)
    x = torch.randint(0, 256, (1, 70))
    base = m(x).logits
    for j in (5, 16, 33, 69):
        y = x.clone()
        y[0, j] = (y[0, j] + 1) % 256
        out = m(y).logits
        torch.testing.assert_close(out[:, :j], base[:, :j])
        assert not torch.allclose(out[:, j:], base[:, j:])


@pytest.mark.parametrize("kv_window,write_importance", [(0, 0.0), (8, 0.0), (0, 2.0)])
def test_incremental_equals_full(kv_window, write_importance):
    """Token-by-token decoding through the state equals one full forward, across segment
    boundaries, compressions and evictions (70 tokens = 4+ segments of 16, banks overflow)."""
    m = make(kv_window=kv_window, write_importance=write_importance)
    if write_importance:  # non-zero importance weights, so the keep scores really use them
        with torch.no_grad():
            for blk in m.blocks:
                if blk.mem is not None:
                    blk.mem.importance_w.normal_(0.0, 1.0)
    x = torch.randint(0, 256, (2, 90))
    full = m(x).logits
    state = m.init_state(2)
    steps = []
    with torch.no_grad():
        # uneven chunks: prefill 7, then 1-token steps, then a chunk crossing a boundary
        pos = 0
        for n in [7] + [1] * 30 + [21] + [1] * 32:
            steps.append(m(x[:, pos:pos + n], state=state).logits)
            pos += n
    assert pos == 90
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    assert state.banks()[0][1].levels[1].n > 0, "test must exercise compression"


def test_write_keys_do_not_depend_on_where_a_segment_ends():
    """A slot's key carries the previous token's query projection; a segment's first slot takes
    the previous segment's last token (the state's ``prev_write``), so a fact that straddles a
    segment boundary is written as if it did not."""
    m = make()
    mem = next(b.mem for b in m.blocks if b.mem is not None)
    h = torch.randn(2, 16, m.config.d_model)
    whole, _ = mem.write_kv_packed(h)
    first, _ = mem.write_kv_packed(h[:, :7])
    rest, _ = mem.write_kv_packed(h[:, 7:], h_before=h[:, 6:7])
    torch.testing.assert_close(torch.cat([first, rest], 3), whole)
    state = m.init_state(2)
    m(torch.randint(0, 256, (2, 20)), state=state)  # one commit, 4 tokens into the next segment
    for blk, ls in zip(m.blocks, state.layers):
        assert (ls.prev_write is not None) == (blk.mem is not None)


def test_state_export_roundtrip_continues_identically():
    m = make()
    x = torch.randint(0, 256, (1, 75))
    s1 = m.init_state(1)
    m(x[:, :41], state=s1)
    blob = s1.export()
    s2 = DNCState.from_export({k: v.clone() for k, v in blob.items()}, m.config)
    a = m(x[:, 41:], state=s1).logits
    b = m(x[:, 41:], state=s2).logits
    torch.testing.assert_close(a, b)


def test_state_import_rejects_mismatch():
    m = make()
    s = m.init_state(1)
    m(torch.randint(0, 256, (1, 40)), state=s)
    blob = s.export()
    other = preset("tiny", segment_len=16, l0_slots=32, l1_slots=16, l2_slots=8, n_heads=8)
    with pytest.raises(ValueError, match="n_heads"):
        DNCState.from_export(blob, other)
    bad = dict(blob)
    bad["format_version"] = torch.tensor(99)
    with pytest.raises(ValueError, match="version"):
        DNCState.from_export(bad, m.config)


def test_dense_read_equals_topk_when_k_covers_all_slots():
    m = make()
    s = m.init_state(2)
    m(torch.randint(0, 256, (2, 64)), state=s)
    blk = m.blocks[1]
    view = blk.mem.build_view(s.layers[1].bank)
    h = torch.randn(2, 10, m.config.d_model)
    q = blk.mem.augment_queries(h, blk.mem.queries(h))
    dense = torch.nn.functional.scaled_dot_product_attention(q, view.keys, view.values, scale=1.0)
    topk = blk.mem._read_topk(q, view.keys, view.values, view.keys.shape[2])
    torch.testing.assert_close(dense, topk, rtol=1e-5, atol=1e-5)
    # and the model-level switch agrees too
    m2 = make(mem_topk=10_000)
    m2.load_state_dict(m.state_dict())
    x = torch.randint(0, 256, (1, 60))
    torch.testing.assert_close(m(x).logits, m2(x).logits, rtol=1e-5, atol=1e-5)
    # a real top-k (k < slots) changes the read
    m3 = make(mem_topk=4)
    m3.load_state_dict(m.state_dict())
    assert not torch.allclose(m(x).logits, m3(x).logits)


def test_gradients_reach_compressor_and_router():
    m = make().train()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.randint(0, 256, (2, 128))
    for _ in range(2):  # compressor projections start at zero: one step opens the path
        opt.zero_grad()
        out = m(x, targets=x.roll(-1, 1))
        assert out.recon_loss.item() > 0
        out.loss.backward()
        opt.step()
    for name in ("compressors.0.out_k.weight", "compressors.0.q_proj.weight", "compressors.1.out_v.weight",
                 "blocks.1.mem.router.proj.weight", "blocks.1.mem.k_write.weight", "blocks.1.mem.level_emb"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


def test_baseline_is_plain_transformer():
    cfg = preset("tiny").baseline(seq_len=96)
    m = DNC(cfg)
    assert cfg.memory_layer_ids == () and not any(b.mem is not None for b in m.blocks)
    x = torch.randint(0, 256, (1, 96))
    out = m(x, return_state=True)
    assert out.state.nbytes() == 0 and out.logits.shape == (1, 96, cfg.vocab_size)


def test_generate_and_sampling_options():
    m = make()
    g = torch.Generator().manual_seed(1)
    ids = m.generate([1, 2, 3], max_new_tokens=10, temperature=0.0)
    assert len(ids) == 10 and ids == m.generate([1, 2, 3], max_new_tokens=10, temperature=0.0)
    s = m.generate([1, 2, 3], max_new_tokens=10, temperature=1.0, top_k=5, top_p=0.9, generator=g)
    assert len(s) == 10
    stop = ids[2]
    out = m.generate([1, 2, 3], max_new_tokens=10, temperature=0.0, stop_tokens=(stop,))
    assert out[-1] == stop and len(out) == ids.index(stop) + 1


def test_config_validation_messages():
    with pytest.raises(ConfigError, match="divisible by n_heads"):
        DNCConfig(d_model=130, n_heads=4)
    with pytest.raises(ConfigError, match="l0_slots"):
        DNCConfig(segment_len=64, l0_slots=32)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ConfigError, match="unknown config fields"):
        DNCConfig.from_dict({"d_modle": 3})
    assert DNCConfig.from_dict(preset("small").to_dict()) == preset("small")
    with pytest.raises(ConfigError, match="mem_temperature"):
        DNCConfig(mem_temperature=-1.0)
    with pytest.raises(ConfigError, match="write_importance"):
        DNCConfig(write_importance=-0.5)


def test_read_temperature_grows_with_the_bank():
    """Auto temperature 1.5 ln(S+1): tiny keeps ~8, a bigger bank starts sharper; an explicit value wins."""
    tiny, small = preset("tiny"), preset("small")
    assert tiny.read_temperature == pytest.approx(1.5 * math.log(tiny.bank_slots + 1))
    assert 7.5 < tiny.read_temperature < 8.5 < 12 < small.read_temperature
    assert preset("tiny", mem_temperature=5.0).read_temperature == 5.0
    model = DNC(preset("tiny", mem_temperature=5.0))
    assert all(bool((b.mem.q_scale.detach() == 5.0).all()) for b in model.blocks if b.mem is not None)


def test_full_width_rope_equals_half_table_reference():
    from dnc.layers import apply_rope, apply_rope_full, rope_table, rope_table_full

    x = torch.randn(2, 3, 40, 16)
    cos, sin = rope_table(40, 16, 10000.0, x.device)
    cos2, sin2 = rope_table_full(40, 16, 10000.0, x.device)
    torch.testing.assert_close(apply_rope_full(x, cos2[:40], sin2[:40]), apply_rope(x, cos[:40], sin[:40]))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.gpu)])
def test_compiled_blocks_match_eager_training_step(backend):
    """``dnc.parallel.compile_blocks`` (``TrainConfig.compile``) computes the eager training step:
    loss and every gradient over segments that fill, compress and evict from the bank. CI traces
    the graphs with aot_eager (inductor's CPU code generation of every shape family takes minutes
    on 2 cores); the GPU machine runs the inductor case (``-m gpu``)."""
    pytest.importorskip("torch._inductor")
    from dnc.parallel import compile_blocks

    torch.manual_seed(0)
    cfg = preset("tiny", l0_slots=32, l1_slots=16, l2_slots=8, kv_window=8)
    eager = DNC(cfg).train()
    compiled = DNC(cfg).train()
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled, backend=backend)
    x = torch.randint(0, cfg.vocab_size, (2, 6 * cfg.segment_len))

    def loss_and_grads(model):
        out = model(x, targets=x)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out.loss.detach(), out.metrics, grads

    want_loss, want_metrics, want_grads = loss_and_grads(eager)
    for _ in range(2):  # the first call compiles; the second reuses the compiled graphs
        loss, metrics, grads = loss_and_grads(compiled)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
        assert metrics["mem/evictions"] == want_metrics["mem/evictions"] > 0
        assert grads.keys() == want_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rope_matches_float32_autograd_bit_for_bit(dtype):
    """``apply_rope_full`` on a bf16/fp16 input (autocast's q and k) casts once each way, yet gives
    exactly the numbers of the float32 round trip (``x.float()`` ... ``.to(dtype)``), forward and backward."""
    from dnc.layers import apply_rope_full, rope_table_full

    torch.manual_seed(0)
    cos, sin = rope_table_full(16, 32, 10000.0, torch.device("cpu"))
    x = torch.randn(2, 2, 4, 16, 32).to(dtype).requires_grad_()
    g = torch.randn(2, 2, 4, 16, 32).to(dtype)
    y = apply_rope_full(x, cos, sin)
    y.backward(g)
    got = x.grad
    x.grad = None
    xf = x.float()
    want = (xf * cos + xf.roll(16, -1) * sin).to(dtype)
    want.backward(g)
    assert y.dtype == got.dtype == dtype
    assert torch.equal(y, want) and torch.equal(got, x.grad)
