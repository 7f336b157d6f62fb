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


def _states(model, n):
    """Rows at different positions (fresh, mid-segment, past several boundaries) with next logits."""
    out = []
    for i in range(n):
        st = model.init_state(1) if i == 0 else history_state(model, 30 + i, 13 * i + 2)
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


@pytest.mark.gpu
@needs_cuda
def test_flex_step_has_no_host_sync():
    """Building the block mask and the compiled flex call do not synchronise with the host."""
    model = _model("cuda", kv_window=8)
    rb = _batch(model, _states(model, 3), 4, "flex", kv_block=16)
    assert_no_host_sync(model, rb)
