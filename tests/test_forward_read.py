"""DNCConfig.forward_read: a temporal-link read that follows the previous position's read one slot on.

Invariants: off by default and needs self_read; a fresh model (gate scale 0) computes exactly what
the model without it computes; the forward read equals an explicit reference (softmax of the
previous position's query over the same keys, causally masked, times the successor's value), dense
and top-k; successors follow write order, which L0 keeps after writes, compression, eviction and
compaction (slot provenance); one forward equals uneven chunks and token-by-token decoding across
commits; the paths that do not support it yet say so.
"""

from __future__ import annotations

import pytest
import torch

from decode_helpers import assert_causal, generate_and_greedy_calls
from dnc.config import ConfigError, preset

SMALL_BANK = dict(segment_len=32, l0_slots=32, l1_slots=16, l2_slots=8, self_read=True)  # overflow after 2 segments


def make(seed: int = 0, **kw):
    from dnc.model import DNC

    torch.manual_seed(seed)
    return DNC(preset("tiny", **{**SMALL_BANK, **kw})).eval()


def mem_blocks(model):
    return [b for b in model.blocks if b.mem is not None]


def open_gates(model, seed: int = 1) -> None:
    """Non-zero gate scales and gate weights (the scale starts at zero), and non-zero slot
    embeddings, so the forward read shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in mem_blocks(model):
            m = blk.mem
            m.fwd_scale.copy_(torch.randn(m.fwd_scale.shape, generator=g) * 2)
            m.fwd_gate.weight.copy_(torch.randn(m.fwd_gate.weight.shape, generator=g) * 0.3)
            m.level_emb.copy_(torch.randn(m.level_emb.shape, generator=g) * 0.3)
            m.age_emb.copy_(torch.randn(m.age_emb.shape, generator=g) * 0.3)


# ================================================================================== config
def test_config_needs_self_read_and_is_off_by_default():
    with pytest.raises(ConfigError, match="forward_read .* needs self_read"):
        preset("tiny", forward_read=True)
    assert preset("tiny", self_read=True, forward_read=True).forward_read
    assert not preset("tiny", self_read=True).forward_read


def test_parameters_only_when_on():
    off, on = make(), make(forward_read=True)
    extra = set(on.state_dict()) - set(off.state_dict())
    assert set(off.state_dict()) <= set(on.state_dict())
    assert extra == {f"blocks.{i}.mem.{n}" for i, b in enumerate(on.blocks) if b.mem is not None
                     for n in ("fwd_scale", "fwd_gate.weight", "fwd_gate.bias")}


@pytest.mark.parametrize("mem_topk", [0, 24])
def test_fresh_model_equals_model_without_it_exactly(mem_topk):
    """Gate scale 0 at init: the same weights with and without forward_read give bit-identical
    logits over 100 tokens (commits, compression, eviction)."""
    off, on = make(mem_topk=mem_topk), make(forward_read=True, mem_topk=mem_topk)
    on.load_state_dict(off.state_dict(), strict=False)
    x = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = off(x).logits, on(x).logits
    assert torch.equal(a, b)
    open_gates(on)
    with torch.no_grad():
        assert not torch.allclose(on(x).logits, a, atol=1e-3), "opened gates must change the output"


# ================================================================================== the read itself
def test_successor_values_follow_write_order():
    """Values numbered by key index: null -> none, L0 i -> i+1, L0's last -> the first write slot,
    L1/L2 within the level, the last of L1, L2 and of the writes -> none."""
    from dnc.memory.read import successor_values

    sizes, n_self = (4, 2, 3), 5
    n = 1 + sum(sizes) + n_self
    vals = torch.arange(1, n + 1, dtype=torch.float32).view(1, 1, n, 1)  # value = index + 1 (0 = none)
    got = successor_values(vals, sizes, n_self).view(-1).long().tolist()
    idx = lambda i: i + 1  # noqa: E731  (value of key index i)
    want = [0,                                     # null
            idx(2), idx(3), idx(4), idx(10),       # L0 1..4: next, last -> first write (index 10)
            idx(6), 0,                             # L1 5..6
            idx(8), idx(9), 0,                     # L2 7..9
            idx(11), idx(12), idx(13), idx(14), 0]  # writes 10..14
    assert got == want
    # an empty L0 points nothing into the writes
    got = successor_values(vals[:, :, :1 + 5 + n_self], (0, 2, 3), n_self).view(-1).long().tolist()
    assert got == [0, idx(2), 0, idx(4), idx(5), 0, idx(7), idx(8), idx(9), idx(10), 0]


@pytest.mark.parametrize("topk", [0, 6])
def test_forward_read_equals_explicit_reference(topk):
    """MemoryRead.forward_read over a bank of 3 levels and 9 write slots (a chunk of 4 at segment
    position 5) against probs() of the previous position's query (write_prev's at the chunk's first
    position), masked to write slots <= t-1, times the successor values."""
    from dnc.memory import StateBank
    from dnc.memory.read import successor_values

    torch.manual_seed(0)
    m = make(forward_read=True)
    mem = mem_blocks(m)[0].mem
    b, h, d = 2, m.config.n_heads, m.config.head_dim
    bank = StateBank.empty(b, h, d, (32, 16, 8), "cpu", torch.float32)
    levels = bank.levels
    for lvl, n in zip(levels, (5, 3, 2)):  # a bank with all three levels filled by hand
        lvl.keys = torch.nn.functional.normalize(torch.randn(b, h, n, d), dim=-1)
        lvl.values = torch.randn(b, h, n, d)
        lvl.salience, lvl.age = torch.rand(b, n) + 0.5, torch.randint(0, 20, (b, n)).float()
        lvl.access, lvl.last_access = torch.zeros(b, n), torch.zeros(b, n)
        lvl.valid = torch.ones(b, n, dtype=torch.bool)
    bank.levels = levels
    view = mem.build_view(bank)
    hs = torch.randn(b, 9, m.config.d_model)                        # the segment's inputs 0..8
    kv, _ = mem.write_kv_packed(hs, h_before=torch.randn(b, 1, m.config.d_model))
    past, t = 5, 4
    hm = hs[:, past:]
    q = mem.augment_queries(hm, mem.queries(hm))
    sk, sv = mem.self_slots(kv, q.dtype)
    keys, vals = torch.cat([view.keys, sk], 2), torch.cat([view.values, sv], 2)
    got = mem.forward_read(hm, hs[:, past - 1:past], q, keys, vals, view, past, topk)

    qp = mem.augment_queries(hs[:, past - 1:past + t - 1], mem.queries(hs[:, past - 1:past + t - 1]))
    n_view = 1 + view.n_slots
    mask = torch.ones(1, 1, t, n_view + past + t, dtype=torch.bool)
    for i in range(t):
        mask[..., i, n_view + past + i:] = False                     # previous position: writes <= past+i-1
    probs = mem.probs(qp, keys, topk, mask)
    want = torch.einsum("bhts,bhsd->bhtd", probs, successor_values(vals, view.sizes, past + t))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_stream_start_position_has_no_forward_read():
    """Without a previous token (write_prev None) position 0's forward read is zero, the others not."""
    m = make(forward_read=True)
    mem = mem_blocks(m)[0].mem
    view = mem.build_view(m.init_state(1).layers[1].bank)
    hs = torch.randn(1, 6, m.config.d_model)
    kv, _ = mem.write_kv_packed(hs)
    q = mem.augment_queries(hs, mem.queries(hs))
    sk, sv = mem.self_slots(kv, q.dtype)
    fwd = mem.forward_read(hs, None, q, torch.cat([view.keys, sk], 2), torch.cat([view.values, sv], 2), view, 0)
    assert torch.equal(fwd[:, :, 0], torch.zeros_like(fwd[:, :, 0]))
    assert fwd[:, :, 1:, :m.config.head_dim].norm(dim=-1).gt(0).all()


