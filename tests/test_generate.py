"""dnc.generate: sampling that no value can crash, and the batched decode loop (batched ==
sequential, rows of different states never mix, across segment boundaries, compressions and
evictions; one row's failure fails that row alone)."""

from __future__ import annotations

import pytest
import torch

from dnc.config import preset
from dnc.generate import BatchDecoder, DecodeRow, SamplingParams, sample_next, sample_rows
from dnc.model import DNC
from decode_helpers import history_state, prompt_ids, solo

SEG = 16


@pytest.fixture(scope="module")
def model() -> DNC:
    torch.manual_seed(0)
    # small segments and banks: a few dozen tokens cross segment boundaries, fill L0, compress, evict
    return DNC(preset("tiny", segment_len=SEG, l0_slots=32, l1_slots=16, l2_slots=8)).eval()






def _assert_same_state(a, b):
    ea, eb = a.export(), b.export()
    assert ea.keys() == eb.keys()
    for k in ea:
        torch.testing.assert_close(ea[k].float(), eb[k].float(), atol=1e-5, rtol=1e-5, msg=k)


# ------------------------------------------------------------------------------------ sampling
def test_sampling_edge_values_never_crash():
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    best = int(logits.argmax())
    for t in (0.0, -1.0, 1e-9, float("nan"), float("-inf"), "hot", None):
        assert sample_next(logits, temperature=t) == best  # below the floor / not a number: greedy
    for k in (-5, 0, 1, 49, 50, 10**9, float("nan"), True):
        for p in (-1.0, 0.0, 0.5, 1.0, 2.0, float("nan")):
            tok = sample_next(logits, temperature=1.0, top_k=k, top_p=p)
            assert 0 <= tok < 50
    assert sample_next(logits, temperature=1.0, top_k=1) == best
    assert sample_next(logits, temperature=1.0, top_p=0.0) == best  # keeps the top token only
    for bad in (torch.full((1, 50), float("nan")), torch.full((1, 50), float("-inf")),
                torch.tensor([[float("inf")] + [0.0] * 49])):
        assert 0 <= sample_next(bad, temperature=1.0) < 50
        assert 0 <= sample_next(bad, temperature=0.0) < 50
        assert all(0 <= t < 50 for t in sample_rows(bad.expand(3, 50), [SamplingParams(1.0)] * 3, [None] * 3))


def test_seeded_sampling_is_reproducible_and_rows_match_sample_next():
    logits = torch.randn(4, 40)
    params = [SamplingParams(0.0), SamplingParams(0.9), SamplingParams(0.7, top_k=5), SamplingParams(1.2, top_p=0.8)]

    def gens():
        return [torch.Generator().manual_seed(10 + i) for i in range(4)]
    a = sample_rows(logits, params, gens())
    assert a == sample_rows(logits, params, gens())
    want = [sample_next(logits[i:i + 1], p.temperature, p.top_k, p.top_p, g) for i, (p, g) in enumerate(zip(params, gens()))]
    assert a == want
    # top-k keeps only the k most likely tokens
    top5 = set(logits[2].topk(5).indices.tolist())
    g = torch.Generator().manual_seed(0)
    assert all(sample_next(logits[2], 5.0, 5, 1.0, g) in top5 for _ in range(50))


