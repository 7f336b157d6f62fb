"""Decode attention over each row's own KV length (``RaggedBatch.kv_attention = "flex"``): the block
mask stands for exactly "row b sees keys 0 .. length[b]", and the flex step computes what the masked
SDPA step computes (logits close in float32, the same greedy tokens) over many steps: across segment
boundaries (the carried KV window rolls), rows at different lengths, rows joining and leaving.

On CPU flex_attention runs eagerly (it reads every key, so these tests check the answer, not the
cost: the block mask is checked key by key below). The ``gpu`` tests run the compiled kernel inside
a captured CUDA graph: ``python -m pytest -m gpu tests/test_decode_kv_length.py``."""

from __future__ import annotations

import pytest
import torch

from dnc.attention import LengthMask
from dnc.config import preset
from dnc.cuda_graphs import DecodeGraphs
from dnc.generate import BatchDecoder, DecodeRow, SamplingParams
from dnc.model import DNC
from dnc.ragged import RaggedBatch, bucket_for, ragged_decode_step
from decode_helpers import assert_no_host_sync, history_state, prompt_ids

SEG = 16
# eager flex on CPU says once that it is unfused: known, and what these tests mean to run
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(device="cpu", **kw) -> DNC:
    torch.manual_seed(0)
    cfg = preset("tiny", segment_len=SEG, l0_slots=32, l1_slots=16, l2_slots=8, **kw)
    return DNC(cfg).to(device).eval()