def test_l0_stays_in_write_order_through_writes_compaction_and_eviction():
    """Slot provenance (StateBank.track_sources): after every commit (compression into L1/L2 and
    eviction from L2 included) and after compact_state, every row's valid L0 slots cover strictly
    increasing token positions. After every commit the last L0 slot is the last token written
    (a write appends after the kept slots), which is what makes the segment's first write slot its
    successor. (compact_state picks by keep score, so it may compress L0's newest slots: then that
    link, like any L0 link across a compressed slot, skips the compressed tokens.)"""
    m = make(forward_read=True, protect_salient=2.0, write_importance=1.0)
    open_gates(m)
    x = torch.randint(0, 256, (2, 32 * 8), generator=torch.Generator().manual_seed(3))
    state = m.init_state(2)
    for _, bank in state.banks():
        bank.track_sources(1)
    evicted = 0
    with torch.no_grad():
        for s in range(8):
            evicted += m(x[:, 32 * s:32 * (s + 1)], state=state).metrics["mem/evictions"]
            for compacted in (False, True) if s == 5 else (False,):
                if compacted:
                    m.compact_state(state, keep_l0=16)
                for _, bank in state.banks():
                    l0 = bank.levels[0]
                    assert l0.n == (16 if compacted else 32)
                    for r in range(2):
                        lo = l0.source[0, r][l0.valid[r]]
                        assert torch.all(lo[1:] > lo[:-1]), (s, r, lo)
                        if not compacted:
                            assert int(l0.source[1, r, -1]) == 32 * (s + 1) - 1 and bool(l0.valid[r, -1])
    assert evicted > 0 and state.banks()[0][1].levels[2].n > 0, "the test must reach L2 and evict"