# ------------------------------------------------------------------------------------ decode loop
def _rows(model, sampling: list[SamplingParams], seeds: list[int | None]):
    """Rows of mixed kinds: fresh states with equal prompt lengths (one prefill batch), a fresh state
    with another length, and sessions with histories, two of them of equal layout."""
    specs = [  # (prompt seed, prompt len, history seed or None, history len, max_new)
        (1, 9, None, 0, 40), (2, 9, None, 0, 25), (3, 13, None, 0, 40),
        (4, 5, 40, 37, 40), (5, 5, 41, 37, 33), (6, 7, 42, 70, 40),
    ]
    rows = []
    for (ps, pn, hs, hn, mx), sp, seed in zip(specs, sampling, seeds):
        rows.append(dict(prompt_ids=prompt_ids(ps, pn), state=None if hs is None else history_state(model, hs, hn),
                         max_new_tokens=mx, sampling=sp, seed=seed))
    return rows


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_batched_equals_sequential_across_segments_compressions_and_evictions(model, mode):
    if mode == "greedy":
        sampling, seeds = [SamplingParams(0.0)] * 6, [None] * 6
    else:
        sampling = [SamplingParams(0.8), SamplingParams(1.0, top_k=20), SamplingParams(0.9, top_p=0.9),
                    SamplingParams(1.1), SamplingParams(0.7, top_k=8, top_p=0.95), SamplingParams(0.0)]
        seeds = [11, 12, 13, 14, 15, None]
    alone = [solo(model, kw) for kw in _rows(model, sampling, seeds)]
    rows = [DecodeRow(**kw) for kw in _rows(model, sampling, seeds)]
    dec = BatchDecoder(model)
    assert dec.add(rows) == []
    assert dec.batch_sizes() == [6]  # every row in one model call, whatever its layout (dnc.ragged)
    seen: dict[int, list[int]] = {}
    for st in dec.run():
        seen.setdefault(id(st.row), []).append(st.token)
    for s, r in zip(alone, rows):
        assert r.tokens == s.tokens and seen[id(r)] == r.tokens
        assert r.finish_reason == s.finish_reason == "length" and len(r.tokens) == r.max_new_tokens
        if r.state is not None:
            _assert_same_state(r.state, s.state)
            assert r.state.tokens_seen == s.state.tokens_seen
    long_row = rows[5].state
    assert long_row.segments >= 6  # the decode crossed segment boundaries ...
    assert any(b.sizes[2] > 0 for _, b in long_row.banks())  # ... and compressed into L2
    state = history_state(model, 7, SEG * 12)
    assert sum(float(b.valid[:, sum(b.sizes[:2]):].sum()) for _, b in state.banks()) > 0


def test_library_generate_is_the_decoder(model):
    p = prompt_ids(9, 20)
    s1, s2 = model.init_state(1), model.init_state(1)
    a = model.generate(p, state=s1, max_new_tokens=30, temperature=0.0)
    b = solo(model, dict(prompt_ids=p, state=s2, max_new_tokens=30, sampling=SamplingParams(0.0)))
    assert a == b.tokens
    _assert_same_state(s1, s2)
    assert s1.tokens_seen == 50  # the prompt and every emitted token, the last one too


def test_rows_of_different_states_never_mix(model):
    """Two sessions of equal layout decoded in one batch: the first row's tokens and final state
    do not depend on what the other row's session holds."""
    results = []
    for other_seed in (50, 51):
        a = DecodeRow(prompt_ids(20, 6), history_state(model, 30, 45), 30, SamplingParams(0.0))
        b = DecodeRow(prompt_ids(21, 6), history_state(model, other_seed, 45), 30, SamplingParams(0.0))
        dec = BatchDecoder(model)
        dec.add([a, b])
        assert dec.batch_sizes() == [2]
        list(dec.run())
        results.append((a, b))
    (a1, b1), (a2, b2) = results
    assert a1.tokens == a2.tokens
    _assert_same_state(a1.state, a2.state)
    e1, e2 = b1.state.export(), b2.state.export()
    assert any(not torch.equal(e1[k], e2[k]) for k in e1)  # the other row's sessions really differ
    alone = solo(model, dict(prompt_ids=prompt_ids(20, 6), state=history_state(model, 30, 45), max_new_tokens=30,
                              sampling=SamplingParams(0.0)))
    assert alone.tokens == a1.tokens
    _assert_same_state(alone.state, a1.state)


