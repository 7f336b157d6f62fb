"""dnc.ragged_prefill: rows of any states and prompt lengths prefill together, in one model call per
piece up to a segment boundary, and get what each gets prefilled alone: next-token logits, every
tensor of the resulting state, and the tokens decoded afterwards; across segment commits that
compress and evict, with self_read, forward_read and top-k reads; a bad row fails alone.

The GPU tests (marked ``gpu``: ``python -m pytest -m gpu tests/test_prefill_ragged.py`` on a CUDA
machine) compare the captured prefill graphs with the eager step."""

from __future__ import annotations

import pytest
import torch

from decode_helpers import history_state, prompt_ids
from dnc.config import preset
from dnc.generate import BatchDecoder, DecodeRow, SamplingParams
from dnc.model import DNC
from dnc.ragged import RaggedBatch, bucket_for
from dnc.ragged_prefill import prefill, ragged_prefill_step, token_bucket

SEG = 16
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (history seed, history length, prompt length); seed None = a fresh state
ROWS = [
    (None, 0, 1), (None, 0, 7), (None, 0, SEG - 1), (None, 0, SEG), (None, 0, 5 * SEG // 2),  # fresh
    (40, 5, 9),            # continued, stays inside its segment
    (41, 37, 20),          # seg_pos 5: crosses a boundary
    (44, 31, 16),          # seg_pos 15: its first token completes a segment
    (42, 70, 1),           # seg_pos 6, one token
    (43, 16 * 9 + 3, 30),  # a full bank: its commits compress and evict
]

CONFIGS = {
    "plain": {},
    "kv-window": {"kv_window": 8},
    "self-read": {"self_read": True, "write_importance": 1.0},
    "forward-read": {"self_read": True, "forward_read": True, "kv_window": 8},
    "forward-read-topk": {"self_read": True, "forward_read": True, "mem_topk": 12, "write_importance": 1.0},
}


def _model(device="cpu", **kw) -> DNC:
    torch.manual_seed(0)
    # small segments and banks: a few dozen tokens cross boundaries, fill L0, compress, evict
    model = DNC(preset("tiny", segment_len=SEG, l0_slots=32, l1_slots=16, l2_slots=8, **kw)).eval()
    # every weight off its initial value: the router, level/age embeddings, importance weights and
    # forward-read gates start at zero, and a path that drops one of their terms would go unseen
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.to(device)


def _states_and_prompts(model, rows=ROWS):
    states = [model.init_state(1) if seed is None else history_state(model, seed, n) for seed, n, _ in rows]
    prompts = [prompt_ids(200 + i, length) for i, (_, _, length) in enumerate(rows)]
    return states, prompts


@torch.no_grad()
def _alone(model, state, prompt):
    """``prompt`` into a copy of ``state`` through the plain model call: (state, next-token logits [V])."""
    s = state.select([0])
    x = torch.tensor([prompt], device=model.device)
    return s, model(x, state=s, last_logits_only=True, metrics=False).logits[0, -1]


def _assert_same_state(a, b, tol=1e-5):
    ea, eb = a.export(), b.export()
    assert ea.keys() == eb.keys()
    for k in ea:
        torch.testing.assert_close(ea[k].float(), eb[k].float(), atol=tol, rtol=tol, msg=k)
    assert (a.seg_pos, a.tokens_seen, a.segments) == (b.seg_pos, b.tokens_seen, b.segments)


def _pieces(seg_pos: int, n: int, max_tokens: int) -> int:
    """Calls one row needs: pieces cut at segment boundaries and at ``max_tokens``."""
    calls = 0
    while n:
        k = min(n, SEG - seg_pos, max_tokens)
        n, seg_pos, calls = n - k, (seg_pos + k) % SEG, calls + 1
    return calls


class _StaticShapes:
    """A prefill runner that calls the step with its static shapes (every KV position and view slot,
    as a captured graph does): on CPU the eager prefill cuts the unused ones instead."""

    def __init__(self, model):
        self.model = model

    def prefill_step(self, batch, tokens, counts):
        return ragged_prefill_step(self.model, batch, tokens, counts)


@pytest.mark.parametrize("shapes", ["trimmed", "static"])
@pytest.mark.parametrize("max_tokens", [256, 6])
@pytest.mark.parametrize("kw", list(CONFIGS.values()), ids=list(CONFIGS))
def test_ragged_prefill_equals_each_row_alone(kw, max_tokens, shapes):
    """Ten rows (fresh and continued states, prompts of 1 to 2.5 segments) prefilled together:
    each row's next-token logits and every tensor of its state equal prefilling it alone; the rows
    take the calls the longest needs, not one each; their commits compressed and evicted. Eager
    calls cut the KV positions and bank slots no row uses ("trimmed"); graphs keep them ("static")."""
    model = _model(**kw)
    states, prompts = _states_and_prompts(model)
    assert len({s.layout() for s in states}) == len(states) - 4  # the fresh ones share a layout, no other
    want = [_alone(model, s, p) for s, p in zip(states, prompts)]
    before = [s.export() for s in states]
    batch = RaggedBatch(model, bucket_for(len(states)))
    for i, s in enumerate(states):
        batch.insert(i, s, torch.zeros(model.config.vocab_size), model)
    runner = _StaticShapes(model) if shapes == "static" else None
    stats = prefill(model, batch, dict(enumerate(prompts)), max_tokens=max_tokens, runner=runner)
    calls = max(_pieces(s.seg_pos, len(p), max_tokens) for s, p in zip(states, prompts))
    assert stats["calls"] == calls and stats["tokens"] == sum(map(len, prompts))
    assert stats["compressed"] > 0 and stats["evicted"] > 0
    for i, (ref, logits) in enumerate(want):
        torch.testing.assert_close(batch.logits[i], logits, atol=1e-4, rtol=1e-4, msg=f"row {i}")
        _assert_same_state(batch.extract(i), ref)
    for s, b in zip(states, before):  # the callers' states were copied, not changed
        assert all(torch.equal(s.export()[k], b[k]) for k in b)


def test_padding_and_idle_rows_change_nothing():
    """The same row prefilled beside rows of other lengths (so with padding, and sitting out calls
    once its prompt is in) or alone in a batch gives the same state and logits."""
    model = _model(self_read=True, forward_read=True)
    states, prompts = _states_and_prompts(model)
    results = []
    for rows in ([6], [6, 4, 9, 0]):  # row 6 crosses a boundary; row 4 is 2.5 segments; row 0 one token
        batch = RaggedBatch(model, bucket_for(len(rows)))
        for slot, i in enumerate(rows):
            batch.insert(slot, states[i], torch.zeros(model.config.vocab_size), model)
        prefill(model, batch, {slot: prompts[i] for slot, i in enumerate(rows)}, max_tokens=8)
        results.append((batch.extract(0), batch.logits[0].clone()))
    (a, la), (b, lb) = results
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    _assert_same_state(a, b)


def _decode_rows(model, states, prompts, max_new=12, **dec_kw):
    rows = [DecodeRow(p, s.select([0]), max_new, SamplingParams(0.0)) for s, p in zip(states, prompts)]
    return rows, BatchDecoder(model, **dec_kw)


@pytest.mark.parametrize("kw", [CONFIGS["plain"], CONFIGS["forward-read-topk"]], ids=["plain", "forward-read-topk"])
def test_decoder_admits_rows_together_and_decodes_what_each_row_alone_decodes(kw):
    """BatchDecoder.add prefills every row in one admission (fewer model calls than one per row)
    and the tokens decoded afterwards, and the final states, are each row's decoded alone with the
    per-layout prefill; rows admitted while others decode join the running batch."""
    model = _model(**kw)
    states, prompts = _states_and_prompts(model)
    solo_rows, _ = _decode_rows(model, states, prompts)
    for r in solo_rows:
        dec = BatchDecoder(model, ragged_prefill=False)
        dec.add([r])
        list(dec.run())
    rows, dec = _decode_rows(model, states, prompts)
    assert dec.add(rows[:4]) == []
    assert dec.prefill_calls == 1  # four fresh rows of 1..SEG tokens: one call
    dec.step()
    dec.step()
    calls = dec.prefill_calls
    assert dec.add(rows[4:]) == []
    assert dec.prefill_calls - calls == max(_pieces(s.seg_pos, len(p), 256) for s, p in zip(states[4:], prompts[4:]))
    assert len(dec.batches) == 1  # the new rows joined the running batch
    list(dec.run())
    for r, want in zip(rows, solo_rows):
        assert r.finish_reason == want.finish_reason == "length"
        assert r.tokens == want.tokens
        _assert_same_state(r.state, want.state, tol=1e-4)


def test_fresh_rows_of_different_lengths_take_one_call_where_the_old_path_takes_one_each():
    model = _model()
    prompts = [prompt_ids(300 + i, n) for i, n in enumerate((1, 3, 7, 11, SEG - 1, SEG))]
    calls = {}
    for ragged in (True, False):
        dec = BatchDecoder(model, ragged_prefill=ragged)
        dec.add([DecodeRow(p, None, 2, SamplingParams(0.0)) for p in prompts])
        calls[ragged] = dec.prefill_calls
        dec.close()
    assert calls == {True: 1, False: len(prompts)}


def test_a_row_with_nothing_to_decode_gets_its_prefilled_state():
    model = _model(self_read=True)
    states, prompts = _states_and_prompts(model)
    rows = [DecodeRow(p, s.select([0]), 0) for s, p in zip(states, prompts)]
    BatchDecoder(model).add(rows)
    for r, s, p in zip(rows, states, prompts):
        assert r.finish_reason == "length" and r.tokens == []
        _assert_same_state(r.state, _alone(model, s, p)[0])


def test_a_bad_row_fails_alone_and_the_callers_states_stay_as_they_were():
    """A row whose state belongs to another model and a row with an out-of-vocabulary prompt fail
    (finish_reason "error"); the other rows prefill together and decode what they decode alone.
    A cancelled row leaves its caller's state untouched."""
    model = _model()
    other = DNC(preset("tiny", d_model=64, segment_len=SEG, l0_slots=32, l1_slots=16, l2_slots=8)).eval()
    states, prompts = _states_and_prompts(model)
    good = [0, 4, 6, 9]
    want, _ = _decode_rows(model, [states[i] for i in good], [prompts[i] for i in good])
    for r in want:
        dec = BatchDecoder(model, ragged_prefill=False)
        dec.add([r])
        list(dec.run())
    rows, dec = _decode_rows(model, [states[i] for i in good], [prompts[i] for i in good])
    foreign = DecodeRow(prompts[1], history_state(other, 7, 9), 5)
    bad_ids = DecodeRow([1, 2, 999], None, 5)
    failed = dec.add([rows[0], foreign, rows[1], bad_ids, rows[2], rows[3]])
    assert set(map(id, failed)) == {id(foreign), id(bad_ids)}
    assert foreign.finish_reason == "error" and bad_ids.finish_reason == "error"
    list(dec.run())
    for r, w in zip(rows, want):
        assert r.tokens == w.tokens
        _assert_same_state(r.state, w.state, tol=1e-4)
    keep = states[6].select([0])
    before = keep.export()
    row = DecodeRow(prompts[6], keep, 5)
    dec = BatchDecoder(model)
    dec.add([row])
    dec.step()
    dec.close()
    assert row.finish_reason == "cancelled"
    assert all(torch.equal(keep.export()[k], before[k]) for k in before)


def test_token_buckets():
    assert [token_bucket(n) for n in (1, 8, 9, 100, 256, 257, 1000)] == [8, 8, 16, 128, 256, 512, 1024]


# ================================================================================== CUDA graphs
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kw", [CONFIGS["plain"], CONFIGS["self-read"]], ids=["plain", "self-read"])
def test_prefill_graphs_equal_the_eager_step(kw):
    """The same admissions three times through DecodeGraphs (warm-up, capture, replays) on the
    runner's reused batches, for two (rows, tokens) buckets: logits and states equal the eager
    prefill, and replays happened."""
    from dnc.cuda_graphs import DecodeGraphs

    model = _model("cuda", **kw)
    runner = DecodeGraphs(model)
    states, prompts = _states_and_prompts(model)
    for rows, max_tokens in ((list(range(len(ROWS))), 8), ([0, 1, 5], 32)):
        eager = RaggedBatch(model, bucket_for(len(rows)))
        for slot, i in enumerate(rows):
            eager.insert(slot, states[i], torch.zeros(model.config.vocab_size, device="cuda"), model)
        prefill(model, eager, {slot: prompts[i] for slot, i in enumerate(rows)}, max_tokens=max_tokens)
        for _ in range(3):
            batch = runner.acquire(bucket_for(len(rows)))
            for slot, i in enumerate(rows):
                batch.insert(slot, states[i], torch.zeros(model.config.vocab_size, device="cuda"), model)
            prefill(model, batch, {slot: prompts[i] for slot, i in enumerate(rows)}, max_tokens=max_tokens,
                    runner=runner)
            torch.testing.assert_close(batch.logits[:len(rows)], eager.logits[:len(rows)], atol=1e-4, rtol=1e-4)
            for slot in range(len(rows)):
                _assert_same_state(batch.extract(slot), eager.extract(slot), tol=1e-4)
            runner.release(batch)
    assert runner.prefill_replays > 0 and any(k[0] == "prefill" for k in runner.graphs)


@pytest.mark.gpu
@needs_cuda
def test_decoder_with_graphs_decodes_what_the_eager_decoder_decodes():
    model = _model("cuda")
    states, prompts = _states_and_prompts(model)
    results = []
    for graphs in (False, True):
        model.enable_cuda_graphs(graphs)
        for _ in range(1 + 2 * graphs):  # with graphs: warm-up, capture, replay
            rows, dec = _decode_rows(model, states, prompts)
            dec.add(rows)
            list(dec.run())
        results.append(rows)
    assert model.decode_runner.prefill_replays > 0
    for a, b in zip(*results):
        assert a.tokens == b.tokens
        _assert_same_state(a.state, b.state, tol=1e-4)
    model.enable_cuda_graphs(False)


def test_a_prompt_longer_than_one_ragged_call_goes_segment_by_segment():
    """Short prompts share one ragged call; a prompt over ``prefill_tokens`` takes the per-layout
    forward (one call per segment piece, whole segments graphable) instead of a ragged call per
    ``prefill_tokens`` tokens; every row decodes what it decodes alone."""
    model = _model()
    prompts = [prompt_ids(400, 3), prompt_ids(401, 6), prompt_ids(402, 2 * SEG + 5)]
    solo = []
    for p in prompts:
        dec = BatchDecoder(model, ragged_prefill=False)
        row = DecodeRow(p, None, 6, SamplingParams(0.0))
        dec.add([row])
        list(dec.run())
        solo.append(row.tokens)
    dec = BatchDecoder(model, prefill_tokens=8)
    rows = [DecodeRow(p, None, 6, SamplingParams(0.0)) for p in prompts]
    assert dec.add(rows) == []
    # one ragged call for the two short rows + three pieces (SEG, SEG, 5) for the long one; ragged
    # calls of 8 tokens would have taken ceil(37 / 8) = 5 for it
    assert dec.prefill_calls == 1 + 3
    list(dec.run())
    assert [r.tokens for r in rows] == solo