# ================================================================================== the model
@pytest.mark.parametrize("kv_window,write_importance,mem_topk", [(0, 0.0, 0), (8, 2.0, 0), (0, 0.0, 24)])
def test_full_equals_chunks_equals_token_by_token(kv_window, write_importance, mem_topk):
    """One forward over 100 tokens (3+ segments of 32: commits, compression, eviction) equals uneven
    chunks and token-by-token decoding through the state, float32, 1e-5, with the gates open."""
    m = make(forward_read=True, kv_window=kv_window, write_importance=write_importance, mem_topk=mem_topk)
    open_gates(m)
    x = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(x, return_state=True)
        for name, sizes in {"chunks": [7, 20, 9, 33, 31], "tokens": [1] * 100}.items():
            state = m.init_state(2)
            steps, pos = [], 0
            for n in sizes:
                steps.append(m(x[:, pos:pos + n], state=state).logits)
                pos += n
            torch.testing.assert_close(torch.cat(steps, 1), full.logits, rtol=1e-5, atol=1e-5, msg=name)
    assert full.state.banks()[0][1].levels[2].n > 0, "the test must exercise compression into L2"


def test_causal():
    """Changing token j never changes logits before j, and does change them from j on."""
    m = make(forward_read=True)
    open_gates(m)
    x = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(2))
    assert_causal(m, x, (3, 31, 32, 45, 79))


def test_gate_scale_gets_a_gradient_from_zero():
    """At init (scale 0) the loss still reaches the scale, so training can open the gate."""
    m = make(forward_read=True).train()
    x = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(4))
    m(x[:, :-1], targets=x[:, 1:]).loss.backward()
    for blk in mem_blocks(m):
        assert blk.mem.fwd_scale.grad is not None and blk.mem.fwd_scale.grad.abs().sum() > 0