def test_finished_rows_leave_and_stop_conditions(model):
    p = prompt_ids(60, 8)
    free = solo(model, dict(prompt_ids=p, max_new_tokens=20, sampling=SamplingParams(0.0))).tokens
    stop_tok = free[4]
    rows = [DecodeRow(p, None, 20, SamplingParams(0.0), stop_tokens=frozenset({stop_tok})),
            DecodeRow(p, None, 20, SamplingParams(0.0), stop_check=lambda t, n=[0]: n.__setitem__(0, n[0] + 1) or n[0] == 3),
            DecodeRow(p, None, 2, SamplingParams(0.0)),
            DecodeRow(p, None, 0, SamplingParams(0.0)),
            DecodeRow(p, None, 20, SamplingParams(0.0))]
    dec = BatchDecoder(model)
    dec.add(rows)
    sizes = []
    while dec.running:
        sizes.append(sum(dec.batch_sizes()))
        dec.step()
    first = free.index(stop_tok)
    assert rows[0].tokens == free[:first + 1] and rows[0].finish_reason == "eos"
    assert rows[1].tokens == free[:3] and rows[1].finish_reason == "stop"
    assert rows[2].tokens == free[:2] and rows[2].finish_reason == "length"
    assert rows[3].tokens == [] and rows[3].finish_reason == "length"
    assert rows[4].tokens == free
    assert sizes[0] == 4 and sizes[-1] == 1 and sizes == sorted(sizes, reverse=True)


def test_one_rows_failure_fails_that_row_alone(model):
    p = prompt_ids(70, 8)
    want = solo(model, dict(prompt_ids=p, max_new_tokens=12, sampling=SamplingParams(0.0))).tokens

    def boom(tok):
        raise RuntimeError("stop check broke")
    bad_ids = DecodeRow([1, 2, 10_000], None, 5)
    empty = DecodeRow([], None, 5)
    bad_check = DecodeRow(p, None, 12, SamplingParams(0.0), stop_check=boom)
    good = DecodeRow(p, None, 12, SamplingParams(0.0))
    wrong_batch = DecodeRow(p, model.init_state(2), 5)
    dec = BatchDecoder(model)
    failed = dec.add([bad_ids, empty, bad_check, good, wrong_batch])
    assert failed == [bad_ids, empty, wrong_batch]
    assert "prompt token ids must be ints in [0, 272)" in str(bad_ids.error)
    assert "at least one token" in str(empty.error)
    list(dec.run())
    assert bad_check.finish_reason == "error" and "stop check broke" in str(bad_check.error)
    assert len(bad_check.tokens) == 1
    assert good.tokens == want and good.finish_reason == "length"
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([], max_new_tokens=3)


def test_max_batch_caps_rows_per_model_call(model):
    p = prompt_ids(80, 10)
    want = solo(model, dict(prompt_ids=p, max_new_tokens=6, sampling=SamplingParams(0.0))).tokens
    rows = [DecodeRow(p, None, 6, SamplingParams(0.0)) for _ in range(5)]
    dec = BatchDecoder(model, max_batch=2)
    dec.add(rows)
    assert sorted(dec.batch_sizes()) == [1, 2, 2]
    list(dec.run())
    assert all(r.tokens == want for r in rows) and dec.max_batch == 2


def test_forced_tokens_replay_a_sampled_row_exactly(model):
    """``DecodeRow.forced`` (replaying a logged session turn) emits the logged tokens and leaves the
    state the sampled row left, across segment boundaries and bank evictions, bit for bit on CPU."""
    from dnc.state import state_to_bytes

    served = history_state(model, 5, 40)
    replayed = history_state(model, 5, 40)
    row = solo(model, dict(prompt_ids=prompt_ids(6, 9), state=served, max_new_tokens=30,
                            sampling=SamplingParams(temperature=1.0), seed=11))
    assert len(row.tokens) == 30
    again = solo(model, dict(prompt_ids=prompt_ids(6, 9), state=replayed, max_new_tokens=30,
                              forced=list(row.tokens), sampling=SamplingParams(temperature=1.0), seed=99))
    assert again.tokens == row.tokens and again.finish_reason == "length"
    assert state_to_bytes(replayed) == state_to_bytes(served)
    short = solo(model, dict(prompt_ids=prompt_ids(6, 9), max_new_tokens=30, forced=row.tokens[:4]))
    assert short.tokens == row.tokens[:4]  # the row ends with its forced tokens