@pytest.mark.parametrize("q_blocks", [True, False])
@pytest.mark.parametrize("max_len,block", [(24, 8), (24, 5), (16, 128), (40, 16)])
def test_block_mask_is_each_rows_length(max_len, block, q_blocks):
    """Key by key (full blocks, the one partial block through mask_mod, the rest skipped), the block
    mask is ``key <= length`` for every length 0 .. Lmax-1: block boundaries, a block larger than
    Lmax, a block that does not divide it."""
    lengths = torch.arange(max_len)
    lm = LengthMask(lengths, max_len, block, q_blocks=q_blocks)
    want = torch.arange(max_len).view(1, -1) <= lengths.view(-1, 1)
    assert torch.equal(lm.dense(), want)
    bm = lm.block_mask()
    # the kernel visits ceil((length+1) / block) blocks of a row, not all of them
    visits = (bm.kv_num_blocks + bm.full_kv_num_blocks).view(-1)
    assert visits.tolist() == [-(-(n + 1) // block) for n in range(max_len)]
    # the mask reads the length when it runs: the same object serves the next step
    lengths.add_(1).clamp_(max=max_len - 1)
    assert torch.equal(lm.dense(), torch.arange(max_len).view(1, -1) <= lengths.view(-1, 1))


def _assert_mask_in_range(bm, length, max_len, block):
    """Every index the block mask hands the kernel is in range for what it indexes: block counts in
    [0, NB] (at most one partial block), listed block ids in [0, NB) and distinct, each listed block
    starting inside the buffer (< Lmax) and holding only keys the row may see (full) or key
    ``length`` itself (partial)."""
    c, nb = length.shape[0], -(-max_len // block)
    num, idx = bm.kv_num_blocks.view(c), bm.kv_indices.view(c, -1)
    fnum, fidx = bm.full_kv_num_blocks.view(c), bm.full_kv_indices.view(c, -1)
    assert idx.shape[1] == fidx.shape[1] == nb
    assert ((num >= 0) & (num <= 1)).all() and ((fnum >= 0) & (fnum <= nb)).all() and (num + fnum <= nb).all()
    assert ((idx >= 0) & (idx < nb)).all() and ((fidx >= 0) & (fidx < nb)).all()
    for b, n in enumerate(length.tolist()):
        full = fidx[b, :fnum[b]].tolist()
        assert full == list(range((n + 1) // block)), (b, n, full)
        part = idx[b, :num[b]].tolist()
        assert part == ([] if (n + 1) % block == 0 else [n // block]), (b, n, part)
        assert all(i * block < max_len for i in full + part)
    for name in ("q_num_blocks", "full_q_num_blocks", "q_indices", "full_q_indices"):
        t = getattr(bm, name)  # compute_q_blocks: a one-token query is one Q block (counts 0 / 1, index 0)
        if t is not None:
            assert ((t >= 0) & (t <= (0 if "indices" in name else 1))).all(), name


def test_block_mask_indices_are_in_range():
    """For every KV buffer a config allows (Lmax = kv_window + segment_len, any length from 1; here
    1 .. 48) and blocks that divide it, do not, equal it or exceed it, at every length 0 .. Lmax-1:
    the block mask's indices are in range (see _assert_mask_in_range). Rules out the suspects of
    session 19's GPU assert (a partial last block, a block count rounded past the buffer)."""
    for max_len in range(1, 49):
        for block in (1, 3, 4, 5, 8, 16, 24, 128):
            lengths = torch.arange(max_len)
            bm = LengthMask(lengths, max_len, block).block_mask()
            _assert_mask_in_range(bm, lengths, max_len, block)
    lengths = torch.arange(24)
    _assert_mask_in_range(LengthMask(lengths, 24, 16, q_blocks=True).block_mask(), lengths, 24, 16)


def test_kv_block_must_be_a_positive_int():
    model = _model()
    rb = _batch(model, _states(model, 1), 1, "flex", kv_block=0)
    with torch.no_grad(), pytest.raises(ValueError, match="kv_block"):
        ragged_decode_step(model, rb)


def _states(model, n, history=None):
    """Rows at different positions (fresh, mid-segment, past several boundaries) with next logits.
    ``history[i]``: row i's tokens before its 3 prompt tokens (default ``13 i + 2``; row 0 fresh)."""
    out = []
    for i in range(n):
        h = (0 if i == 0 else 13 * i + 2) if history is None else history[i]
        st = model.init_state(1) if h == 0 else history_state(model, 30 + i, h)
        with torch.no_grad():
            lg = model(torch.tensor([prompt_ids(40 + i, 3)], device=model.device), state=st,
                       last_logits_only=True, metrics=False).logits[0, -1]
        out.append((st, lg))
    return out


def _batch(model, states, capacity, kv_attention, runner=None, kv_block=4):
    rb = runner.acquire(capacity) if runner is not None else RaggedBatch(model, capacity)
    rb.kv_attention, rb.kv_block = kv_attention, kv_block
    for i, (state, logits) in enumerate(states):
        rb.insert(i, state.select([0]), logits, model)
    return rb


@pytest.mark.parametrize("kw", [{}, {"kv_window": 8}, {"self_read": True, "kv_window": 8}],
                         ids=["no-window", "kv-window", "self-read-kv-window"])
def test_flex_step_equals_masked_step(kw, one_torch_thread):
    """Five rows at different lengths, 40 greedy tokens in lock step (every row crosses at least two
    segment boundaries; with kv_window the carried window rolls): the flex step's logits equal the
    masked step's every step, and so do the tokens and the final states. Blocks of 4 keys: a row
    reads 1 .. 6 of them."""
    model = _model(**kw)
    states = _states(model, 5)
    rb_m = _batch(model, states, 8, "masked")
    rb_f = _batch(model, states, 8, "flex")
    n, steps, commits = len(states), 40, 0
    with torch.no_grad():
        for t in range(steps):
            toks_m, toks_f = rb_m.logits[:n].argmax(-1), rb_f.logits[:n].argmax(-1)
            assert toks_f.tolist() == toks_m.tolist(), f"step {t}"
            rb_m.tokens[:n], rb_f.tokens[:n] = toks_m, toks_f
            lg_m, lg_f = ragged_decode_step(model, rb_m), ragged_decode_step(model, rb_f)
            rb_m.logits.copy_(lg_m)
            rb_f.logits.copy_(lg_f)
            commits += rb_m.after_step(model)["committed"]
            rb_f.after_step(model)
            torch.testing.assert_close(lg_f[:n], lg_m[:n], atol=1e-5, rtol=1e-5, msg=f"step {t}")
    assert commits >= n * (steps // SEG)
    for i in range(n):
        a, b = rb_f.extract(i).export(), rb_m.extract(i).export()
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-5, msg=k)


def test_decoder_with_flex_equals_masked_as_rows_join_and_leave(monkeypatch, one_torch_thread):
    """BatchDecoder(kv_attention="flex"): rows join one per step (buckets grow 1 .. 8) and leave as
    they finish (buckets shrink): the same greedy tokens as the masked default."""
    monkeypatch.setattr(RaggedBatch, "KV_BLOCK", 4)  # several blocks per row (Lmax 24)
    model = _model(kv_window=8)

    def rows():
        return [DecodeRow(prompt_ids(400 + i, 3 + i % 4), None if i == 0 else history_state(model, 500 + i, 5 * i + 1),
                          10 + 3 * i, SamplingParams(0.0)) for i in range(6)]

    got = {}
    for kv in ("masked", "flex"):
        dec = BatchDecoder(model, shrink_after=1, kv_attention=kv)
        rs = rows()
        dec.add(rs[:1])
        caps = set()
        for r in rs[1:]:
            dec.step()
            dec.add([r])
        while dec.running:
            for b in dec.batches:
                assert b.rb.kv_attention == kv and b.rb.kv_block == 4
                caps.add(b.rb.capacity)
            dec.step()
        assert {1, 2, 4, 8} <= caps
        got[kv] = [r.tokens for r in rs]
    assert got["flex"] == got["masked"]
    assert all(len(t) == 10 + 3 * i for i, t in enumerate(got["flex"]))


def test_unknown_kv_attention_is_refused():
    model = _model()
    rb = _batch(model, _states(model, 1), 1, "dense")
    with torch.no_grad(), pytest.raises(ValueError, match="kv_attention"):
        ragged_decode_step(model, rb)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("kv_block", [16, 128])  # (flex_decoding's KV tile is at most the block: >= 16)
def test_flex_graph_replay_equals_eager_and_masked(autocast, kv_block):
    """The compiled flex step captured in a CUDA graph (compiled during the eager warm-up, then
    captured and replayed) gives the eager flex step's logits and the masked step's tokens, 40
    steps over rows of different lengths, with segment commits between replays."""
    model = _model("cuda", kv_window=8)
    states = _states(model, 5)
    runner = DecodeGraphs(model)
    rb_g = _batch(model, states, 8, "flex", runner, kv_block)
    rb_e = _batch(model, states, 8, "flex", kv_block=kv_block)
    rb_m = _batch(model, states, 8, "masked")
    n = len(states)
    tol = 3e-2 if autocast else 1e-4
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)
    with torch.no_grad(), amp:
        for t in range(40):
            toks = rb_m.logits[:n].argmax(-1)
            for rb in (rb_g, rb_e, rb_m):
                rb.tokens[:n] = toks
            lg_g, lg_e, lg_m = runner.step(rb_g), ragged_decode_step(model, rb_e), ragged_decode_step(model, rb_m)
            for rb, lg in ((rb_g, lg_g), (rb_e, lg_e), (rb_m, lg_m)):
                rb.logits.copy_(lg)
                rb.after_step(model)
            torch.testing.assert_close(lg_g[:n], lg_e[:n], atol=tol, rtol=tol, msg=f"graph vs eager, step {t}")
            torch.testing.assert_close(lg_g[:n], lg_m[:n], atol=tol, rtol=tol, msg=f"flex vs masked, step {t}")
    assert runner.replays >= 38 and len(runner.graphs) == 1


# Rows for the steps that run with no ``after_step`` between them (assert_no_host_sync: 1 + 3 steps).
# Session 19's device-side assert (``indexSelectSmallIndex: srcIndex < srcSelectDimSize``, in
# test_flex_step_has_no_host_sync) was not flex's: its third row (28 + 3 tokens: segment position 15,
# KV length 23 = Lmax - 1) was one token from its segment's end, and those steps skip the commit
# after_step would have made there, so the second step read the RoPE table at row 24 of 24
# (``rope_table_full(Lmax).index_select(0, length)``) and would have written k/v at position 24 and
# write_h at segment position 16; the masked step does the same (on CPU: IndexError). The block mask
# is in range at that shape (test_block_mask_indices_are_in_range). Hence: every row has room for
# those steps (checked by _assert_room), at the same awkward shape (Lmax 24 = kv_window 8 + 16, blocks of
# 16: the last block partial) and lengths that reach a block edge (visible keys 16) and Lmax - 1.
ROOM_STEPS = 4
ROOM_HISTORY = (0, 17, 25)  # + 3 prompt tokens: KV lengths 3, 12 (.. 15) and 20 (.. 23 = Lmax - 1)


def _assert_room(rb, steps):
    """Every occupied row of ``rb`` can take ``steps`` tokens before its segment is full: a step
    past it without the commit indexes the RoPE table, k/v and write_h out of range."""
    for i, meta in enumerate(rb.rows):
        if meta is not None:
            assert meta.seg_pos + steps <= rb.segment_len, f"row {i} at segment position {meta.seg_pos}"


def test_flex_steps_without_commits_equal_masked_at_block_edges(one_torch_thread):
    """The CPU mirror of test_flex_step_has_no_host_sync: the same model (kv_window 8), rows, bucket
    and kv_block 16, the same 4 steps with no after_step: flex equals masked every step, and the
    block mask of every step lists only blocks that exist and hold a key the row may see. (With that
    test's old rows, ``_states(model, 3)``, both paths raise IndexError at the second step.)"""
    model = _model(kv_window=8)
    states = _states(model, 3, ROOM_HISTORY)
    rb_f = _batch(model, states, 4, "flex", kv_block=16)
    rb_m = _batch(model, states, 4, "masked")
    _assert_room(rb_f, ROOM_STEPS)
    assert rb_f.max_len == 24 and rb_f.length[:3].tolist() == [3, 12, 20]
    with torch.no_grad():
        for t in range(ROOM_STEPS):
            _assert_mask_in_range(rb_f.length_mask().block_mask(), rb_f.length, rb_f.max_len, 16)
            lg_f, lg_m = ragged_decode_step(model, rb_f), ragged_decode_step(model, rb_m)
            torch.testing.assert_close(lg_f[:3], lg_m[:3], atol=1e-5, rtol=1e-5, msg=f"step {t}")
            rb_f.tokens.copy_(lg_m.argmax(-1))
            rb_m.tokens.copy_(lg_m.argmax(-1))
    assert rb_f.length[:3].tolist() == [7, 16, 24]  # the last row wrote key 23 = Lmax - 1


@pytest.mark.gpu
@needs_cuda
def test_flex_step_has_no_host_sync():
    """Building the block mask and the compiled flex call do not synchronise with the host (Lmax 24,
    blocks of 16; rows with room for the uncommitted steps: see ROOM_HISTORY)."""
    model = _model("cuda", kv_window=8)
    rb = _batch(model, _states(model, 3, ROOM_HISTORY), 4, "flex", kv_block=16)
    _assert_room(rb, ROOM_STEPS)
    assert_no_host_sync(model, rb, steps=ROOM_STEPS - 1)