# ================================================================================== ragged decode
def test_successor_index_of_a_padded_view_matches_successor_values():
    """dnc.ragged's successor map over [null | bank | padding | writes] picks, for every slot of the
    bank and the writes, the value successor_values gives over the unpadded view."""
    from dnc.memory.read import successor_values
    from dnc.ragged import successor_index

    sizes, smax, seg = (5, 3, 2), 14, 6
    idx = successor_index(sizes, smax, seg)
    unpadded = list(range(1 + sum(sizes))) + list(range(smax + 1, smax + 1 + seg))  # view index per unpadded key
    vals = torch.tensor([float(i) for i in unpadded]).view(1, 1, -1, 1) + 1.0      # value = view index + 1
    want = successor_values(vals, sizes, seg).view(-1) - 1.0                        # -1 = none
    got = idx[torch.tensor(unpadded)].float()
    got = torch.where(got == 0, torch.full_like(got, -1.0), got)
    assert got.tolist() == want.tolist()
    assert idx[1 + sum(sizes):smax + 1].eq(0).all()                                 # padding: none


@pytest.mark.parametrize("mem_topk", [0, 24])
def test_ragged_step_equals_each_row_alone(mem_topk):
    """Four rows at different positions and layouts in one RaggedBatch, 50 greedy steps (segment
    commits, compression, eviction): every step's logits match the row decoded alone through model
    calls, with the gates open."""
    from dnc.ragged import RaggedBatch, ragged_decode_step

    m = make(forward_read=True, mem_topk=mem_topk, write_importance=2.0)
    open_gates(m)
    g = torch.Generator().manual_seed(5)
    rows, want = [], []
    with torch.no_grad():
        for n in (3, 30, 45, 70):
            x = torch.randint(0, 256, (1, n), generator=g)
            st, ref = m.init_state(1), m.init_state(1)
            lg = m(x, state=st, last_logits_only=True).logits[0, -1]
            m(x, state=ref)
            rows.append((st, lg))
            toks, lgs, cur = [], [], lg
            for _ in range(50):
                toks.append(int(cur.argmax()))
                cur = m(torch.tensor([[toks[-1]]]), state=ref, last_logits_only=True).logits[0, -1]
                lgs.append(cur)
            want.append((toks, lgs))
        batch = RaggedBatch(m, 4)
        for i, (st, lg) in enumerate(rows):
            batch.insert(i, st, lg, m)
        commits = 0
        for t in range(50):
            batch.tokens[:] = torch.tensor([w[0][t] for w in want])
            lg = ragged_decode_step(m, batch)
            commits += batch.after_step(m)["committed"]
            for i, w in enumerate(want):
                torch.testing.assert_close(lg[i], w[1][t], rtol=1e-4, atol=1e-4, msg=f"row {i} step {t}")
    assert commits >= 4


def test_generate_equals_greedy_model_calls():
    """DNC.generate (the batched decoder's ragged step) equals greedy decoding through model calls
    from a state 16 tokens into its second segment, for 60 tokens."""
    m = make(forward_read=True)
    open_gates(m)
    x = torch.randint(0, 256, (1, 52), generator=torch.Generator().manual_seed(6))
    got, want, s_gen, s_ref = generate_and_greedy_calls(m, x, prefix=48, new_tokens=60)
    assert got == want
    assert s_gen.segments == s_ref.segments >= 3


# ================================================================================== unsupported paths
def test_unsupported_paths_say_so():
    from dnc.cuda_graphs import DecodeGraphs, SegmentGraphs
    from dnc.training.compiled_segment import CompiledTrainSegments

    m = make(forward_read=True)
    for make_path, where in [(lambda: SegmentGraphs(m), "SegmentGraphs"), (lambda: DecodeGraphs(m), "DecodeGraphs"),
                             (lambda: CompiledTrainSegments(m, compile=False), "compiled training segment")]:
        with pytest.raises(NotImplementedError, match=f"forward_read is not supported by .*{where}"):
            make_path()


def test_enable_cuda_graphs_keeps_a_forward_read_model_eager():
    """A forward_read checkpoint still evaluates and serves where graphs are switched on (a GPU):
    enable_cuda_graphs warns and leaves both runners off."""
    m = make(self_read=True, forward_read=True)
    with pytest.warns(UserWarning, match="forward_read has no CUDA-graph path"):
        m.enable_cuda_graphs()
    assert m.decode_runner is None and m.step_runner is None
